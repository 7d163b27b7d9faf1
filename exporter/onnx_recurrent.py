"""ONNX mapping of the two recurrent custom ops in `graphs/recurrent_ops.py`.

Each custom op becomes one node: `qwen_edge::gated_delta_rule` -> `LinearAttention`
(update_rule gated_delta) and `qwen_edge::causal_conv_with_state` -> `CausalConvWithState`
(activation silu). The nodes are emitted in a private placeholder domain, because the torch
exporter's version converter does not know opset 27, and `place_recurrent_ops` then moves them to
the domain the user chose:

- "standard": ONNX opset 27 (default domain). Runs on ONNX Runtime >= 1.32.
- "contrib": `com.microsoft` (ORT >= 1.25), with the rest of the graph on a lower opset; this is
  what transformers.js 4.3's runtime (ORT 1.30) and mobile builds load.

`to_contrib` turns a saved standard graph into the contrib form (the app bundles need it).
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
import onnx_ir as ir
import torch
from onnxscript.values import Op, Opset

import graphs.recurrent_ops  # noqa: F401  (registers the torch.ops.qwen_edge custom ops)

PLACEHOLDER_DOMAIN = "qwen_edge.recurrent"
RECURRENT_OPS = ("LinearAttention", "CausalConvWithState")
STANDARD_OPSET = 27
CONTRIB_DOMAIN = "com.microsoft"
DOMAINS = {"standard": "", "contrib": CONTRIB_DOMAIN}


def _placeholder_op(name: str) -> Op:
    """An onnxscript op with the opset-27 schema of `name`, living in the placeholder domain."""
    src = onnx.defs.get_schema(name, STANDARD_OPSET, "")
    schema = onnx.defs.OpSchema(
        name,
        PLACEHOLDER_DOMAIN,
        1,
        inputs=list(src.inputs),
        outputs=list(src.outputs),
        type_constraints=[(c.type_param_str, list(c.allowed_type_strs), c.description) for c in src.type_constraints],
        attributes=list(src.attributes.values()),
    )
    return Op(Opset(PLACEHOLDER_DOMAIN, 1), name, schema)


_LINEAR_ATTENTION = _placeholder_op("LinearAttention")
_CAUSAL_CONV = _placeholder_op("CausalConvWithState")


def gated_delta_rule_onnx(q, k, v, g, beta, state, num_heads: int, scale: float):  # noqa: ANN001, ANN201
    # Input order of LinearAttention: query, key, value, past_state, decay, beta.
    out, new_state = _LINEAR_ATTENTION(
        q, k, v, state, g, beta,
        q_num_heads=num_heads, kv_num_heads=num_heads, update_rule="gated_delta", scale=scale, _outputs=2,
    )
    return out, new_state


def causal_conv_with_state_onnx(x, weight, state):  # noqa: ANN001, ANN201
    y, new_state = _CAUSAL_CONV(x, weight, None, state, activation="silu", _outputs=2)
    return y, new_state


def translation_table() -> dict[Callable, Callable]:
    """The `custom_translation_table` for `torch.onnx.export(dynamo=True)`."""
    return {
        torch.ops.qwen_edge.gated_delta_rule.default: gated_delta_rule_onnx,
        torch.ops.qwen_edge.causal_conv_with_state.default: causal_conv_with_state_onnx,
    }


def place_recurrent_ops(model: ir.Model, form: str) -> None:
    """Move the placeholder nodes to the standard (opset 27) or contrib (com.microsoft) domain.

    Works on the in-memory IR (no protobuf round trip, so models over 2 GB are fine).
    """
    if form not in DOMAINS:
        raise ValueError(f"recurrent ops form must be one of {sorted(DOMAINS)}, not {form!r}")
    found = False
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain == PLACEHOLDER_DOMAIN:
            node.domain = DOMAINS[form]
            node.version = None
            found = True
    model.opset_imports.pop(PLACEHOLDER_DOMAIN, None)
    if found and form == "standard":
        model.opset_imports[""] = STANDARD_OPSET
    elif found:
        model.opset_imports[CONTRIB_DOMAIN] = 1


def trace_opset() -> int:
    """The default-domain opset the torch exporter writes: the graph's opset before the standard form
    relabels it to 27, and the one a contrib export keeps."""
    from torch.onnx import _constants

    return _constants.ONNX_DEFAULT_OPSET


def to_contrib(model: onnx.ModelProto) -> bool:
    """Turn a saved standard (opset-27) graph into the contrib form, in place.

    The recurrent nodes move to `com.microsoft` and each fused norm becomes ONNX Runtime's
    `SimplifiedLayerNormalization` (exporter/onnx_norms.py): same inputs, attributes and weights
    (external data untouched), only op names, domains and opset imports change, so the result is the
    graph `--recurrent-ops contrib` would have written. Returns False when the graph had no standard node.
    """
    from exporter.onnx_norms import NORM_OP

    standard = [n for n in _all_nodes(model.graph) if n.domain in ("", "ai.onnx")
                and n.op_type in (*RECURRENT_OPS, NORM_OP["standard"])]
    if not standard:
        return False
    for node in standard:
        if node.op_type == NORM_OP["standard"]:
            node.op_type = NORM_OP["contrib"]
        else:
            node.domain = CONTRIB_DOMAIN
    imports = {o.domain: o.version for o in model.opset_import}
    imports[""] = trace_opset()
    imports[CONTRIB_DOMAIN] = max(imports.get(CONTRIB_DOMAIN, 1), 1)
    imports.pop("ai.onnx", None)
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in sorted(imports.items()))
    return True


def _all_nodes(graph: onnx.GraphProto):  # noqa: ANN202
    """Every node, including those of subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _all_nodes(sub)
