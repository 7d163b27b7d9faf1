"""onnxruntime-genai driven as an app drives it: load a bundle (one of its graphs), greedy generation."""

from __future__ import annotations

import json
from pathlib import Path


def genai_model(bundle: Path, graph: str | None = None):  # noqa: ANN201
    """og.Model of an Android/iOS bundle; `graph` picks a variant's merged graph (default: genai_config.json's)."""
    import onnxruntime_genai as og

    config = og.Config(str(bundle))
    if graph is not None:
        config.overlay(json.dumps({"model": {"decoder": {"filename": graph}}}))
    return og.Model(config)


def genai_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:  # noqa: ANN001
    """Greedy tokens after `prompt` (append_tokens), stopping where genai stops; the end token it stops
    on is included (genai emits it)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    got: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        got.append(int(generator.get_next_tokens()[0]))
    return got
