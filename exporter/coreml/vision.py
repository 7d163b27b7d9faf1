"""The Core ML vision encoder: one function per image size an app declares (`--image-sizes 448x448,...`).

    OUT/coreml/vision_encoder{suffix}.mlpackage   functions `image_{W}x{H}`, one copy of the weights
        input  pixel_values   [H/p · W/p, C·T·p·p] fp32  (the processor's patches for a W×H image)
        output image_features [H/p · W/p / 4, hidden] fp32

Core ML shapes are fixed, so each size is its own function (graphs/vision.FixedSizeVisionEncoder: the
patch layout is a constant of the program). An app resizes an image to a declared size itself (or
picks the declared size smart_resize would give); sizes must be multiples of patch × merge (32).
Weights: the scheme's compression under the vision predicate (quant/schemes.py `vision_bits_for`).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from graphs.config import VisionConfig
from graphs.errors import QwenEdgeError
from graphs.vision import FixedSizeVisionEncoder, VisionEncoder
from runtime_py.export_format import coreml_vision_function

PACKAGE_STEM = "vision_encoder"


def parse_image_sizes(text: str | None) -> tuple[tuple[int, int], ...]:
    """'448x448,640x480' -> ((448, 448), (640, 480)) as (width, height)."""
    if not text:
        return ()
    sizes = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        try:
            width, height = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise QwenEdgeError(f"--image-sizes {item!r}: write WIDTHxHEIGHT, e.g. 448x448,640x480") from None
        sizes.append((width, height))
    return tuple(dict.fromkeys(sizes))


def check_image_sizes(sizes: tuple[tuple[int, int], ...], cfg: VisionConfig) -> None:
    factor = cfg.patch_size * cfg.spatial_merge_size
    for width, height in sizes:
        if width < factor or height < factor or width % factor or height % factor:
            near = f"{max(factor, round(width / factor) * factor)}x{max(factor, round(height / factor) * factor)}"
            raise QwenEdgeError(f"--image-sizes {width}x{height}: each side must be a multiple of {factor} "
                                f"(patch × merge); use e.g. {near}")


def function_name(width: int, height: int) -> str:
    return coreml_vision_function(width, height)


def package_name(suffix: str) -> str:
    return f"coreml/{PACKAGE_STEM}{suffix}.mlpackage"


def convert_size(encoder: VisionEncoder, width: int, height: int, compute: str):  # noqa: ANN201
    """One image size as a Core ML mlprogram (not loaded: this may be Linux)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    import coremltools as ct

    module = FixedSizeVisionEncoder(encoder, height, width).eval()
    patches = module.grid[1] * module.grid[2]
    example = torch.zeros(patches, encoder.cfg.patch_dim, dtype=torch.float32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, (example,), strict=False)
        program = program.run_decompositions({torch.ops.aten.gelu.default: _tanh_gelu})
    precision = ct.precision.FLOAT16 if compute == "float16" else ct.precision.FLOAT32
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    return ct.convert(program, inputs=[ct.TensorType(name="pixel_values", shape=example.shape, dtype=np.float32)],
                      outputs=[ct.TensorType(name="image_features", dtype=np.float32)],
                      minimum_deployment_target=ct.target.iOS18, compute_precision=precision,
                      convert_to="mlprogram", skip_model_load=True)


def _tanh_gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU's tanh form written out. coremltools 9 reads gelu's `approximate` only as a positional
    argument while torch.export passes it by keyword, so the blocks' tanh GELU would convert as the
    exact one (1e-4 off transformers); the merger's exact GELU stays one op."""
    if approximate != "tanh":
        return NotImplemented
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


def io_record(sizes: tuple[tuple[int, int], ...], cfg: VisionConfig) -> dict:
    """The vision package's functions with their input and output shapes, as the manifest states them."""
    functions = {}
    for width, height in sizes:
        patches = (height // cfg.patch_size) * (width // cfg.patch_size)
        functions[function_name(width, height)] = {
            "inputs": {"pixel_values": [patches, cfg.patch_dim]},
            "outputs": {"image_features": [patches // cfg.merge_unit, cfg.out_hidden_size]},
            "image_size": [width, height]}
    return {"functions": functions}


def write_vision_package(converted: dict[str, object], scheme: object, cfg: VisionConfig, folder: Path) -> str:
    """Compress each size's program with the vision predicate and merge them into one package."""
    import shutil

    import coremltools as ct

    from quant.coreml_weights import compress_vision_weights

    parts_dir = folder / f".vision-parts{scheme.suffix}"
    parts_dir.mkdir()
    desc = ct.utils.MultiFunctionDescriptor()
    for name, mlmodel in converted.items():
        path = parts_dir / f"{name}.mlpackage"
        compress_vision_weights(mlmodel, scheme, cfg).save(str(path))
        desc.add_function(str(path), src_function_name="main", target_function_name=name)
    desc.default_function_name = next(iter(converted))
    target = package_name(scheme.suffix)
    ct.utils.save_multifunction(desc, str(folder / target))
    shutil.rmtree(parts_dir)
    return target
