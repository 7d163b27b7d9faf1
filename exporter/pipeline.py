"""`qwen-edge export`: the one skeleton both formats plug into.

    resolve the checkpoint -> refuse a bad destination -> open and check the checkpoint
    -> in a temporary folder: load, then per activation dtype prepare once (trace or convert) and
       write each variant, then finish (ONNX: the one pass that streams the weights into every
       variant) -> copy the support files -> write the manifest
    -> move the folder into place

A backend (`exporter/onnx/backend.py`, `exporter/coreml/backend.py`) supplies the format-specific
steps; the export folder's format itself is `runtime_py/export_format.py`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from default_model import resolve_checkpoint
from exporter.atomic import atomic_output_dir, check_destination
from exporter.progress import Stages
from graphs.checkpoint import Checkpoint, open_checkpoint
from graphs.config import TextConfig
from graphs.errors import QwenEdgeError
from graphs.file_checks import read_json
from quant.schemes import SCHEMES, Scheme
from runtime_py.export_format import EXPORT_FORMAT, SUPPORT_FILES, qwen_edge_version, write_manifest
from runtime_py.tokenizer import check_support_files

ACTIVATIONS = ("float32", "float16")  # groups are prepared in this order


@dataclass(frozen=True)
class ExportRequest:
    """What to export, and where: the options every format shares."""

    checkpoint: str | Path
    out: Path
    schemes: tuple[Scheme, ...] = (SCHEMES["fp32"],)
    force: bool = False
    progress: bool = True


class ExportBackend(Protocol):
    """The format-specific steps of an export."""

    format: str

    def check(self, schemes: tuple[Scheme, ...]) -> None:
        """Refuse, before any work, what this format cannot write."""

    def check_config(self, cfg: TextConfig) -> None:
        """Refuse, before any weight is read, options this model cannot take."""

    def prepare_stages(self, activations: str) -> list[str]:
        """Names of the stages `prepare` runs for one activation dtype."""

    def finish_stages(self) -> list[str]:
        """Names of the stages `finish` runs."""

    def load(self, checkpoint: Checkpoint) -> Any:
        """What `prepare` starts from (a model, or the checkpoint itself)."""

    def prepare(self, model: Any, activations: str, folder: Path, stages: Stages) -> Any:
        """The traced or converted form of `model` in `activations`, shared by that dtype's variants."""

    def write_variant(self, prepared: Any, scheme: Scheme, folder: Path) -> dict:
        """Write one variant into `folder`; returns its manifest record."""

    def release(self, prepared: Any) -> None:
        """Drop what `prepare` left behind."""

    def finish(self, folder: Path, stages: Stages) -> None:
        """Complete every variant written (after all of them are)."""

    def manifest_fields(self, cfg: TextConfig) -> dict:
        """The format's own manifest entries (between `source_checkpoint` and `variants`)."""


def run_export(request: ExportRequest, backend: ExportBackend) -> Path:
    """Export `request.checkpoint` into `request.out` (atomically). Returns the output folder."""
    if not request.schemes:
        raise QwenEdgeError("no variants to export; pass --quant with at least one scheme")
    backend.check(request.schemes)
    folder = resolve_checkpoint(request.checkpoint)
    out = Path(request.out)
    check_destination(out, request.force, [folder])
    groups = [(a, [s for s in request.schemes if s.activations == a]) for a in ACTIVATIONS]
    groups = [(a, members) for a, members in groups if members]
    names = ["check checkpoint", "load"]
    for activations, members in groups:
        names += backend.prepare_stages(activations) + [f"write {s.name}" for s in members]
    stages = Stages([*names, *backend.finish_stages(), "copy tokenizer"], request.progress)
    checkpoint = stages.run(lambda: _open_checked(folder, backend))
    with atomic_output_dir(out, request.force, [folder]) as tmp:
        model = stages.run(lambda: backend.load(checkpoint))
        records = {}
        for activations, members in groups:
            prepared = backend.prepare(model, activations, tmp, stages)
            for scheme in members:
                records[scheme.name] = stages.run(lambda s=scheme: backend.write_variant(prepared, s, tmp))
            backend.release(prepared)
        backend.finish(tmp, stages)
        copied = stages.run(lambda: copy_support_files(folder, tmp))
        write_manifest(tmp, {
            "export_format": EXPORT_FORMAT,
            "qwen_edge_version": qwen_edge_version(),
            "format": backend.format,
            "source_checkpoint": folder.resolve().name,
            **backend.manifest_fields(checkpoint.config),
            "variants": {s.name: records[s.name] for s in request.schemes},
            "support_files": copied,
        })
    return out


def _open_checked(folder: Path, backend: ExportBackend) -> Checkpoint:
    """The checkpoint, its options and every file `generate` will read, checked before the work starts."""
    checkpoint = open_checkpoint(folder)
    backend.check_config(checkpoint.config)
    check_support_files(folder)
    generation = folder / "generation_config.json"
    if generation.exists() and not isinstance(read_json(generation, "fix it or remove it"), dict):
        raise QwenEdgeError(f"{generation}: must hold a JSON object; fix it or remove it")
    return checkpoint


def copy_support_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer, chat template and configs a client needs beside the graphs (contents only: the
    copies follow the user's umask, not the checkpoint's modes)."""
    names = [n for n in SUPPORT_FILES if (src / n).exists()]
    for name in names:
        if not (src / name).is_file():
            raise QwenEdgeError(f"{src / name}: not a regular file; a checkpoint's support files must be plain files")
        shutil.copyfile(src / name, dst / name)
    return names


def files_bytes(root: Path, paths: list[str]) -> int:
    """Bytes on disk of files (or whole folders) under `root`; missing ones count 0."""
    total = 0
    for rel in paths:
        path = root / rel
        if path.is_dir():
            total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        elif path.is_file():
            total += path.stat().st_size
    return total
