"""Block-wise int4/int8 weights for an exported ONNX decoder: a graph transform.

Which weights, in which format: the scheme's `weight_format` (quant/schemes.py, the one answer every
format shares), asked with the parameter of the module path the torch exporter records on every
node; its block defaults to `--block-size`. Those MatMuls become `MatMulNBits` with that format's
bits and block; everything else stays float, and the recurrent state is untouched (fp32). Packing
uses ONNX Runtime's own block quantizers, so the bytes are exactly what its kernels expect. A weight
in memory is packed here; a streamed one (exporter/onnx/streamed.py) brings its own packed tensors,
filled block by block when the weights are written.
The token embedding becomes `GatherBlockQuantized`; with tied embeddings it reads the LM head's
quantized bytes (same layout: [vocab, hidden] blocked along hidden), so the embedding is stored once.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper
from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

from quant.schemes import QuantOptions, Scheme, WeightFormat

CONTRIB = "com.microsoft"
PARTS = ("data", "scales", "zero_points")


def module_path(node: ir.Node) -> str | None:
    """The PyTorch module that produced `node`, from the exporter's name-scope metadata."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return None
    names = ast.literal_eval(scopes)
    return names[-2] if len(names) >= 2 else None  # the last entry names the op itself


@dataclass
class PackedWeight:
    """A [K, N] weight quantized in blocks along K, in MatMulNBits layout."""

    data: np.ndarray  # uint8 [N, K/block, block*bits/8]
    scales: np.ndarray  # [N, K/block]
    zero_points: np.ndarray | None  # uint8, packed; None when symmetric


def packed_shapes(k: int, n: int, fmt: WeightFormat, dtype: np.dtype) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of each MatMulNBits tensor of a [K, N] weight whose scales are `dtype`."""
    k_blocks = -(-k // fmt.block_size)
    return {"data": ((n, k_blocks, fmt.block_size * fmt.bits // 8), np.dtype(np.uint8)),
            "scales": ((n, k_blocks), np.dtype(dtype)),
            "zero_points": ((n, -(-k_blocks * fmt.bits // 8)), np.dtype(np.uint8))}


def packed_bytes(k: int, n: int, fmt: WeightFormat, scale_dtype: np.dtype = np.dtype(np.float32)) -> int:
    """Bytes of a [K, N] weight in MatMulNBits layout, as `pack_blockwise` writes it (scales fp32 in
    fp32 graphs; zero points only when asymmetric)."""
    parts = ("data", "scales") if fmt.symmetric else PARTS
    return sum(int(np.prod(shape)) * dtype.itemsize
               for shape, dtype in (packed_shapes(k, n, fmt, scale_dtype)[part] for part in parts))


TRANSPOSE_TILE = 16  # source rows per tile: a 2-D transpose copied tile by tile stays in cache


def contiguous(array: np.ndarray, dtype: np.dtype | None = None) -> np.ndarray:
    """`array` as a C-contiguous array of `dtype`. A transposed view of a contiguous matrix (a weight
    read as checkpoint rows, used as [K, N]) is copied in tiles of rows: numpy's one strided copy of
    a large transpose misses the cache on every element and is about 9× slower (measured here)."""
    dtype = np.dtype(array.dtype if dtype is None else dtype)
    if array.ndim != 2 or array.flags.c_contiguous or not array.T.flags.c_contiguous:
        return np.ascontiguousarray(array, dtype=dtype)
    source = array.T  # the contiguous [N, K] matrix
    out = np.empty(array.shape, dtype)
    for start in range(0, source.shape[0], TRANSPOSE_TILE):
        out[:, start:start + TRANSPOSE_TILE] = source[start:start + TRANSPOSE_TILE].T
    return out


def pack_blockwise(weight: np.ndarray, fmt: WeightFormat) -> PackedWeight:
    """Quantize a MatMul weight [K, N] with ONNX Runtime's packers (computed in fp32). Output
    channels are independent, so packing columns in groups gives the same bytes as all at once.

    The scales keep the weight's dtype: MatMulNBits and GatherBlockQuantized take scales in the
    activation dtype, which is the dtype the float graph was traced in.
    """
    k, n = weight.shape
    shapes = packed_shapes(k, n, fmt, weight.dtype)
    data = np.zeros(shapes["data"][0], np.uint8)
    scales = np.zeros(shapes["scales"][0], np.float32)
    zero_points = np.zeros(shapes["zero_points"][0], np.uint8)
    packer = {4: quantize_matmul_4bits, 8: quantize_matmul_8bits}[fmt.bits]
    packer(data, contiguous(weight, np.float32), scales, zero_points, fmt.block_size, n, k,
           fmt.symmetric)
    return PackedWeight(data, scales.astype(weight.dtype), None if fmt.symmetric else zero_points)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 [N, ...] holding two 4-bit values per byte (the lower index in the low nibble) -> [N, 2·bytes]."""
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)


