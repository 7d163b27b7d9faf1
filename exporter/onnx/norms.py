"""Norm subgraphs of the traced decoder -> one normalization node each.

The tracer writes every norm as six or seven elementwise nodes, and ONNX Runtime's own fusion does
not recognise the `Reciprocal(Sqrt(...))` form, so they all ran unfused (about 7 % of decode node
time on the 0.8B shape). This pass replaces each chain by one node:

- RMSNorm, `x * rsqrt(mean(x²) + eps) * w`  ->  norm(x, w, eps);
- the L2 normalisation of q and k in Gated DeltaNet, `x * rsqrt(sum(x²) + eps)` over d channels,
  is the same thing up to constants: `x / sqrt(d · (mean(x²) + eps/d))`  ->  norm(x, d^-½, eps/d).

The node is ONNX `RMSNormalization` (opset 23) in "standard" graphs (opset 27) and ONNX Runtime's
`SimplifiedLayerNormalization` in "contrib" graphs, which stay on a low opset for older runtimes
(every ORT version registers it in the default domain). Both compute over the last axis in fp32
(`stash_type` 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from exporter.onnx.forms import NORM_OP


@dataclass
class NormChain:
    x: ir.Value
    eps: float
    weight: ir.Value | None  # None: an L2 normalisation, whose constant weight is made at fusion
    nodes: list[ir.Node]


def _only_consumer(value: ir.Value, op_type: str) -> ir.Node | None:
    users = value.consumers()
    if len(users) != 1 or value.is_graph_output() or users[0].op_type != op_type or users[0].domain != "":
        return None
    return users[0]


def _const(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None or value.const_value is None else value.const_value.numpy()


def _other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The input of a binary node that is not `value` (None unless `value` is exactly one of them)."""
    a, b = node.inputs
    if (a is value) == (b is value):
        return None
    return b if a is value else a


def _squared(node: ir.Node) -> ir.Value | None:
    """x when `node` is `Pow(x, 2)` or `Mul(x, x)`."""
    if node.domain != "" or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if node.op_type == "Mul" and a is b:
        return a
    if node.op_type == "Pow" and (e := _const(b)) is not None and e.size == 1 and e.item() == 2.0:
        return a
    return None


def _match(square: ir.Node) -> NormChain | None:
    """The chain `Mul(x, Reciprocal(Sqrt(Reduce(x², last axis) + eps)))` [`* w` after a mean] from `square`."""
    x = _squared(square)
    if x is None or x.shape is None or not isinstance(x.shape[-1], int):
        return None
    users = square.outputs[0].consumers()
    reduce = users[0] if len(users) == 1 and users[0].op_type in ("ReduceMean", "ReduceSum") else None
    if reduce is None or reduce.domain != "" or square.outputs[0].is_graph_output():
        return None
    axes = _const(reduce.inputs[1] if len(reduce.inputs) > 1 else None)
    if axes is None or axes.size != 1 or axes.item() not in (-1, len(x.shape) - 1) \
            or reduce.attributes.get_int("keepdims", 1) != 1:
        return None
    add = _only_consumer(reduce.outputs[0], "Add")
    if add is None or (eps := _const(_other(add, reduce.outputs[0]))) is None or eps.size != 1:
        return None
    sqrt = _only_consumer(add.outputs[0], "Sqrt")
    recip = sqrt and _only_consumer(sqrt.outputs[0], "Reciprocal")
    scale_x = recip and _only_consumer(recip.outputs[0], "Mul")
    if scale_x is None or _other(scale_x, recip.outputs[0]) is not x:
        return None
    nodes = [square, reduce, add, sqrt, recip, scale_x]
    if reduce.op_type == "ReduceSum":
        return NormChain(x, eps.item() / x.shape[-1], None, nodes)
    scale_w = _only_consumer(scale_x.outputs[0], "Mul")
    weight = scale_w and _other(scale_w, scale_x.outputs[0])
    if weight is None or weight.shape is None or list(weight.shape) != [x.shape[-1]] or weight.dtype != x.dtype:
        return None
    return NormChain(x, eps.item(), weight, [*nodes, scale_w])


def drop_unused_initializers(model: ir.Model) -> None:
    """Remove the constants a fusion left without a reader."""
    for name, value in list(model.graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            del model.graph.initializers[name]


def fuse_norms(model: ir.Model, form: str) -> int:
    """Replace every RMSNorm and L2-normalisation chain in `model` by one node; returns how many."""
    op_type = NORM_OP[form]
    fused = 0
    l2_scales: dict[tuple[int, ir.DataType], ir.Value] = {}
    for square in [n for n in model.graph if n.op_type in ("Pow", "Mul") and n.domain == ""]:
        if square.graph is not model.graph:  # removed with an earlier chain
            continue
        chain = _match(square)
        if chain is None:
            continue
        weight = chain.weight
        if weight is None:
            key = (chain.x.shape[-1], chain.x.dtype)
            weight = l2_scales.get(key)
            if weight is None:
                d, dtype = key
                weight = ir.Value(name=f"l2_norm_scale_{d}_{dtype.name.lower()}",
                                  const_value=ir.tensor(np.full(d, d**-0.5, dtype=dtype.numpy())))
                weight.shape, weight.type = weight.const_value.shape, ir.TensorType(dtype)
                model.graph.register_initializer(weight)
                l2_scales[key] = weight
        last = chain.nodes[-1]
        norm = ir.Node("", op_type, [chain.x, weight], attributes=[
            ir.AttrInt64("axis", -1), ir.AttrFloat32("epsilon", chain.eps), ir.AttrInt64("stash_type", 1)])
        norm.metadata_props.update(last.metadata_props)  # keeps the module path for node naming
        norm.outputs[0].shape, norm.outputs[0].type = last.outputs[0].shape, last.outputs[0].type
        model.graph.insert_before(last, norm)
        ir.convenience.replace_all_uses_with(last.outputs[0], norm.outputs[0], replace_graph_outputs=True)
        name = last.outputs[0].name
        model.graph.remove(chain.nodes, safe=True)
        norm.outputs[0].name = name
        fused += 1
    drop_unused_initializers(model)  # exponents, eps, axes of the old chains
    if form == "standard" and fused:
        model.opset_imports[""] = max(model.opset_imports.get("", 23), 23)
    return fused
