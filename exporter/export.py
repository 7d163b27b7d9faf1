"""`qwen-edge export`: a checkpoint folder in, an app-ready ONNX export folder out.

Output layout (onnx-community Qwen3.5):
    OUT/config.json, generation_config.json, tokenizer.json, tokenizer_config.json, ...
    OUT/onnx/embed_tokens.onnx (+ .onnx_data)
    OUT/onnx/decoder_model_merged.onnx (+ .onnx_data)
    OUT/qwen_edge.json   what was exported, how, and by which version
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import click
import onnx
import onnxruntime

from exporter.atomic import atomic_output_dir, check_destination
from exporter.onnx_export import export_decoder, export_embed
from exporter.onnx_recurrent import DOMAINS
from graphs.checkpoint import open_checkpoint

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "default_model" / "checkpoint"
SUPPORT_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "preprocessor_config.json",
)
MANIFEST = "qwen_edge.json"
# Oldest ONNX Runtime that runs each form of the recurrent ops (see exporter/onnx_recurrent.py).
MIN_ORT = {"standard": "1.32", "contrib": "1.25"}


def qwen_edge_version() -> str:
    try:
        return version("qwen-edge")
    except PackageNotFoundError:
        return "0+unknown"


def resolve_checkpoint(name: str | Path) -> Path:
    """'default' names the embedded default model; anything else is a folder path."""
    return DEFAULT_MODEL_DIR if str(name) == "default" else Path(name)


class Stages:
    """A progress bar over the named stages of a long job (on stderr, so stdout stays clean)."""

    def __init__(self, names: list[str], enabled: bool) -> None:
        self.names, self.enabled, self.done = names, enabled, 0
        self.bar = click.progressbar(length=len(names), label="export", file=sys.stderr,
                                     item_show_func=lambda _: self.current, show_eta=False) if enabled else None
        self.current = names[0]
        if self.bar:
            self.bar.__enter__()
            self.bar.render_progress()

    def run(self, fn: Callable[[], object]) -> object:
        self.current = self.names[self.done]
        if self.bar:
            self.bar.render_progress()
        result = fn()
        self.done += 1
        if self.bar:
            self.bar.update(1)
            if self.done == len(self.names):
                self.bar.__exit__(None, None, None)
        return result


def _copy_support_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer, chat template and configs a client needs beside the graphs."""
    names = [n for n in SUPPORT_FILES if (src / n).is_file()]
    for name in names:
        shutil.copy2(src / name, dst / name)
    return names


def _opset_imports(path: Path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    return {o.domain or "ai.onnx": o.version for o in model.opset_import}


def export_checkpoint(
    checkpoint: str | Path, out: Path, *, recurrent_ops: str = "standard", force: bool = False, progress: bool = True
) -> Path:
    """Export `checkpoint` into `out` (atomically). Returns `out`."""
    if recurrent_ops not in DOMAINS:
        raise ValueError(f"recurrent ops must be one of {sorted(DOMAINS)}")
    folder = resolve_checkpoint(checkpoint)
    out = Path(out)
    check_destination(out, force)
    stages = Stages(["check checkpoint", "load weights", "export embed_tokens", "export decoder", "copy tokenizer"],
                    progress)
    ck = stages.run(lambda: open_checkpoint(folder))
    with atomic_output_dir(out, force) as tmp:
        onnx_dir = tmp / "onnx"
        onnx_dir.mkdir()
        model = stages.run(ck.build_decoder)
        embed = stages.run(lambda: export_embed(model, onnx_dir))
        decoder = stages.run(lambda: export_decoder(model, onnx_dir, recurrent_ops))
        copied = stages.run(lambda: _copy_support_files(folder, tmp))
        manifest = {
            "qwen_edge_version": qwen_edge_version(),
            "format": "onnx",
            "source_checkpoint": folder.resolve().name,
            "dtype": "float32",
            "recurrent_ops": recurrent_ops,
            "recurrent_ops_domain": DOMAINS[recurrent_ops] or "ai.onnx",
            "min_onnxruntime": MIN_ORT[recurrent_ops],
            "opset_imports": _opset_imports(decoder),
            "exported_with_onnxruntime": onnxruntime.__version__,
            "graphs": {"embed_tokens": f"onnx/{embed.name}", "decoder": f"onnx/{decoder.name}"},
            "support_files": copied,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out
