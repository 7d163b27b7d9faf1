"""Weights an ONNX graph names but memory never holds whole: traced as placeholders, then written
from the checkpoint in one streaming pass shared by every variant of an export.

    trace     the decoder's large matrices are zero-memory placeholders (graphs/checkpoint.py
              `build_skeleton`); each becomes a `CheckpointWeight` before the exporter's optimizer
              runs. The optimizer folds `Transpose(W)` as it would with real values: it is handed a
              `WeightRef`, a zero-stride array that records the permutation and refuses any other
              arithmetic, so the folded initializer keeps the name and place real values give it.
    quantize  `PackedPart`s are the MatMulNBits / GatherBlockQuantized tensors (data, scales, zero
              points) of a CheckpointWeight, in the format the scheme gives that parameter.
    save      `save_graph` writes a graph with onnx_ir, which lays out the data file; a streamed
              tensor leaves a hole of its size there and is recorded as a `Sink` (file, offset).
    stream    `stream_weights` reads each checkpoint tensor once, in blocks of rows, and fills every
              sink of every variant from each block, so peak memory is one block, not the model.

Torch-free: values are read through a `RowReader` (the Checkpoint) as float32 numpy rows.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir._core import TensorBase

from exporter.onnx.external_data import set_external
from exporter.progress import helper_finished, own_peak_rss_bytes, rss_bytes
from graphs.errors import QwenEdgeError
from quant.onnx_weights import PackedWeight, contiguous, pack_blockwise, packed_shapes
from quant.schemes import WeightFormat

BLOCK_BYTES = 64 << 20  # float32 bytes of source rows converted at a time


class RowReader(Protocol):
    """Where streamed values come from (graphs.checkpoint.Checkpoint)."""

    def read_rows(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """float32 rows start:stop of a checkpoint tensor."""

    def read_order(self, name: str) -> Any:
        """A sort key that visits tensors in the order they are stored."""


class WeightRef(np.ndarray):
    """What the optimizer sees of a placeholder: zero memory, the source's name, and the permutation
    applied to it so far. Transposing is the one operation allowed; any arithmetic raises."""

    source: str
    perm: tuple[int, ...]

    def __new__(cls, source: str, shape: tuple[int, ...], dtype: np.dtype, perm: tuple[int, ...]) -> "WeightRef":
        ref = np.broadcast_to(np.zeros((), dtype), shape).view(cls)
        ref.source, ref.perm = source, perm
        return ref

    def __array_finalize__(self, obj: Any) -> None:
        self.source, self.perm = getattr(obj, "source", ""), getattr(obj, "perm", ())

    def __array_function__(self, func: Callable, types: Any, args: tuple, kwargs: dict) -> Any:
        if func is not np.transpose:
            raise QwenEdgeError(f"internal: the exporter computed {func.__name__} of the streamed weight "
                                f"'{self.source}'; only transposes of weights can be written from the checkpoint")
        axes = args[1] if len(args) > 1 else kwargs.get("axes")
        axes = tuple(reversed(range(self.ndim))) if axes is None else tuple(int(a) for a in axes)
        out = super().__array_function__(func, types, args, kwargs)
        out.perm = tuple(self.perm[a] for a in axes)
        return out

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        raise QwenEdgeError(f"internal: the exporter computed {ufunc.__name__} of the streamed weight "
                            f"'{self.source}'; only transposes of weights can be written from the checkpoint")


class Block:
    """Rows start:start+n of one source tensor, with the casts and packs made of them (each made once)."""

    def __init__(self, rows: np.ndarray, start: int) -> None:
        self.start, self.stop = start, start + rows.shape[0]
        self._rows = {np.dtype(np.float32): rows}
        self._packs: dict[tuple, PackedWeight] = {}

    def rows(self, dtype: np.dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        if dtype not in self._rows:
            self._rows[dtype] = self._rows[np.dtype(np.float32)].astype(dtype)
        return self._rows[dtype]

    def packed(self, fmt: WeightFormat, dtype: np.dtype) -> PackedWeight:
        """The rows as MatMulNBits columns: row n of the source is output channel n."""
        key = (fmt, np.dtype(dtype))
        if key not in self._packs:
            self._packs[key] = pack_blockwise(self.rows(dtype).T, fmt)
        return self._packs[key]


class StreamedTensor(TensorBase):
    """A tensor whose bytes are made from blocks of one checkpoint tensor's rows."""

    def __init__(self, reader: RowReader, source: str, source_shape: tuple[int, ...], shape: tuple[int, ...],
                 dtype: ir.DataType) -> None:
        super().__init__()
        self.reader, self.source, self.source_shape = reader, source, tuple(source_shape)
        self._shape, self._dtype = ir.Shape(shape), dtype

    @property
    def shape(self) -> ir.Shape:
        return self._shape

    @property
    def dtype(self) -> ir.DataType:
        return self._dtype

    @property
    def raw(self) -> None:
        return None

    def block_bytes(self, block: Block) -> Iterator[tuple[int, bytes]]:
        """(byte offset in this tensor, bytes) written from one block of source rows."""
        raise NotImplementedError

    def tobytes(self) -> bytes:
        """The whole tensor, computed now (the serializer asks only for tensors too small to stream)."""
        out = bytearray(self.nbytes)
        for offset, data in self.block_bytes(Block(self.reader.read_rows(self.source), 0)):
            out[offset : offset + len(data)] = data
        return bytes(out)

    def numpy(self) -> np.ndarray:
        return np.frombuffer(self.tobytes(), self.dtype.numpy()).reshape(tuple(self.shape))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.numpy() if dtype is None else self.numpy().astype(dtype)

    def __dlpack__(self, *, stream: Any = None) -> Any:
        return self.numpy().__dlpack__(stream=stream)

    def __dlpack_device__(self) -> tuple[int, int]:
        return self.numpy().__dlpack_device__()

    def tofile(self, file: Any) -> None:
        """Leave a hole of this tensor's size: `stream_weights` fills it."""
        file.seek(self.nbytes - 1, os.SEEK_CUR)
        file.write(b"\0")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, {list(self.shape)}, {self.dtype.name})"


