"""The streamed export (weightless trace, then one pass over the checkpoint) writes the same bytes as
the in-memory export, and its weight pass holds one block of rows, not the model."""

from __future__ import annotations

import copy
import json
import os
import tracemalloc
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest
import torch

from exporter.onnx.backend import OnnxOptions, export_onnx
from exporter.onnx.external_data import external_info
from exporter.onnx.streamed import CheckpointWeight, Sink, stream_weights
from graphs.checkpoint import expected_shapes, is_placeholder, open_checkpoint
from graphs.errors import QwenEdgeError
from graphs.random_checkpoint import write_random_checkpoint
from quant.schemes import QuantOptions, WeightFormat
from tests.conftest import TINY_TEXT


def _files(folder: Path, names: set[str] | None = None) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "onnx").iterdir())
            if names is None or p.name.split(".")[0] in names}


def assert_same_files(streamed: Path, in_memory: Path) -> None:
    """Every graph and data file of `in_memory` is in `streamed` with the same bytes."""
    b = _files(in_memory)
    a = _files(streamed, {name.split(".")[0] for name in b})
    assert sorted(a) == sorted(b)
    different = [name for name in a if a[name] != b[name]]
    assert not different, f"streamed and in-memory exports differ in {different}"


def test_streamed_equals_in_memory_untied_fp16_asymmetric(tiny_checkpoints: dict[str, Path],
                                                          tiny_untied_quantized: Path, tmp_path: Path) -> None:
    """Hv = 2·Hk, untied head (the embedding packed per row), fp16 activations, asymmetric block 64:
    the q4f16 files of the streamed session fixture."""
    options = OnnxOptions("contrib", QuantOptions(64, False, 4), all_logits=True, stream_weights=False)
    reference = export_onnx(tiny_checkpoints["kv_double_untied"], tmp_path / "ref", "q4f16", options,
                            progress=False)
    assert_same_files(tiny_untied_quantized, reference)


def test_streamed_equals_in_memory_tied(default_contrib_export: Path, tmp_path: Path) -> None:
    """Tied embedding (the quantized gather shares the head's bytes), fp32 and q4: the streamed
    session export of the default model."""
    reference = export_onnx("default", tmp_path / "ref", "fp32,q4", OnnxOptions("contrib", stream_weights=False),
                            progress=False)
    assert_same_files(default_contrib_export, reference)


