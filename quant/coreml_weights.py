"""Core ML weight compression of a converted mlprogram, for the schemes of quant/schemes.py.

    q8      int8 per output channel          q4, q4f16   int4 per block of 32 input channels
    p4      4-bit palettization: a 16-entry k-means LUT per group of 16 output channels, the LM head
            (and tied embedding) 6-bit with a 64-entry LUT per row, as its recipe says
    q4mix   per family, as its recipe says: int8 per output channel, int4 per block of its size

Which weights, in which format: the scheme's `weight_format`, the one answer the ONNX exporter uses
too, asked with the decoder parameter each weight constant of the program was converted from
(coremltools names those constants after the exported program's parameters). Everything else stays
float. Core ML's blocks must divide the input dimension (coremltools skips the weight otherwise), so
a block that does not is halved until it does (the default model's 352-wide MLP: 64 -> 32).

int4 blocks are rounded by ONNX Runtime's symmetric quantizer, not coremltools' own: the block's
largest-magnitude weight maps to -8, so all 16 levels are used (coremltools' symmetric mode uses
-7..7, a 14 % coarser step that measured KL 3.6e-3 against 2.1e-3 on the default model). Core ML
and ONNX then store the same integers and scales for a weight of the same format.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache, partial

import numpy as np

from graphs.config import TextConfig, VisionConfig
from quant.schemes import FAMILIES, PALETTE_GROUP, QuantOptions, Scheme, WeightFormat, family_of

INT4_BLOCK = 32
# torch.export lifts parameter `model.X.Y` of the step module as `p_model_X_Y`; the fp16-compute pass
# appends `_to_fp16`, and compression names the decoding op after the constant it replaced.
_PARAM_PREFIX = "p_model_"
_SUFFIXES = ("_palettized", "_quantized", "_to_fp16")


@lru_cache(maxsize=8)
def _constant_names(cfg: TextConfig) -> dict[str, str]:
    return {_PARAM_PREFIX + name.replace(".", "_"): name for name in lifted_shapes(cfg)}


def lifted_shapes(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    """The shape ([out, in] for a matrix) of every decoder parameter a converted program may hold as a
    constant: the checkpoint's, and the LM head, which a tied model's program holds its table under."""
    from graphs.checkpoint import expected_shapes

    shapes = expected_shapes(cfg)
    shapes.setdefault("lm_head.weight", shapes["embed_tokens.weight"])
    return shapes


def param_of_constant(op_name: str, cfg: TextConfig) -> str | None:
    """The decoder parameter a weight constant (or its decoding op) of a converted program holds."""
    for suffix in _SUFFIXES:
        op_name = op_name.removesuffix(suffix)
    return _constant_names(cfg).get(op_name)


def weight_constants(mlmodel, cfg: TextConfig) -> dict[str, str]:  # noqa: ANN001
    """{const op name: decoder parameter name} of every parameter constant in the converted program."""
    found = {}
    for function in mlmodel._mil_program.functions.values():
        for op in function.operations:
            if op.op_type == "const" and (param := param_of_constant(op.name, cfg)) is not None:
                found[op.name] = param
    return found


def coreml_format(scheme: Scheme, param: str, shape: tuple[int, ...]) -> WeightFormat | None:
    """How Core ML stores a decoder parameter of `shape` ([out, in]): int8 per output channel (block
    None), int4 per block of the scheme's size halved until it divides the input dimension, a palette
    per group of output channels (block None); None when it stays float."""
    return _coreml_storage(scheme, scheme.weight_format(param, QuantOptions(INT4_BLOCK)), shape)


def _coreml_storage(scheme: Scheme, fmt: WeightFormat | None, shape: tuple[int, ...]) -> WeightFormat | None:
    """A weight format as Core ML stores it for a weight of `shape` (see `coreml_format`)."""
    if fmt is None:
        return None
    if scheme.coreml == "palette":
        return WeightFormat(fmt.bits, fmt.block_size)  # LUT index bits, output channels per LUT
    if fmt.bits == 8:
        return WeightFormat(fmt.bits)
    block = fmt.block_size
    while shape[-1] % block:
        block //= 2
    return WeightFormat(fmt.bits, block)


def family_formats(scheme: Scheme, cfg: TextConfig) -> dict[str, dict | None]:
    """{family: {"bits", "block_size"} or None} as this scheme's package stores them (the manifest's record)."""
    from graphs.checkpoint import expected_shapes

    formats = {}
    for param, shape in expected_shapes(cfg).items():
        if (family := family_of(param)) is not None:
            fmt = coreml_format(scheme, param, shape)
            formats[family] = None if fmt is None else {"bits": fmt.bits, "block_size": fmt.block_size}
    return {family: formats[family] for family in FAMILIES if family in formats}


def kmeans_lut(values: np.ndarray, nbits: int = 4, iterations: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """1-D k-means (Lloyd, quantile start) of a weight group: (LUT [2^nbits], indices like values).

    coremltools' own k-means needs scikit-learn or kmeans1d; on sorted 1-D data each Lloyd step is a
    searchsorted between centroid midpoints, so NumPy alone is fast enough.
    """
    flat = values.reshape(-1).astype(np.float32)
    k = 1 << nbits
    centroids = np.quantile(flat, (np.arange(k) + 0.5) / k)
    for _ in range(iterations):
        bounds = (centroids[1:] + centroids[:-1]) / 2
        labels = np.searchsorted(bounds, flat)
        sums = np.bincount(labels, weights=flat, minlength=k)
        counts = np.bincount(labels, minlength=k)
        centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        centroids = np.sort(centroids)
    labels = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, flat)
    return centroids.astype(values.dtype), labels.reshape(values.shape).astype(np.uint8)


def int4_blocks(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(int4 values in -8..7 as int8 [N, K], scales [N, K/block] in the weight's dtype) of a weight
    [N, K] quantized in blocks along K by ONNX Runtime's packer (quant/onnx_weights.py)."""
    from quant.onnx_weights import pack_blockwise, unpack_nibbles

    n, k = weight.shape
    values, scales = np.empty((n, k), np.int8), np.empty((n, k // block), weight.dtype)
    for start in range(0, n, _INT4_ROWS):  # rows are independent: a large table is packed in row blocks
        rows = slice(start, start + _INT4_ROWS)
        packed = pack_blockwise(weight[rows].T, WeightFormat(4, block))
        values[rows] = unpack_nibbles(packed.data)[:, :k].astype(np.int8) - 8  # symmetric: stored zero point 8
        scales[rows] = packed.scales
    return values, scales


_INT4_ROWS = 8192


def _full_range_int4_pass():  # noqa: ANN202
    """coremltools' weight quantization pass class, with int4 blocks rounded by `int4_blocks`."""
    from coremltools.converters.mil.mil import types
    from coremltools.optimize import _utils as optimize_utils
    from coremltools.optimize.coreml._quantization_passes import linear_quantize_weights

    class FullRangeInt4(linear_quantize_weights):
        @classmethod
        def blockwise_compress_by_dtype(cls, original_data, dtype, mode, block_sizes):  # noqa: ANN001, ANN206
            dtype = types.string_to_builtin(dtype) if isinstance(dtype, str) else dtype
            if dtype == types.int4 and mode == "LINEAR_SYMMETRIC" and original_data.ndim == 2 and block_sizes[0] == 1:
                data, scale = int4_blocks(original_data, block_sizes[1])
                return optimize_utils.QuantParams(data=data.astype(types.nptype_from_builtin(types.int4)),
                                                  scale=scale, offset=None, nbits=np.uint8(4))
            return super().blockwise_compress_by_dtype(original_data, dtype, mode, block_sizes)

    return FullRangeInt4


def provenance(op) -> list:  # noqa: ANN001
    """The scopes that ops made in place of `op` inherit: the source's (a program converted from
    torch.export requires them of every op), not the names of the coremltools passes that touched it."""
    from coremltools.converters.mil.mil.scope import ScopeInfo, ScopeSource

    return [ScopeInfo(source=source, data=data) for source, data in op.scopes.items()
            if source != ScopeSource.COREMLTOOLS_GRAPH_PASS]


ConstFill = Callable[[object], object]  # a const op -> the const op that replaced it, holding its real values


def compression_pass(scheme: Scheme, chosen: dict[str, WeightFormat], fill: ConstFill | None = None,  # noqa: ANN201
                     reuse: dict[str, object] | None = None):
    """The coremltools pass that compresses the named weight constants (const op name -> storage format)
    as the scheme says; other constants stay float.

    With `fill`, each weight-sized const op is first handed to `fill`, which may replace it by one
    holding its real values (the placeholders of a skeleton program: exporter/coreml/skeleton.py); a
    weight stored compressed is dropped as soon as it is, so one weight's float values are in memory at
    a time. With `reuse` (int8/int4 schemes), a weight compressed by an earlier pass over another
    function of the same variant (same const name: the same parameter) takes that pass's integers and
    scales, neither read nor rounded again, and the functions hold one copy of them."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.optimize import coreml as cto
    from coremltools.optimize.coreml._quantization_passes import palettize_weights

    def op_config(fmt: WeightFormat) -> object:  # weight_threshold 1: the scheme, not the size, decides
        if scheme.coreml == "palette":
            return cto.OpPalettizerConfig(mode="custom", lut_function=partial(kmeans_lut, nbits=fmt.bits),
                                          granularity="per_grouped_channel", group_size=fmt.block_size,
                                          weight_threshold=1)
        if fmt.bits == 8:
            return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                               weight_threshold=1)
        return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                           block_size=fmt.block_size, weight_threshold=1)

    base = palettize_weights if scheme.coreml == "palette" else _full_range_int4_pass()

    reusing = reuse is not None and scheme.coreml != "palette"

    class Compress(base):
        def transform_op(self, op) -> None:  # noqa: ANN001
            self.const_name = op.name
            if fill is None:
                return super().transform_op(op)
            with mb.scope(*provenance(op)):
                if not (reusing and op.name in chosen and op.name in reuse):
                    op = fill(op)
                super().transform_op(op)
            if op.enclosing_block is None:  # compressed and removed: free its float values now, not at gc
                op.outputs[0]._sym_val = op.val._sym_val = None
            return None

        if reusing:
            def blockwise_compress_by_dtype(self, original_data, dtype, mode, block_sizes):  # noqa: ANN001, ANN202
                if self.const_name not in reuse:
                    reuse[self.const_name] = super().blockwise_compress_by_dtype(original_data, dtype, mode, block_sizes)
                return reuse[self.const_name]

    compress = Compress()
    config = cto.OptimizationConfig(op_name_configs={const: op_config(fmt) for const, fmt in chosen.items()})
    compress.set_options([PassOption("config", config), PassOption("joint_compression", False)])
    return compress


def chosen_formats(scheme: Scheme, constants: dict[str, str], cfg: TextConfig) -> dict[str, WeightFormat]:
    """{const op name: storage format} of the decoder weight constants ({const: parameter}) this scheme
    compresses (a converted const's value may be a placeholder: the shapes come from the config)."""
    shapes = lifted_shapes(cfg)
    chosen = {const: coreml_format(scheme, param, tuple(shapes[param])) for const, param in constants.items()}
    return {const: fmt for const, fmt in chosen.items() if fmt}


def _compress(mlmodel, scheme: Scheme, chosen: dict[str, WeightFormat]):  # noqa: ANN001, ANN202
    """A converted mlprogram (full weights) with the named weight constants compressed as the scheme says."""
    if scheme.coreml == "float" or not chosen:
        return mlmodel
    from coremltools.models import utils as model_utils

    return model_utils._apply_graph_pass(mlmodel, compression_pass(scheme, chosen))


# The vision tower's parameters as the fixed-size wrapper lifts them: `encoder.X.Y` -> `p_encoder_X_Y`.
_VISION_PREFIX = "p_encoder_"


def vision_weight_constants(mlmodel, cfg: VisionConfig) -> dict[str, str]:  # noqa: ANN001
    """{const op name: vision tower parameter name} of the weight constants in a converted program."""
    from graphs.vision import vision_parameter_shapes

    names = {_VISION_PREFIX + name.replace(".", "_"): name for name in vision_parameter_shapes(cfg)}
    found = {}
    for function in mlmodel._mil_program.functions.values():
        for op in function.operations:
            name = op.name
            for suffix in _SUFFIXES:
                name = name.removesuffix(suffix)
            if op.op_type == "const" and name in names:
                found[op.name] = names[name]
    return found


def _vision_format(scheme: Scheme, param: str) -> WeightFormat | None:
    """A vision parameter's format; a palette scheme's tower takes one LUT per PALETTE_GROUP channels."""
    fmt = scheme.vision_weight_format(param, QuantOptions(INT4_BLOCK))
    return WeightFormat(fmt.bits, PALETTE_GROUP) if fmt and scheme.coreml == "palette" else fmt


def compress_vision_weights(mlmodel, scheme: Scheme, cfg: VisionConfig):  # noqa: ANN001, ANN201
    """The scheme's compression of a converted vision function, under the vision predicate."""
    from graphs.vision import vision_parameter_shapes

    shapes = vision_parameter_shapes(cfg)
    chosen = {const: _coreml_storage(scheme, _vision_format(scheme, param), tuple(shapes[param]))
              for const, param in vision_weight_constants(mlmodel, cfg).items()}
    return _compress(mlmodel, scheme, {const: fmt for const, fmt in chosen.items() if fmt})
