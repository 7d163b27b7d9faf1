"""Core ML weight options: the `--quant` names of quant/schemes.py mapped to coremltools.optimize.coreml.

    fp32    fp32 compute, fp32 weights          fp16   fp16 compute, fp16 weights
    q8      fp32 compute, int8 per-channel      q4     fp32 compute, int4 per-block (block 32)
    q4f16   fp16 compute, int4 per-block        p4     fp16 compute, 4-bit palettization (16-entry
                                                       k-means LUT per group of 16 output channels)

Only the large projections, the embedding and the LM head are compressed: tensors no larger than
the small ones (in_proj_a/b, the conv, norms, A_log, dt_bias) stay float, as in the ONNX variants.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphs.config import TextConfig
from graphs.errors import QwenEdgeError
from quant.schemes import SCHEMES

PALETTE_GROUP = 16  # output channels sharing one LUT
INT4_BLOCK = 32


@dataclass(frozen=True)
class CoreMLScheme:
    name: str
    suffix: str  # package name suffix, as the ONNX file suffixes
    compute: str  # "float32" | "float16"
    weights: str  # "float" | "int8-per-channel" | "int4-block32" | "palette4"
    bits: int  # stored bits per compressed weight (16 or 32 for float)


COREML_SCHEMES: dict[str, CoreMLScheme] = {
    s.name: s
    for s in (
        CoreMLScheme("fp32", SCHEMES["fp32"].suffix, "float32", "float", 32),
        CoreMLScheme("fp16", SCHEMES["fp16"].suffix, "float16", "float", 16),
        CoreMLScheme("q8", SCHEMES["q8"].suffix, "float32", "int8-per-channel", 8),
        CoreMLScheme("q4", SCHEMES["q4"].suffix, "float32", "int4-block32", 4),
        CoreMLScheme("q4f16", SCHEMES["q4f16"].suffix, "float16", "int4-block32", 4),
        CoreMLScheme("p4", "_p4", "float16", "palette4", 4),
    )
}


def parse_coreml_schemes(text: str) -> list[CoreMLScheme]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise QwenEdgeError("--quant is empty; give one or more of " + ", ".join(COREML_SCHEMES))
    for name in names:
        if name not in COREML_SCHEMES:
            raise QwenEdgeError(f"--quant {name!r} is not a Core ML weight option; choose from {', '.join(COREML_SCHEMES)}")
    return [COREML_SCHEMES[n] for n in dict.fromkeys(names)]


def weight_threshold(cfg: TextConfig) -> int:
    """Element count above which a weight is compressed: just above the largest small tensor."""
    small = max(cfg.hidden_size * cfg.linear_num_value_heads, cfg.conv_dim * cfg.linear_conv_kernel_dim,
                cfg.hidden_size)
    return small + 1


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


def compress_weights(mlmodel, scheme: CoreMLScheme, cfg: TextConfig):  # noqa: ANN001, ANN201
    """The scheme's weight compression applied to a converted mlprogram (float schemes: unchanged)."""
    from coremltools.optimize import coreml as cto

    threshold = weight_threshold(cfg)
    if scheme.weights == "float":
        return mlmodel

    def only_weights(op: object) -> cto.OptimizationConfig:
        # Weights feed `linear` (projections, LM head) and `gather` (embedding); other constants
        # (causal masks, identity blocks) must stay exact.
        return cto.OptimizationConfig(op_type_configs={"linear": op, "gather": op})

    if scheme.weights == "palette4":
        op = cto.OpPalettizerConfig(mode="custom", lut_function=kmeans_lut, granularity="per_grouped_channel",
                                    group_size=PALETTE_GROUP, weight_threshold=threshold)
        return cto.palettize_weights(mlmodel, only_weights(op))
    if scheme.weights == "int8-per-channel":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                         weight_threshold=threshold)
    else:
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                         block_size=INT4_BLOCK, weight_threshold=threshold)
    return cto.linear_quantize_weights(mlmodel, only_weights(op))
