"""ONNX mapping of the two recurrent custom ops in `graphs/recurrent_ops.py`.

Each custom op becomes one node: `qwen_edge::gated_delta_rule` -> `LinearAttention`
(update_rule gated_delta) and `qwen_edge::causal_conv_with_state` -> `CausalConvWithState`
(activation silu). The nodes are emitted in a private placeholder domain, because the torch
exporter's version converter does not know opset 27, and `place_recurrent_ops` then moves them to
the domain of the form the user chose (exporter/onnx/forms.py):

- "standard": ONNX opset 27 (default domain). Runs on ONNX Runtime >= 1.32.
- "contrib": `com.microsoft` (ORT >= 1.25), with the rest of the graph on the trace opset; this is
  what transformers.js 4.3's runtime (ORT 1.30) and mobile builds load.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
import onnx_ir as ir
import torch
from onnxscript.values import Op, Opset

import graphs.recurrent_ops  # noqa: F401  (registers the torch.ops.qwen_edge custom ops)
from exporter.onnx.forms import CONTRIB_DOMAIN
from runtime_py.export_format import RECURRENT_FORMS, STANDARD_OPSET

PLACEHOLDER_DOMAIN = "qwen_edge.recurrent"


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
    if form not in RECURRENT_FORMS:
        raise ValueError(f"recurrent ops form must be one of {sorted(RECURRENT_FORMS)}, not {form!r}")
    found = False
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain == PLACEHOLDER_DOMAIN:
            node.domain = RECURRENT_FORMS[form].domain
            node.version = None
            found = True
    model.opset_imports.pop(PLACEHOLDER_DOMAIN, None)
    if found and form == "standard":
        model.opset_imports[""] = STANDARD_OPSET
    elif found:
        model.opset_imports[CONTRIB_DOMAIN] = 1