def _wide_config() -> dict:
    """Many layers of a wide MLP: the model is far larger than its largest tensor."""
    cfg = copy.deepcopy(TINY_TEXT)
    cfg.update(num_hidden_layers=8, intermediate_size=2048, hidden_size=128,
               layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"])
    return cfg


def _wide_sinks(ck, data: Path, reader=None) -> tuple[list[Sink], int]:
    """Every large matrix of `ck` as float32 [K, N] and as q4 (the decoder's two forms), laid out in
    `data`, read through `reader` (default: the checkpoint)."""
    fmt = WeightFormat(4, 32, True)
    sinks, offset = [], 0
    for name, shape in expected_shapes(ck.config).items():
        if not is_placeholder(name, shape) or name == "lm_head.weight":
            continue
        weight = CheckpointWeight(reader or ck, name, shape, ir.DataType.FLOAT, (1, 0))
        for tensor in (weight, *weight.packed_parts(fmt).values()):
            sinks.append(Sink(tensor, data, offset))
            offset += tensor.nbytes
    with data.open("wb") as f:
        f.truncate(offset)
    return sinks, offset


def test_weight_pass_memory_is_one_block(tmp_path: Path) -> None:
    """The pass that fills the streamed tensors peaks below the largest single tensor on the Python
    heap (numpy included), while it writes over twenty times that; and each tensor's bytes are its
    whole-tensor value. One writer: a forked second one does the same per-block work on its share."""
    ck = open_checkpoint(write_random_checkpoint(_wide_config(), tmp_path / "ck", seed=3, dtype=torch.float32))
    largest = 128 * 2048 * 4  # one MLP projection in float32
    data = tmp_path / "weights.bin"
    sinks, offset = _wide_sinks(ck, data)
    tracemalloc.start()
    try:
        stream_weights(ck, sinks, block_bytes=largest // 8, writers=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert offset > 20 * largest
    assert peak < largest, f"weight pass peaked at {peak:,} bytes (largest tensor {largest:,})"
    written = data.read_bytes()
    for sink in sinks[:: max(1, len(sinks) // 7)]:
        assert written[sink.offset : sink.offset + sink.tensor.nbytes] == sink.tensor.tobytes(), sink.tensor


def test_streamed_equals_in_memory_with_mtp_head(tiny_mtp_checkpoint: Path, tiny_mtp_export: Path,
                                                 tmp_path: Path) -> None:
    """A checkpoint with an MTP head: the draftable decoder and the `mtp` graph, float and q4, are
    streamed in the same pass (the session's export) and come out as the in-memory export writes them,
    the head reading the LM head's bytes from the decoder's data file in both; the manifests (sizes,
    fingerprints) agree."""
    streamed = tiny_mtp_export
    reference = export_onnx(tiny_mtp_checkpoint, tmp_path / "ref", "fp32,q4", OnnxOptions(stream_weights=False),
                            progress=False)
    assert_same_files(streamed, reference)
    assert {"mtp.onnx", "mtp_q4.onnx"} <= set(_files(streamed))
    variants = json.loads((streamed / "qwen_edge.json").read_text())["variants"]
    assert variants == json.loads((reference / "qwen_edge.json").read_text())["variants"]
    for variant in variants.values():
        mtp = onnx.load(str(streamed / variant["mtp"]), load_external_data=False)
        locations = {external_info(t)["location"] for t in mtp.graph.initializer
                     if t.data_location == onnx.TensorProto.EXTERNAL}
        assert Path(variant["decoder"]).name + "_data" in locations  # the shared LM head


def test_two_writers_write_the_same_bytes_and_report_progress(tmp_path: Path) -> None:
    """The default weight pass deals the tensors to this process and a forked one: the file is the
    one a single writer makes, and progress ends at every byte and tensor (both shares counted)."""
    ck = open_checkpoint(write_random_checkpoint(_wide_config(), tmp_path / "ck", seed=3, dtype=torch.float32))
    one, two = tmp_path / "one.bin", tmp_path / "two.bin"
    stream_weights(ck, _wide_sinks(ck, one)[0], writers=1)
    sinks, total = _wide_sinks(ck, two)
    seen: list[tuple[int, int]] = []
    stream_weights(ck, sinks, lambda b, t: seen.append((b, t)), writers=2)
    assert two.read_bytes() == one.read_bytes()
    assert seen[-1] == (total, len(sinks))
    assert [b for b, _ in seen] == sorted(b for b, _ in seen)


class _FailsInFork:
    """A checkpoint reader whose reads fail in any process but the one that made it (the forked writer)."""

    def __init__(self, reader) -> None:
        self.reader, self.pid = reader, os.getpid()

    def read_order(self, name: str):
        return self.reader.read_order(name)

    def read_rows(self, name: str, start: int = 0, stop: int | None = None):
        if os.getpid() != self.pid:
            raise QwenEdgeError(f"{name}: the file is truncated, re-download it")
        return self.reader.read_rows(name, start, stop)


def test_an_error_in_the_forked_writer_is_the_passes_error(tmp_path: Path) -> None:
    """A read that fails in the forked writer's share fails the pass with that one-line message."""
    ck = open_checkpoint(write_random_checkpoint(_wide_config(), tmp_path / "ck", seed=3, dtype=torch.float32))
    reader = _FailsInFork(ck)
    sinks, _ = _wide_sinks(ck, tmp_path / "w.bin", reader)
    with pytest.raises(QwenEdgeError, match="the file is truncated, re-download it"):
        stream_weights(reader, sinks, writers=2)
