"""The sequence state of the hybrid decoder: what each layer carries from one call to the next.

This is the one description of it. The decoder's initial state, the ONNX graph inputs and outputs,
the Core ML states, the runtime's present -> past mapping, onnxruntime-genai's name patterns and the
bundle manifest's state layout are all derived from `state_tensors(cfg)`. Torch-free.

    Gated DeltaNet layer i   conv        [batch, conv_dim, K-1]              activation dtype
                             recurrent   [batch, Hv, dk, dv]                 float32 always
    attention layer i        key, value  [batch, kv_heads, length, head_dim] activation dtype
    MTP head layer j         key, value  [batch, kv_heads, length, head_dim] activation dtype

The multi-token-prediction head (graphs/mtp.py) is one more full-attention layer with its own KV
cache, carried by its own graph; its tensors are `mtp_state_tensors(cfg)`, named apart from the
decoder's so that the two caches can never be confused.
Only the attention caches grow with the sequence (their `length` axis); the recurrent state has a
fixed size, which is what makes the hybrid cheap on a phone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from graphs.config import TextConfig

Dim = int | str  # an int is fixed; a str names a dynamic axis
BATCH = "batch_size"
PAST_LENGTH = "past_sequence_length"  # the cache length a call receives
TOTAL_LENGTH = "total_sequence_length"  # the cache length it returns: past + new tokens
ACTIVATION = "activation"  # stands for the graph's activation dtype (float32 or float16)


@dataclass(frozen=True)
class StateRole:
    """One kind of state tensor: its names (`%d` is the layer index) and what it holds."""

    role: str  # "conv" | "recurrent" | "key" | "value"
    layer_type: str  # the `layer_types` entry of the layers that carry it ("mtp": the MTP head's layers)
    past_pattern: str  # ONNX graph input
    present_pattern: str  # ONNX graph output
    coreml_pattern: str  # Core ML state (registered buffer) name
    always_fp32: bool
    doc: str  # "{window}" is the conv state's width, K-1


ROLES: tuple[StateRole, ...] = (
    StateRole("conv", "linear_attention", "past_conv.%d", "present_conv.%d", "conv_%d", False,
              "last {window} inputs of the causal conv"),
    StateRole("recurrent", "linear_attention", "past_recurrent.%d", "present_recurrent.%d", "recurrent_%d", True,
              "gated delta-rule state S [dk, dv] per value head (always fp32)"),
    StateRole("key", "full_attention", "past_key_values.%d.key", "present.%d.key", "key_%d", False,
              "attention key cache"),
    StateRole("value", "full_attention", "past_key_values.%d.value", "present.%d.value", "value_%d", False,
              "attention value cache"),
)
MTP_ROLES: tuple[StateRole, ...] = (
    StateRole("key", "mtp", "past_mtp.%d.key", "present_mtp.%d.key", "mtp_key_%d", False,
              "MTP head attention key cache"),
    StateRole("value", "mtp", "past_mtp.%d.value", "present_mtp.%d.value", "mtp_value_%d", False,
              "MTP head attention value cache"),
)


@dataclass(frozen=True)
class StateTensor:
    """One state tensor of one layer."""

    layer: int
    role: StateRole
    fixed_dims: tuple[int, ...]  # the dims after batch; for a cache, `length` sits at index 1 of these
    grows: bool  # True for the attention caches

    @property
    def past_name(self) -> str:
        return self.role.past_pattern % self.layer

    @property
    def present_name(self) -> str:
        return self.role.present_pattern % self.layer

    @property
    def coreml_name(self) -> str:
        return self.role.coreml_pattern % self.layer

    @property
    def doc(self) -> str:
        return f"layer {self.layer}: " + self.role.doc.format(window=self.fixed_dims[-1])

    def dtype(self, activation: str = "float32") -> str:
        """numpy dtype name of this tensor in a graph whose activations are `activation`."""
        return "float32" if self.role.always_fp32 else activation

    def dims(self, past: bool) -> tuple[Dim, ...]:
        """Symbolic dims: as a graph input (`past`) or output; the cache axis is named for which."""
        if not self.grows:
            return (BATCH, *self.fixed_dims)
        heads, head_dim = self.fixed_dims
        return (BATCH, heads, PAST_LENGTH if past else TOTAL_LENGTH, head_dim)

    def shape(self, batch: int, length: int = 0) -> tuple[int, ...]:
        """Concrete shape; `length` is the cache length (ignored for fixed-size state)."""
        if not self.grows:
            return (batch, *self.fixed_dims)
        heads, head_dim = self.fixed_dims
        return (batch, heads, length, head_dim)


def state_tensors(cfg: TextConfig) -> list[StateTensor]:
    """Every state tensor in graph order: per layer, (conv, recurrent) or (key, value)."""
    fixed = {
        "conv": (cfg.conv_dim, cfg.linear_conv_kernel_dim - 1),
        "recurrent": (cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim),
        "key": (cfg.num_key_value_heads, cfg.head_dim),
        "value": (cfg.num_key_value_heads, cfg.head_dim),
    }
    return [StateTensor(i, role, fixed[role.role], role.layer_type == "full_attention")
            for i, layer_type in enumerate(cfg.layer_types) for role in ROLES if role.layer_type == layer_type]


def mtp_state_tensors(cfg: TextConfig) -> list[StateTensor]:
    """The MTP head's state in graph order: per MTP layer, key and value (empty without a head)."""
    fixed = (cfg.num_key_value_heads, cfg.head_dim)
    return [StateTensor(j, role, fixed, True) for j in range(cfg.mtp_num_hidden_layers) for role in MTP_ROLES]


