"""Export the embedding and the stateful decoder to ONNX (onnx-community Qwen3.5 layout).

Recipe per graph: wrap, trace with `torch.onnx.export(dynamo=True)` with the recurrent custom ops
translated to single nodes, optimize as the exporter does, name every input and output from the I/O
spec, place the recurrent ops in the chosen domain, fuse each norm into one node. A model built by
`Checkpoint.build_skeleton` traces with its large matrices as streamed weights (exporter/onnx/streamed.py):
the graph is the same as with real values, and no weight is in memory.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import onnx_ir as ir
import torch
from torch.export import Dim
from torch.onnx._internal._lazy_import import onnxscript_apis

from exporter.onnx.norms import fuse_norms
from exporter.onnx.recurrent import place_recurrent_ops, translation_table
from exporter.onnx.streamed import RowReader, adopt_folded, adopt_placeholders
from graphs.io_spec import GraphSpec, decoder_spec, embed_spec
from graphs.qwen3_5 import EmbedTokens, Qwen35Decoder
from graphs.state import TOTAL_LENGTH, state_tensors
from quant.onnx_weights import module_path
from runtime_py.export_format import TRACE_OPSET

# Trace-time sizes: all different and > 1, so no dynamic axis is specialised to a constant.
TRACE_BATCH, TRACE_SEQ, TRACE_PAST = 2, 7, 5


def _dims(spec: GraphSpec) -> list[dict[int, object]]:
    """torch.export dynamic-shape entries for each input of a spec (str dims are dynamic)."""
    shared: dict[str, object] = {}
    out = []
    for t in spec.inputs:
        entry = {}
        for axis, dim in enumerate(t.dims):
            if isinstance(dim, str):
                # The mask spans past + current tokens: a relation torch.export infers itself.
                entry[axis] = Dim.AUTO if dim == TOTAL_LENGTH else shared.setdefault(dim, Dim(dim))
        out.append(entry)
    return out


def activation_dtype(model: Qwen35Decoder) -> torch.dtype:
    return model.embed_tokens.weight.dtype


def _sample_inputs(model: Qwen35Decoder) -> tuple[torch.Tensor, ...]:
    cfg, dtype = model.cfg, activation_dtype(model)
    b, t, p = TRACE_BATCH, TRACE_SEQ, TRACE_PAST
    state = [torch.zeros(s.shape(b, p), dtype=torch.float32 if s.role.always_fp32 else dtype)
             for s in state_tensors(cfg)]  # attention caches get a non-empty past
    return (
        torch.zeros(b, t, cfg.hidden_size, dtype=dtype),
        torch.ones(b, p + t, dtype=torch.int64),
        torch.arange(p, p + t).expand(3, b, t).contiguous(),
        *state,
    )


def _name_dynamic_axes(model: ir.Model, spec: GraphSpec) -> None:
    """Give every dynamic axis the spec's name (`total_sequence_length`, not the tracer's `s53` or
    `sequence_length + past_sequence_length`), in the graph's I/O and in every intermediate shape."""
    dims = {t.name: t.dims for t in (*spec.inputs, *spec.outputs)}
    rename: dict[str, str] = {}
    for value in (*model.graph.inputs, *model.graph.outputs):
        for traced, wanted in zip(value.shape or (), dims.get(value.name, ())):
            if isinstance(wanted, str) and isinstance(traced, ir.SymbolicDim) and traced.value != wanted:
                rename[traced.value] = wanted
    if not rename:
        return
    values = [*model.graph.inputs, *(out for node in model.graph for out in node.outputs)]
    for value in values:
        if value.shape is not None and any(isinstance(d, ir.SymbolicDim) and d.value in rename for d in value.shape):
            value.shape = ir.Shape([ir.SymbolicDim(rename[d.value]) if isinstance(d, ir.SymbolicDim) and d.value in rename
                                    else d for d in value.shape])


