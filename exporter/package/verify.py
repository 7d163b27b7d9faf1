"""A bundle's manifest file list, and `qwen-edge package verify`: does the bundle hold exactly that?

Every file of a bundle but `manifest.json` is listed with its size and SHA-256. Verification reads
each file once. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from graphs.errors import QwenEdgeError

BUNDLE_MANIFEST = "manifest.json"
BUNDLE_FORMAT = 1  # version of the manifest's schema
# keys of a variant record that name bundle files
VARIANT_FILE_KEYS = ("onnx", "ort", "embed_tokens", "decoder", "vision_encoder", "vision", "embedding", "vision_ort",
                     "embedding_ort", "decoder_ort")
_CHUNK = 1 << 20


def bundle_files(root: Path) -> list[Path]:
    """Every file under `root` except the manifest, sorted by path (nothing is read)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != BUNDLE_MANIFEST)


def file_records(root: Path) -> list[dict]:
    """Path, size and SHA-256 of every file under `root` except the manifest, sorted by path."""
    return [{"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size, "sha256": sha256(p)}
            for p in bundle_files(root)]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_bundle(bundle: Path) -> dict:
    """Re-check a bundle against its manifest; raise QwenEdgeError naming every problem found.

    Checks: every listed path stays inside the bundle, exists, and has the listed size and SHA-256;
    no file is present that the manifest does not list; every graph and variant file the manifest
    names is among the hashed files. Returns the manifest.
    """
    bundle = Path(bundle)
    path = bundle / BUNDLE_MANIFEST
    if not path.is_file():
        raise QwenEdgeError(f"{bundle}: no {BUNDLE_MANIFEST}; pass a folder written by 'qwen-edge package'")
    try:
        manifest = json.loads(path.read_text())
        entries = manifest["files"]
        listed = {e["path"]: e for e in entries}
    except (ValueError, KeyError, TypeError) as exc:
        raise QwenEdgeError(f"{path}: not a qwen-edge bundle manifest ({exc}); re-package the export") from None
    root = bundle.resolve()
    problems = []
    for rel, entry in sorted(listed.items()):
        target = (root / rel).resolve()
        if Path(rel).is_absolute() or ".." in Path(rel).parts or not target.is_relative_to(root):
            problems.append(f"{rel}: path outside the bundle")
        elif not target.is_file():
            problems.append(f"{rel}: missing")
        elif target.stat().st_size != entry.get("bytes"):
            problems.append(f"{rel}: {target.stat().st_size} bytes, manifest says {entry.get('bytes')}")
        elif sha256(target) != entry.get("sha256"):
            problems.append(f"{rel}: SHA-256 differs from the manifest (file changed)")
    for extra in sorted({p.relative_to(bundle).as_posix() for p in bundle_files(bundle)} - set(listed)):
        problems.append(f"{extra}: not listed in the manifest")
    named = list(manifest.get("graphs", {})) + [f for v in manifest.get("variants", {}).values()
                                                for k, f in v.items() if k in VARIANT_FILE_KEYS]
    for rel in sorted(set(named) - set(listed)):
        problems.append(f"{rel}: named by the manifest but not hashed in its file list")
    if problems:
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
        raise QwenEdgeError(f"{bundle}: failed verification: {problems[0]}{more}; re-package the export")
    return manifest