class CheckpointWeight(StreamedTensor):
    """A decoder parameter in the graph's activation dtype, possibly transposed (`perm`)."""

    def __init__(self, reader: RowReader, source: str, source_shape: tuple[int, ...], dtype: ir.DataType,
                 perm: tuple[int, ...] | None = None) -> None:
        perm = tuple(range(len(source_shape))) if perm is None else tuple(perm)
        if perm not in ((0,), (0, 1), (1, 0)):
            raise QwenEdgeError(f"internal: permutation {perm} of streamed weight '{source}' is not supported")
        super().__init__(reader, source, source_shape, tuple(source_shape[p] for p in perm), dtype)
        self.perm = perm

    @property
    def transposed(self) -> bool:
        return self.perm == (1, 0)

    def packed_parts(self, fmt: WeightFormat, channels_first: bool = False) -> dict[str, "PackedPart"]:
        """The block-quantized tensors of this [K, N] weight, or of this [N, K] table packed per row
        (channels_first); quant.onnx_weights.packed_tensors asks."""
        weight = CheckpointWeight(self.reader, self.source, self.source_shape, self.dtype, (1, 0)) \
            if channels_first else self
        parts = ("data", "scales") if fmt.symmetric else ("data", "scales", "zero_points")
        return {part: PackedPart(weight, fmt, part) for part in parts}

    def numpy(self) -> np.ndarray:
        """The optimizer's view: a WeightRef (see module doc); real bytes come from tobytes/block_bytes."""
        return WeightRef(self.source, tuple(self.shape), self.dtype.numpy(), self.perm)

    def block_bytes(self, block: Block) -> Iterator[tuple[int, bytes]]:
        rows = block.rows(self.dtype.numpy())
        item = rows.itemsize
        if not self.transposed:
            yield block.start * rows[0].size * item, rows.tobytes()
            return
        n = self.source_shape[0]
        columns = contiguous(rows.T)  # [K, rows]: a column range of every row of W.T
        for k in range(columns.shape[0]):
            yield (k * n + block.start) * item, columns[k].tobytes()


