"""Declarative input/output description of the exported graphs (the onnx-community Qwen3.5 layout).

One place says what each graph takes and returns: names, dims (symbolic names for dynamic axes),
dtypes and what each tensor means. The exporter, the runtime harness and the parity checker all
read it, so the names cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphs.config import TextConfig

Dim = int | str  # an int is fixed; a str names a dynamic axis


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


def state_specs(cfg: TextConfig, past: bool, dtype: str = "float32") -> list[TensorSpec]:
    """Per-layer state, in layer order: conv + recurrent for Gated DeltaNet, key + value for attention.

    past=True gives the graph inputs (`past_*`), past=False the outputs (`present_*`).
    """
    specs: list[TensorSpec] = []
    for i, layer_type in enumerate(cfg.layer_types):
        if layer_type == "linear_attention":
            conv, rec = (f"past_conv.{i}", f"past_recurrent.{i}") if past else (f"present_conv.{i}", f"present_recurrent.{i}")
            specs.append(TensorSpec(conv, ("batch_size", cfg.conv_dim, cfg.linear_conv_kernel_dim - 1), dtype,
                                    f"layer {i}: last {cfg.linear_conv_kernel_dim - 1} inputs of the causal conv"))
            specs.append(TensorSpec(rec, ("batch_size", cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                          cfg.linear_value_head_dim), "float32",
                                    f"layer {i}: gated delta-rule state S [dk, dv] per value head (always fp32)"))
        else:
            seq = "past_sequence_length" if past else "total_sequence_length"
            base = f"past_key_values.{i}" if past else f"present.{i}"
            for part in ("key", "value"):
                specs.append(TensorSpec(f"{base}.{part}", ("batch_size", cfg.num_key_value_heads, seq, cfg.head_dim),
                                        dtype, f"layer {i}: attention {part} cache"))
    return specs


def decoder_spec(cfg: TextConfig, dtype: str = "float32", all_logits: bool = False) -> GraphSpec:
    """`decoder_model_merged`: one graph for prefill (T > 1) and decode (T = 1).

    Logits cover every position only when `all_logits`; by default just the last one.
    """
    inputs = [
        TensorSpec("inputs_embeds", ("batch_size", "sequence_length", cfg.hidden_size), dtype,
                   "token embeddings from embed_tokens (or image features)"),
        TensorSpec("attention_mask", ("batch_size", "total_sequence_length"), "int64",
                   "1 for real tokens, 0 for padding, over past + current tokens"),
        TensorSpec("position_ids", (3, "batch_size", "sequence_length"), "int64",
                   "multimodal RoPE positions (time, height, width); equal rows for text"),
        *state_specs(cfg, past=True, dtype=dtype),
    ]
    outputs = [
        TensorSpec("logits", ("batch_size", "sequence_length" if all_logits else 1, cfg.vocab_size), "float32",
                   "next-token logits" + ("" if all_logits else " (last position only)")),
        *state_specs(cfg, past=False, dtype=dtype),
    ]
    return GraphSpec(tuple(inputs), tuple(outputs))


def embed_spec(cfg: TextConfig, dtype: str = "float32") -> GraphSpec:
    """`embed_tokens`: token ids to embeddings."""
    return GraphSpec(
        (TensorSpec("input_ids", ("batch_size", "sequence_length"), "int64", "token ids"),),
        (TensorSpec("inputs_embeds", ("batch_size", "sequence_length", cfg.hidden_size), dtype, "embeddings"),),
    )
