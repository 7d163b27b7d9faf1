"""The embedded default model end to end: export, verify against PyTorch and transformers, and generate
text in the language it was trained on."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from exporter.cli import main
from exporter.verify.runners import greedy_reference
from graphs.checkpoint import open_checkpoint
from runtime_py.generate import generate
from runtime_py.session import OnnxModel
from runtime_py.tokenizer import TextTokenizer
from tests.hf_oracle import HfRunner, hf_causal_lm


def test_default_model_is_small_and_complete(default_checkpoint):
    cfg = open_checkpoint(default_checkpoint).config
    assert {"linear_attention", "full_attention"} == set(cfg.layer_types)
    assert cfg.linear_num_value_heads == 2 * cfg.linear_num_key_heads  # exercises the repeated q/k heads
    size = sum(p.stat().st_size for p in default_checkpoint.iterdir())
    assert size < 8 * 2**20
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (default_checkpoint / name).is_file()


def test_greedy_text_identical_across_onnx_pytorch_and_transformers(default_checkpoint, default_export):
    tok = TextTokenizer(default_export)
    prompt = tok.encode("On Monday the baker walked to the market.")
    steps = 40
    onnx_ids = generate(OnnxModel(default_export), prompt, steps)
    torch_ids = greedy_reference(open_checkpoint(default_checkpoint).build_decoder(), prompt, steps)
    hf = HfRunner(hf_causal_lm(default_checkpoint))
    logits = hf.forward(np.array([prompt]))
    hf_ids = []
    for _ in range(steps):
        hf_ids.append(int(logits[0, -1].argmax()))
        logits = hf.forward(np.array([[hf_ids[-1]]]))
    assert onnx_ids == torch_ids == hf_ids


def test_generated_text_follows_the_training_language(default_export):
    """The trained model answers arithmetic in its chat format and continues stories in its grammar."""
    tok = TextTokenizer(default_export)
    model = OnnxModel(default_export)
    stop = [tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")]
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 12 plus 7?"}])
    answer = tok.decode(generate(model, tok.encode(chat), 20, stop_ids=stop))
    assert answer.startswith("12 plus 7 is "), answer
    story = tok.decode(generate(model, tok.encode("On Monday the farmer walked to"), 30, stop_ids=stop))
    assert story.startswith(" the "), story
    assert "." in story


def test_verify_cli_passes_and_writes_json(default_export, tmp_path):
    report_path = tmp_path / "report.json"
    result = CliRunner().invoke(main, ["verify", "default", str(default_export), "--json", str(report_path)])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
    report = json.loads(report_path.read_text())
    assert report["passed"] is True
    assert [p["prompt_length"] for p in report["prompts"]] == [1, 63, 64, 65, 130]
    for prompt in report["prompts"]:
        assert len(prompt["steps"]) == 33  # prefill + 32 decode steps
        assert prompt["greedy_agreement"] == 1.0
        assert all(s["max_abs_diff"] <= 1e-4 * max(1, s["logit_scale"]) for s in prompt["steps"])


def test_verify_fails_on_an_impossible_tolerance(default_export):
    result = CliRunner().invoke(main, ["verify", "default", str(default_export), "--rtol", "1e-12",
                                       "--prompt-lengths", "5", "--decode-steps", "2"])
    assert result.exit_code == 1
    assert "FAIL" in result.output


def test_generate_cli_streams_text(default_export):
    result = CliRunner().invoke(main, ["generate", str(default_export), "--chat", "--prompt", "What day comes after Monday?",
                                       "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    assert "Tuesday" in result.output
    sampled = [CliRunner().invoke(main, ["generate", str(default_export), "--prompt", "On Friday", "--temperature", "0.8",
                                         "--top-p", "0.9", "--seed", "3", "--max-new-tokens", "15"]).output
               for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0].startswith("On Friday")
