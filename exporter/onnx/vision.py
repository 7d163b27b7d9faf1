"""The vision encoder's ONNX graph: `onnx/vision_encoder{suffix}.onnx` beside the decoder's.

Traced once per activation dtype with any number of patches and images (graphs/vision.py computes
the layout from `image_grid_thw` in the graph); the float variant is that trace re-saved, a
quantized one the same MatMulNBits transform as the decoder (quant/onnx_weights.py) under the
vision recipe (quant/schemes.py `vision_weight_format`).

The export traces the tower in a helper process (`VisionTrace`, this module's `__main__`) while it
traces the decoder: the two graphs share nothing, tracing is single-threaded Python, and the tower's
trace was 10 of the 28 s of tracing on the 0.8B shape (2026-12-03), so on two cores it costs no time.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch
from torch.export import Dim

from exporter.onnx.streamed import save_graph
from exporter.onnx.trace import _describe, _trace, name_nodes_and_strip_trace_metadata
from exporter.progress import helper_finished
from graphs.errors import QwenEdgeError
from graphs.io_spec import IMAGES, PATCHES, vision_spec
from graphs.vision import VisionEncoder
from quant.onnx_weights import quantize_projections
from quant.schemes import VISION_FALLBACK_BITS, VISION_INT4_MAX_ERROR, QuantOptions, Scheme

# Trace-time grids: two images of different sizes (40 patches), so no axis is specialised.
TRACE_GRID = ((1, 4, 6), (1, 2, 8))

FLOAT_NAME = "vision.onnx"


def trace_vision(encoder: VisionEncoder) -> ir.Model:
    dtype = {torch.float32: "float32", torch.float16: "float16"}[encoder.pos_embed.weight.dtype]
    spec = vision_spec(encoder.cfg, dtype)
    grid = torch.tensor(TRACE_GRID, dtype=torch.int64)
    pixels = torch.zeros(int(grid.prod(-1).sum()), encoder.cfg.patch_dim, dtype=torch.float32)
    dynamic = [{0: Dim(PATCHES)}, {0: Dim(IMAGES)}]
    graph = _trace(encoder, (pixels, grid), spec, dynamic, None)
    _describe(graph, spec, "Qwen3.5 vision tower: pixel patches + grid -> image features (qwen-edge)")
    return graph


class VisionTrace:
    """`trace_vision` of a checkpoint's tower in a helper process, saved as `out`/FLOAT_NAME; `wait`
    for it. The helper reads the checkpoint folder itself (the tower's weights are small beside the
    decoder's) and exits non-zero with its error on stderr, which `wait` raises as the export's error."""

    def __init__(self, folder: Path, activations: str, out: Path) -> None:
        self.log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty helper cannot block on it
        self.process = subprocess.Popen([sys.executable, "-m", __name__, str(Path(folder).resolve()), activations,
                                         str(out / FLOAT_NAME)], stdout=subprocess.DEVNULL, stderr=self.log)

    def wait(self) -> None:
        try:
            code = self.process.wait()
            helper_finished()
            if code != 0:
                self.log.seek(0)
                lines = [line for line in self.log.read().decode(errors="replace").splitlines() if line.strip()]
                last = lines[-1] if lines else f"exit code {code}"
                raise QwenEdgeError(f"tracing the vision tower failed: {last.removeprefix('error: ')}")
        finally:
            self.log.close()

    def stop(self) -> None:
        """End the helper early (the export failed elsewhere)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()


def _trace_in_helper(folder: str, activations: str, path: str) -> None:
    from graphs.checkpoint import open_checkpoint

    dtype = {"float32": torch.float32, "float16": torch.float16}[activations]
    checkpoint = open_checkpoint(folder, mtp=False)  # the tower only: an MTP head is not read
    save_graph(trace_vision(checkpoint.build_vision_encoder(dtype)), Path(path))


GATE_GRID = (1, 8, 8)  # the synthetic input the 4-bit gate is measured on


def _features(path: Path, pixels: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    grid = np.array([GATE_GRID], np.int64)
    return session.run(None, {"pixel_values": pixels, "image_grid_thw": grid})[0].astype(np.float32)


def feature_error(reference: Path, candidate: Path, patch_dim: int) -> float:
    """Relative RMS difference of two vision encoders' features on a fixed synthetic input."""
    pixels = np.random.default_rng(0).uniform(-1, 1, (int(np.prod(GATE_GRID)), patch_dim)).astype(np.float32)
    ref, got = _features(reference, pixels), _features(candidate, pixels)
    return float(np.sqrt(np.mean((got - ref) ** 2) / max(np.mean(ref ** 2), 1e-30)))


def write_vision_variant(float_dir: Path, scheme: Scheme, out_dir: Path, opts: QuantOptions, patch_dim: int) -> dict:
    """Write the scheme's vision encoder from the traced float graph; returns its manifest fields.

    A 4-bit scheme keeps 4-bit tower weights only where the features stay within
    VISION_INT4_MAX_ERROR of the float tower; otherwise the tower is stored in 8 bits."""
    target = out_dir / scheme.vision_file
    record: dict = {"vision_encoder": scheme.vision_file}
    bits = scheme.weight_bits
    while True:
        graph = ir.load(float_dir / FLOAT_NAME)
        if bits is not None:
            stored = replace(scheme, weight_bits=bits)
            quantize_projections(graph, stored, opts, lambda param: stored.vision_weight_format(param, opts))
        name_nodes_and_strip_trace_metadata(graph)
        save_graph(graph, target)
        if bits != 4:
            break
        error = feature_error(float_dir / FLOAT_NAME, target, patch_dim)
        record["vision_int4_feature_error"] = round(error, 5)
        if error <= VISION_INT4_MAX_ERROR:
            break
        bits = VISION_FALLBACK_BITS
    if bits is not None:
        record["vision_weight_bits"] = bits
    return record


if __name__ == "__main__":
    try:
        _trace_in_helper(*sys.argv[1:])
    except QwenEdgeError as error:
        sys.exit(f"error: {error}")
