"""What `qwen-edge export` writes: the onnx-community layout, named I/O, one node per recurrent op in
the chosen domain, dynamic axes, external data, and a manifest."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from exporter.onnx.fusions import SKIP_NORM_OP
from graphs.config import load_text_config
from graphs.io_spec import LOGIT_POSITIONS, decoder_spec
from runtime_py.session import OnnxModel


def _decoder(export):
    return onnx.load(str(export / "onnx" / "decoder_model_merged.onnx"), load_external_data=False)


def test_layout_and_manifest(tiny_exports, tiny_checkpoints):
    export = tiny_exports["kv_equal_tied"]
    for name in ("onnx/embed_tokens.onnx", "onnx/embed_tokens.onnx_data", "onnx/decoder_model_merged.onnx",
                 "onnx/decoder_model_merged.onnx_data", "config.json", "qwen_edge.json"):
        assert (export / name).is_file(), name
    manifest = json.loads((export / "qwen_edge.json").read_text())
    assert manifest["recurrent_ops"] == "standard" and manifest["logits"] == "all positions"
    assert manifest["variants"]["fp32"]["opset_imports"] == {"ai.onnx": 27}
    assert manifest["variants"]["fp32"]["decoder"] == "onnx/decoder_model_merged.onnx"
    assert (export / "config.json").read_text() == (tiny_checkpoints["kv_equal_tied"] / "config.json").read_text()


@pytest.mark.parametrize("layout,domain", [("kv_equal_tied", ""), ("kv_double_untied", "com.microsoft")])
def test_recurrent_ops_are_single_nodes_in_the_chosen_domain(layout, domain, tiny_exports, tiny_checkpoints):
    model = _decoder(tiny_exports[layout])
    cfg = load_text_config(tiny_checkpoints[layout])
    by_type = {}
    for node in model.graph.node:
        by_type.setdefault(node.op_type, []).append(node)
    assert len(by_type["LinearAttention"]) == len(cfg.linear_layers)
    assert len(by_type["CausalConvWithState"]) == len(cfg.linear_layers)
    assert {n.domain for n in by_type["LinearAttention"] + by_type["CausalConvWithState"]} == {domain}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in by_type["LinearAttention"][0].attribute}
    assert attrs["update_rule"] == b"gated_delta"
    assert attrs["q_num_heads"] == attrs["kv_num_heads"] == cfg.linear_num_value_heads
    assert not any(n.op_type in ("Loop", "Scan") for n in model.graph.node)  # no decomposed recurrence
    imports = {o.domain: o.version for o in model.opset_import}
    if domain == "":
        assert imports[""] == 27
    else:
        assert imports["com.microsoft"] == 1 and imports[""] < 27


def test_io_names_and_dynamic_axes_follow_the_spec(tiny_exports, tiny_checkpoints):
    model = _decoder(tiny_exports["kv_double_untied"])
    spec = decoder_spec(load_text_config(tiny_checkpoints["kv_double_untied"]))
    assert [i.name for i in model.graph.input] == spec.input_names
    assert [o.name for o in model.graph.output] == spec.output_names
    for value, want in zip(model.graph.input, spec.inputs):
        dims = value.type.tensor_type.shape.dim
        for d, w in zip(dims, want.dims):
            assert (d.dim_value == w) if isinstance(w, int) else bool(d.dim_param), (value.name, w)
        assert value.doc_string == want.doc
    big = [init for init in model.graph.initializer if np.prod(init.dims) * 4 > 1024]
    assert big and all(init.data_location == onnx.TensorProto.EXTERNAL for init in big)  # weights beside the graph


def test_state_shapes_and_constant_recurrent_memory(tiny_exports, tiny_checkpoints):
    """Recurrent and conv state keep their size as the context grows; only the KV cache grows."""
    cfg = load_text_config(tiny_checkpoints["kv_equal_tied"])
    model = OnnxModel(tiny_exports["kv_equal_tied"])
    state = model.new_state(1)
    model.forward(np.arange(10)[None] % 320, state)
    sizes_10 = {k: v.shape() for k, v in state.values.items()}
    model.forward(np.arange(50)[None] % 320, state)
    sizes_60 = {k: v.shape() for k, v in state.values.items()}
    for i in cfg.linear_layers:
        assert sizes_10[f"past_conv.{i}"] == sizes_60[f"past_conv.{i}"] == [1, cfg.conv_dim, 3]
        assert sizes_60[f"past_recurrent.{i}"] == [1, cfg.linear_num_value_heads, 16, 16]
    for i in cfg.attention_layers:
        assert sizes_10[f"past_key_values.{i}.key"][2] == 10 and sizes_60[f"past_key_values.{i}.key"][2] == 60


@pytest.mark.parametrize("layout,norm_op", [("kv_equal_tied", "RMSNormalization"),
                                            ("kv_double_untied", "SimplifiedLayerNormalization")])
def test_every_norm_is_one_node(layout, norm_op, tiny_exports, tiny_checkpoints):
    """Two RMSNorms per layer; per Gated DeltaNet layer the gated norm and the L2 norms of q and k; per
    attention layer the q and k norms; the final norm. In contrib graphs the norms after a residual
    Add are fused with it (exporter/onnx/fusions.py)."""
    model = _decoder(tiny_exports[layout])
    cfg = load_text_config(tiny_checkpoints[layout])
    expected = 2 * len(cfg.layer_types) + 3 * len(cfg.linear_layers) + 2 * len(cfg.attention_layers) + 1
    norms = [n for n in model.graph.node if n.op_type == norm_op]
    skips = [n for n in model.graph.node if n.op_type == SKIP_NORM_OP]
    assert len(norms) + len(skips) == expected and {n.domain for n in norms} == {""}
    assert {n.domain for n in skips} == (set() if norm_op == "RMSNormalization" else {"com.microsoft"})
    assert not any(n.op_type in ("Pow", "Sqrt") for n in model.graph.node)  # each norm went into its fused node
    used = {name for n in model.graph.node for name in n.input}
    assert all(init.name in used for init in model.graph.initializer)  # the old chains' constants went too
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in norms[0].attribute}
    assert attrs["axis"] == -1 and attrs["stash_type"] == 1 and attrs["epsilon"] == pytest.approx(cfg.rms_norm_eps)


DOCUMENTED_AXES = {"batch_size", "sequence_length", "past_sequence_length", "total_sequence_length", LOGIT_POSITIONS}


@pytest.mark.parametrize("layout", ["kv_equal_tied", "kv_double_untied"])
def test_every_dynamic_axis_has_a_documented_name(layout, tiny_exports, default_all_variants):
    """Graph inputs and outputs carry the spec's axis names (no traced names such as `s53`), in every variant."""
    graphs = [*(tiny_exports[layout] / "onnx").glob("*.onnx"), *(default_all_variants / "onnx").glob("*.onnx")]
    for path in graphs:
        model = onnx.load(str(path), load_external_data=False)
        for value in [*model.graph.input, *model.graph.output]:
            for dim in value.type.tensor_type.shape.dim:
                assert dim.HasField("dim_value") or dim.dim_param in DOCUMENTED_AXES, (path.name, value.name, dim)
