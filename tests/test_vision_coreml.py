"""Core ML vision functions (`export --format coreml --image-sizes`), run by the NumPy MIL interpreter:
the image features equal transformers' for the same pixels, per declared size and weight option."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from exporter.coreml.check import InterpretedPackage, read_package_spec
from graphs.errors import QwenEdgeError
from runtime_py.export_format import read_manifest
from tests.hf_vision_oracle import hf_features, hf_inputs, hf_vl_model

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