def unpack_blockwise(packed: PackedWeight, k: int, fmt: WeightFormat) -> np.ndarray:
    """The float32 [K, N] weight that MatMulNBits computes with: the inverse of `pack_blockwise`
    (value = (q - zero point) · scale per block; symmetric formats use the midpoint 2^(bits-1))."""
    n, k_blocks, _ = packed.data.shape
    q = (unpack_nibbles(packed.data) if fmt.bits == 4 else packed.data).reshape(n, k_blocks, fmt.block_size)
    if packed.zero_points is None:
        zero = np.full((n, k_blocks), 1 << (fmt.bits - 1), np.float32)
    else:
        zero = (unpack_nibbles(packed.zero_points) if fmt.bits == 4 else packed.zero_points)[:, :k_blocks]
    values = (q.astype(np.float32) - zero[..., None]) * packed.scales.astype(np.float32)[..., None]
    return np.ascontiguousarray(values.reshape(n, -1)[:, :k].T)


def packed_tensors(weight: ir.TensorProtocol, fmt: WeightFormat, *, channels_first: bool = False
                   ) -> dict[str, ir.TensorProtocol]:
    """{part: tensor} of a [K, N] MatMul weight (or, channels_first, an [N, K] table such as the
    embedding) in `fmt`: a streamed weight gives tensors filled when the weights are written; one in
    memory is packed now."""
    streamed = getattr(weight, "packed_parts", None)
    if streamed is not None:
        return streamed(fmt, channels_first)
    array = weight.numpy()
    packed = pack_blockwise(array.T if channels_first else array, fmt)
    arrays = {"data": packed.data, "scales": packed.scales, "zero_points": packed.zero_points}
    return {part: ir.tensor(array) for part, array in arrays.items() if array is not None}


@dataclass
class QuantizedHead:
    """The LM head's packed tensors, which a tied embedding gathers from."""

    parts: dict[str, ir.Value]
    fmt: WeightFormat
    vocab: int
    hidden: int


def _constant(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    tensor.name = name
    graph.register_initializer(value)
    return value


def quantize_projections(model: ir.Model, scheme: Scheme, opts: QuantOptions,
                         format_for: Callable[[str], WeightFormat | None] | None = None) -> QuantizedHead | None:
    """Replace every MatMul whose weight the scheme compresses by MatMulNBits, in place. Returns the
    quantized LM head (None when the scheme leaves it float). `format_for` is another graph's
    recipe (the vision tower's: Scheme.vision_weight_format), by default the decoder's."""
    format_for = format_for or (lambda param: scheme.weight_format(param, opts))
    graph = model.graph
    lm_head = None
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain != "" or node.inputs[1] is None:
            continue
        weight_value = node.inputs[1]
        weight = weight_value.const_value
        path = module_path(node)
        fmt = None if path is None else format_for(path + ".weight")
        if weight is None or fmt is None:
            continue
        k, n = weight.shape
        suffix = {"data": f"q{fmt.bits}", "scales": "scales", "zero_points": "zero_points"}
        parts = {part: _constant(graph, f"{path}.weight_{suffix[part]}", tensor)
                 for part, tensor in packed_tensors(weight, fmt).items()}
        attrs = {"K": k, "N": n, "bits": fmt.bits, "block_size": fmt.block_size, "accuracy_level": opts.accuracy_level}
        new = ir.Node(CONTRIB, "MatMulNBits", [node.inputs[0], *parts.values()],
                      [ir.AttrInt64(key, v) for key, v in attrs.items()],
                      name=f"/{path.replace('.', '/')}/MatMulNBits", num_outputs=1,
                      metadata_props=dict(node.metadata_props))
        new.outputs[0].shape, new.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], node.outputs, new.outputs)
        if not weight_value.uses() and weight_value.name in graph.initializers:
            graph.initializers.pop(weight_value.name)
        if path == "lm_head":
            lm_head = QuantizedHead(parts, fmt, n, k)
    model.opset_imports[CONTRIB] = 1
    return lm_head


EMBED_NAMES = {"data": "embed_tokens.weight_quantized", "scales": "embed_tokens.weight_scales",
               "zero_points": "embed_tokens.weight_zero_points"}


def quantized_embed_graph(parts: dict[str, ir.TensorProtocol], fmt: WeightFormat, vocab: int, hidden: int,
                          doc: str) -> onnx.ModelProto:
    """input_ids -> GatherBlockQuantized over the [vocab, hidden] table packed in `parts`. Its
    initializers carry shapes and types only: the caller places their bytes (embedded_tensors)."""
    inits = [onnx.TensorProto(name=EMBED_NAMES[part], data_type=int(tensor.dtype),
                              dims=[vocab, int(np.prod(tensor.shape[1:]))] if part == "data" else list(tensor.shape))
             for part, tensor in parts.items()]
    node = helper.make_node("GatherBlockQuantized", [inits[0].name, "input_ids", *[t.name for t in inits[1:]]],
                            ["inputs_embeds"], name="/embed_tokens/GatherBlockQuantized", domain=CONTRIB,
                            gather_axis=0, quantize_axis=1, block_size=fmt.block_size, bits=fmt.bits)
    out_type = int(parts["scales"].dtype)
    graph = helper.make_graph(
        [node], "embed_tokens",
        [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch_size", "sequence_length"])],
        [helper.make_tensor_value_info("inputs_embeds", out_type, ["batch_size", "sequence_length", hidden])],
        initializer=inits, doc_string=doc)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(CONTRIB, 1)],
                              producer_name="qwen-edge")
    model.ir_version = 10
    return model