def _describe(model: ir.Model, spec: GraphSpec, doc: str) -> None:
    """Put the spec's descriptions and axis names on the graph's inputs and outputs (self-describing artifact)."""
    _name_dynamic_axes(model, spec)
    model.graph.doc_string = doc
    docs = {t.name: t.doc for t in (*spec.inputs, *spec.outputs)}
    for value in (*model.graph.inputs, *model.graph.outputs):
        value.doc_string = docs.get(value.name, "")
    model.producer_name = "qwen-edge"


@dataclass(frozen=True)
class StreamedWeights:
    """The placeholders of a skeleton model: {parameter name: (checkpoint tensor, shape)}, read from `reader`."""

    reader: RowReader
    sources: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)


def _trace(module: torch.nn.Module, args: tuple, spec: GraphSpec, dynamic: list,
           weights: StreamedWeights | None) -> ir.Model:
    """torch.onnx.export, with its optimizer run here (the same call it makes) so that streamed
    weights are in place before anything is folded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=tuple(dynamic),
            custom_translation_table=translation_table(),
            opset_version=TRACE_OPSET,
            verbose=False,
            optimize=False,
        )
    model = program.model
    if weights is not None:
        adopt_placeholders(model, weights.reader, weights.sources)
    onnxscript_apis.optimize(model)
    if weights is not None:
        adopt_folded(model, weights.reader, dict(weights.sources.values()))
    got_inputs = [v.name for v in model.graph.inputs]
    if got_inputs != spec.input_names:
        raise RuntimeError(f"exported inputs {got_inputs} differ from the I/O spec {spec.input_names}")
    return model


def name_nodes_and_strip_trace_metadata(model: ir.Model) -> None:
    """Name each node by its place in the model (`/layers/3/self_attn/q_proj/MatMul`) and drop the
    exporter's per-node trace metadata (stack traces, FX names): a smaller graph whose profiles read well."""
    seen: dict[str, int] = {}
    for node in model.graph:
        path = module_path(node)
        if path is not None:
            path = "" if path.startswith("_") else path  # the exporter's placeholder for the root module
            base = f"/{path.replace('.', '/')}/{node.op_type}" if path else f"/{node.op_type}"
            count = seen.get(base, 0)
            seen[base] = count + 1
            node.name = base if count == 0 else f"{base}_{count}"
        node.metadata_props.clear()


def _dtype_name(model: Qwen35Decoder) -> str:
    return {torch.float32: "float32", torch.float16: "float16"}[activation_dtype(model)]


def trace_embed(model: Qwen35Decoder, weights: StreamedWeights | None = None) -> ir.Model:
    spec = embed_spec(model.cfg, _dtype_name(model))
    ids = torch.zeros(TRACE_BATCH, TRACE_SEQ, dtype=torch.int64)
    graph = _trace(EmbedTokens(model.embed_tokens), (ids,), spec, _dims(spec), _prefixed(weights, "embed."))
    _describe(graph, spec, "Qwen3.5 token embedding (qwen-edge)")
    return graph


def _prefixed(weights: StreamedWeights | None, prefix: str) -> StreamedWeights | None:
    """The embedding module traced alone names its table `embed.weight`."""
    if weights is None:
        return None
    return StreamedWeights(weights.reader, {prefix + k.removeprefix("embed_tokens."): v
                                            for k, v in weights.sources.items() if k.startswith("embed_tokens.")})


def trace_decoder(model: Qwen35Decoder, recurrent_ops: str, weights: StreamedWeights | None = None) -> ir.Model:
    """The stateful decoder graph; logits as the model was built to give them (all or last position)."""
    spec = decoder_spec(model.cfg, _dtype_name(model), model.logits_mode == "all")
    dims = _dims(spec)
    fixed = len(spec.inputs) - len(state_tensors(model.cfg))
    dynamic = [*dims[:fixed], tuple(dims[fixed:])]  # the state arrives as forward's *state varargs
    graph = _trace(model, _sample_inputs(model), spec, dynamic, weights)
    place_recurrent_ops(graph, recurrent_ops)
    fuse_norms(graph, recurrent_ops)
    _describe(graph, spec, f"Qwen3.5 hybrid decoder, prefill and decode, recurrent ops: {recurrent_ops} (qwen-edge)")
    return graph
