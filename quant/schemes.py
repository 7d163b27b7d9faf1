"""The one place that defines the export variants (`--quant` names), shared by every exporter.

A variant is an activation dtype plus an optional block-wise weight quantization. File suffixes
follow the onnx-community convention, so clients that know it pick the files by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from graphs.errors import QwenEdgeError


@dataclass(frozen=True)
class QualityGate:
    """Minimum quality of a variant against the float reference on held-out text."""

    min_top1: float
    max_kl: float
    max_ppl_increase: float  # relative, 0.05 = +5 %


@dataclass(frozen=True)
class Scheme:
    name: str
    suffix: str  # onnx-community file suffix
    activations: str  # "float32" | "float16"
    weight_bits: int | None  # None: weights stay in the activation dtype
    gate: QualityGate
    doc: str

    @property
    def files(self) -> tuple[str, str]:
        """(embed_tokens, decoder) graph paths inside an export folder."""
        return f"onnx/embed_tokens{self.suffix}.onnx", f"onnx/decoder_model_merged{self.suffix}.onnx"


# Default gates, measured against the float reference on the default model's held-out text. Top-1
# agreement is volatile where the reference itself hesitates (the synthetic grammar has many
# near-equal choices: q8 measured 98.7-99.0 % top-1 with mean KL 2e-5 and no perplexity change),
# so KL and perplexity carry most of the weight for the near-lossless schemes.
SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("fp32", "", "float32", None, QualityGate(0.99, 1e-4, 0.001), "reference precision"),
        Scheme("fp16", "_fp16", "float16", None, QualityGate(0.99, 1e-3, 0.01), "fp16 weights and activations"),
        Scheme("q8", "_quantized", "float32", 8, QualityGate(0.98, 1e-3, 0.01), "int8 block-wise weights"),
        Scheme("q4", "_q4", "float32", 4, QualityGate(0.90, 0.1, 0.05), "int4 block-wise weights"),
        Scheme("q4f16", "_q4f16", "float16", 4, QualityGate(0.90, 0.1, 0.05), "int4 weights, fp16 activations"),
    )
}
BLOCK_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantOptions:
    """How weights are quantized when a scheme asks for it (ignored by float schemes)."""

    block_size: int = 32
    symmetric: bool = True
    # MatMulNBits accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute (fastest on CPU).
    accuracy_level: int = 4

    def __post_init__(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise QwenEdgeError(f"--block-size {self.block_size} is not supported; use one of {', '.join(map(str, BLOCK_SIZES))}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise QwenEdgeError(f"--accuracy-level {self.accuracy_level} is not valid; use 0 to 4 (4 = int8 compute)")


def parse_schemes(text: str) -> list[Scheme]:
    """'fp32,q4' -> schemes, in the order given, without repeats."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise QwenEdgeError("--quant is empty; give one or more of " + ", ".join(SCHEMES))
    unknown = [n for n in names if n not in SCHEMES]
    if unknown:
        raise QwenEdgeError(f"--quant {unknown[0]!r} is not a scheme; choose from {', '.join(SCHEMES)}")
    return [SCHEMES[n] for n in dict.fromkeys(names)]


def scheme_for_suffix(suffix: str) -> Scheme:
    for scheme in SCHEMES.values():
        if scheme.suffix == suffix:
            return scheme
    raise KeyError(suffix)


@dataclass(frozen=True)
class GateOverrides:
    """User overrides of default gates: {scheme: {field: value}}."""

    values: dict[str, dict[str, float]] = field(default_factory=dict)

    def gate_for(self, scheme: Scheme) -> QualityGate:
        base = scheme.gate
        over = self.values.get(scheme.name, {})
        return QualityGate(over.get("min_top1", base.min_top1), over.get("max_kl", base.max_kl),
                           over.get("max_ppl_increase", base.max_ppl_increase))

    @classmethod
    def parse(cls, items: tuple[str, ...]) -> "GateOverrides":
        """Items like 'q4.min_top1=0.95'."""
        values: dict[str, dict[str, float]] = {}
        for item in items:
            try:
                key, raw = item.split("=", 1)
                scheme, metric = key.split(".", 1)
                value = float(raw)
            except ValueError:
                raise QwenEdgeError(f"--gate {item!r}: write SCHEME.METRIC=VALUE, e.g. q4.min_top1=0.95") from None
            if scheme not in SCHEMES or metric not in QualityGate.__dataclass_fields__:
                raise QwenEdgeError(f"--gate {item!r}: scheme must be one of {', '.join(SCHEMES)} and metric one of "
                                    f"{', '.join(QualityGate.__dataclass_fields__)}")
            values.setdefault(scheme, {})[metric] = value
        return cls(values)
