"""The host side of an image or video prompt on Core ML: what an app does between its pixels and the
decoder's `prefill_visual` function (exporter/coreml/sequence.py).

    pixels (runtime_py/vision_preprocess.py) ─► the vision function of the image's size
        (`image_{W}x{H}`), once per frame pair of a video ─► image features
    token ids + grids ─► runtime_py/vision.py: rope_index (3-row positions and delta), scatter
        (the feature rows at the pad tokens)

Core ML functions have fixed shapes, so an image must resize (smart_resize) to a size the export
declared with --image-sizes; a video calls the function of its frame size once per temporal patch
(attention in the tower never crosses frame pairs, so this equals one call over the whole video).
NumPy only, like sequence.py: the logic an app mirrors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exporter.coreml.sequence import CallFn
from graphs.config import VisionConfig
from graphs.errors import QwenEdgeError
from runtime_py.export_format import coreml_vision_function
from runtime_py.vision import IMAGE, VIDEO, VisionTokens, rope_index, scatter_features, token_types
from runtime_py.vision_preprocess import VisualInput


@dataclass
class VisualPrefill:
    """What `CoreMLSequence.prefill_visual` takes for one prompt."""

    ids: list[int]
    positions: np.ndarray  # [3, L]
    features: np.ndarray  # [L, hidden]: encoder rows at the pad tokens, zeros elsewhere
    delta: int


def encode_visual(call: CallFn, functions: set[str], visual: VisualInput, cfg: VisionConfig) -> np.ndarray:
    """Image features [t·h·w/4, hidden] of one image or video through the vision package's functions."""
    t, h, w = visual.grid
    name = coreml_vision_function(w * cfg.patch_size, h * cfg.patch_size)
    if name not in functions:
        declared = ", ".join(sorted(f.removeprefix("image_") for f in functions)) or "none"
        raise QwenEdgeError(f"the {visual.kind} resizes to {w * cfg.patch_size}x{h * cfg.patch_size}, which the Core "
                            f"ML vision package has no function for (declared: {declared}); export with "
                            f"--image-sizes including it, or resize the {visual.kind} to a declared size")
    rows = h * w
    return np.concatenate([np.asarray(call(name, {"pixel_values": visual.pixel_values[i * rows:(i + 1) * rows]})
                                      ["image_features"], np.float32) for i in range(t)])


def visual_prefill_inputs(ids: list[int], visuals: list[VisualInput], tokens: VisionTokens, cfg: VisionConfig,
                          call: CallFn, functions: set[str]) -> VisualPrefill:
    """Positions and feature rows of an expanded prompt (runtime_py/vision.py expand_placeholders)."""
    types = token_types(ids, tokens)
    positions, delta = rope_index(types, visuals, cfg.spatial_merge_size)
    features = {}
    for kind, name in ((IMAGE, "image"), (VIDEO, "video")):
        encoded = [encode_visual(call, functions, v, cfg) for v in visuals if v.kind == name]
        if encoded:
            features[kind] = np.concatenate(encoded)
    rows = scatter_features(np.zeros((len(ids), cfg.out_hidden_size), np.float32), types, features)
    return VisualPrefill(list(ids), positions, rows, delta)
