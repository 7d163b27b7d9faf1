"""Contrib graphs carry the fused residual norms and softplus (exporter/onnx/fusions.py); standard ones do not.

That the fused graphs compute what transformers does is held by tests/test_parity_transformers.py,
which runs the contrib export of the Hv = 2·Hk layout."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from exporter.onnx.fusions import SKIP_NORM_OP
from graphs.config import load_text_config
from runtime_py.export_format import mtp_variant_file, onnx_variant_files


def _graph(path: Path) -> tuple[list[onnx.NodeProto], dict[str, onnx.NodeProto]]:
    nodes = list(onnx.load(path, load_external_data=False).graph.node)
    return nodes, {out: n for n in nodes for out in n.output}


def _unfused(path: Path) -> tuple[int, int, int]:
    """(residual Adds still feeding a norm, Wheres over a Softplus, fused norms) of a graph."""
    nodes, producer = _graph(path)
    adds = sum(1 for n in nodes if n.op_type == "SimplifiedLayerNormalization"
               and getattr(producer.get(n.input[0]), "op_type", "") == "Add")
    wheres = sum(1 for n in nodes if n.op_type == "Where"
                 and any(getattr(producer.get(i), "op_type", "") == "Softplus" for i in n.input))
    return adds, wheres, sum(1 for n in nodes if n.op_type == SKIP_NORM_OP)


@pytest.mark.parametrize("variant", ["fp32", "q4"])
def test_contrib_decoder_and_head_are_fused(tiny_exports, tiny_mtp_export, variant):
    export = tiny_exports["kv_double_untied"] if variant == "fp32" else tiny_mtp_export
    layers = load_text_config(export).num_hidden_layers
    adds, wheres, fused = _unfused(onnx_variant_files(export, variant)[1])
    assert (adds, wheres) == (0, 0)
    assert fused >= 2 * layers - 1  # every layer's post-attention norm, every later layer's input norm
    if variant == "q4":
        assert _unfused(mtp_variant_file(export, variant))[:2] == (0, 0)


def test_standard_decoder_keeps_the_traced_form(tiny_exports):
    nodes, _ = _graph(onnx_variant_files(tiny_exports["kv_equal_tied"], "fp32")[1])
    assert not any(n.domain == "com.microsoft" for n in nodes)
