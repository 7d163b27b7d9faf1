"""The vision encoder's ONNX graph: `onnx/vision_encoder{suffix}.onnx` beside the decoder's.

Traced once per activation dtype with any number of patches and images (graphs/vision.py computes
the layout from `image_grid_thw` in the graph); the float variant is that trace re-saved, a
quantized one the same MatMulNBits transform as the decoder (quant/onnx_weights.py) under the
vision predicate (quant/schemes.py `vision_bits_for`).
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import torch
from torch.export import Dim

from exporter.onnx.trace import _describe, _trace, name_nodes_and_strip_trace_metadata, save_graph
from graphs.io_spec import IMAGES, PATCHES, vision_spec
from graphs.vision import VisionEncoder
from quant.onnx_weights import quantize_projections
from quant.schemes import QuantOptions, Scheme

# Trace-time grids: two images of different sizes (40 patches), so no axis is specialised.
TRACE_GRID = ((1, 4, 6), (1, 2, 8))

FLOAT_NAME = "vision.onnx"


def trace_vision(encoder: VisionEncoder) -> ir.Model:
    dtype = {torch.float32: "float32", torch.float16: "float16"}[encoder.pos_embed.weight.dtype]
    spec = vision_spec(encoder.cfg, dtype)
    grid = torch.tensor(TRACE_GRID, dtype=torch.int64)
    pixels = torch.zeros(int(grid.prod(-1).sum()), encoder.cfg.patch_dim, dtype=torch.float32)
    dynamic = [{0: Dim(PATCHES)}, {0: Dim(IMAGES)}]
    graph = _trace(encoder, (pixels, grid), spec, dynamic)
    _describe(graph, spec, "Qwen3.5 vision tower: pixel patches + grid -> image features (qwen-edge)")
    return graph


def write_vision_variant(float_dir: Path, scheme: Scheme, out_dir: Path, opts: QuantOptions) -> str:
    """Write the scheme's vision encoder from the traced float graph; returns its path in the export."""
    graph = ir.load(float_dir / FLOAT_NAME)
    if scheme.weight_bits is not None:
        quantize_projections(graph, scheme, opts, bits_for=scheme.vision_bits_for)
    name_nodes_and_strip_trace_metadata(graph)
    save_graph(graph, out_dir / scheme.vision_file)
    return scheme.vision_file