class PackedPart(StreamedTensor):
    """One tensor of a block-quantized weight: `data`, `scales` or `zero_points` of `weight` ([K, N],
    the transpose of the checkpoint's [N, K]), each output channel n packed from source row n."""

    def __init__(self, weight: CheckpointWeight, fmt: WeightFormat, part: str) -> None:
        if not weight.transposed:
            raise QwenEdgeError(f"internal: streamed weight '{weight.source}' is quantized but not transposed")
        k, n = tuple(weight.shape)
        shape, dtype = packed_shapes(k, n, fmt, weight.dtype.numpy())[part]
        super().__init__(weight.reader, weight.source, weight.source_shape, shape, ir.DataType.from_numpy(dtype))
        self.weight, self.format, self.part = weight, fmt, part

    def block_bytes(self, block: Block) -> Iterator[tuple[int, bytes]]:
        packed = block.packed(self.format, self.weight.dtype.numpy())
        array = {"data": packed.data, "scales": packed.scales, "zero_points": packed.zero_points}[self.part]
        row_bytes = self.nbytes // self.shape[0]
        yield block.start * row_bytes, np.ascontiguousarray(array).tobytes()


def adopt_placeholders(model: ir.Model, reader: RowReader, sources: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Turn the traced placeholder initializers ({initializer name: (checkpoint tensor, shape)}) into
    CheckpointWeights, before the optimizer folds anything."""
    for name, value in model.graph.initializers.items():
        if name in sources:
            source, shape = sources[name]
            value.const_value = CheckpointWeight(reader, source, shape, value.dtype)


def adopt_folded(model: ir.Model, reader: RowReader, shapes: dict[str, tuple[int, ...]]) -> None:
    """After the optimizer: the initializers it folded from a WeightRef become CheckpointWeights."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.Tensor) and isinstance(tensor.raw, WeightRef):
            ref = tensor.raw
            value.const_value = CheckpointWeight(reader, ref.source, shapes[ref.source], value.dtype, ref.perm)


@dataclass(frozen=True)
class Sink:
    """Where one streamed tensor's bytes go: a data file and the tensor's offset in it."""

    tensor: StreamedTensor
    path: Path
    offset: int


def save_graph(model: ir.Model, path: Path, sinks: list[Sink] | None = None) -> Path:
    """Save with every weight in one external data file beside the graph (`<name>.onnx_data`); each
    streamed tensor is left as a hole and appended to `sinks` for `stream_weights`."""
    data = path.name + "_data"

    def record(tensor: Any, info: ir.external_data.CallbackInfo) -> None:
        if isinstance(tensor, StreamedTensor):
            if sinks is None:
                raise QwenEdgeError(f"internal: {path.name} has streamed weights but nothing will write them")
            sinks.append(Sink(tensor, path.parent / data, info.offset))

    ir.save(model, path, external_data=data, callback=record)
    return path


WRITERS = 2  # processes that fill the sinks: by the weight pass the export's traces are done, so a core is free


def stream_weights(reader: RowReader, sinks: list[Sink], progress: Callable[[int, int], None] | None = None,
                   block_bytes: int = BLOCK_BYTES, writers: int = WRITERS) -> None:
    """Fill every sink: each source tensor is read once, in blocks of rows, and each block written to
    all the sinks made from it. `progress(bytes, tensors)` is called after each source tensor.

    With `writers` 2 (and os.fork) the sources are dealt to this process and a forked one, balanced
    by bytes and each share in file order. Quantizing holds the GIL (ONNX Runtime's packers), so a
    thread would not help; the fork inherits the sinks and the open checkpoint, writes its share
    into the same files at its own offsets, and reports progress and any error over a pipe."""
    by_source: dict[str, list[Sink]] = defaultdict(list)
    for sink in sinks:
        by_source[sink.tensor.source].append(sink)
    order = sorted(by_source, key=reader.read_order)
    shares: list[list[str]] = [[] for _ in range(max(1, writers if hasattr(os, "fork") else 1))]
    share_bytes = [0] * len(shares)
    for source in order:
        i = share_bytes.index(min(share_bytes))
        shares[i].append(source)
        share_bytes[i] += sum(s.tensor.nbytes for s in by_source[source])
    files = {}
    try:
        for path in {s.path for s in sinks}:
            files[path] = os.open(path, os.O_WRONLY)
        if len(shares) == 1 or not shares[1]:
            _write_share(reader, order, by_source, files, block_bytes, progress)
        else:
            _write_two_shares(reader, shares, by_source, files, block_bytes, progress)
    finally:
        for fd in files.values():
            os.close(fd)


def _write_share(reader: RowReader, share: list[str], by_source: dict[str, list[Sink]], files: dict[Path, int],
                 block_bytes: int, progress: Callable[[int, int], None] | None) -> None:
    done_bytes = done_tensors = 0
    for source in share:
        group = by_source[source]
        shape = group[0].tensor.source_shape
        row_elements = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        step = max(1, block_bytes // (4 * row_elements))
        for start in range(0, shape[0], step):
            block = Block(reader.read_rows(source, start, min(start + step, shape[0])), start)
            for sink in group:
                for offset, data in sink.tensor.block_bytes(block):
                    os.pwrite(files[sink.path], data, sink.offset + offset)
        done_bytes += sum(s.tensor.nbytes for s in group)
        done_tensors += len(group)
        if progress:
            progress(done_bytes, done_tensors)


def _write_two_shares(reader: RowReader, shares: list[list[str]], by_source: dict[str, list[Sink]],
                      files: dict[Path, int], block_bytes: int, progress: Callable[[int, int], None] | None) -> None:
    """Share 1 in a forked process, share 0 here; progress is the sum of both. The fork's messages are
    lines on a pipe: `p BYTES TENSORS` after each tensor, `m BYTES` (the memory it added to what it
    inherited) at its end, `e MESSAGE` on an error."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the forked writer: report through the pipe, never return into the caller's stack
        os.close(read_end)
        code = 0
        try:
            inherited = rss_bytes()
            _write_share(reader, shares[1], by_source, files, block_bytes,
                         lambda b, t: os.write(write_end, f"p {b} {t}\n".encode()))
            os.write(write_end, f"m {max(0, own_peak_rss_bytes() - inherited)}\n".encode())
        except BaseException as error:  # noqa: BLE001  (every failure goes to the parent as one line)
            message = str(error).replace("\n", " ") or type(error).__name__
            os.write(write_end, f"e {message}\n".encode(errors="replace"))
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    os.set_blocking(read_end, False)
    theirs = {"p": (0, 0)}
    pending = b""
    mine = (0, 0)

    def drain(block: bool) -> None:
        """Read what the fork has sent: all that is there, or (block) at least one chunk or its end."""
        nonlocal pending
        os.set_blocking(read_end, block)
        while True:
            try:
                chunk = os.read(read_end, 65536)
            except BlockingIOError:
                break
            if not chunk:
                theirs["eof"] = True
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                kind, _, rest = line.decode(errors="replace").partition(" ")
                theirs[kind] = tuple(int(v) for v in rest.split()) if kind in ("p", "m") else rest
            if block:
                break
        if progress:
            progress(mine[0] + theirs["p"][0], mine[1] + theirs["p"][1])

    def report(done_bytes: int, done_tensors: int) -> None:
        nonlocal mine
        mine = (done_bytes, done_tensors)
        drain(block=False)

    try:
        _write_share(reader, shares[0], by_source, files, block_bytes, report)
        while "eof" not in theirs:
            drain(block=True)
    except BaseException:
        os.kill(pid, 9)
        raise
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(read_end)
    if "e" in theirs or status != 0:
        raise QwenEdgeError(theirs.get("e") or f"the weight writer process ended with status {status}")
    if "m" in theirs:
        helper_finished(theirs["m"][0])


def save_proto(model: onnx.ModelProto, path: Path, tensors: dict[str, ir.TensorProtocol],
               sinks: list[Sink] | None = None) -> Path:
    """Save a graph built as a protobuf (whose initializers carry shapes only) with `tensors`' bytes:
    as `onnx.save(..., save_as_external_data=True, size_threshold=1024)` lays them out (raw data of
    1024 bytes or more, counted as Python's sys.getsizeof counts a bytes object, densely in one file
    beside the graph), streamed tensors as holes recorded in `sinks`."""
    data_name = path.name + "_data"
    data_path = path.parent / data_name
    offset = 0
    with data_path.open("wb") as data:
        for proto in model.graph.initializer:
            tensor = tensors[proto.name]
            if tensor.nbytes + sys.getsizeof(b"") < 1024:
                proto.raw_data = tensor.tobytes()
                continue
            set_external(proto, data_name, offset, tensor.nbytes)
            if isinstance(tensor, StreamedTensor):
                if sinks is None:
                    raise QwenEdgeError(f"internal: {path.name} has streamed weights but nothing will write them")
                sinks.append(Sink(tensor, data_path, offset))
                data.seek(offset + tensor.nbytes - 1)
                data.write(b"\0")
            else:
                data.seek(offset)
                data.write(tensor.tobytes())
            offset += tensor.nbytes
    if offset == 0:
        data_path.unlink()
    onnx.save(model, str(path))
    return path
