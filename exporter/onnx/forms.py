"""The two forms of an exported decoder graph, and the lossless conversion from one to the other.

- "standard": the recurrent ops `LinearAttention` / `CausalConvWithState` in ONNX opset 27 and the
  norms as `RMSNormalization` (ONNX Runtime >= 1.32);
- "contrib": the same ops in `com.microsoft` and the norms as ONNX Runtime's
  `SimplifiedLayerNormalization`, the rest of the graph on the trace opset (ORT >= 1.25, what web
  and mobile runtimes load).

`to_contrib` turns a saved standard graph into the contrib form (the app bundles need it), and
`as_plain_decoder` gives a draftable decoder the plain decoder's I/O (what onnxruntime-genai binds).
Both edit protobufs only, so packaging needs neither torch nor the weights in memory.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx
import onnx_ir as ir

from graphs.io_spec import HIDDEN_STATES, LOGIT_POSITIONS
from runtime_py.export_format import RECURRENT_FORMS, TRACE_OPSET

RECURRENT_OPS = ("LinearAttention", "CausalConvWithState")
NORM_OP = {"standard": "RMSNormalization", "contrib": "SimplifiedLayerNormalization"}
CONTRIB_DOMAIN = RECURRENT_FORMS["contrib"].domain


def to_contrib(model: onnx.ModelProto) -> bool:
    """Turn a standard (opset-27) graph into the contrib form, in place.

    The recurrent nodes move to `com.microsoft`, each fused norm becomes
    `SimplifiedLayerNormalization` (exporter/onnx/norms.py), and the contrib fusions run
    (exporter/onnx/fusions.py): same weights (external data untouched), so the result is the graph
    `--recurrent-ops contrib` would have written. Returns False when the graph had no standard node.
    """
    from exporter.onnx.fusions import fuse_contrib  # fusions.py reads this module's op names

    standard = [n for n in all_nodes(model.graph) if n.domain in ("", "ai.onnx")
                and n.op_type in (*RECURRENT_OPS, NORM_OP["standard"])]
    if not standard:
        return False
    for node in standard:
        if node.op_type == NORM_OP["standard"]:
            node.op_type = NORM_OP["contrib"]
        else:
            node.domain = CONTRIB_DOMAIN
    imports = {o.domain: o.version for o in model.opset_import}
    imports[""] = TRACE_OPSET
    imports[CONTRIB_DOMAIN] = max(imports.get(CONTRIB_DOMAIN, 1), 1)
    imports.pop("ai.onnx", None)
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in sorted(imports.items()))
    fused = ir.serde.deserialize_model(model)
    if fuse_contrib(fused):
        model.CopyFrom(ir.serde.serialize_model(fused))
    return True


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node, including those of subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from all_nodes(sub)


def as_plain_decoder(model: onnx.ModelProto) -> bool:
    """Give a draftable decoder (an export with an MTP head) the plain decoder's inputs and outputs,
    in place; returns whether it was draftable.

    onnxruntime-genai allocates `logits` as [batch, new tokens, vocab] unless their second dim is a
    fixed 1, and knows neither `logit_positions` nor `hidden_states`: fed a draftable decoder it fails
    at the first call. Dropping the input leaves its default ([-1], the last position) as a constant,
    so the logits are the last position's, a fixed 1 row; the hidden states stay an internal value."""
    graph = model.graph
    if not any(o.name == HIDDEN_STATES for o in graph.output):
        return False
    selects = any(i.name == LOGIT_POSITIONS for i in graph.input)
    kept_inputs = [i for i in graph.input if i.name != LOGIT_POSITIONS]
    kept_outputs = [o for o in graph.output if o.name != HIDDEN_STATES]
    del graph.input[:], graph.output[:]
    graph.input.extend(kept_inputs)
    graph.output.extend(kept_outputs)
    if selects:
        rows = next(o for o in graph.output if o.name == "logits").type.tensor_type.shape.dim[1]
        rows.Clear()
        rows.dim_value = 1
    return True
