"""Core ML weight compression of a converted mlprogram, for the schemes of quant/schemes.py.

    q8      int8 per output channel          q4, q4f16   int4 per block of 32 input channels
    p4      4-bit palettization: a 16-entry k-means LUT per group of 16 output channels

Which weights: the scheme's `bits_for`, the predicate the ONNX exporter uses too, asked with the
decoder parameter each weight constant of the program was converted from (coremltools names those
constants after the exported program's parameters). Everything else stays float.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from graphs.config import TextConfig, VisionConfig
from quant.schemes import Scheme

PALETTE_GROUP = 16  # output channels sharing one LUT
INT4_BLOCK = 32
# torch.export lifts parameter `model.X.Y` of the step module as `p_model_X_Y`; the fp16-compute pass
# appends `_to_fp16`, and compression names the decoding op after the constant it replaced.
_PARAM_PREFIX = "p_model_"
_SUFFIXES = ("_palettized", "_quantized", "_to_fp16")


@lru_cache(maxsize=8)
def _constant_names(cfg: TextConfig) -> dict[str, str]:
    from graphs.checkpoint import expected_shapes

    names = {_PARAM_PREFIX + name.replace(".", "_"): name for name in expected_shapes(cfg)}
    names[_PARAM_PREFIX + "lm_head_weight"] = "lm_head.weight"  # a tied table is lifted under the head's name
    return names


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


def compress_weights(mlmodel, scheme: Scheme, cfg: TextConfig):  # noqa: ANN001, ANN201
    """The scheme's weight compression applied to a converted mlprogram (float schemes: unchanged)."""
    if scheme.coreml == "float":
        return mlmodel
    chosen = {const: scheme.bits_for(param) for const, param in weight_constants(mlmodel, cfg).items()}
    return _compress(mlmodel, scheme, {const: bits for const, bits in chosen.items() if bits})


def _compress(mlmodel, scheme: Scheme, chosen: dict[str, int]):  # noqa: ANN001, ANN202
    """Compress the named weight constants (const op name -> bits) as the scheme says."""
    from coremltools.optimize import coreml as cto

    if scheme.coreml == "float" or not chosen:
        return mlmodel

    def op_config(bits: int) -> object:  # weight_threshold 1: the predicate, not the size, decides
        if scheme.coreml == "palette4":
            return cto.OpPalettizerConfig(mode="custom", lut_function=kmeans_lut, granularity="per_grouped_channel",
                                          group_size=PALETTE_GROUP, weight_threshold=1)
        if bits == 8:
            return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                               weight_threshold=1)
        return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                           block_size=INT4_BLOCK, weight_threshold=1)

    config = cto.OptimizationConfig(op_name_configs={const: op_config(bits) for const, bits in chosen.items()})
    if scheme.coreml == "palette4":
        return cto.palettize_weights(mlmodel, config)
    return cto.linear_quantize_weights(mlmodel, config)


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


def compress_vision_weights(mlmodel, scheme: Scheme, cfg: VisionConfig):  # noqa: ANN001, ANN201
    """The scheme's compression of a converted vision function, under the vision predicate."""
    chosen = {const: scheme.vision_bits_for(param) for const, param in vision_weight_constants(mlmodel, cfg).items()}
    return _compress(mlmodel, scheme, {const: bits for const, bits in chosen.items() if bits})
