"""Images and video against transformers' Qwen3_5ForConditionalGeneration on a tiny random multimodal
checkpoint: pixel values, image features, mRoPE positions, prompt ids and 16 greedy tokens (with
per-step logits), for a square image, a non-square one, two images and a two-frame video; the
vision encoder's variants; and the errors a user can cause."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from exporter.cli import main
from tests.hf_vision_oracle import hf_features, hf_greedy, hf_inputs, hf_positions, hf_vl_model
from runtime_py.export_format import onnx_vision_file
from runtime_py.generate import Sampling, generate
from runtime_py.session import OnnxModel
from runtime_py.tokenizer import TextTokenizer
from runtime_py.vision import (VisionEncoder, VisionTokens, VisualRequest, expand_placeholders, plain_prompt_text,
                               rope_index, token_types, visual_parts, visual_prompt, with_visuals)

RTOL = 1e-4  # of the features' / logits' scale, as the decoder's parity
CASES = {
    "square": dict(images=("square",)),
    "wide": dict(images=("wide",)),
    "two_images": dict(images=("square", "wide")),
    "video": dict(video="video", fps=2.0),
}
PROMPT = "What is in it?"


@pytest.fixture(scope="module")
def hf_model(tiny_vl_checkpoint: Path):  # noqa: ANN201
    return hf_vl_model(tiny_vl_checkpoint)


def _request(case: dict, images: dict[str, Path]) -> VisualRequest:
    return VisualRequest(tuple(images[n] for n in case.get("images", ())),
                         images[case["video"]] if "video" in case else None, case.get("fps"))


def _chat_text(export: Path, request: VisualRequest) -> str:
    parts = [{"type": "image"}] * len(request.images) + ([{"type": "video"}] if request.video else [])
    return TextTokenizer(export).apply_chat_template([{"role": "user", "content": [*parts, {"type": "text",
                                                                                             "text": PROMPT}]}])


def _oracle_inputs(checkpoint: Path, export: Path, request: VisualRequest):  # noqa: ANN202
    return hf_inputs(checkpoint, _chat_text(export, request), list(request.images), request.video, request.fps)


def runtime_prompt(export: Path, variant: str, request: VisualRequest, model: OnnxModel):  # noqa: ANN201
    """What `qwen-edge generate --chat --prompt PROMPT --image ... --video ... --fps ...` prefills."""
    tokenizer = TextTokenizer(export)
    messages = with_visuals([{"role": "user", "content": PROMPT}], request)
    return visual_prompt(export, variant, tokenizer.apply_chat_template(messages), visual_parts(messages), tokenizer,
                         model, 16, default_fps=request.fps)


def test_preprocessing_equals_transformers(tiny_vl_checkpoint: Path, tiny_vl_export: Path,
                                           test_images: dict[str, Path]) -> None:
    """Pillow + NumPy pixels and grids equal transformers' processor output, including an image whose
    side is an exact half of the resize factor (Python's round-half-to-even: 80 px -> 64, not 96)."""
    encoder = VisionEncoder(tiny_vl_export, "fp32")
    for name in ("square", "wide", "half"):
        ref = hf_inputs(tiny_vl_checkpoint, "<|image_pad|>", [test_images[name]])
        mine = encoder.image(test_images[name])
        assert [list(mine.grid)] == ref["image_grid_thw"].tolist()
        np.testing.assert_allclose(mine.pixel_values, ref["pixel_values"].numpy(), atol=1e-6)
    assert encoder.image(test_images["half"]).grid == (1, 4, 8)
    ref = hf_inputs(tiny_vl_checkpoint, "<|video_pad|>", video=test_images["video"], fps=2.0)
    video = encoder.video(test_images["video"], 2.0)
    assert [list(video.grid)] == ref["video_grid_thw"].tolist()
    np.testing.assert_allclose(video.pixel_values, ref["pixel_values_videos"].numpy(), atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_features_positions_and_tokens_match_transformers(case: str, hf_model, tiny_vl_checkpoint: Path,  # noqa: ANN001
                                                          tiny_vl_export: Path, test_images: dict[str, Path]) -> None:
    request = _request(CASES[case], test_images)
    inputs = _oracle_inputs(tiny_vl_checkpoint, tiny_vl_export, request)
    model = OnnxModel(tiny_vl_export, "fp32")
    prompt = runtime_prompt(tiny_vl_export, "fp32", request, model)
    assert prompt.ids == inputs["input_ids"][0].tolist()

    # image features from the ONNX vision encoder on transformers' own pixel values
    encoder = VisionEncoder(tiny_vl_export, "fp32")
    kind = "video" if request.video else "image"
    pixels, grid = (inputs["pixel_values_videos"], inputs["video_grid_thw"]) if request.video else (
        inputs["pixel_values"], inputs["image_grid_thw"])
    ref = hf_features(hf_model, pixels, grid)
    got = encoder.session.run(None, {"pixel_values": pixels.numpy(), "image_grid_thw": grid.numpy()})[0]
    assert np.abs(got - ref).max() <= RTOL * np.abs(ref).max(), kind

    # positions and delta
    positions, delta = hf_positions(hf_model, inputs)
    np.testing.assert_array_equal(prompt.positions[:, 0], positions)
    assert prompt.delta == delta

    # 16 greedy tokens, and every step's logits
    steps: list[np.ndarray] = []
    original = model.forward_embeds

    def record(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        logits = original(*args, **kwargs)
        steps.append(logits[0, -1])
        return logits

    model.forward_embeds = record
    tokens = generate(model, prompt.ids, 16, Sampling(), visual=prompt)
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=16, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    ref_tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    assert tokens == ref_tokens and len(tokens) == 16
    for mine, theirs in zip(steps, out.logits):
        theirs = theirs[0].numpy()
        assert np.abs(mine - theirs).max() <= RTOL * max(1.0, np.abs(theirs).max())


def test_the_image_changes_the_answer(hf_model, tiny_vl_checkpoint: Path, tiny_vl_export: Path,  # noqa: ANN001
                                      test_images: dict[str, Path]) -> None:
    """The agreement above means something: two images give different greedy tokens."""
    answers = [hf_greedy(hf_model, _oracle_inputs(tiny_vl_checkpoint, tiny_vl_export,
                                                  VisualRequest((test_images[n],)))) for n in ("square", "wide")]
    assert answers[0] != answers[1]


def test_rope_index_of_mixed_prompt_matches_transformers(hf_model, tiny_vl_checkpoint: Path,  # noqa: ANN001
                                                         tiny_vl_export: Path, test_images: dict[str, Path]) -> None:
    """Text between and after two images and a video, placeholders written by hand (plain prompt)."""
    encoder = VisionEncoder(tiny_vl_export, "fp32")
    tokenizer = TextTokenizer(tiny_vl_export)
    visuals = [encoder.image(test_images["wide"]), encoder.image(test_images["square"]),
               encoder.video(test_images["video"], 2.0)]
    tokens = VisionTokens.of(encoder.config, tokenizer.tokenizer.id_to_token)
    text = (f"first {tokens.placeholder('image')} then {tokens.placeholder('image')} and a clip "
            f"{tokens.placeholder('video')} done")
    assert plain_prompt_text(text, visuals, tokens) == text
    assert plain_prompt_text("done", visuals[:1], tokens) == tokens.placeholder("image") + "done"
    ids = tokenizer.encode(expand_placeholders(text, visuals, tokens))
    inputs = hf_inputs(tiny_vl_checkpoint, text, [test_images["wide"], test_images["square"]],
                       test_images["video"], 2.0)
    assert ids == inputs["input_ids"][0].tolist()
    positions, delta = rope_index(token_types(ids, tokens), visuals, 2)
    ref_positions, ref_delta = hf_positions(hf_model, inputs)
    np.testing.assert_array_equal(positions, ref_positions)
    assert delta == ref_delta < 0


def test_generate_cli_json_with_images(tiny_vl_checkpoint: Path, tiny_vl_export: Path, hf_model,  # noqa: ANN001
                                       test_images: dict[str, Path]) -> None:
    """`qwen-edge generate --image A --image B --json`: prompt ids and 16 tokens equal transformers'."""
    request = VisualRequest((test_images["square"], test_images["wide"]))
    inputs = _oracle_inputs(tiny_vl_checkpoint, tiny_vl_export, request)
    run = subprocess.run([sys.executable, "-m", "exporter.cli", "generate", str(tiny_vl_export), "--chat", "--prompt",
                          PROMPT, "--image", str(test_images["square"]), "--image", str(test_images["wide"]),
                          "--max-new-tokens", "16", "--json"], capture_output=True, text=True, check=True)
    result = json.loads(run.stdout)
    assert result["prompt_ids"] == inputs["input_ids"][0].tolist()
    assert result["generated_ids"] == hf_greedy(hf_model, inputs)
    assert result["text"] == TextTokenizer(tiny_vl_export).decode(result["generated_ids"])


def test_generate_cli_messages_with_image_parts(tiny_vl_checkpoint: Path, tiny_vl_export: Path, hf_model,  # noqa: ANN001
                                                test_images: dict[str, Path], tmp_path: Path) -> None:
    """`--messages` with image parts (a name inside the file's folder, and OpenAI's image_url with a
    file:// URL there) takes the same path."""
    (tmp_path / "pictures").mkdir()
    shutil.copyfile(test_images["square"], tmp_path / "pictures" / "square.png")
    shutil.copyfile(test_images["wide"], tmp_path / "wide.png")
    messages = [{"role": "user", "content": [{"type": "image", "image": "pictures/square.png"},
                                             {"type": "image_url", "image_url": {"url": "file://" + str(tmp_path / "wide.png")}},
                                             {"type": "text", "text": PROMPT}]}]
    (tmp_path / "m.json").write_text(json.dumps(messages))
    run = subprocess.run([sys.executable, "-m", "exporter.cli", "generate", str(tiny_vl_export), "--messages",
                          str(tmp_path / "m.json"), "--max-new-tokens", "16", "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    inputs = _oracle_inputs(tiny_vl_checkpoint, tiny_vl_export, VisualRequest((test_images["square"], test_images["wide"])))
    result = json.loads(run.stdout)
    assert result["prompt_ids"] == inputs["input_ids"][0].tolist()
    assert result["generated_ids"] == hf_greedy(hf_model, inputs)


@pytest.mark.parametrize("name", ["../outside.png", "/etc/hostname", "file:///etc/hostname", "a/../../outside.png"])
def test_a_message_file_reads_images_only_inside_its_folder(tiny_vl_export: Path, tmp_path: Path, name: str) -> None:
    (tmp_path / "outside.png").write_bytes(b"secret")
    (tmp_path / "chat").mkdir()
    (tmp_path / "chat" / "m.json").write_text(json.dumps([{"role": "user", "content": [
        {"type": "image", "image": name}, {"type": "text", "text": PROMPT}]}]))
    result = CliRunner().invoke(main, ["generate", str(tiny_vl_export), "--messages", str(tmp_path / "chat" / "m.json")])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "outside" in result.output and "m.json" in result.output


@pytest.mark.parametrize("variant,limit", [("q8", 2e-2), ("q4", 0.1)])
def test_vision_encoder_variants(variant: str, limit: float, tiny_vl_export: Path, test_images: dict[str, Path]) -> None:
    """Each variant has its own vision encoder, features in the variant's activation dtype, close to fp32
    (relative RMS error; the int ones store the block matmuls as MatMulNBits). q4 keeps 4-bit tower
    weights only where its gate holds, else 8-bit, and the manifest says which and why."""
    import onnx

    from quant.schemes import VISION_INT4_MAX_ERROR
    from runtime_py.export_format import variant_record

    record = variant_record(tiny_vl_export, variant)
    if variant == "q4":
        bits, error = record["vision_weight_bits"], record["vision_int4_feature_error"]
        assert (bits == 4) == (error <= VISION_INT4_MAX_ERROR) and bits in (4, 8)

    reference = VisionEncoder(tiny_vl_export, "fp32")
    encoder = VisionEncoder(tiny_vl_export, variant)
    visual = reference.image(test_images["wide"])
    ref, got = reference.encode(visual), encoder.encode(visual)
    assert got.dtype == (np.float16 if variant == "fp16" else np.float32)
    error = np.sqrt(np.mean((got.astype(np.float32) - ref) ** 2)) / np.sqrt(np.mean(ref ** 2))
    assert error < limit, error
    ops = {n.op_type for n in onnx.load(str(onnx_vision_file(tiny_vl_export, variant)), load_external_data=False).graph.node}
    assert ("MatMulNBits" in ops) == variant.startswith("q")


def test_fp16_vision_encoder(tiny_vl_checkpoint: Path, tiny_vl_export: Path, test_images: dict[str, Path],
                             tmp_path: Path) -> None:
    """The fp16 variant's tower as an fp16 export writes it (the tower halved, traced, written by
    write_vision_variant), without tracing the fp16 decoder too: float16 features close to fp32."""
    import onnxruntime as ort

    from exporter.onnx.streamed import save_graph
    from exporter.onnx.vision import FLOAT_NAME, trace_vision, write_vision_variant
    from graphs.checkpoint import open_checkpoint
    from quant.schemes import QuantOptions, parse_schemes

    tower = open_checkpoint(tiny_vl_checkpoint).build_vision_encoder().half()
    (tmp_path / "float").mkdir()
    save_graph(trace_vision(tower), tmp_path / "float" / FLOAT_NAME)
    (tmp_path / "onnx").mkdir()
    record = write_vision_variant(tmp_path / "float", parse_schemes("fp16")[0], tmp_path, QuantOptions(),
                                  tower.cfg.patch_dim)
    assert "vision_weight_bits" not in record
    session = ort.InferenceSession(str(tmp_path / record["vision_encoder"]), providers=["CPUExecutionProvider"])
    reference = VisionEncoder(tiny_vl_export, "fp32")
    visual = reference.image(test_images["wide"])
    got = session.run(None, {"pixel_values": visual.pixel_values, "image_grid_thw": np.array([visual.grid])})[0]
    ref = reference.encode(visual)
    assert got.dtype == np.float16
    assert np.sqrt(np.mean((got.astype(np.float32) - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)) < 2e-3


def _cli_in_process(*args: str):  # noqa: ANN202
    """The CLI as `qwen-edge ARGS` runs it, in this process (no interpreter start per case)."""
    from click.testing import CliRunner

    from exporter.cli import main

    return CliRunner().invoke(main, list(args))


def test_bad_images_give_one_clear_error(tiny_vl_export: Path, test_images: dict[str, Path], tmp_path: Path,
                                         default_export: Path) -> None:
    good = test_images["wide"].read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "corrupt.png").write_bytes(good[:20] + bytes(40) + good[60:])  # header damaged
    middle = len(good) // 2
    (tmp_path / "damaged.png").write_bytes(good[:middle] + bytes(64) + good[middle + 64:])  # pixel data damaged
    (tmp_path / "notes.png").write_text("not an image at all")
    (tmp_path / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>')
    cases = {
        "truncated.png": "truncated or corrupt", "corrupt.png": "is corrupt", "damaged.png": "corrupt",
        "notes.png": "not an image format", "drawing.svg": "not an image format", "missing.png": "image not found",
    }
    for name, expected in cases.items():
        run = _cli_in_process("generate", str(tiny_vl_export), "--prompt", "x", "--image", str(tmp_path / name))
        lines = run.stderr.strip().splitlines()
        assert run.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], run.stderr
    # an image too large for the context
    from PIL import Image

    Image.new("RGB", (4000, 4000), (90, 120, 200)).save(tmp_path / "huge.png")
    run = _cli_in_process("generate", str(tiny_vl_export), "--prompt", "x", "--image", str(tmp_path / "huge.png"),
                          "--max-new-tokens", "4090")
    assert run.exit_code == 1 and "more than the model's context" in run.stderr and run.stderr.count("\n") == 1
    # --image on a text-only export, --video without --fps
    run = _cli_in_process("generate", str(default_export), "--prompt", "x", "--image", str(test_images["square"]))
    assert run.exit_code == 1 and "no vision encoder" in run.stderr and run.stderr.count("\n") == 1
    run = _cli_in_process("generate", str(tiny_vl_export), "--prompt", "x", "--video", str(test_images["video"]))
    assert run.exit_code == 1 and "--video needs --fps" in run.stderr


def test_processor_steps_other_than_the_defaults_are_refused() -> None:
    """A processor file that turns off a step the preprocessing always takes fails clearly instead of
    giving features transformers would not; stating the defaults (as the web bundle does) is accepted."""
    from graphs.errors import QwenEdgeError
    from runtime_py.vision_preprocess import PROCESSOR_STEPS, PUBLISHED_IMAGE, PixelSettings

    assert PixelSettings.from_dict({**PUBLISHED_IMAGE, **PROCESSOR_STEPS}) == PixelSettings.from_dict(PUBLISHED_IMAGE)
    assert PixelSettings.from_dict({**PUBLISHED_IMAGE, "rescale_factor": 0.00392156862745098}).patch_size == 16
    for key, value in (("do_normalize", False), ("rescale_factor", 1.0), ("resample", 2)):
        with pytest.raises(QwenEdgeError, match=f"processor setting {key}="):
            PixelSettings.from_dict({**PUBLISHED_IMAGE, key: value})


def test_a_failing_vision_helper_is_the_exports_error(tmp_path: Path) -> None:
    """The tower is traced in a helper process: its failure must surface as one clear error, not a
    missing file later."""
    from exporter.onnx.vision import VisionTrace
    from graphs.errors import QwenEdgeError

    helper = VisionTrace(tmp_path / "no-such-checkpoint", "float32", tmp_path)
    with pytest.raises(QwenEdgeError, match="^tracing the vision tower failed: .*no-such-checkpoint"):
        helper.wait()
    helper.stop()
