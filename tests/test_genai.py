"""Android and iOS bundles in onnxruntime-genai 0.18 give transformers' greedy tokens on random checkpoints
(saved by transformers itself, and by our writer), not only on the trained default model (issue 16).

genai 0.18 treats every prompt token equal to `pad_token_id` as padding, even unbatched; the bundle
names a pad no token equals. The prompts here hold the end-of-sequence id and 0 in their middle, so a
bundle that let genai mask them would fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter.package.android import NO_PAD_ID, genai_token_ids
from exporter.package.build import package_export
from graphs.config import declared_token_ids
from graphs.errors import QwenEdgeError
from graphs.random_checkpoint import write_random_checkpoint
from runtime_py.generate import generate, stop_ids
from runtime_py.session import OnnxModel
from tests.conftest import tiny_config
from tests.genai_driver import genai_greedy, genai_model
from tests.hf_oracle import HfRunner, hf_causal_lm

og = pytest.importorskip("onnxruntime_genai")
transformers = pytest.importorskip("transformers")

NEW_TOKENS = 16
PROMPT_LENGTHS = (2, 13, 70)
VOCAB = 320


def _saved_by_transformers(folder: Path, value_heads: int, tie: bool, eos: int | None) -> Path:
    """What a user gets from Qwen3_5ForCausalLM(config).save_pretrained(): transformers' own init and files."""
    text = tiny_config(value_heads=value_heads, tie=tie)
    text.pop("model_type")
    config = transformers.Qwen3_5TextConfig(**text)
    if eos is not None:
        config.eos_token_id = eos
    torch.manual_seed(value_heads)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if eos is not None:
        model.generation_config.eos_token_id = eos
    model.save_pretrained(folder)
    return folder


def _written_by_us(folder: Path, multimodal: bool, config_ids: dict, generation: dict | None) -> Path:
    config = tiny_config(value_heads=4 if multimodal else 2, tie=not multimodal, multimodal=multimodal)
    target = config["text_config"] if multimodal else config
    target.update(config_ids.pop("text_config", {}))
    config.update(config_ids)
    write_random_checkpoint(config, folder, seed=5, dtype=torch.float32, multimodal_names=multimodal)
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


