"""The decoder as one fixed-shape Core ML step: state lives in buffers that the step updates in place.

Core ML states (`ct.StateType`) are traced from registered buffers written by slice assignment, so
this module wraps `Qwen35Decoder` (sharing its parameters) and keeps, per layer, the conv and
delta-rule states or a key/value cache of fixed `capacity`. In an export every shape is fixed by the
number of tokens T (the prefill chunk, or 1 for decode) and `capacity`; what varies at run time comes in as inputs:

    input_ids       [1, T] int32
    position_ids    [1, T] int32   RoPE positions; -1 marks padding (a zero embedding)
    attention_mask  [1, 1, T, capacity] fp32 additive (0 = may attend, -1e4 = may not)
    write_position  [1] int32      the cache slot of the first of the T tokens

Padding goes at the start of a sequence's first chunk: a zero embedding stays exactly zero through
every layer (norms of 0 are 0, projections have no bias), so it leaves the conv and delta-rule
states untouched; a padding row attends to its own (zero) key only.

States are fp16 (Core ML accepts no other state dtype). With `recurrent_io=True` the delta-rule
state is instead one fp32 input `recurrent_in` [linear layers, Hv, dk, dv] and output `recurrent_out`
that the caller carries between calls.

With `visual_tokens` (the image and video pad ids) the step is the prefill of an image or video
prompt: `position_ids` is the 3-row mRoPE [3, 1, T] (row 0 = -1 marks padding) and one more input

    image_features  [1, T, hidden] fp32   the vision encoder's rows at the pad tokens (other rows ignored)

replaces the embedding of every pad token, as transformers' masked_scatter does.
"""

from __future__ import annotations

import torch
from torch import nn

from graphs.qwen3_5 import Qwen35Decoder, rope_cos_sin
from graphs.recurrent_ops import MATMUL_ONLY
from graphs.state import state_tensors

STATE_DTYPE = torch.float16


class CoreMLStep(nn.Module):
    """forward(input_ids, position_ids, attention_mask, write_position[, recurrent_in][, image_features])
    -> (logits[, recurrent_out]).

    Buffers (the Core ML states) carry the names `graphs/state.py` gives them (conv_i, recurrent_i,
    key_i, value_i). The wrapped decoder must be built with the matmul-only kernels and last-position
    logits (`Checkpoint.build_decoder(kernels=MATMUL_ONLY, logits="last")`); its layers run
    unchanged, only the attention cache is written into the fixed-capacity buffers.
    """

    def __init__(self, model: Qwen35Decoder, capacity: int, recurrent_io: bool = False,
                 visual_tokens: tuple[int, ...] = ()) -> None:
        super().__init__()
        if model.kernels is not MATMUL_ONLY or model.logits_mode != "last":
            raise ValueError("CoreMLStep needs a decoder built with kernels=MATMUL_ONLY and logits='last'")
        self.model, self.capacity, self.recurrent_io = model, capacity, recurrent_io
        self.visual_tokens = tuple(visual_tokens)
        self.tensors = state_tensors(model.cfg)
        for t in self.tensors:
            if not (recurrent_io and t.role.role == "recurrent"):
                self.register_buffer(t.coreml_name, torch.zeros(t.shape(1, capacity), dtype=STATE_DTYPE))

    def reset_states(self) -> None:
        """Zero every state buffer: a fresh sequence (what Core ML's `make_state()` gives an app)."""
        for buffer in self.buffers():
            buffer.zero_()

    def recurrent_io_shape(self) -> tuple[int, ...]:
        """[linear layers, Hv, dk, dv]: every delta-rule state stacked, as `recurrent_in` / `recurrent_out`."""
        recurrent = [t for t in self.tensors if t.role.role == "recurrent"]
        return (len(recurrent), *recurrent[0].shape(1)[1:])

    def visual_prefill(self, visual_tokens: tuple[int, ...]) -> "CoreMLStep":
        """The same decoder (shared parameters, same state names) as the image/video prefill step."""
        return CoreMLStep(self.model, self.capacity, self.recurrent_io, visual_tokens).eval()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        write_position: torch.Tensor,
        recurrent_in: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        model, cfg = self.model, self.model.cfg
        t = input_ids.shape[1]  # static in an export: the prefill chunk, or 1 for decode
        rows = position_ids if self.visual_tokens else position_ids[None].expand(3, -1, -1)  # [3,1,T]
        real = (rows[0] >= 0).to(torch.float32)[..., None]  # [1,T,1]
        x = model.embed_tokens(input_ids).float()
        if self.visual_tokens:  # 1 at a pad token, else 0 (arithmetic: the converter has no boolean or)
            pad = sum((input_ids == token).to(torch.float32) for token in self.visual_tokens)[..., None]
            x = x * (1 - pad) + image_features.float() * pad
        x = x * real
        cos, sin = rope_cos_sin(cfg, rows.clamp(min=0), x.dtype)
        start = write_position[0].item()  # a dynamic slice start: Core ML slice_update at run time
        torch._check(start >= 0)
        torch._check(start + t <= self.capacity)

        def write_slots(key_cache: torch.Tensor, value_cache: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            key_cache[:, :, start : start + t] = _as_state(key)
            value_cache[:, :, start : start + t] = _as_state(value)
            return key_cache.float(), value_cache.float()

        recurrent = iter(range(len(cfg.linear_layers)))
        state = []
        for tensor in self.tensors:
            if tensor.grows:  # the cache buffer itself: write_slots updates it in place
                state.append(getattr(self, tensor.coreml_name))
            elif self.recurrent_io and tensor.role.role == "recurrent":
                n = next(recurrent)
                state.append(recurrent_in[n : n + 1])
            else:
                state.append(getattr(self, tensor.coreml_name).float())
        hidden, new_state = model.run_layers(x, torch.ones(1, t), attention_mask, cos, sin, state, write_slots)
        recurrent_out = []
        for tensor, value in zip(self.tensors, new_state):
            if tensor.grows:
                continue
            if self.recurrent_io and tensor.role.role == "recurrent":
                recurrent_out.append(value)
            else:
                getattr(self, tensor.coreml_name)[...] = value  # copy_ rounds to the fp16 buffer
        logits = model.logits(hidden)
        if self.recurrent_io:
            return logits, torch.cat(recurrent_out, dim=0)
        return (logits,)


def _as_state(x: torch.Tensor) -> torch.Tensor:
    """Round to the fp16 state dtype in eager runs; under export the converter inserts that cast
    itself (it reads states as fp32 and casts on write), so the value must stay fp32 there."""
    return x if torch.compiler.is_exporting() else x.to(STATE_DTYPE)
