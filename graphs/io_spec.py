"""Declarative input/output description of the exported graphs (the onnx-community Qwen3.5 layout).

One place says what each graph takes and returns: names, dims (symbolic names for dynamic axes),
dtypes and what each tensor means. The state part comes from `graphs/state.py`. The exporter, the
runtime harness and the parity checker all read it, so the names cannot drift apart. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphs.config import TextConfig, VisionConfig
from graphs.state import BATCH, TOTAL_LENGTH, Dim, StateTensor, mtp_state_tensors, state_tensors

SEQUENCE = "sequence_length"  # new tokens in this call
LOGIT_POSITIONS = "logit_positions"  # positions whose logits a draftable decoder returns (input and axis)
HIDDEN_STATES = "hidden_states"  # a draftable decoder's extra output, the MTP head's input
DEFAULT_LOGIT_POSITIONS = (-1,)  # a draftable decoder's default: the last position, like the plain one


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[Dim, ...]
    dtype: str  # numpy dtype name
    doc: str


@dataclass(frozen=True)
class GraphSpec:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


def state_specs(cfg: TextConfig, past: bool, dtype: str = "float32",
                tensors: list[StateTensor] | None = None) -> list[TensorSpec]:
    """Per-layer state in graph order (the decoder's unless `tensors` is given); past=True gives the
    graph inputs, past=False the outputs."""
    return [TensorSpec(t.past_name if past else t.present_name, t.dims(past), t.dtype(dtype), t.doc)
            for t in (state_tensors(cfg) if tensors is None else tensors)]


def decoder_spec(cfg: TextConfig, dtype: str = "float32", all_logits: bool = False,
                 draftable: bool = False) -> GraphSpec:
    """`decoder_model_merged`: one graph for prefill (T > 1) and decode (T = 1).

    Logits cover every position only when `all_logits`; by default just the last one. A
    `draftable` decoder (an export with an MTP head, graphs/mtp.py) also returns the final-normed
    hidden state of every position, and without `all_logits` takes `logit_positions`, which has a
    default (the last position), so clients that do not feed it see the plain decoder.
    """
    select = draftable and not all_logits
    inputs = [
        TensorSpec("inputs_embeds", (BATCH, SEQUENCE, cfg.hidden_size), dtype,
                   "token embeddings from embed_tokens (or image features)"),
        TensorSpec("attention_mask", (BATCH, TOTAL_LENGTH), "int64",
                   "1 for real tokens, 0 for padding, over past + current tokens"),
        TensorSpec("position_ids", (3, BATCH, SEQUENCE), "int64",
                   "multimodal RoPE positions (time, height, width); equal rows for text"),
        *([TensorSpec(LOGIT_POSITIONS, (LOGIT_POSITIONS,), "int64",
                      "positions to return logits for (negative: from the end); default [-1], the last")]
          if select else []),
        *state_specs(cfg, past=True, dtype=dtype),
    ]
    logit_rows = SEQUENCE if all_logits else (LOGIT_POSITIONS if select else 1)
    outputs = [
        TensorSpec("logits", (BATCH, logit_rows, cfg.vocab_size), "float32",
                   "next-token logits" + ("" if all_logits else " (at logit_positions)" if select
                                          else " (last position only)")),
        *([TensorSpec(HIDDEN_STATES, (BATCH, SEQUENCE, cfg.hidden_size), dtype,
                      "final-normed hidden state of every position (the MTP head's input)")] if draftable else []),
        *state_specs(cfg, past=False, dtype=dtype),
    ]
    return GraphSpec(tuple(inputs), tuple(outputs))


def mtp_spec(cfg: TextConfig, dtype: str = "float32") -> GraphSpec:
    """`mtp`: the multi-token-prediction head (graphs/mtp.py) over its own KV cache.

    Row t pairs the decoder's hidden state at t with the embedding of token t+1; the logits
    (last row) draft token t+2, and the head's own hidden state of the last row drafts the next one.
    """
    tensors = mtp_state_tensors(cfg)
    inputs = [
        TensorSpec("inputs_embeds", (BATCH, SEQUENCE, cfg.hidden_size), dtype,
                   "embeddings of the tokens that follow each hidden state"),
        TensorSpec(HIDDEN_STATES, (BATCH, SEQUENCE, cfg.hidden_size), dtype,
                   "the decoder's hidden_states (or the head's own, to draft further)"),
        TensorSpec("attention_mask", (BATCH, TOTAL_LENGTH), "int64",
                   "1 for real entries, over the head's past + current entries"),
        TensorSpec("position_ids", (3, BATCH, SEQUENCE), "int64", "positions of the hidden states"),
        *state_specs(cfg, past=True, dtype=dtype, tensors=tensors),
    ]
    outputs = [
        TensorSpec("logits", (BATCH, 1, cfg.vocab_size), "float32", "draft logits (last row only)"),
        TensorSpec("mtp_hidden_states", (BATCH, 1, cfg.hidden_size), dtype,
                   "the head's hidden state of the last row (the hidden_states input to draft one more)"),
        *state_specs(cfg, past=False, dtype=dtype, tensors=tensors),
    ]
    return GraphSpec(tuple(inputs), tuple(outputs))


def embed_spec(cfg: TextConfig, dtype: str = "float32") -> GraphSpec:
    """`embed_tokens`: token ids to embeddings."""
    return GraphSpec(
        (TensorSpec("input_ids", (BATCH, SEQUENCE), "int64", "token ids"),),
        (TensorSpec("inputs_embeds", (BATCH, SEQUENCE, cfg.hidden_size), dtype, "embeddings"),),
    )


PATCHES = "num_patches"  # rows of pixel patches in this call (all images / video frame pairs)
IMAGES = "num_images"  # entries of image_grid_thw
IMAGE_TOKENS = "num_image_tokens"  # merged features: num_patches / merge²


def vision_spec(cfg: VisionConfig, dtype: str = "float32") -> GraphSpec:
    """`vision_encoder` (onnx-community / transformers.js contract; onnxruntime-genai's `vision`):
    pixel patches stay float32 in every variant; the features come out in the variant's activation
    dtype, the dtype of embed_tokens' output, since clients copy them into inputs_embeds as they are."""
    return GraphSpec(
        (TensorSpec("pixel_values", (PATCHES, cfg.patch_dim), "float32",
                    "normalised pixel patches [C·T·p·p] in merge-block order (the processor's pixel_values)"),
         TensorSpec("image_grid_thw", (IMAGES, 3), "int64", "per image or video: temporal, height, width in patches")),
        (TensorSpec("image_features", (IMAGE_TOKENS, cfg.out_hidden_size), dtype,
                    "one embedding per 2×2 block, images in order; they replace the <|image_pad|> rows"),),
    )
