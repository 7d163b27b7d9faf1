"""Trace one decoder layer of each type, then stack copies of them into the whole decoder graph.

Tracing (torch.export, decomposition, translation, onnxscript's optimizer) costs time per node, and
a Qwen3.5 decoder is the same two layers repeated: a 24-layer trace of the 0.8B shape spent over
95 % of its time on the layers. So the decoder is traced with one layer of each type (the
*template*: the first layer of each `layer_types` entry), marked at every layer boundary, and the
graph of layer i is a copy of its type's template with layer i's weights, state inputs and outputs.

What makes a copy exact:
- Partition by data, not by name scopes: a node belongs to template layer j when it depends on layer
  j's sources (the boundary marker before it, its state inputs, its weights); a node that depends on
  no layer is shared by all of them (masks, RoPE tables, shapes); after the last marker comes the
  head. Anything that reads two layers' values makes the template unusable (`NotStackable`).
- Folded weights are refolded: the optimizer folded expressions of small weights into constants
  (`1 + norm.weight`, `-exp(A_log)`, transposes). For each copy, the same folding pass runs on the
  unoptimized template's expression of that constant, with layer i's weights in place of layer j's;
  for the template's own layers the refolded bytes must equal the optimizer's, or stacking is refused.
- Node name scopes say `layers.i`, so quantization recipes and node names see the real layer.

The stacked graph has the ops of a whole-model trace (tests/test_layer_stack.py checks both graphs
give bit-identical outputs); `trace_decoder` falls back to the whole trace on `NotStackable`.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import onnx
import onnx_ir as ir
import torch
from onnxscript.optimizer import _constant_folding
from onnxscript.values import Op, Opset

from graphs.config import TextConfig
from graphs.io_spec import GraphSpec
from graphs.qwen3_5 import Qwen35Decoder
from graphs.state import state_tensors

BOUNDARY_DOMAIN = "qwen_edge.boundary"
SCOPES = "pkg.torch.onnx.name_scopes"
# inputs of which an op reads only the shape or the element type, not the values
TYPE_ONLY = {"Shape": (0,), "Size": (0,), "CastLike": (1,)}
LayerTensor = Callable[[str], ir.TensorProtocol]  # real parameter name ("layers.7.mlp.up_proj.weight") -> value


class NotStackable(Exception):
    """The template's graph cannot be copied layer by layer; the reason says where."""


@torch.library.custom_op("qwen_edge::layer_boundary", mutates_args=())
def layer_boundary(x: torch.Tensor, index: int) -> torch.Tensor:
    """Identity that marks where layer `index` starts (index = layer count: where the head starts)."""
    return x.clone()


@layer_boundary.register_fake
def _(x: torch.Tensor, index: int) -> torch.Tensor:
    return torch.empty_like(x)