CHECKPOINTS = {
    # transformers writes null ids: genai needs an end token and refuses null or [] ids
    "transformers_tied_no_ids": lambda d: _saved_by_transformers(d, 2, True, None),
    "transformers_untied_eos": lambda d: _saved_by_transformers(d, 4, False, 5),
    # Qwen style: two end tokens, the pad one of them
    "ours_tied_pad_is_eos": lambda d: _written_by_us(d, False, {"eos_token_id": 9},
                                                     {"eos_token_id": [9, 5], "pad_token_id": 5}),
    # the published layout: a null top-level id defers to text_config; a separate pad id
    "ours_multimodal_untied": lambda d: _written_by_us(d, True, {"eos_token_id": None,
                                                                 "text_config": {"eos_token_id": 7, "pad_token_id": 3}},
                                                       None),
}


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def bundle(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(checkpoint, export, android bundle) with fp32 and q4."""
    from exporter.onnx.backend import export_onnx

    root = tmp_path_factory.mktemp(request.param)
    checkpoint = CHECKPOINTS[request.param](root / "checkpoint")
    export = export_onnx(checkpoint, root / "export", "fp32,q4", progress=False)
    package_export(export, root / "android", "android")
    return checkpoint, export, root / "android"


def _prompts(end_tokens: list[int]) -> list[list[int]]:
    rng = np.random.default_rng(4)
    prompts = []
    for length in PROMPT_LENGTHS:
        prompt = [int(t) for t in rng.integers(0, VOCAB, length)]
        prompt[length // 2] = end_tokens[0]
        prompt[length // 3] = 0
        prompts.append(prompt)
    return prompts


def _cut(tokens: list[int], end_tokens: list[int]) -> list[int]:
    """Up to and including the first end token (genai emits the token it stops on)."""
    for i, token in enumerate(tokens):
        if token in end_tokens:
            return tokens[: i + 1]
    return tokens


def _genai(bundle: Path, graph: str, prompt: list[int]) -> list[int]:
    return genai_greedy(genai_model(bundle, graph), prompt, NEW_TOKENS)


def _transformers_greedy(checkpoint: Path, prompt: list[int]) -> list[int]:
    runner = HfRunner(hf_causal_lm(checkpoint))
    logits, tokens = runner.forward(np.array([prompt])), []
    for _ in range(NEW_TOKENS):
        tokens.append(int(logits[0, -1].argmax()))
        logits = runner.forward(np.array([[tokens[-1]]]))
    return tokens


def _end_tokens(bundle: Path) -> list[int]:
    config = json.loads((bundle / "genai_config.json").read_text())["model"]
    assert config["pad_token_id"] == NO_PAD_ID and all(isinstance(t, int) for t in config["eos_token_id"])
    return config["eos_token_id"]


@pytest.mark.parametrize("kind", ["onnx", "ort"])
def test_genai_gives_transformers_greedy_tokens_fp32(bundle, kind: str) -> None:
    checkpoint, _, android = bundle
    end_tokens = _end_tokens(android)
    graph = json.loads((android / "manifest.json").read_text())["variants"]["fp32"][kind]
    for prompt in _prompts(end_tokens):
        want = _cut(_transformers_greedy(checkpoint, prompt), end_tokens)
        assert _genai(android, graph, prompt) == want, len(prompt)


@pytest.mark.parametrize("kind", ["onnx", "ort"])
def test_genai_q4_agrees_with_qwen_edge_generate(bundle, kind: str) -> None:
    _, export, android = bundle
    end_tokens = _end_tokens(android)
    graph = json.loads((android / "manifest.json").read_text())["variants"]["q4"][kind]
    model = OnnxModel(export, "q4")
    assert set(stop_ids(export)) <= set(end_tokens)  # the bundle stops wherever qwen-edge generate stops
    for prompt in _prompts(end_tokens):
        ours = generate(model, prompt, NEW_TOKENS, stop_ids=end_tokens)  # stops before an end token
        got = _genai(android, graph, prompt)  # emits the end token it stops on
        assert got[: len(ours)] == ours and (got == ours or (len(got) == len(ours) + 1 and got[-1] in end_tokens))


def test_ios_bundle_onnx_graphs_run_in_genai(tmp_path: Path, tiny_checkpoints: dict[str, Path],
                                             tiny_exports: dict[str, Path], tiny_coreml: Path) -> None:
    """The iOS bundle carries the same merged graphs and genai_config.json for ONNX Runtime on iOS."""
    checkpoint = tiny_checkpoints["kv_double_untied"]
    package_export(tiny_exports["kv_double_untied"], tmp_path / "ios", "ios", coreml_dir=tiny_coreml)
    graph = json.loads((tmp_path / "ios" / "manifest.json").read_text())["variants"]["fp32"]["onnx"]
    end_tokens = _end_tokens(tmp_path / "ios")
    for prompt in _prompts(end_tokens):
        want = _cut(_transformers_greedy(checkpoint, prompt), end_tokens)
        assert _genai(tmp_path / "ios", graph, prompt) == want


@pytest.mark.parametrize("config, generation, eos, bos", [
    ({"eos_token_id": None, "pad_token_id": None}, {"_from_model_config": True}, (), None),
    ({"eos_token_id": 5}, {"_from_model_config": True}, (5,), None),  # transformers reads only generation_config
    ({}, {"eos_token_id": [9, 5], "pad_token_id": 5, "bos_token_id": 4}, (9, 5), 4),
    ({"eos_token_id": None, "text_config": {"eos_token_id": 7}}, None, (7,), None),
])
def test_declared_token_ids(tmp_path: Path, config: dict, generation: dict | None, eos: tuple, bos: int | None) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    ids = declared_token_ids(tmp_path, VOCAB)
    assert ids.eos == eos and ids.bos == bos
    written = genai_token_ids(ids, VOCAB, tmp_path)
    assert written["eos_token_id"] == (list(eos) or [VOCAB - 1]) and written["pad_token_id"] == NO_PAD_ID
    assert ("bos_token_id" in written) == (bos is not None)


@pytest.mark.parametrize("generation, message", [
    ({"eos_token_id": VOCAB}, "outside the vocabulary"),
    ({"eos_token_id": "2"}, "is not a token id"),
    ({"eos_token_id": [1, True]}, "is not a token id"),
])
def test_bad_token_ids_are_refused(tmp_path: Path, generation: dict, message: str) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    with pytest.raises(QwenEdgeError, match=message):
        declared_token_ids(tmp_path, VOCAB)
