"""--draft-vocab N: the MTP head drafts among the first N tokens, reading a prefix of the decoder's
LM-head bytes; speculative decoding still gives exactly the plain tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from exporter.cli import main
from exporter.onnx.draft_vocab import LM_HEAD_NODE
from exporter.onnx.external_data import external_info
from runtime_py.generate import Sampling, generate
from runtime_py.session import OnnxModel
from runtime_py.speculative import generate_speculative

DRAFT = 400  # of the tiny checkpoint's 1,024 tokens
PROMPT = [3, 17, 42, 99, 5, 250, 8, 61, 777, 140, 12, 900]


@pytest.fixture(scope="module")
def limited_export(tiny_mtp_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("draft_vocab") / "export"
    result = CliRunner().invoke(main, ["export", str(tiny_mtp_checkpoint), str(out), "--quant", "fp32,q4,q4f16",
                                       "--draft-vocab", str(DRAFT), "--quiet"])
    assert result.exit_code == 0, result.output
    (out.parent / "export.log").write_text(result.output)
    return out


def test_variants_it_does_not_apply_to_are_named(limited_export: Path) -> None:
    notes = [line for line in (limited_export.parent / "export.log").read_text().splitlines() if "--draft-vocab" in line]
    assert notes == [f"note: --draft-vocab {DRAFT} does not apply to variant fp32: its LM head is float, stored "
                     "transposed, so only int4/int8 heads are limited"]


def _lm_head_tensors(graph_path: Path) -> dict[str, onnx.TensorProto]:
    model = onnx.load(str(graph_path), load_external_data=False)
    node = next(n for n in model.graph.node if n.name == LM_HEAD_NODE)
    by_name = {t.name: t for t in model.graph.initializer}
    return {name: by_name[name] for name in node.input[1:] if name}


def test_the_quantized_head_reads_a_prefix_of_the_decoders_lm_head(limited_export: Path) -> None:
    manifest = json.loads((limited_export / "qwen_edge.json").read_text())
    records = manifest["variants"]
    assert records["q4"]["draft_vocab"] == records["q4f16"]["draft_vocab"] == DRAFT
    assert "draft_vocab" not in records["fp32"]  # a float head is stored transposed: no prefix to read
    head = _lm_head_tensors(limited_export / records["q4"]["mtp"])
    decoder = _lm_head_tensors(limited_export / records["q4"]["decoder"])
    assert head.keys() == decoder.keys()
    for name, tensor in head.items():
        mine, full = external_info(tensor), external_info(decoder[name])
        assert tensor.dims[0] == DRAFT and decoder[name].dims[0] == 1024
        assert mine["location"] == full["location"] and mine["offset"] == full["offset"]
        assert int(mine["length"]) * 1024 == int(full["length"]) * DRAFT


def test_limited_drafts_are_the_full_heads_first_scores(limited_export: Path, tiny_mtp_export: Path) -> None:
    limited, full = OnnxModel(limited_export, "q4"), OnnxModel(tiny_mtp_export, "q4")
    rng = np.random.default_rng(3)
    hidden = rng.standard_normal((1, 5, limited.mtp.session.get_inputs()[1].shape[-1])).astype(np.float32)
    embeds = limited.embed_ids(np.array([[4, 80, 500, 9, 1000]]))
    a, _ = limited.mtp.forward(embeds, hidden, limited.mtp.new_state(1))
    b, _ = full.mtp.forward(embeds, hidden, full.mtp.new_state(1))
    assert a.shape == b.shape == (1024,)
    np.testing.assert_allclose(a[:DRAFT], b[:DRAFT], rtol=0, atol=1e-5)
    assert np.all(a[DRAFT:] == -np.inf)  # never drafted, draft probability 0


def test_an_fp16_head_is_limited_too(limited_export: Path) -> None:
    """q4f16: fp16 scales, and the logits leave the head through a cast to float32."""
    model = OnnxModel(limited_export, "q4f16")
    assert model.mtp.draft_vocab == DRAFT
    prefix = [5, 60, 700]
    assert generate_speculative(model, prefix, 8, 2) == generate(model, prefix, 8)
    hidden = np.zeros((1, 1, model.mtp.session.get_inputs()[1].shape[-1]), np.float32)
    logits, _ = model.mtp.forward(model.embed_ids(np.array([[7]])), hidden, model.mtp.new_state(1))
    assert logits.shape == (1024,) and np.isfinite(logits[:DRAFT]).all() and np.all(logits[DRAFT:] == -np.inf)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_speculative_with_a_limited_head_gives_the_plain_tokens(limited_export: Path, k: int) -> None:
    model = OnnxModel(limited_export, "q4")
    plain = generate(model, PROMPT, 20)
    assert generate_speculative(model, PROMPT, 20, k) == plain
    sampled = generate_speculative(model, PROMPT, 20, k, Sampling(temperature=1.0, seed=5))
    assert len(sampled) == 20 and all(0 <= t < 1024 for t in sampled)


def test_draft_vocab_is_an_onnx_option(tiny_mtp_checkpoint: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["export", str(tiny_mtp_checkpoint), str(tmp_path / "out"), "--format", "coreml",
                                       "--draft-vocab", "8"])
    assert result.exit_code != 0 and "--draft-vocab" in result.output
    assert not (tmp_path / "out").exists()
