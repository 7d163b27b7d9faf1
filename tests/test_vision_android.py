"""The Android bundle of a multimodal export, run by onnxruntime-genai 0.18's Qwen3.5 vision-language
pipeline (its own image processor, prompt expansion, positions and state handling): the greedy tokens
of an image prompt equal `qwen-edge generate`'s, and so do those of a text prompt."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from exporter.package.android_vision import PROCESSOR_CONFIG
from exporter.package.build import package_export
from runtime_py.generate import generate, stop_ids
from runtime_py.session import OnnxModel
from runtime_py.tokenizer import TextTokenizer
from runtime_py.vision import VisualRequest, visual_parts, visual_prompt, with_visuals
from tests.genai_driver import genai_image_greedy

og = pytest.importorskip("onnxruntime_genai")
PROMPT = "What is in it?"
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def vl_android_bundle(tiny_vl_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vl_android") / "bundle"
    package_export(tiny_vl_export, out, "android", ["fp32", "q4"])
    return out


def _genai_tokens(bundle: Path, prompt: str, image: Path | None, limit: int) -> list[int]:
    return genai_image_greedy(bundle, prompt, image, limit, NEW_TOKENS)


def _trim(tokens: list[int], stops: list[int]) -> list[int]:
    """genai returns the end-of-sequence token it stopped on; runtime_py does not."""
    return tokens[:-1] if tokens and tokens[-1] in stops else tokens


def test_layout_is_the_vision_language_pipeline(vl_android_bundle: Path) -> None:
    from exporter.package.verify import verify_bundle

    manifest = verify_bundle(vl_android_bundle)  # everything the manifest claims holds
    assert manifest["variants"]["fp32"]["converted_to_contrib"] is False  # the export already has contrib ops
    config = json.loads((vl_android_bundle / "genai_config.json").read_text())["model"]
    assert config["type"] == "qwen3_5"
    assert config["vision"]["filename"] == "onnx/vision.onnx" and config["embedding"]["filename"] == "onnx/embedding.onnx"
    assert config["decoder"]["filename"] == "onnx/decoder.onnx" and "inputs_embeds" in config["decoder"]["inputs"]
    processor = json.loads((vl_android_bundle / PROCESSOR_CONFIG).read_text())
    assert [t["operation"]["type"] for t in processor["processor"]["transforms"]][-1] == "PatchImage"
    for name in ("vision", "embedding", "decoder"):
        for suffix in ("", "_q4"):
            assert (vl_android_bundle / "onnx" / f"{name}{suffix}.ort").is_file()
    assert not list((vl_android_bundle / "onnx").glob("model*.onnx"))  # no merged graph: the decoder ships once


def test_embedding_graph_scatters_the_features(vl_android_bundle: Path, tiny_vl_export: Path) -> None:
    session = ort.InferenceSession(str(vl_android_bundle / "onnx" / "embedding.onnx"))
    image_id = json.loads((tiny_vl_export / "config.json").read_text())["image_token_id"]
    ids = np.array([[5, image_id, image_id, 9]], np.int64)
    features = np.arange(2 * 64, dtype=np.float32).reshape(2, 64)
    out = session.run(None, {"input_ids": ids, "image_features": features})[0]
    plain = OnnxModel(tiny_vl_export, "fp32").embed_ids(ids)
    np.testing.assert_array_equal(out[0, 1:3], features)
    np.testing.assert_array_equal(out[0, [0, 3]], plain[0, [0, 3]])
    empty = session.run(None, {"input_ids": ids[:, :1], "image_features": np.zeros((0, 64), np.float32)})[0]
    np.testing.assert_array_equal(empty, plain[:, :1])


@pytest.mark.parametrize("variant", ["fp32"])
def test_genai_image_prompt_matches_runtime(vl_android_bundle: Path, tiny_vl_export: Path,
                                            test_images: dict[str, Path], variant: str) -> None:
    tokenizer = TextTokenizer(tiny_vl_export)
    model = OnnxModel(tiny_vl_export, variant)
    messages = with_visuals([{"role": "user", "content": PROMPT}], VisualRequest((test_images["square"],)))
    prompt = visual_prompt(tiny_vl_export, variant, tokenizer.apply_chat_template(messages), visual_parts(messages),
                           tokenizer, model, NEW_TOKENS)
    expected = generate(model, prompt.ids, NEW_TOKENS, stop_ids=stop_ids(tiny_vl_export), visual=prompt)
    text = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": PROMPT}]}])
    got = _genai_tokens(vl_android_bundle, text, test_images["square"], len(prompt.ids) + NEW_TOKENS)
    assert _trim(got, stop_ids(tiny_vl_export)) == expected


def test_genai_text_prompt_matches_runtime(vl_android_bundle: Path, tiny_vl_export: Path) -> None:
    tokenizer = TextTokenizer(tiny_vl_export)
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    ids = tokenizer.encode(text)
    expected = generate(OnnxModel(tiny_vl_export, "fp32"), ids, NEW_TOKENS, stop_ids=stop_ids(tiny_vl_export))
    got = _genai_tokens(vl_android_bundle, text, None, len(ids) + NEW_TOKENS)
    assert _trim(got, stop_ids(tiny_vl_export)) == expected