def _boundary_op() -> Op:
    schema = onnx.defs.OpSchema(
        "LayerBoundary", BOUNDARY_DOMAIN, 1,
        inputs=[onnx.defs.OpSchema.FormalParameter("x", "T")],
        outputs=[onnx.defs.OpSchema.FormalParameter("y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "hidden states")],
        attributes=[onnx.defs.OpSchema.Attribute("index", onnx.defs.OpSchema.AttrType.INT, "layer index")],
    )
    return Op(Opset(BOUNDARY_DOMAIN, 1), "LayerBoundary", schema)


_BOUNDARY = _boundary_op()


def _boundary_onnx(x, index: int):  # noqa: ANN001, ANN202
    return _BOUNDARY(x, index=index)


BOUNDARY_TRANSLATION = {torch.ops.qwen_edge.layer_boundary.default: _boundary_onnx}


def template_layers(layer_types: tuple[str, ...]) -> list[int]:
    """The first layer of each type, in order: the layers the template traces."""
    first: dict[str, int] = {}
    for i, kind in enumerate(layer_types):
        first.setdefault(kind, i)
    return sorted(first.values())


def template_decoder(model: Qwen35Decoder, placeholders: set[str]) -> Qwen35Decoder:
    """A decoder over the template layers of `model` (its module paths and weight shapes), with a
    boundary marker before each layer and before the head.

    The template layers' real-valued tensors get distinct stand-in values: every copy's constants are
    refolded from its own weights anyway, and equal weights in two layers (a freshly initialised
    checkpoint's norms) would let the optimizer merge their constants into one, across layers. The
    `placeholders` (real parameter names) stay the zero-memory views they are."""
    chosen = template_layers(model.cfg.layer_types)
    cfg = replace(model.cfg, layer_types=tuple(model.cfg.layer_types[i] for i in chosen), num_hidden_layers=len(chosen))
    with torch.device("meta"):
        shell = Qwen35Decoder(cfg, model.kernels, model.logits_mode)
    shell.embed_tokens, shell.norm, shell.lm_head = model.embed_tokens, model.norm, model.lm_head
    stand_in = torch.Generator().manual_seed(0)
    for j, i in enumerate(chosen):
        shell.layers[j].load_state_dict(stand_in_values(model.layers[i], stand_in, f"layers.{i}.", placeholders),
                                        strict=True, assign=True)
    shell.layer_boundary = torch.ops.qwen_edge.layer_boundary
    return shell.eval()


def stand_in_values(layer: torch.nn.Module, gen: torch.Generator, prefix: str = "",
                    keep: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Distinct stand-in values for a template layer's parameters (those named in `keep`, with
    `prefix`, stay as they are: the zero-memory placeholders)."""
    return {name: p if prefix + name in keep else (0.25 + 0.5 * torch.rand(p.shape, generator=gen)).to(p.dtype)
            for name, p in layer.named_parameters()}


def _split_param(name: str, prefix: str = "layers") -> tuple[int | None, str]:
    """`layers.j.X` -> (j, X); any other name -> (None, name)."""
    match = re.match(rf"{prefix}\.(\d+)\.", name)
    return (None, name) if match is None else (int(match.group(1)), name[match.end():])


def _layer_of_param(name: str, prefix: str = "layers") -> int | None:
    return _split_param(name, prefix)[0]


def template_name(name: str, chosen: list[int]) -> str:
    """`layers.j.X` of the template -> `layers.i.X` of the model (other names are the same)."""
    j, rest = _split_param(name)
    return name if j is None else f"layers.{chosen[j]}.{rest}"


def _state_roles(cfg: TextConfig, past: bool) -> dict[str, tuple[int, str]]:
    """{state input (past) or output name: (layer, role)}."""
    return {t.past_name if past else t.present_name: (t.layer, t.role.role) for t in state_tensors(cfg)}


@dataclass(frozen=True)
class Repeats:
    """What repeats in a graph: modules `prefix.i` of one kind each, their state inputs and outputs
    {name: (i, role)}, and the graph input that enters copy 0 (None: a value the shared nodes compute,
    as the vision tower's patch embedding)."""

    prefix: str
    kinds: tuple[str, ...]
    past: dict[str, tuple[int, str]]
    present: dict[str, tuple[int, str]]
    hidden_input: str | None

    @staticmethod
    def of_decoder(cfg: TextConfig, hidden_input: str) -> "Repeats":
        return Repeats("layers", tuple(cfg.layer_types), _state_roles(cfg, past=True), _state_roles(cfg, past=False),
                       hidden_input)


class _Template:
    """The optimized template graph, split into shared nodes, each layer's nodes and the head's."""

    def __init__(self, traced: ir.Model, unoptimized: ir.Model, repeats: Repeats) -> None:
        self.unoptimized, self.prefix = unoptimized, repeats.prefix
        self.producers = {out.name: node for node in unoptimized.graph for out in node.outputs}
        graph = traced.graph
        self.layers = len(repeats.kinds)
        self.inputs = {v.name: v for v in graph.inputs}
        self.hidden_input = repeats.hidden_input
        self.state_inputs, self.state_outputs = repeats.past, repeats.present
        self.initializer_layer = {name: self._initializer_layer(name, value) for name, value in graph.initializers.items()}
        self.markers: dict[int, ir.Node] = {}
        self.label: dict[ir.Value, object] = {}  # None: shared; int j: template layer j; "head"
        self.nodes: dict[object, list[ir.Node]] = {None: [], "head": [], **{j: [] for j in range(self.layers)}}
        self._partition(graph)
        for value in graph.outputs:
            want = self.state_outputs.get(value.name, ("head",))[0]
            if self.label.get(value) != want:
                raise NotStackable(f"graph output {value.name} is computed in {self.label.get(value)!r}, not {want!r}")

    def _initializer_layer(self, name: str, value: ir.Value) -> int | None:
        """The template layer whose weights an initializer is (or was folded from); None when shared.

        An int64 vector the optimizer made by a rewrite (a Reshape target with -1 for its one dynamic
        dim, no node of its own) is a shape: every copy of a kind has the same shapes, so it is shared."""
        if _layer_of_param(name, self.prefix) is not None:
            return _layer_of_param(name, self.prefix)
        if name not in self.producers:
            if name in self.unoptimized.graph.initializers or name in {v.name for v in self.unoptimized.graph.inputs}:
                return None
            if value.const_value is not None and value.const_value.dtype == ir.DataType.INT64 \
                    and len(value.const_value.shape) == 1:
                return None
            raise NotStackable(f"initializer {name} has no origin in the traced template")
        layers = {_layer_of_param(p, self.prefix) for p in _cone(self.unoptimized, [name])[1]} - {None}  # graph inputs: None
        if len(layers) > 1:
            raise NotStackable(f"initializer {name} is folded from the weights of several layers")
        return layers.pop() if layers else None

    def _partition(self, graph: ir.Graph) -> None:
        self.graph_inputs = set(graph.inputs)
        for value in graph.inputs:
            self.label[value] = self.state_inputs[value.name][0] if value.name in self.state_inputs else None
        if self.hidden_input is not None:
            self.label[self.inputs[self.hidden_input]] = "embeds"
        for name, value in graph.initializers.items():
            self.label[value] = self.initializer_layer[name]
        for node in graph:
            if node.domain == BOUNDARY_DOMAIN:
                index = node.attributes["index"].as_int()
                before = self.label.get(node.inputs[0])
                expected = index - 1 if index else ("embeds" if self.hidden_input is not None else None)
                if before != expected:
                    raise NotStackable(f"the boundary before layer {index} reads {before!r}")
                self.markers[index] = node
                self.label[node.outputs[0]] = index if index < self.layers else "head"
                continue
            if node.op_type == "Shape" and node.inputs[0] in self.graph_inputs:
                # a graph input's shape is made of the call's shared sizes (batch, lengths, static
                # dims), whichever input the tracer read them from
                self.nodes[None].append(node)
                self.label[node.outputs[0]] = None
                continue
            labels = {self.label.get(v) for v in node.inputs if v is not None} - {None}
            if "embeds" in labels:
                raise NotStackable(f"{node.op_type} node {node.name} reads inputs_embeds before the first layer")
            if len(labels) > 1:
                raise NotStackable(f"node {node.name} ({node.op_type}) reads values of {sorted(map(str, labels))}: "
                                   + ", ".join(f"{v.name}={self.label.get(v)!r}" for v in node.inputs if v is not None))
            where = labels.pop() if labels else None
            self.nodes[where].append(node)
            for out in node.outputs:
                self.label[out] = where
        if sorted(self.markers) != list(range(self.layers + 1)):
            raise NotStackable(f"layer boundaries found: {sorted(self.markers)}")


def _cone(model: ir.Model, names: list[str]) -> tuple[list[ir.Node], set[str]]:
    """The nodes (in graph order) that compute the values `names` of `model`, and the initializers and
    graph inputs they read (a constant the optimizer folded may have read a graph input's static shape)."""
    producers = {out.name: node for node in model.graph for out in node.outputs}
    needed: set[int] = set()
    read: set[str] = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        node = producers.get(name)
        if node is None:
            read.add(name)
            continue
        if id(node) in needed:
            continue
        needed.add(id(node))
        stack += [v.name for k, v in enumerate(node.inputs) if v is not None and k not in TYPE_ONLY.get(node.op_type, ())]
    return [node for node in model.graph if id(node) in needed], read


def refold(model: ir.Model, names: list[str], substitute: dict[str, ir.TensorProtocol]) -> dict[str, ir.TensorProtocol]:
    """The constants `names` of the unoptimized `model`, folded by the optimizer's folding pass with
    the initializers in `substitute` replaced."""
    nodes, read = _cone(model, names)
    if read - set(model.graph.initializers):
        raise NotStackable(f"constants {names} read graph inputs {sorted(read - set(model.graph.initializers))}")
    values: dict[str, ir.Value] = {}
    initializers = []
    for name in sorted(read):
        source = model.graph.initializers[name]
        tensor = substitute.get(name, source.const_value)
        values[name] = ir.Value(name=name, type=source.type, shape=ir.Shape(tensor.shape), const_value=tensor)
        initializers.append(values[name])
    copies = []
    for node in nodes:
        if any(v is not None and v.name not in values for v in node.inputs):
            raise NotStackable(f"constant {names}: {node.op_type} reads the type of a computed value")
        copies.append(_copy_node(node, values))
    graph = ir.Graph([], [values[name] for name in names], nodes=copies, initializers=initializers,
                     opset_imports=dict(model.graph.opset_imports))
    folded = ir.Model(graph, ir_version=model.ir_version)
    _constant_folding.FoldConstantsPass(shape_inference=True,
                                        input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                        output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT)(folded)
    out = {}
    for value in folded.graph.outputs:
        if value.const_value is None:
            raise NotStackable(f"constant {value.name} does not fold for another layer")
        out[value.name] = value.const_value
    return out


def _copy_node(node: ir.Node, values: dict[str, ir.Value], rename: Callable[[str], str] = lambda s: s,
               scopes: Callable[[str], str] = lambda s: s) -> ir.Node:
    """A copy of `node` reading `values` (by the original input names); its outputs are added there."""
    inputs = [None if v is None else values[v.name] for v in node.inputs]
    props = dict(node.metadata_props)
    if SCOPES in props:
        props[SCOPES] = scopes(props[SCOPES])
    copy = ir.Node(node.domain, node.op_type, inputs, list(node.attributes.values()), overload=node.overload,
                   num_outputs=len(node.outputs), version=node.version, name=rename(node.name or node.op_type),
                   doc_string=node.doc_string, metadata_props=props)
    for old, new in zip(node.outputs, copy.outputs):
        new.name, new.type = rename(old.name), old.type
        new.shape = None if old.shape is None else ir.Shape(old.shape)
        values[old.name] = new
    return copy


def _stream_key(tensor: ir.TensorProtocol) -> tuple | None:
    """(checkpoint tensor, permutation) of a streamed weight, before (WeightRef) or after adoption."""
    for ref in (tensor, getattr(tensor, "raw", None)):
        if hasattr(ref, "source") and hasattr(ref, "perm"):
            return ref.source, tuple(ref.perm)
    return None


def _same_tensor(a: ir.TensorProtocol, b: ir.TensorProtocol) -> bool:
    """Equal bytes; a streamed weight has none yet, and compares by what it will be read from."""
    if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
        return False
    if _stream_key(a) is not None or _stream_key(b) is not None:
        return _stream_key(a) == _stream_key(b)
    return a.tobytes() == b.tobytes()


def stack_layers(traced: ir.Model, unoptimized: ir.Model, template_cfg: TextConfig, cfg: TextConfig,
                 spec: GraphSpec, layer_tensor: LayerTensor) -> ir.Model:
    """The whole decoder graph from the template's: its shared nodes once, a copy of the template layer
    of each layer's type per layer (with that layer's weights and state), then the head."""
    hidden = spec.input_names[0]
    return stack_copies(traced, unoptimized, Repeats.of_decoder(template_cfg, hidden), Repeats.of_decoder(cfg, hidden),
                        spec.input_names, spec.output_names, layer_tensor)


def stack_copies(traced: ir.Model, unoptimized: ir.Model, template_repeats: Repeats, repeats: Repeats,
                 input_names: list[str], output_names: list[str], layer_tensor: LayerTensor) -> ir.Model:
    """A graph from its template's (traced with the first copy of each kind, boundary markers between
    them): the shared nodes once, a copy of the template's copy of each kind per `repeats` copy (with
    that copy's weights and state), then the head."""
    template = _Template(traced, unoptimized, template_repeats)
    prefix = repeats.prefix
    chosen = template_layers(repeats.kinds)
    kind = {repeats.kinds[i]: j for j, i in enumerate(chosen)}
    values: dict[str, ir.Value] = {}  # template value name -> value of the stacked graph (shared ones)

    def fresh(value: ir.Value, name: str, const: ir.TensorProtocol | None = None) -> ir.Value:
        return ir.Value(name=name, type=value.type, shape=None if value.shape is None else ir.Shape(value.shape),
                        const_value=const)

    spec_roles = repeats.past
    template_past = {v: k for k, v in template.state_inputs.items()}  # (j, role) -> template input name
    template_present = {v: k for k, v in template.state_outputs.items()}
    inputs = []
    for name in input_names:
        if name in spec_roles:
            layer, role = spec_roles[name]
            source = template.inputs[template_past[(kind[repeats.kinds[layer]], role)]]
            inputs.append(fresh(source, name))
        else:
            inputs.append(fresh(template.inputs[name], name))
            values[name] = inputs[-1]
    past = {spec_roles[v.name]: v for v in inputs if v.name in spec_roles}
    for (j, role), name in template_past.items():  # what shared nodes read of a template layer's state
        values[name] = past[(chosen[j], role)]

    initializers = []
    for name, value in traced.graph.initializers.items():
        if template.initializer_layer[name] is None:
            values[name] = fresh(value, name, value.const_value)
            initializers.append(values[name])
    nodes = [_copy_node(n, values) for n in template.nodes[None]]

    hidden = values[template.markers[0].inputs[0].name]
    present: dict[tuple[int, str], ir.Value] = {}
    checked: set[int] = set()
    for i, layer_type in enumerate(repeats.kinds):
        j = kind[layer_type]
        local = dict(values)
        local[template.markers[j].outputs[0].name] = hidden
        for (tj, role), name in template_past.items():
            if tj == j:
                local[name] = past[(i, role)]
        mine = [n for n, layer in template.initializer_layer.items() if layer == j]
        params = [n for n in mine if _layer_of_param(n, prefix) is not None]
        folded = [n for n in mine if _layer_of_param(n, prefix) is None]
        real = {n: layer_tensor(f"{prefix}.{i}.{_split_param(n, prefix)[1]}") for n in params}
        if folded:
            if j not in checked:  # the refolding, on the template's own values, gives the optimizer's bytes
                for n, tensor in refold(unoptimized, folded, {}).items():
                    if not _same_tensor(tensor, traced.graph.initializers[n].const_value):
                        raise NotStackable(f"refolding {n} does not give the optimizer's constant")
                checked.add(j)
            # the unoptimized template names its parameters as traced: layers.j.X
            substitute = {n: layer_tensor(f"{prefix}.{i}.{_split_param(n, prefix)[1]}")
                          for n in _cone(unoptimized, folded)[1] if _layer_of_param(n, prefix) == j}
            real.update(refold(unoptimized, folded, substitute))
        for n in mine:
            local[n] = fresh(traced.graph.initializers[n], f"{prefix}.{i}.{_split_param(n, prefix)[1]}"
                             if _layer_of_param(n, prefix) is not None else f"{prefix}.{i}/{n}", real[n])
            initializers.append(local[n])

        def rename(name: str, i: int = i) -> str:
            return f"{prefix}.{i}/{name}"

        def scopes(text: str, i: int = i, j: int = j) -> str:
            return repr([re.sub(rf"^{prefix}\.{j}(?=\.|$)", f"{prefix}.{i}", s) for s in ast.literal_eval(text)])

        for node in template.nodes[j]:
            nodes.append(_copy_node(node, local, rename, scopes))
        hidden = local[template.markers[j + 1].inputs[0].name]
        for (tj, role), name in template_present.items():
            if tj == j:
                present[(i, role)] = local[name]

    local = dict(values)
    local[template.markers[template.layers].outputs[0].name] = hidden
    nodes += [_copy_node(n, local) for n in template.nodes["head"]]
    out_roles = repeats.present
    outputs = []
    for name in output_names:
        value = present[out_roles[name]] if name in out_roles else local[name]
        value.name = name
        outputs.append(value)
    opsets = {d: v for d, v in traced.graph.opset_imports.items() if d != BOUNDARY_DOMAIN}
    graph = ir.Graph(inputs, outputs, nodes=nodes, initializers=initializers, opset_imports=opsets,
                     name=traced.graph.name, doc_string=traced.graph.doc_string)
    return ir.Model(graph, ir_version=traced.ir_version, producer_name=traced.producer_name,
                    producer_version=traced.producer_version, functions=list(traced.functions.values()))
