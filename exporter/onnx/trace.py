"""Export the embedding, the stateful decoder and the MTP head to ONNX (onnx-community Qwen3.5 layout).

Recipe per graph: wrap, trace with `torch.onnx.export(dynamo=True)` with the recurrent custom ops
translated to single nodes, optimize as the exporter does, name every input and output from the I/O
spec, place the recurrent ops in the chosen domain, fuse each norm into one node. A model built by
`Checkpoint.build_skeleton` (or an MTP head built by `build_mtp_skeleton`) traces with its large
matrices as streamed weights (exporter/onnx/streamed.py): the graph is the same as with real values,
and no weight is in memory.
"""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch
from torch.export import Dim
from torch.onnx._internal._lazy_import import onnxscript_apis

from exporter.onnx.layer_stack import (BOUNDARY_TRANSLATION, NotStackable, stack_layers, template_decoder,
                                       template_layers, template_name)
from exporter.onnx.fusions import fuse_contrib
from exporter.onnx.norms import fuse_norms
from exporter.onnx.recurrent import place_recurrent_ops, translation_table
from exporter.onnx.streamed import CheckpointWeight, RowReader, adopt_folded, adopt_placeholders
from graphs.io_spec import DEFAULT_LOGIT_POSITIONS, LOGIT_POSITIONS, GraphSpec, decoder_spec, embed_spec, mtp_spec
from graphs.mtp import DraftableDecoder, MTPDraftStep
from graphs.qwen3_5 import EmbedTokens, Qwen35Decoder
from graphs.state import TOTAL_LENGTH, StateTensor, mtp_state_tensors, state_tensors
from quant.onnx_weights import module_path
from runtime_py.export_format import TRACE_OPSET

# Trace-time sizes: all different and > 1, so no dynamic axis is specialised to a constant.
TRACE_BATCH, TRACE_SEQ, TRACE_PAST, TRACE_LOGITS = 2, 7, 5, 3
NAMED_INPUTS = 3  # forward(inputs_embeds, attention_mask, position_ids, *rest) of the decoder modules


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


