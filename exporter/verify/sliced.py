"""The decoder graph of an export run one layer at a time: parity of an export larger than memory.

ONNX Runtime's CPU provider has no fp16 kernels for most of the decoder's ops: it casts an fp16
variant's weights to fp32 when it loads them, so a session holds about twice the variant's bytes. The
9B fp16 decoder (19.3 GB) was killed at 22.7 GiB on this 24 GiB machine (BENCHMARKS.md, 2026-12-02).
Here the graph is cut into segments, one per decoder layer (nodes are assigned by their `/layers/i/`
name scope, and every other node goes with the latest segment it reads from), plus the final norm and
LM head. One segment's session is loaded at a time, and every call of every prompt runs through it
before the next one is loaded. Memory is one segment's weights, whatever the model's depth.

Running layer by layer means every call's input must be known before any call's logits are. So the
decode calls are fed the tokens of a fixed sequence, not the target's own greedy token. Each call is
still compared with the reference on the same history, and a greedy disagreement at any position still fails.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from exporter.onnx.layer_stack import TYPE_ONLY
from graphs.errors import QwenEdgeError
from graphs.state import BATCH, is_state_input, is_state_output, past_name_for
from runtime_py.export_format import onnx_variant_files
from runtime_py.session import GraphRewrite, call_positions, graph_session

LAYER_SCOPE = re.compile(r"^/layers/(\d+)/")
HEAD_SCOPES = ("/norm/", "/lm_head/")  # graphs/qwen3_5.py's module names after the last layer
PAST = "past length"  # a call's own record: the cache length it receives
_NP = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT64: np.int64}


@dataclass(frozen=True)
class Segment:
    """One piece of the decoder graph, as a model whose weights stay in the export's data file."""

    model: bytes
    inputs: tuple[str, ...]  # graph inputs and values of earlier segments it reads
    outputs: tuple[str, ...]  # values later segments read, and graph outputs
    shape_only: tuple[str, ...] = ()  # state inputs it reads before their layer, only for their shape


def _reads(node: onnx.NodeProto) -> set[str]:
    """Every value a node reads, including those its subgraphs (Scan, If, Loop bodies) take from outside."""
    names = {n for n in node.input if n}
    for attr in node.attribute:
        for graph in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            inner = {i.name for i in graph.input} | {t.name for t in graph.initializer}
            for sub in graph.node:
                names |= _reads(sub) - inner
                inner |= set(sub.output)
    return names


def _type_only_reader(node: onnx.NodeProto, name: str) -> bool:
    """Whether `node` reads `name` only for its shape or element type (a past length from a cache's shape)."""
    positions = TYPE_ONLY.get(node.op_type, ())
    return name not in _reads(node) - {node.input[i] for i in positions if i < len(node.input)}


def _pin(node: onnx.NodeProto, layers: int) -> int:
    """The earliest segment a node's name scope allows."""
    match = LAYER_SCOPE.match(node.name)
    if match:
        return int(match.group(1))
    return layers if node.name.startswith(HEAD_SCOPES) else 0


def segments(model: onnx.ModelProto) -> list[Segment]:
    """Cut a decoder graph (loaded without its external data) into one segment per layer and one for
    the head. A segment never reads a later one; a state input must be read no earlier than the segment
    that writes its next value, or the layer-by-layer order could not feed it."""
    graph = model.graph
    layers = 1 + max((int(m.group(1)) for n in graph.node if (m := LAYER_SCOPE.match(n.name))), default=-1)
    initializers = {t.name: t for t in graph.initializer}
    types = {v.name: v for v in (*graph.input, *graph.value_info, *graph.output)}
    produced_in: dict[str, int] = {}
    nodes: list[list[onnx.NodeProto]] = [[] for _ in range(layers + 1)]
    for node in graph.node:
        where = max([_pin(node, layers), *(produced_in[v] for v in _reads(node) if v in produced_in)])
        nodes[where].append(node)
        produced_in.update((out, where) for out in node.output if out)
    graph_outputs = {o.name for o in graph.output}
    writer_of = {past_name_for(o): produced_in[o] for o in graph_outputs if is_state_output(o)}
    read_by = [set().union(*(_reads(n) for n in seg)) if seg else set() for seg in nodes]
    out: list[Segment] = []
    for index, seg in enumerate(nodes):
        if not seg:
            continue
        made = {o for n in seg for o in n.output if o}
        inputs = sorted(v for v in read_by[index] - made if v not in initializers)
        later = set().union(*read_by[index + 1 :]) if index + 1 < len(read_by) else set()
        outputs = sorted(v for v in made if v in later or v in graph_outputs)
        for name in (*inputs, *outputs):
            if name not in types:
                raise QwenEdgeError(f"decoder value {name!r} has no type in the graph; cannot run it layer by layer")
        shape_only = []
        for name in inputs:
            if is_state_input(name) and writer_of.get(name, index) > index:
                if not all(_type_only_reader(n, name) for n in seg if name in _reads(n)):
                    raise QwenEdgeError(f"state input {name!r} is read before its layer; cannot run it layer by layer")
                shape_only.append(name)
        used = sorted(v for v in read_by[index] if v in initializers)
        sub = onnx.helper.make_graph(seg, f"{graph.name}_segment{index}", [types[n] for n in inputs],
                                     [types[n] for n in outputs], [initializers[n] for n in used])
        piece = onnx.helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
        out.append(Segment(piece.SerializeToString(), tuple(inputs), tuple(outputs), tuple(shape_only)))
    return out


