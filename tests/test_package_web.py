"""The web bundle: written from a contrib-ops export, loaded by transformers.js on Node (tests/js),
and held to the same greedy tokens as the project's own runtime (what `qwen-edge generate` runs)."""

from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
from pathlib import Path

import onnx
import pytest

from default_model import CHECKPOINT_DIR as DEFAULT_MODEL_DIR
from tests.conftest import JS_DIR
from exporter.package.web import rehome_external_data, write_web_layout
from graphs.errors import QwenEdgeError
from runtime_py.generate import generate
from runtime_py.session import OnnxModel
from runtime_py.tokenizer import TextTokenizer

VARIANTS = ["fp32", "q4"]  # what the default_contrib_export fixture holds
MAX_NEW_TOKENS = 32
# (prompt, chat): the chat prompt answers in a few tokens and ends with <|im_end|> (decode positions
# past a 14-token prompt decide it); the plain one runs the full 32 tokens.
PROMPTS = [("What is 12 plus 7?", True), ("On Monday the", False)]


@pytest.fixture(scope="module")
def web_bundle(default_contrib_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("web") / "bundle"
    write_web_layout(default_contrib_export, out, VARIANTS)
    return out


def run_transformers_js(node: str, bundle: Path, prompt: str, chat: bool, dtype: str | None) -> dict:
    args = [node, "generate.mjs", "--model", str(bundle), "--prompt", prompt,
            "--max-new-tokens", str(MAX_NEW_TOKENS)]
    args += ["--chat"] if chat else []
    args += ["--dtype", dtype] if dtype else []
    done = subprocess.run(args, cwd=JS_DIR, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"transformers.js failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def runtime_tokens(export: Path, variant: str, prompt: str, chat: bool) -> tuple[list[int], list[int]]:
    """Prompt ids and greedy new tokens from runtime_py, as `qwen-edge generate` produces them."""
    tokenizer = TextTokenizer(export)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
    ids = tokenizer.encode(text)
    stops = json.loads((export / "generation_config.json").read_text())["eos_token_id"]
    return ids, generate(OnnxModel(export, variant), ids, MAX_NEW_TOKENS, stop_ids=stops)


def without_stop(tokens: list[int], stops: list[int]) -> list[int]:
    """transformers.js keeps the end-of-sequence token it stopped on; runtime_py does not."""
    return tokens[:-1] if tokens and tokens[-1] in stops else tokens


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("prompt,chat", PROMPTS)
def test_transformers_js_greedy_tokens_match_runtime(node: str, web_bundle: Path, default_contrib_export: Path,
                                                     variant: str, prompt: str, chat: bool) -> None:
    js = run_transformers_js(node, web_bundle, prompt, chat, variant)
    ids, expected = runtime_tokens(default_contrib_export, variant, prompt, chat)
    stops = js["eos_token_id"]
    assert js["prompt_ids"] == ids  # transformers.js's tokenizer and chat template agree with ours
    assert without_stop(js["generated_ids"], stops) == expected
    stopped_early = len(expected) < MAX_NEW_TOKENS
    assert (js["generated_ids"][-1] in stops) == stopped_early


def test_default_dtype_comes_from_the_bundle_config(node: str, default_contrib_export: Path, tmp_path: Path) -> None:
    """A q4-only bundle loads without a dtype argument (transformers.js's own default, fp32, is absent)."""
    write_web_layout(default_contrib_export, tmp_path / "q4only", ["q4"])
    assert not (tmp_path / "q4only" / "onnx" / "decoder_model_merged.onnx").exists()
    prompt, chat = PROMPTS[0]
    js = run_transformers_js(node, tmp_path / "q4only", prompt, chat, dtype=None)
    _, expected = runtime_tokens(default_contrib_export, "q4", prompt, chat)
    assert without_stop(js["generated_ids"], js["eos_token_id"]) == expected


def test_layout_is_what_transformers_js_reads(web_bundle: Path) -> None:
    config = json.loads((web_bundle / "config.json").read_text())
    assert config["model_type"] == "qwen3_5"
    assert config["architectures"] == ["Qwen3_5ForConditionalGeneration"]  # text-only path of AutoModelForCausalLM
    assert config["text_config"]["layer_types"][:4] == ["linear_attention"] * 3 + ["full_attention"]
    js_config = config["transformers.js_config"]
    assert js_config["dtype"] == VARIANTS[0]
    graphs = sorted(p.name for p in (web_bundle / "onnx").glob("*.onnx"))
    assert graphs == ["decoder_model_merged.onnx", "decoder_model_merged_q4.onnx",
                      "embed_tokens.onnx", "embed_tokens_q4.onnx"]
    assert js_config["use_external_data_format"] == {name: 1 for name in graphs}
    for name in graphs:  # each graph reads only its own data file (browsers fetch them by name)
        model = onnx.load(str(web_bundle / "onnx" / name), load_external_data=False)
        locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {name + "_data"}
        onnx.load(str(web_bundle / "onnx" / name))  # offsets and lengths are inside the file
    tok_config = json.loads((web_bundle / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]
    assert json.loads((web_bundle / "generation_config.json").read_text())["eos_token_id"] == [2, 0]


def test_same_export_gives_byte_identical_bundle(default_contrib_export: Path, web_bundle: Path,
                                                 tmp_path: Path) -> None:
    again = tmp_path / "again"
    write_web_layout(default_contrib_export, again, VARIANTS)
    files = sorted(p.relative_to(web_bundle) for p in web_bundle.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(web_bundle, again, [str(f) for f in files], shallow=False)
    assert mismatch == [] and errors == []


def test_large_data_is_split_into_numbered_chunks(default_contrib_export: Path, tmp_path: Path) -> None:
    src = default_contrib_export / "onnx" / "decoder_model_merged.onnx"
    chunks = rehome_external_data(src, tmp_path / "decoder_model_merged.onnx", chunk_bytes=1 << 20)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert chunks > 1 and names == sorted(["decoder_model_merged.onnx", "decoder_model_merged.onnx_data"]
                                          + [f"decoder_model_merged.onnx_data_{i}" for i in range(1, chunks)])
    reference = onnx.load(str(src))
    rehomed = onnx.load(str(tmp_path / "decoder_model_merged.onnx"))
    assert [onnx.numpy_helper.to_array(t).tobytes() for t in rehomed.graph.initializer] == \
           [onnx.numpy_helper.to_array(t).tobytes() for t in reference.graph.initializer]


def _copy_export(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bad_input_is_one_clear_error(default_contrib_export: Path, tmp_path: Path) -> None:
    with pytest.raises(QwenEdgeError, match="no qwen_edge.json"):
        write_web_layout(tmp_path, tmp_path / "out", ["fp32"])
    with pytest.raises(QwenEdgeError, match="has no 'q8' variant.*--quant q8"):
        write_web_layout(default_contrib_export, tmp_path / "out", ["q8"])
    with pytest.raises(QwenEdgeError, match="at least one"):
        write_web_layout(default_contrib_export, tmp_path / "out", [])

    standard = _copy_export(default_contrib_export, tmp_path / "standard")
    manifest = json.loads((standard / "qwen_edge.json").read_text())
    (standard / "qwen_edge.json").write_text(json.dumps({**manifest, "recurrent_ops": "standard"}))
    with pytest.raises(QwenEdgeError, match="re-export with --recurrent-ops contrib"):
        write_web_layout(standard, tmp_path / "out", ["fp32"])

    truncated = _copy_export(default_contrib_export, tmp_path / "truncated")
    data = truncated / "onnx" / "decoder_model_merged_q4.onnx_data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(QwenEdgeError, match="decoder_model_merged_q4.onnx_data is missing or truncated"):
        write_web_layout(truncated, tmp_path / "out-truncated", ["q4"])

    no_tokenizer = _copy_export(default_contrib_export, tmp_path / "no-tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(QwenEdgeError, match="tokenizer.json missing"):
        write_web_layout(no_tokenizer, tmp_path / "out-tok", ["fp32"])


def test_published_multimodal_config_untied_all_logits(node: str, tiny_exports: dict[str, Path],
                                                        tmp_path: Path) -> None:
    """A checkpoint in the published form (model_type qwen3_5 + text_config, Hv = 2·Hk, untied head)
    exported with logits for every position: transformers.js reads the last row, as runtime_py does."""
    export = _copy_export(tiny_exports["kv_double_untied"], tmp_path / "export")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # random checkpoints have none; ids are given
        shutil.copy(DEFAULT_MODEL_DIR / name, export / name)
    write_web_layout(export, tmp_path / "bundle", ["fp32"])
    config = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert config["model_type"] == "qwen3_5" and config["text_config"]["linear_num_value_heads"] == 4
    ids = [5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 200, 31]
    done = subprocess.run([node, "generate.mjs", "--model", str(tmp_path / "bundle"), "--dtype", "fp32",
                           "--ids", ",".join(map(str, ids)), "--max-new-tokens", "16"],
                          cwd=JS_DIR, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    js = json.loads(done.stdout.strip().splitlines()[-1])
    assert js["generated_ids"] == generate(OnnxModel(export, "fp32"), ids, 16)


def test_browser_runtime_reads_the_declared_data_files(node: str, web_bundle: Path,
                                                        default_contrib_export: Path) -> None:
    """onnxruntime-web's WebAssembly backend (what transformers.js runs in a browser) gets each graph's
    weights only as the named files config.json declares, and decodes the same greedy tokens."""
    prompt, chat = PROMPTS[0]
    ids, expected = runtime_tokens(default_contrib_export, "q4", prompt, chat)
    done = subprocess.run([node, "wasm_greedy.mjs", "--model", str(web_bundle), "--dtype", "q4",
                           "--ids", ",".join(map(str, ids)), "--max-new-tokens", str(len(expected))],
                          cwd=JS_DIR, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["generated_ids"] == expected
