"""The vision encoder's ONNX graph: `onnx/vision_encoder{suffix}.onnx` beside the decoder's.

Traced once per activation dtype with any number of patches and images (graphs/vision.py computes
the layout from `image_grid_thw` in the graph), from one block stacked to the tower's depth as the
decoder's layers are (exporter/onnx/layer_stack.py; 4.3 s against 9.3 s for the 12 blocks of the
0.8B shape, the same ops and bit-identical features); the float variant is that trace re-saved, a
quantized one the same MatMulNBits transform as the decoder (quant/onnx_weights.py) under the
vision recipe (quant/schemes.py `vision_weight_format`).

The export traces the tower in a helper process (`VisionTrace`, this module's `__main__`) while it
traces the decoder: the two graphs share nothing and tracing is single-threaded Python, so on two
cores the tower's trace costs no time.
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
from exporter.onnx.layer_stack import NotStackable, Repeats, stack_copies, stand_in_values
from exporter.onnx.trace import _describe, _export, _optimize, _trace, name_nodes_and_strip_trace_metadata
from exporter.progress import helper_finished
from graphs.errors import QwenEdgeError
from graphs.io_spec import IMAGES, PATCHES, GraphSpec, vision_spec
from graphs.vision import VisionEncoder
from quant.onnx_weights import quantize_projections
from quant.schemes import VISION_FALLBACK_BITS, VISION_INT4_MAX_ERROR, QuantOptions, Scheme

# Trace-time grids: two images of different sizes (40 patches), so no axis is specialised.
TRACE_GRID = ((1, 4, 6), (1, 2, 8))

FLOAT_NAME = "vision.onnx"


def trace_vision(encoder: VisionEncoder, stack: bool = True) -> ir.Model:
    """The tower's graph. `stack` (the default): trace one block and stack a copy per block
    (exporter/onnx/layer_stack.py), as the decoder's layers are; False, or a template that cannot be
    stacked, traces every block."""
    dtype = {torch.float32: "float32", torch.float16: "float16"}[encoder.pos_embed.weight.dtype]
    spec = vision_spec(encoder.cfg, dtype)
    grid = torch.tensor(TRACE_GRID, dtype=torch.int64)
    pixels = torch.zeros(int(grid.prod(-1).sum()), encoder.cfg.patch_dim, dtype=torch.float32)
    dynamic = [{0: Dim(PATCHES)}, {0: Dim(IMAGES)}]
    graph = None
    if stack:
        try:
            graph = _stacked(encoder, (pixels, grid), spec, dynamic)
        except NotStackable as why:
            print(f"note: tracing every vision block ({why})", file=sys.stderr)
    if graph is None:
        graph = _trace(encoder, (pixels, grid), spec, dynamic, None)
    _describe(graph, spec, "Qwen3.5 vision tower: pixel patches + grid -> image features (qwen-edge)")
    return graph


def _stacked(encoder: VisionEncoder, args: tuple, spec: GraphSpec, dynamic: list) -> ir.Model:
    """The tower traced with one block (stand-in values, boundary markers) and stacked to its depth."""
    with torch.device("meta"):
        shell = VisionEncoder(replace(encoder.cfg, depth=1))
    shell.patch_embed, shell.pos_embed, shell.merger = encoder.patch_embed, encoder.pos_embed, encoder.merger
    shell.blocks[0].load_state_dict(stand_in_values(encoder.blocks[0], torch.Generator().manual_seed(0)),
                                    strict=True, assign=True)
    shell.block_boundary = torch.ops.qwen_edge.layer_boundary
    unoptimized = _export(shell.eval(), args, spec, dynamic, None)
    traced = _optimize(unoptimized.clone(), spec, None)
    params = dict(encoder.named_parameters())

    def block_tensor(name: str) -> ir.TensorProtocol:
        return ir.Tensor(params[name].detach().numpy(), name=name)

    def repeats(depth: int) -> Repeats:
        return Repeats("blocks", ("block",) * depth, {}, {}, None)

    return stack_copies(traced, unoptimized, repeats(1), repeats(encoder.cfg.depth), spec.input_names,
                        spec.output_names, block_tensor)


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