def _zeros(info: onnx.ValueInfoProto, past: int = 0) -> np.ndarray:
    """A state input of batch 1 and cache length `past`, zeros: the empty state when `past` is 0."""
    dims = [1 if d.dim_param == BATCH else (d.dim_value if d.HasField("dim_value") else past)
            for d in info.type.tensor_type.shape.dim]
    return np.zeros(dims, _NP[info.type.tensor_type.elem_type])


def sliced_calls(export_dir: Path, variant: str, sequences: list[list[int]], prompt_lengths: list[int],
                 rewrite: GraphRewrite | None = None, threads: int | None = None) -> list[list[np.ndarray]]:
    """The logits of each call, per sequence: one prefill of its first `prompt_lengths[i]` tokens, then one
    decode call per remaining token, as `exporter.verify.parity.target_calls` returns them."""
    embed_path, decoder_path = onnx_variant_files(Path(export_dir), variant)
    embed = graph_session(embed_path, threads, rewrite)
    calls = [[ids[:n]] + [[t] for t in ids[n:]] for ids, n in zip(sequences, prompt_lengths)]
    model = (onnx.load_from_string(rewrite(decoder_path)) if rewrite
             else onnx.load(str(decoder_path), load_external_data=False))
    embeds_type = _NP[model.graph.input[0].type.tensor_type.elem_type]
    values: list[list[dict[str, np.ndarray]]] = []  # per sequence, per call: the values between segments
    for seq in calls:
        past, positions, per_call = np.zeros((1, 0), np.int64), np.zeros((1,), np.int64), []
        for ids in seq:
            new_mask = np.ones((1, len(ids)), np.int64)
            mask, position_ids, positions = call_positions(past, positions, new_mask)
            vector = embed.run(None, {"input_ids": np.array([ids], np.int64)})[0].astype(embeds_type)
            per_call.append({"inputs_embeds": vector, "attention_mask": mask, "position_ids": position_ids,
                             PAST: past.shape[1]})
            past = mask
        values.append(per_call)
    del embed
    state_inputs = {i.name: i for i in model.graph.input if is_state_input(i.name)}
    for seq_values in values:
        seq_values[0].update((name, _zeros(info)) for name, info in state_inputs.items())
    pieces = segments(model)
    for index, segment in enumerate(pieces):
        # Prepacked weights would be a second copy of each one (the 9B LM head's alone is 4 GB in fp32)
        session = graph_session(decoder_path, threads, model=segment.model, prepack=False)
        for seq_values in values:
            for step, call in enumerate(seq_values):
                feeds = {n: _zeros(state_inputs[n], call[PAST]) if n in segment.shape_only else call[n]
                         for n in segment.inputs}
                results = session.run(list(segment.outputs), feeds)
                for name, value in zip(segment.outputs, results):
                    if not is_state_output(name):
                        call[name] = value
                    elif step + 1 < len(seq_values):  # what the next call of this sequence reads
                        seq_values[step + 1][past_name_for(name)] = value
        del session
        needed = {"logits"}.union(*(later.inputs for later in pieces[index + 1 :]))
        for seq_values in values:
            for call in seq_values:
                for name in [n for n in call if n not in needed and n != PAST]:
                    del call[name]  # a layer's states of every call add up to gigabytes on the 9B shape
    return [[call["logits"][0] for call in seq_values] for seq_values in values]

