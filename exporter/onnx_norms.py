"""RMSNorm subgraphs of the traced decoder -> one normalization node each.

The tracer writes `x * rsqrt(mean(x²) + eps) * w` as seven elementwise nodes, and ONNX Runtime's
own fusion does not recognise the `Reciprocal` form, so every norm ran unfused (about 7 % of
decode node time on the 0.8B shape). This pass replaces each such chain by one node:

- "standard" graphs (opset 27): ONNX `RMSNormalization` (opset 23);
- "contrib" graphs (kept on a low opset for older runtimes): ONNX Runtime's
  `SimplifiedLayerNormalization`, which every ORT version has registered in the default domain.

Both compute `x / sqrt(mean(x²) + eps) * w` over the last axis in fp32 (`stash_type` 1).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

NORM_OP = {"standard": "RMSNormalization", "contrib": "SimplifiedLayerNormalization"}


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


def _match(pow_node: ir.Node) -> tuple[ir.Value, float, ir.Value, list[ir.Node]] | None:
    """(x, eps, weight, nodes) when `pow_node` starts `Mul(Mul(x, Reciprocal(Sqrt(ReduceMean(x², -1) + eps))), w)`."""
    x, exponent = pow_node.inputs
    if (e := _const(exponent)) is None or e.size != 1 or e.item() != 2.0:
        return None
    mean = _only_consumer(pow_node.outputs[0], "ReduceMean")
    if mean is None or (axes := _const(mean.inputs[1] if len(mean.inputs) > 1 else None)) is None:
        return None
    rank = len(x.shape) if x.shape is not None else None
    if axes.size != 1 or rank is None or axes.item() not in (-1, rank - 1) or mean.attributes.get_int("keepdims", 1) != 1:
        return None
    add = _only_consumer(mean.outputs[0], "Add")
    if add is None or (eps := _const(_other(add, mean.outputs[0]))) is None or eps.size != 1:
        return None
    sqrt = _only_consumer(add.outputs[0], "Sqrt")
    recip = sqrt and _only_consumer(sqrt.outputs[0], "Reciprocal")
    scale_x = recip and _only_consumer(recip.outputs[0], "Mul")
    if scale_x is None or _other(scale_x, recip.outputs[0]) is not x:
        return None
    scale_w = _only_consumer(scale_x.outputs[0], "Mul")
    weight = scale_w and _other(scale_w, scale_x.outputs[0])
    if weight is None or weight.shape is None or list(weight.shape) != [x.shape[-1]] or weight.dtype != x.dtype:
        return None
    return x, float(eps.item()), weight, [pow_node, mean, add, sqrt, recip, scale_x, scale_w]


def fuse_rms_norms(model: ir.Model, form: str) -> int:
    """Replace every RMSNorm chain in `model` by one node of the form's op; returns how many."""
    op_type = NORM_OP[form]
    fused = 0
    for pow_node in [n for n in model.graph if n.op_type == "Pow" and n.domain == ""]:
        found = _match(pow_node)
        if found is None:
            continue
        x, eps, weight, chain = found
        last = chain[-1]
        norm = ir.Node("", op_type, [x, weight], attributes=[
            ir.AttrInt64("axis", -1), ir.AttrFloat32("epsilon", eps), ir.AttrInt64("stash_type", 1)])
        norm.metadata_props.update(last.metadata_props)  # keeps the module path for node naming
        norm.outputs[0].shape, norm.outputs[0].type = last.outputs[0].shape, last.outputs[0].type
        model.graph.insert_before(last, norm)
        ir.convenience.replace_all_uses_with(last.outputs[0], norm.outputs[0])
        name = last.outputs[0].name
        model.graph.remove(chain, safe=True)
        norm.outputs[0].name = name
        fused += 1
    if form == "standard" and fused:
        model.opset_imports[""] = max(model.opset_imports.get("", 23), 23)
    return fused
