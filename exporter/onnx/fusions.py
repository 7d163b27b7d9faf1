"""Fusions of the contrib-form graph that ONNX Runtime's optimizer leaves undone.

Decoding one token on a phone CPU is bound by weight bandwidth and by per-node overhead: the 0.8B
decoder runs about a thousand small nodes per token. Two patterns of the traced graph are fused
here, each into an op every ONNX Runtime of the contrib form (>= 1.25) runs:

- the residual `Add` feeding an RMSNorm -> `com.microsoft.SkipSimplifiedLayerNormalization`, whose
  fourth output is the sum for the next residual. ONNX Runtime fuses such an Add only when the norm
  is its only reader, and in a pre-norm decoder the sum is always read again.
- softplus as torch traces it, `Where(x > threshold, x, Softplus(x))` -> `Softplus(x)`: above the
  threshold (20) `log1p(exp(-x))` is below half an ulp of x in fp16 and fp32, so both give x.

The standard form (opset 27 runtimes) is left as traced, and so are fp16 graphs, whose norms read
a Cast of the sum to fp32 (the pattern does not occur there).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from exporter.onnx.forms import CONTRIB_DOMAIN, NORM_OP
from exporter.onnx.norms import drop_unused_initializers

SKIP_NORM_OP = "SkipSimplifiedLayerNormalization"
SOFTPLUS_THRESHOLD = 20.0  # torch.nn.functional.softplus's default


def _producer(value: ir.Value, op_type: str) -> ir.Node | None:
    node = value.producer()
    return node if node is not None and node.op_type == op_type and node.domain == "" else None


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    return a.shape is not None and b.shape is not None and len(a.shape) == 3 and a.shape == b.shape \
        and a.dtype == b.dtype


def fuse_skip_norms(model: ir.Model) -> int:
    """Residual Add + SimplifiedLayerNormalization -> SkipSimplifiedLayerNormalization; returns how many."""
    fused = 0
    for norm in [n for n in model.graph if n.op_type == NORM_OP["contrib"] and n.domain == ""]:
        add = _producer(norm.inputs[0], "Add")
        if add is None or not _same_shape(*add.inputs) or add.outputs[0].is_graph_output() \
                or norm.attributes.get_int("axis", -1) not in (-1, 2):
            continue
        total = add.outputs[0]
        skip = ir.Node(CONTRIB_DOMAIN, SKIP_NORM_OP, [add.inputs[0], add.inputs[1], norm.inputs[1]],
                       attributes=[ir.AttrFloat32("epsilon", norm.attributes.get_float("epsilon", 1e-5))],
                       num_outputs=4)
        skip.metadata_props.update(norm.metadata_props)  # keeps the module path for node naming
        out, _, _, summed = skip.outputs
        out.shape, out.type = norm.outputs[0].shape, norm.outputs[0].type
        summed.shape, summed.type = total.shape, total.type
        model.graph.insert_before(norm, skip)
        ir.convenience.replace_all_uses_with(norm.outputs[0], out, replace_graph_outputs=True)
        ir.convenience.replace_all_uses_with(total, summed)
        names = norm.outputs[0].name, total.name
        model.graph.remove([norm, add], safe=True)
        out.name, summed.name = names
        skip.outputs[1].name = skip.outputs[2].name = ""  # mean and inverse std: omitted optional outputs
        fused += 1
    if fused:
        model.opset_imports[CONTRIB_DOMAIN] = max(model.opset_imports.get(CONTRIB_DOMAIN, 1), 1)
    return fused


def fuse_softplus_thresholds(model: ir.Model) -> int:
    """Where(x > 20, x, Softplus(x)) -> Softplus(x); returns how many."""
    fused = 0
    for where in [n for n in model.graph if n.op_type == "Where" and n.domain == ""]:
        cond, x, soft = where.inputs
        greater, softplus = _producer(cond, "Greater"), _producer(soft, "Softplus")
        if greater is None or softplus is None or greater.inputs[0] is not x or softplus.inputs[0] is not x:
            continue
        limit = greater.inputs[1].const_value
        if limit is None or limit.numpy().size != 1 or float(np.asarray(limit.numpy()).item()) != SOFTPLUS_THRESHOLD:
            continue
        ir.convenience.replace_all_uses_with(where.outputs[0], soft, replace_graph_outputs=True)
        name = where.outputs[0].name
        model.graph.remove([where], safe=True)
        if not cond.uses() and not cond.is_graph_output():
            model.graph.remove([greater], safe=True)
        soft.name = name
        fused += 1
    return fused


def fuse_contrib(model: ir.Model) -> int:
    """Both fusions, then the constants they orphaned dropped; returns the nodes removed."""
    before = len(model.graph)
    fuse_softplus_thresholds(model)
    fuse_skip_norms(model)
    drop_unused_initializers(model)
    return before - len(model.graph)
