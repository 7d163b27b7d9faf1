"""Block-wise int4/int8 weights for an exported ONNX decoder: a graph transform.

Which weights, in which format: the scheme's `weight_format` (quant/schemes.py, the one answer every
format shares), asked with the parameter of the module path the torch exporter records on every
node; its block defaults to `--block-size`. Those MatMuls become `MatMulNBits` with that format's
bits and block; everything else stays float, and the recurrent state is untouched (fp32).
Packing uses ONNX Runtime's own block quantizers, so the bytes are exactly what its kernels expect.
The token embedding becomes `GatherBlockQuantized`; with tied embeddings it reads the LM head's
quantized bytes (same layout: [vocab, hidden] blocked along hidden), so the embedding is stored once.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper
from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

from quant.schemes import QuantOptions, Scheme, WeightFormat

CONTRIB = "com.microsoft"


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
    k: int
    n: int
    bits: int
    block_size: int


def packed_bytes(k: int, n: int, fmt: WeightFormat, scale_bytes: int = 4) -> int:
    """Bytes of a [K, N] weight in MatMulNBits layout (symmetric): the packed blocks and one scale per
    block (fp32 in fp32 graphs), as `pack_blockwise` writes them."""
    blocks = -(-k // fmt.block_size)
    return n * blocks * (fmt.block_size * fmt.bits // 8 + scale_bytes)


def pack_blockwise(weight: np.ndarray, fmt: WeightFormat, opts: QuantOptions) -> PackedWeight:
    """Quantize a MatMul weight [K, N] in `fmt` with ONNX Runtime's packers (computed in fp32).

    The scales keep the weight's dtype: MatMulNBits and GatherBlockQuantized take scales in the
    activation dtype, which is the dtype the float graph was traced in.
    """
    k, n = weight.shape
    bits, block = fmt.bits, fmt.block_size or opts.block_size
    k_blocks = -(-k // block)
    data = np.zeros((n, k_blocks, block * bits // 8), np.uint8)
    scales = np.zeros((n, k_blocks), np.float32)
    zero_points = np.zeros((n, -(-k_blocks * bits // 8)), np.uint8)
    packer = {4: quantize_matmul_4bits, 8: quantize_matmul_8bits}[bits]
    packer(data, np.ascontiguousarray(weight, dtype=np.float32), scales, zero_points, block, n, k, opts.symmetric)
    return PackedWeight(data, scales.astype(weight.dtype), None if opts.symmetric else zero_points, k, n, bits, block)


def _constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.Tensor(array, name=name))
    graph.register_initializer(value)
    return value


def quantize_projections(model: ir.Model, scheme: Scheme, opts: QuantOptions) -> PackedWeight | None:
    """Replace every MatMul whose weight the scheme compresses by MatMulNBits, in place. Returns the
    packed LM head (None when the scheme leaves it float)."""
    graph = model.graph
    lm_head = None
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain != "" or node.inputs[1] is None:
            continue
        weight_value = node.inputs[1]
        weight = weight_value.const_value
        path = module_path(node)
        fmt = None if path is None else scheme.weight_format(path + ".weight", opts.block_size)
        if weight is None or fmt is None:
            continue
        array = weight.numpy()
        packed = pack_blockwise(array, fmt, opts)
        bits = packed.bits
        inputs = [node.inputs[0], _constant(graph, f"{path}.weight_q{bits}", packed.data),
                  _constant(graph, f"{path}.weight_scales", packed.scales)]
        if packed.zero_points is not None:
            inputs.append(_constant(graph, f"{path}.weight_zero_points", packed.zero_points))
        attrs = {"K": packed.k, "N": packed.n, "bits": bits, "block_size": packed.block_size,
                 "accuracy_level": opts.accuracy_level}
        new = ir.Node(CONTRIB, "MatMulNBits", inputs, [ir.AttrInt64(k, v) for k, v in attrs.items()],
                      name=f"/{path.replace('.', '/')}/MatMulNBits", num_outputs=1,
                      metadata_props=dict(node.metadata_props))
        new.outputs[0].shape, new.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], node.outputs, new.outputs)
        if not weight_value.uses() and weight_value.name in graph.initializers:
            graph.initializers.pop(weight_value.name)
        if path == "lm_head":
            lm_head = packed
    model.opset_imports[CONTRIB] = 1
    return lm_head


def quantized_embed_graph(packed: PackedWeight, hidden: int, doc: str) -> onnx.ModelProto:
    """input_ids -> GatherBlockQuantized over the [vocab, hidden] table packed in `packed`."""
    vocab = packed.n
    inits = [numpy_helper.from_array(packed.data.reshape(vocab, -1), "embed_tokens.weight_quantized"),
             numpy_helper.from_array(packed.scales, "embed_tokens.weight_scales")]
    if packed.zero_points is not None:
        inits.append(numpy_helper.from_array(packed.zero_points, "embed_tokens.weight_zero_points"))
    node = helper.make_node("GatherBlockQuantized", [inits[0].name, "input_ids", *[t.name for t in inits[1:]]],
                            ["inputs_embeds"], name="/embed_tokens/GatherBlockQuantized", domain=CONTRIB,
                            gather_axis=0, quantize_axis=1, block_size=packed.block_size, bits=packed.bits)
    out_type = helper.np_dtype_to_tensor_dtype(packed.scales.dtype)
    graph = helper.make_graph(
        [node], "embed_tokens",
        [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch_size", "sequence_length"])],
        [helper.make_tensor_value_info("inputs_embeds", out_type, ["batch_size", "sequence_length", hidden])],
        initializer=inits, doc_string=doc)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(CONTRIB, 1)],
                              producer_name="qwen-edge")
    model.ir_version = 10
    return model
