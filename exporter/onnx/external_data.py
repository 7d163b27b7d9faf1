"""Weights stored beside an ONNX graph ("external data"): where each tensor's bytes are, and moving them.

One relocator serves every writer that re-homes a graph's weights (the Android merge, the web
layout): each distinct source byte range is copied once, so tensors that shared bytes (a tied int4
embedding reading the LM head's table) still share them. Every location read from a graph must stay
inside the graph's folder. Torch-free; works on protobufs, never loads weights into memory whole.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import onnx

from graphs.errors import QwenEdgeError

COPY_BLOCK = 64 << 20


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def set_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Point `tensor` at `length` bytes at `offset` of the data file `location` (beside the graph)."""
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)


def stored_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a graph stores: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from stored_tensors(attr.g)
            for sub in attr.graphs:
                yield from stored_tensors(sub)


def source_range(tensor: onnx.TensorProto, graph_dir: Path) -> tuple[Path, int, int]:
    """(file, offset, length) of an external tensor's bytes; the file must lie inside `graph_dir`."""
    info = external_info(tensor)
    folder = graph_dir.resolve()
    location = info.get("location", "")
    path = (folder / location).resolve()
    if not location or Path(location).is_absolute() or not path.is_relative_to(folder):
        raise QwenEdgeError(f"{graph_dir}: a graph names weight data outside its folder ({location!r}); re-export it")
    if not path.is_file():
        raise QwenEdgeError(f"{path}: weight data file missing; re-export, or copy the export folder whole")
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else path.stat().st_size - offset
    except ValueError:
        raise QwenEdgeError(f"{graph_dir}: tensor '{tensor.name}' has a malformed external-data record; re-export it") from None
    if offset < 0 or length < 0 or offset + length > path.stat().st_size:
        raise QwenEdgeError(f"{graph_dir}: its weights file {path.name} is missing or truncated "
                            f"(tensor '{tensor.name}'); re-run 'qwen-edge export'")
    return path, offset, length


def relocate(sources: list[tuple[onnx.TensorProto, Path]], out_dir: Path, data_name: str, *, align: int = 1,
             chunk_bytes: int | None = None) -> list[str]:
    """Copy the bytes of each external tensor (with the folder of the graph it came from) into
    `out_dir/data_name` and point the tensor there.

    Each range starts at a multiple of `align` (4096: every tensor can be memory-mapped); with
    `chunk_bytes`, a new file `data_name_1`, `data_name_2`, ... starts before a file would exceed it.
    Returns the names of the data files written, in order.
    """
    placed: dict[tuple[Path, int, int], tuple[str, int]] = {}
    files: list[str] = []
    out, written = None, 0
    try:
        for tensor, graph_dir in sources:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            key = source_range(tensor, graph_dir)
            if key not in placed:
                pad = -written % align
                if out is None or (chunk_bytes and written and written + pad + key[2] > chunk_bytes):
                    if out is not None:
                        out.close()
                    files.append(data_name if not files else f"{data_name}_{len(files)}")
                    out, written, pad = open(out_dir / files[-1], "wb"), 0, 0
                out.write(b"\0" * pad)
                placed[key] = (files[-1], written + pad)
                _copy_range(*key, out)
                written += pad + key[2]
            location, offset = placed[key]
            set_external(tensor, location, offset, key[2])
    finally:
        if out is not None:
            out.close()
    return files


def _copy_range(path: Path, offset: int, length: int, out) -> None:  # noqa: ANN001
    with path.open("rb") as f:
        f.seek(offset)
        left = length
        while left:
            block = f.read(min(left, COPY_BLOCK))
            if not block:
                raise QwenEdgeError(f"{path}: ended while copying weights (the file changed or is truncated)")
            out.write(block)
            left -= len(block)


def share_identical_weights(graph_path: Path, donor_path: Path) -> int:
    """Point every weight of the graph at `graph_path` whose bytes equal a weight of the graph at
    `donor_path` (same folder) at the donor's bytes, and rewrite its own data file without them.

    The MTP head shares the decoder's LM head this way: stored once on disk, whatever its name in
    each graph. Returns the number of bytes no longer stored twice.
    """
    folder = graph_path.parent
    graph = onnx.load(str(graph_path), load_external_data=False)
    donor = onnx.load(str(donor_path), load_external_data=False)
    candidates: dict[tuple, list[onnx.TensorProto]] = {}
    for tensor in donor.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            length = source_range(tensor, donor_path.parent)[2]
            candidates.setdefault((tuple(tensor.dims), tensor.data_type, length), []).append(tensor)
    digests: dict[tuple[Path, int, int], str] = {}

    def digest(tensor: onnx.TensorProto, graph_dir: Path) -> str:
        key = source_range(tensor, graph_dir)
        if key not in digests:
            h = hashlib.sha256()
            with key[0].open("rb") as f:
                f.seek(key[1])
                left = key[2]
                while left:
                    block = f.read(min(left, COPY_BLOCK))
                    h.update(block)
                    left -= len(block)
            digests[key] = h.hexdigest()
        return digests[key]

    shared = 0
    own = []
    for tensor in graph.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        length = source_range(tensor, folder)[2]
        match = next((d for d in candidates.get((tuple(tensor.dims), tensor.data_type, length), [])
                      if digest(d, donor_path.parent) == digest(tensor, folder)), None)
        if match is None:
            own.append(tensor)
            continue
        info = external_info(match)
        set_external(tensor, info["location"], int(info.get("offset", 0)), length)
        shared += length
    if shared:
        data_name = graph_path.name + "_data"
        if relocate([(t, folder) for t in own], folder, data_name + ".partial"):
            for tensor in own:
                info = external_info(tensor)
                set_external(tensor, data_name, int(info.get("offset", 0)), int(info["length"]))
            (folder / (data_name + ".partial")).replace(folder / data_name)
        else:
            (folder / data_name).unlink()
        onnx.save(graph, str(graph_path))
    return shared
