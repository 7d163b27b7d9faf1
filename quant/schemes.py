"""The one table of weight schemes (`--quant` names), shared by the ONNX and Core ML exporters.

A scheme is an activation (compute) dtype plus an optional weight compression, with a quality gate.
Which weights a scheme compresses is decided by one predicate on the parameter name,
`is_compressed` (its weight family, `family_of`), for every format. File suffixes follow the onnx-community convention, so clients
that know it pick the files by name.

    name    activations  weights                         ONNX               Core ML
    fp32    float32      float                           yes                yes
    fp16    float16      float16                         yes                yes
    q8      float32      int8                            MatMulNBits 8-bit  int8 per output channel
    q4      float32      int4                            MatMulNBits 4-bit  int4 per block of 32
    q4f16   float16      int4                            MatMulNBits 4-bit  int4 per block of 32
    p4      float16      4-bit palette (6-bit LM head)   -                  k-means LUT per 16 channels (head: per row)
    q4mix   float32      int4/int8 per family (recipe)   MatMulNBits 4/8    int4 per block / int8 per channel

A scheme's `recipe` gives some weight families another format than its default (`q4mix`: measured
by exporter/bench/sensitivity.py, results in BENCHMARKS.md); `weight_format` is the one answer both
exporters ask, and each export records the answer per family in its manifest (`weight_formats`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from graphs.errors import QwenEdgeError

# Every large projection, by its module name; with the LM head and the token embedding these are
# the compressed weights. The small ones (in_proj_a, in_proj_b), norms, the conv, A_log and dt_bias
# stay float in every scheme, and the recurrent state stays fp32.
DECODER_PROJECTIONS = (
    "in_proj_qkv", "in_proj_z", "out_proj",  # Gated DeltaNet
    "q_proj", "k_proj", "v_proj", "o_proj",  # gated attention
    "gate_proj", "up_proj", "down_proj",  # MLP
)
LARGE_PROJECTIONS = (*DECODER_PROJECTIONS, "fc")  # and the MTP head's input projection (mtp.fc, [hidden, 2·hidden])
EMBEDDING_AND_HEAD = frozenset({"embed_tokens.weight", "lm_head.weight"})
# The units a recipe assigns storage formats to: the LM head with the token embedding (one table when
# tied, so one format for both) and each large projection by its module name, in every layer.
HEAD_FAMILY = "lm_head"
FAMILIES = (HEAD_FAMILY, *DECODER_PROJECTIONS)  # the decoder's (swept, recorded per variant)
RECIPE_FAMILIES = (HEAD_FAMILY, *LARGE_PROJECTIONS)  # and the MTP head's fc: what a recipe may name


def family_of(param: str) -> str | None:
    """The family of a decoder parameter (e.g. `layers.3.mlp.up_proj.weight` -> `up_proj`), or None
    for a weight no scheme compresses."""
    if param in EMBEDDING_AND_HEAD:
        return HEAD_FAMILY
    module, _, leaf = param.rpartition(".")
    name = module.rsplit(".", 1)[-1]
    return name if leaf == "weight" and name in LARGE_PROJECTIONS else None


def is_compressed(param: str) -> bool:
    """Does a scheme with weight compression compress this decoder parameter?"""
    return family_of(param) is not None


# The vision tower's large matmuls (graphs/vision.py): attention qkv and output, the block MLPs and
# the merger's MLP. The patch embedding, the learned position table and the norms stay float.
VISION_PROJECTIONS = frozenset({"qkv", "proj", "linear_fc1", "linear_fc2"})


def is_compressed_vision(param: str) -> bool:
    """Does a compressing scheme compress this vision tower parameter (e.g. `blocks.0.attn.qkv.weight`)?"""
    module, _, leaf = param.rpartition(".")
    return leaf == "weight" and module.rsplit(".", 1)[-1] in VISION_PROJECTIONS and not module.startswith("patch_embed")


# The vision tower's gate for 4-bit weights: relative RMS error of the image features against the
# float tower on a fixed synthetic input. A 4-bit scheme whose tower misses it stores the tower's
# matmuls in 8 bits instead (recorded per variant as `vision_weight_bits`).
VISION_INT4_MAX_ERROR = 0.1
VISION_FALLBACK_BITS = 8


@dataclass(frozen=True)
class WeightFormat:
    """How one compressed weight is stored: integer bits, the block of input channels sharing a scale,
    and symmetry. In a recipe the block may be None (the export's default, `--block-size` for ONNX;
    Core ML stores int8 per output channel) and the symmetry is the export's (`weight_format` sets both).
    In a palette scheme the bits are the LUT index width and the block is the group of output channels
    sharing one LUT."""

    bits: int
    block_size: int | None = None
    symmetric: bool = True

    def __str__(self) -> str:
        return f"int{self.bits}" + (f"/b{self.block_size}" if self.block_size else "")


@dataclass(frozen=True)
class QualityGate:
    """Minimum quality of a variant against the float reference on held-out text."""

    min_top1: float
    max_kl: float
    max_ppl_increase: float  # relative, 0.05 = +5 %


@dataclass(frozen=True)
class Scheme:
    name: str
    suffix: str  # onnx-community file suffix (and Core ML package suffix)
    activations: str  # "float32" | "float16": the compute dtype
    weight_bits: int | None  # None: weights stay in the activation dtype
    gate: QualityGate
    doc: str
    onnx: bool  # the ONNX exporter writes it
    coreml: str  # how Core ML stores the compressed weights (the manifest's "weights")
    # Per-family formats where they differ from `weight_bits` at the default block (None: stays float).
    recipe: tuple[tuple[str, WeightFormat | None], ...] = ()
    coreml_gate: QualityGate | None = None  # Core ML's gate where it differs from `gate`

    def __post_init__(self) -> None:
        unknown = [family for family, _ in self.recipe if family not in RECIPE_FAMILIES]
        if unknown:
            raise ValueError(f"scheme {self.name}: unknown recipe families {unknown}; use {', '.join(RECIPE_FAMILIES)}")

    def weight_format(self, param: str, opts: QuantOptions) -> WeightFormat | None:
        """The one answer, for every format and every writer (in memory or streamed), to how a decoder
        parameter is stored: its format (the recipe's block, else `opts.block_size`, the format's
        default; `opts.symmetric`), or None when it stays float."""
        family = family_of(param)
        if not self.weight_bits or family is None:
            return None
        chosen = dict(self.recipe).get(family, WeightFormat(self.weight_bits))
        if chosen is None:
            return None
        return WeightFormat(chosen.bits, chosen.block_size or opts.block_size, opts.symmetric)

    def family_formats(self, params: Iterable[str], opts: QuantOptions) -> dict[str, dict | None]:
        """{family: {"bits", "block_size"} or None (float)} for the families among `params`: what an
        export's manifest records."""
        formats = {}
        for param in params:
            if (family := family_of(param)) is not None:
                fmt = self.weight_format(param, opts)
                formats[family] = None if fmt is None else {"bits": fmt.bits, "block_size": fmt.block_size}
        return {family: formats[family] for family in FAMILIES if family in formats}

    def bits_for(self, param: str) -> int | None:
        """Stored bits of one decoder parameter's compressed weight, or None when it stays float."""
        fmt = self.weight_format(param, QuantOptions())
        return fmt.bits if fmt else None

    def gate_for(self, fmt: str) -> QualityGate:
        """The default gate of this scheme's variants in `fmt` ("onnx" | "coreml")."""
        return self.coreml_gate if fmt == "coreml" and self.coreml_gate else self.gate

    @property
    def files(self) -> tuple[str, str]:
        """(embed_tokens, decoder) ONNX graph paths inside an export folder."""
        return f"onnx/embed_tokens{self.suffix}.onnx", f"onnx/decoder_model_merged{self.suffix}.onnx"

    @property
    def mtp_file(self) -> str:
        """The MTP head's ONNX graph inside an export folder (exports of checkpoints with a head)."""
        return f"onnx/mtp{self.suffix}.onnx"

    @property
    def vision_file(self) -> str:
        """The vision encoder's ONNX graph path inside an export folder."""
        return f"onnx/vision_encoder{self.suffix}.onnx"

    def vision_bits_for(self, param: str) -> int | None:
        """Stored bits of one vision tower parameter's compressed weight, or None when it stays float."""
        return self.weight_bits if self.weight_bits and is_compressed_vision(param) else None

    def vision_weight_format(self, param: str, opts: "QuantOptions") -> WeightFormat | None:
        """How the ONNX export stores one vision tower parameter (None: float)."""
        bits = self.vision_bits_for(param)
        return None if bits is None else WeightFormat(bits, opts.block_size, opts.symmetric)

    @property
    def coreml_package(self) -> str:
        return f"coreml/model{self.suffix}.mlpackage"

    @property
    def stored_bits(self) -> int:
        """Bits per stored weight of the compressed tensors (the float dtype's width when uncompressed)."""
        return self.weight_bits or (16 if self.activations == "float16" else 32)