def layer_state_layout(cfg: TextConfig) -> list[dict]:
    """Per layer, which tensors flow from an output back to an input (the bundle manifest's record)."""
    layout: list[dict] = []
    for t in state_tensors(cfg):
        if not layout or layout[-1]["layer"] != t.layer:
            layout.append({"layer": t.layer, "kind": cfg.layer_types[t.layer], "tensors": []})
        layout[-1]["tensors"].append({"input": t.past_name, "output": t.present_name, "dims": list(t.dims(past=True)),
                                      "dtype": t.dtype(), "doc": t.doc})
    return layout


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(pattern).replace("%d", r"(\d+)") + "$")


_PRESENT = [(_pattern_regex(r.present_pattern), r) for r in (*ROLES, *MTP_ROLES)]
_PAST = [_pattern_regex(r.past_pattern) for r in (*ROLES, *MTP_ROLES)]


def past_name_for(present: str) -> str:
    """The input that receives output `present` on the next call (`present.3.key` -> `past_key_values.3.key`)."""
    for regex, role in _PRESENT:
        match = regex.match(present)
        if match:
            return role.past_pattern % int(match.group(1))
    raise KeyError(f"{present!r} is not a state output")


def is_state_input(name: str) -> bool:
    return any(regex.match(name) for regex in _PAST)


def is_state_output(name: str) -> bool:
    return any(regex.match(name) for regex, _ in _PRESENT)


_FIXED_SIZE = [_pattern_regex(r.past_pattern) for r in ROLES if r.layer_type == "linear_attention"]


def is_fixed_size_state(past_name: str) -> bool:
    """True for the conv and recurrent state inputs: the same shape every call, so a runtime may let a
    call write its output over its input (the attention caches grow, so they cannot)."""
    return any(regex.match(past_name) for regex in _FIXED_SIZE)


def name_patterns(direction: str) -> dict[str, str]:
    """{role: pattern} of graph inputs ("past") or outputs ("present"), e.g. for onnxruntime-genai."""
    attr = {"past": "past_pattern", "present": "present_pattern"}[direction]
    return {r.role: getattr(r, attr) for r in ROLES}