def _sample_state(tensors: list[StateTensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Zero state at trace sizes; attention caches get a non-empty past."""
    return [torch.zeros(s.shape(TRACE_BATCH, TRACE_PAST), dtype=torch.float32 if s.role.always_fp32 else dtype)
            for s in tensors]


def _sample_inputs(model: Qwen35Decoder, draftable: bool = False) -> tuple[torch.Tensor, ...]:
    cfg, dtype = model.cfg, activation_dtype(model)
    b, t, p = TRACE_BATCH, TRACE_SEQ, TRACE_PAST
    select = [-torch.arange(TRACE_LOGITS, 0, -1)] if draftable and model.logits_mode == "last" else []
    return (
        torch.zeros(b, t, cfg.hidden_size, dtype=dtype),
        torch.ones(b, p + t, dtype=torch.int64),
        torch.arange(p, p + t).expand(3, b, t).contiguous(),
        *select,
        *_sample_state(state_tensors(cfg), dtype),
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


def _export(module: torch.nn.Module, args: tuple, spec: GraphSpec, dynamic: list,
            weights: StreamedWeights | None) -> ir.Model:
    """torch.onnx.export without its optimizer, streamed weights adopted (so they are in place
    before anything is folded)."""
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
            custom_translation_table={**translation_table(), **BOUNDARY_TRANSLATION},
            opset_version=TRACE_OPSET,
            verbose=False,
            optimize=False,
        )
    model = program.model
    if weights is not None:
        adopt_placeholders(model, weights.reader, weights.sources)
    return model


def _optimize(model: ir.Model, spec: GraphSpec, weights: StreamedWeights | None) -> ir.Model:
    """The optimizer torch.onnx.export runs, then the folded streamed weights adopted."""
    onnxscript_apis.optimize(model)
    if weights is not None:
        adopt_folded(model, weights.reader, dict(weights.sources.values()))
    got_inputs = [v.name for v in model.graph.inputs]
    if got_inputs != spec.input_names:
        raise RuntimeError(f"exported inputs {got_inputs} differ from the I/O spec {spec.input_names}")
    return model


def _trace(module: torch.nn.Module, args: tuple, spec: GraphSpec, dynamic: list,
           weights: StreamedWeights | None) -> ir.Model:
    return _optimize(_export(module, args, spec, dynamic, weights), spec, weights)


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


def _decoder_module(model: Qwen35Decoder, draftable: bool) -> torch.nn.Module:
    return DraftableDecoder(model) if draftable else model


def _decoder_dims(spec: GraphSpec) -> list:
    dims = _dims(spec)
    return [*dims[:NAMED_INPUTS], tuple(dims[NAMED_INPUTS:])]  # the rest arrives as forward's varargs


def stacked_decoder_graph(model: Qwen35Decoder, draftable: bool, weights: StreamedWeights | None) -> ir.Model:
    """The decoder graph traced from one layer of each type and stacked (exporter/onnx/layer_stack.py);
    raises NotStackable when the template cannot be copied."""
    template = template_decoder(model, set() if weights is None else set(weights.sources))
    chosen = template_layers(model.cfg.layer_types)
    dtype = _dtype_name(model)
    spec = decoder_spec(model.cfg, dtype, model.logits_mode == "all", draftable)
    template_spec = decoder_spec(template.cfg, dtype, model.logits_mode == "all", draftable)
    template_weights = None if weights is None else StreamedWeights(weights.reader, {
        name: weights.sources[template_name(name, chosen)]
        for name, _ in template.named_parameters(remove_duplicate=False) if template_name(name, chosen) in weights.sources})
    unoptimized = _export(_decoder_module(template, draftable), _sample_inputs(template, draftable), template_spec,
                          _decoder_dims(template_spec), template_weights)
    traced = _optimize(unoptimized.clone(), template_spec, template_weights)
    params = dict(model.named_parameters(remove_duplicate=False))

    def layer_tensor(name: str) -> ir.TensorProtocol:
        if weights is not None and name in weights.sources:
            source, shape = weights.sources[name]
            return CheckpointWeight(weights.reader, source, shape, ir.DataType.from_numpy(
                torch.empty((), dtype=params[name].dtype).numpy().dtype))
        return ir.Tensor(params[name].detach().numpy(), name=name)

    graph = stack_layers(traced, unoptimized, template.cfg, model.cfg, spec, layer_tensor)
    if weights is not None:
        adopt_folded(graph, weights.reader, dict(weights.sources.values()))
    return graph


def trace_decoder(model: Qwen35Decoder, recurrent_ops: str, draftable: bool = False,
                  weights: StreamedWeights | None = None, stack: bool = True) -> ir.Model:
    """The stateful decoder graph; logits as the model was built to give them (all or last position).

    `draftable` (an export with an MTP head): graphs/mtp.py's DraftableDecoder, which also returns
    the hidden states and takes `logit_positions`, an input with a default. `stack`: trace one layer
    of each type and stack copies (the default, far faster); False, or a template that cannot be
    stacked, traces every layer."""
    graph = None
    if stack:
        try:
            graph = stacked_decoder_graph(model, draftable, weights)
        except NotStackable as why:
            print(f"note: tracing every decoder layer ({why})", file=sys.stderr)
    if graph is None:
        spec = decoder_spec(model.cfg, _dtype_name(model), model.logits_mode == "all", draftable)
        graph = _trace(_decoder_module(model, draftable), _sample_inputs(model, draftable), spec,
                       _decoder_dims(spec), weights)
    finish_decoder_graph(graph, model, recurrent_ops, draftable)
    return graph


def finish_decoder_graph(graph: ir.Model, model: Qwen35Decoder, recurrent_ops: str, draftable: bool) -> None:
    """What every traced decoder graph gets: the default of `logit_positions`, the recurrent ops in
    their domain, fused norms (and in the contrib form residual norms and softplus, exporter/onnx/fusions.py),
    the spec's names and descriptions."""
    spec = decoder_spec(model.cfg, _dtype_name(model), model.logits_mode == "all", draftable)
    if LOGIT_POSITIONS in spec.input_names:
        _give_default(graph, LOGIT_POSITIONS, np.array(DEFAULT_LOGIT_POSITIONS, np.int64))
    place_recurrent_ops(graph, recurrent_ops)
    fuse_norms(graph, recurrent_ops)
    if recurrent_ops == "contrib":
        fuse_contrib(graph)
    _describe(graph, spec, f"Qwen3.5 hybrid decoder, prefill and decode, recurrent ops: {recurrent_ops} (qwen-edge)")


def _give_default(model: ir.Model, name: str, value: np.ndarray) -> None:
    """Make graph input `name` optional: an initializer of the same name is its default, which ONNX
    Runtime uses when the input is not fed (and does not list it among the required inputs)."""
    graph_input = next(v for v in model.graph.inputs if v.name == name)
    graph_input.const_value = ir.Tensor(value, name=name)
    model.graph.register_initializer(graph_input)


def trace_mtp(step: MTPDraftStep, weights: StreamedWeights | None = None) -> ir.Model:
    """The MTP head graph (graphs/mtp.py) over its own KV cache; `weights`: the placeholders of a
    head built by `Checkpoint.build_mtp_skeleton` (and of the shared LM head)."""
    cfg = step.cfg
    dtype = step.mtp.fc.weight.dtype
    spec = mtp_spec(cfg, {torch.float32: "float32", torch.float16: "float16"}[dtype])
    b, t, p = TRACE_BATCH, TRACE_SEQ, TRACE_PAST
    args = (torch.zeros(b, t, cfg.hidden_size, dtype=dtype), torch.zeros(b, t, cfg.hidden_size, dtype=dtype),
            torch.ones(b, p + t, dtype=torch.int64), torch.arange(p, p + t).expand(3, b, t).contiguous(),
            *_sample_state(mtp_state_tensors(cfg), dtype))
    graph = _trace(step, args, spec, _dims(spec), weights)
    fuse_norms(graph, "contrib")
    fuse_contrib(graph)
    _describe(graph, spec, "Qwen3.5 multi-token-prediction head: drafts the token after next (qwen-edge)")
    return graph
