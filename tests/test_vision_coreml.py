"""Core ML vision functions (`export --format coreml --image-sizes`), run by the NumPy MIL interpreter:
the image features equal transformers' for the same pixels, per declared size and weight option; and
the whole iOS image path (vision function -> the decoder's prefill_visual -> decode) gives
transformers' 16 greedy tokens for an image and a two-frame video."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from exporter.coreml.check import InterpretedPackage, read_package_spec
from graphs.errors import QwenEdgeError
from runtime_py.export_format import read_manifest
from tests.hf_vision_oracle import hf_features, hf_greedy, hf_inputs, hf_vl_model

SIZES = "64x64,96x64"


@pytest.fixture(scope="module")
def vl_coreml(tiny_vl_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exporter.coreml.backend import CoreMLOptions, export_coreml
    from exporter.coreml.vision import parse_image_sizes

    return export_coreml(tiny_vl_checkpoint, tmp_path_factory.mktemp("vl_coreml") / "export", "fp32,q8",
                         CoreMLOptions(context=128, image_sizes=parse_image_sizes(SIZES)), progress=False)


def test_package_has_one_function_per_size(vl_coreml: Path) -> None:
    manifest = read_manifest(vl_coreml)
    assert list(manifest["vision"]["functions"]) == ["image_64x64", "image_96x64"]
    prefill_visual = manifest["functions"]["prefill_visual"]["inputs"]
    assert prefill_visual["position_ids"] == [3, 1, 64] and prefill_visual["image_features"] == [1, 64, 64]
    decoder = read_package_spec(vl_coreml / manifest["variants"]["q8"]["package"])
    assert set(decoder.functions) == {"prefill", "decode", "prefill_visual"}
    assert decoder.functions["prefill_visual"].inputs["image_features"] == ("fp32", [1, 64, 64])
    assert decoder.functions["prefill_visual"].states == decoder.functions["decode"].states
    spec = read_package_spec(vl_coreml / manifest["variants"]["q8"]["vision_package"])
    assert set(spec.functions) == {"image_64x64", "image_96x64"}
    function = spec.functions["image_96x64"]
    assert function.inputs["pixel_values"][1] == [24, 1536] and function.outputs["image_features"][1] == [6, 64]
    assert function.weight_bits.get("int8", 0) == 2 * 4 + 2  # per block qkv, proj, fc1, fc2; merger fc1, fc2


@pytest.mark.parametrize("variant,rtol", [("fp32", 1e-4), ("q8", 3e-2)])
def test_mil_interpreter_features_match_transformers(vl_coreml: Path, tiny_vl_checkpoint: Path,
                                                     test_images: dict[str, Path], variant: str, rtol: float) -> None:
    model = hf_vl_model(tiny_vl_checkpoint)
    package = InterpretedPackage(vl_coreml / read_manifest(vl_coreml)["variants"][variant]["vision_package"])
    for name, function in (("square", "image_64x64"), ("video", None)):
        if function is None:  # a 96×64 frame pair of the video folder goes through the 96x64 function
            inputs = hf_inputs(tiny_vl_checkpoint, "<|video_pad|>", video=test_images["video"], fps=2.0)
            pixels, grid, function = inputs["pixel_values_videos"], inputs["video_grid_thw"], "image_96x64"
        else:
            inputs = hf_inputs(tiny_vl_checkpoint, "<|image_pad|>", [test_images[name]])
            pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
        ref = hf_features(model, pixels, grid)
        got = package.call(function, {"pixel_values": pixels.numpy()})["image_features"]
        assert np.abs(got - ref).max() <= rtol * np.abs(ref).max(), (variant, function)


@pytest.mark.parametrize("case", ["square", "video"])
def test_image_prompt_gives_transformers_greedy_tokens(case: str, vl_coreml: Path, tiny_vl_checkpoint: Path,
                                                       test_images: dict[str, Path]) -> None:
    """What an iOS app runs: runtime_py's pixels and prompt, the Core ML vision function of the image's
    size, its rows scattered into `prefill_visual` with 3-row positions, then `decode` at L + delta."""
    import json

    from exporter.coreml.sequence import CoreMLSequence
    from exporter.coreml.visual_host import visual_prefill_inputs
    from graphs.config import vision_config_from_dict
    from runtime_py.tokenizer import TextTokenizer
    from runtime_py.vision import VisionTokens, expand_placeholders
    from runtime_py.vision_preprocess import PixelSettings, preprocess_image, preprocess_video, processor_dicts

    manifest = read_manifest(vl_coreml)
    cfg = vision_config_from_dict(json.loads((vl_coreml / "config.json").read_text()))
    tokenizer = TextTokenizer(vl_coreml)
    image_settings, video_settings = (PixelSettings.from_dict(d) for d in processor_dicts(vl_coreml))
    if case == "video":
        visuals = [preprocess_video(test_images["video"], 2.0, video_settings)]
    else:
        visuals = [preprocess_image(test_images[case], image_settings)]
    text = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": visuals[0].kind},
                                                                       {"type": "text", "text": "What is in it?"}]}])
    tokens = VisionTokens.of(cfg, tokenizer.tokenizer.id_to_token)
    ids = tokenizer.encode(expand_placeholders(text, visuals, tokens))
    inputs = (hf_inputs(tiny_vl_checkpoint, text, video=test_images["video"], fps=2.0) if case == "video"
              else hf_inputs(tiny_vl_checkpoint, text, [test_images[case]]))
    assert ids == inputs["input_ids"][0].tolist()

    variant = manifest["variants"]["fp32"]
    vision = InterpretedPackage(vl_coreml / variant["vision_package"])
    prefill = visual_prefill_inputs(ids, visuals, tokens, cfg, vision.call, set(manifest["vision"]["functions"]))
    decoder = InterpretedPackage(vl_coreml / variant["package"])
    decoder.reset()
    sequence = CoreMLSequence(decoder.call, manifest["prefill_chunk"], manifest["context_capacity"])
    logits = sequence.prefill_visual(ids, prefill.positions, prefill.features)
    generated = [int(np.argmax(logits))]
    while len(generated) < 16:
        generated.append(int(np.argmax(sequence.decode(generated[-1]))))
    assert sequence.position == len(ids) + prefill.delta + 15
    model = hf_vl_model(tiny_vl_checkpoint)
    assert generated == hf_greedy(model, inputs)
    # the prompt's logits too (fp16 states): measured 2.5e-5 of their scale, where zero image features
    # move them by 6e-2 and text positions by 3e-2
    import torch

    with torch.no_grad():
        ref = model(**inputs).logits[0, -1].numpy()
    assert np.abs(logits - ref).max() <= 1e-3 * np.abs(ref).max()


def test_image_without_a_declared_size_is_a_clear_error(vl_coreml: Path, test_images: dict[str, Path]) -> None:
    import json

    from exporter.coreml.visual_host import encode_visual
    from graphs.config import vision_config_from_dict
    from runtime_py.vision_preprocess import PixelSettings, preprocess_image, processor_dicts

    cfg = vision_config_from_dict(json.loads((vl_coreml / "config.json").read_text()))
    wide = preprocess_image(test_images["wide"], PixelSettings.from_dict(processor_dicts(vl_coreml)[0]))
    with pytest.raises(QwenEdgeError, match="resizes to 160x96.*declared: 64x64, 96x64.*--image-sizes"):
        encode_visual(lambda *a: {}, set(read_manifest(vl_coreml)["vision"]["functions"]), wide, cfg)


def test_image_sizes_are_checked(tiny_vl_checkpoint: Path, tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from exporter.coreml.backend import CoreMLOptions, export_coreml
    from exporter.coreml.vision import parse_image_sizes

    with pytest.raises(QwenEdgeError, match="multiple of 32.*e.g. 448x448"):
        export_coreml(tiny_vl_checkpoint, tmp_path / "a", options=CoreMLOptions(image_sizes=((450, 440),)),
                      progress=False)
    with pytest.raises(QwenEdgeError, match="WIDTHxHEIGHT"):
        parse_image_sizes("448")
    with pytest.raises(QwenEdgeError, match="text-only"):
        export_coreml(tiny_checkpoints["kv_equal_tied"], tmp_path / "b",
                      options=CoreMLOptions(image_sizes=((64, 64),)), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_ios_bundle_carries_both_image_paths(vl_coreml: Path, tiny_vl_export: Path, test_images: dict[str, Path],
                                             tmp_path: Path) -> None:
    """The iOS bundle: the Core ML decoder (with prefill_visual) and vision packages, and the ONNX
    vision-language pipeline onnxruntime-genai loads on iOS, whose image-prompt tokens are the runtime's."""
    pytest.importorskip("onnxruntime_genai")
    from exporter.package.build import package_export
    from exporter.package.verify import verify_bundle
    from runtime_py.generate import generate, stop_ids
    from runtime_py.session import OnnxModel
    from runtime_py.tokenizer import TextTokenizer
    from runtime_py.vision import VisualRequest, visual_parts, visual_prompt, with_visuals
    from tests.genai_driver import genai_image_greedy

    bundle = tmp_path / "ios"
    manifest = package_export(tiny_vl_export, bundle, "ios", ["fp32"], coreml_dir=vl_coreml)
    verify_bundle(bundle)
    coreml_variants = read_manifest(vl_coreml)["variants"].values()
    assert set(manifest["coreml"]["packages"]) == {v[k] for v in coreml_variants for k in ("package", "vision_package")}
    assert "prefill_visual" in manifest["coreml"]["export_record"]["functions"]
    assert manifest["variants"]["fp32"]["vision"] == "onnx/vision.onnx"

    tokenizer, model = TextTokenizer(tiny_vl_export), OnnxModel(tiny_vl_export, "fp32")
    messages = with_visuals([{"role": "user", "content": "What is in it?"}], VisualRequest((test_images["square"],)))
    prompt = visual_prompt(tiny_vl_export, "fp32", tokenizer.apply_chat_template(messages), visual_parts(messages),
                           tokenizer, model, 16)
    stops = stop_ids(tiny_vl_export)
    expected = generate(model, prompt.ids, 16, stop_ids=stops, visual=prompt)
    text = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": "What is in it?"}]}])
    got = genai_image_greedy(bundle, text, test_images["square"], len(prompt.ids) + 16, 16)
    assert (got[:-1] if got and got[-1] in stops else got) == expected