PALETTE_GROUP = 16  # output channels sharing one LUT in a palette scheme (p4), the LM head excepted


# Default gates, measured against the float reference on the default model's held-out text. Top-1
# agreement is volatile where the reference itself hesitates (the synthetic grammar has many
# near-equal choices: q8 measured 98.7-99.0 % top-1 with mean KL 2e-5 and no perplexity change),
# so KL and perplexity carry most of the weight for the near-lossless schemes.
SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("fp32", "", "float32", None, QualityGate(0.99, 1e-4, 0.001), "reference precision", True, "float"),
        Scheme("fp16", "_fp16", "float16", None, QualityGate(0.99, 1e-3, 0.01), "fp16 weights and activations",
               True, "float"),
        Scheme("q8", "_quantized", "float32", 8, QualityGate(0.98, 1e-3, 0.01), "int8 block-wise weights",
               True, "int8-per-channel"),
        Scheme("q4", "_q4", "float32", 4, QualityGate(0.90, 0.1, 0.05), "int4 block-wise weights", True,
               "int4-block32"),
        Scheme("q4f16", "_q4f16", "float16", 4, QualityGate(0.90, 0.1, 0.05), "int4 weights, fp16 activations",
               True, "int4-block32"),
        # Measured (BENCHMARKS.md, "Core ML quality gates"): with the LM head in a 4-bit palette too, p4
        # missed its top-1 gate (85.7 %); the head in 6 bits with one 64-entry table per row passes.
        Scheme("p4", "_p4", "float16", 4, QualityGate(0.90, 0.1, 0.05),
               "4-bit palettization (16-entry k-means LUT per group of 16 output channels; LM head and "
               "embedding 6-bit, a 64-entry LUT per row), fp16 compute", False, "palette",
               recipe=((HEAD_FAMILY, WeightFormat(6, 1)),
                       *((family, WeightFormat(4, PALETTE_GROUP)) for family in LARGE_PROJECTIONS))),
        # Measured (BENCHMARKS.md, "Int4 sensitivity"): the LM head with the tied embedding carries most of
        # int4's loss (alone at block 32: KL 1.9e-3 of q4's 2.2e-3; at block 128 it fails the gate alone),
        # the projections cost little at block 128. Cheapest candidate that meets the q4 gate: 423 MB of
        # compressed weights on the 0.8B shape against 470 MB for q4.
        Scheme("q4mix", "_q4mix", "float32", 4, QualityGate(0.90, 0.1, 0.05),
               "int4: LM head and embedding in blocks of 32, every projection in blocks of 128", True, "int4-mixed",
               recipe=((HEAD_FAMILY, WeightFormat(4, 32)),
                       *((family, WeightFormat(4, 128)) for family in LARGE_PROJECTIONS))),
    )
}
BLOCK_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantOptions:
    """How ONNX weights are quantized when a scheme asks for it (ignored by float schemes)."""

    block_size: int = 32
    symmetric: bool = True
    # MatMulNBits accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute (fastest on CPU).
    accuracy_level: int = 4

    def __post_init__(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise QwenEdgeError(f"--block-size {self.block_size} is not supported; use one of {', '.join(map(str, BLOCK_SIZES))}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise QwenEdgeError(f"--accuracy-level {self.accuracy_level} is not valid; use 0 to 4 (4 = int8 compute)")


def parse_schemes(text: str, fmt: str = "onnx") -> list[Scheme]:
    """'fp32,q4' -> the schemes `fmt` ("onnx" | "coreml") can write, in the order given, without repeats."""
    offered = [s.name for s in SCHEMES.values() if s.onnx or fmt == "coreml"]
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise QwenEdgeError("--quant is empty; give one or more of " + ", ".join(offered))
    for name in names:
        if name not in offered:
            what = "a scheme" if fmt == "onnx" else "a Core ML weight option"
            raise QwenEdgeError(f"--quant {name!r} is not {what}; choose from {', '.join(offered)}")
    return [SCHEMES[n] for n in dict.fromkeys(names)]


@dataclass(frozen=True)
class GateOverrides:
    """User overrides of default gates: {scheme: {field: value}}."""

    values: dict[str, dict[str, float]] = field(default_factory=dict)

    def gate_for(self, scheme: Scheme, fmt: str = "onnx") -> QualityGate:
        base = scheme.gate_for(fmt)
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
