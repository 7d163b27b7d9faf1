"""`qwen-edge package verify`: does a bundle hold exactly what its manifest says, and does the manifest
say what the files are?

Checked, all problems collected before failing:
  - the manifest is a strict JSON object of this schema (no repeated keys, no NaN);
  - entries: every file but `manifest.json` is listed once, by a plain relative path, with its size
    and SHA-256; nothing else is present (no unlisted file, folder, symbolic link, FIFO or device);
  - fields: the ones exporter/package/manifest.py derives from the files (graph I/O and opsets read
    from the graphs, the model shape and state layout from config.json, logits mode, generation
    defaults, total size) equal what the manifest states; each variant names listed files of the
    kinds its target needs, and its quantization matches the graph's MatMulNBits nodes; every graph
    has its recurrent ops in the contrib form the manifest claims; the target's required files exist.
What this cannot prove: that nobody rewrote files and manifest together. `--manifest-sha256 HEX`
pins the manifest of a release (printed by `package` and by every `verify`), and with it every file.
Torch-free.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

from exporter.onnx.forms import CONTRIB_DOMAIN
from exporter.package.manifest import (BUNDLE_FORMAT, BUNDLE_MANIFEST, DERIVED, QUANT_KEYS, TOP_LEVEL_KEYS,
                                       activations_of, bundle_config, derived_fields, file_records, load_graph, quantization_of,
                                       sha256, standard_recurrent_nodes)
from graphs.errors import QwenEdgeError
from graphs.file_checks import MAX_JSON_BYTES, parse_json, relative_name_problem
from runtime_py.export_format import RECURRENT_FORMS, SUPPORT_FILES

__all__ = ["BUNDLE_FORMAT", "BUNDLE_MANIFEST", "bundle_entries", "check_bundle", "file_records", "sha256", "verify_bundle"]

TARGET_FORMATS = {"android": "onnx+ort", "ios": "coreml+onnx", "web": "onnx"}
VARIANT_FILE_KEYS = {"android": ("onnx", "ort"), "ios": ("onnx",), "web": ("embed_tokens", "decoder")}
REQUIRED_FILES = {"android": ("config.json", "genai_config.json", "required_operators.config"),
                  "ios": ("config.json", "genai_config.json"),
                  "web": ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_PROBLEMS_SHOWN = 8


def bundle_entries(root: Path) -> tuple[list[str], list[str], list[str]]:
    """(regular files, folders, anything else) under `root`, as relative POSIX paths; links are not followed."""
    files, folders, others = [], [], []
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(root / rel if rel else root) as it:
            for entry in it:
                path = f"{rel}/{entry.name}" if rel else entry.name
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISREG(mode):
                    files.append(path)
                elif stat.S_ISDIR(mode):
                    folders.append(path)
                    stack.append(path)
                else:
                    others.append(path)
    return sorted(files), sorted(folders), sorted(others)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def _listed_files(manifest: dict, problems: list[str]) -> dict[str, dict]:
    entries = manifest.get("files")
    if not isinstance(entries, list):
        problems.append("'files' is not a list")
        return {}
    listed: dict[str, dict] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != {"path", "bytes", "sha256"}:
            problems.append(f"files[{i}]: not a {{path, bytes, sha256}} record")
            continue
        rel, size, digest = entry["path"], entry["bytes"], entry["sha256"]
        problem = relative_name_problem(rel)
        if problem is not None:
            where = rel if isinstance(rel, str) and problem != "holds a control character" else f"files[{i}]"
            problems.append(f"{where}: path outside the bundle ({problem})")
        elif rel == BUNDLE_MANIFEST:
            problems.append(f"files[{i}]: lists {BUNDLE_MANIFEST} itself")
        elif rel in listed:
            problems.append(f"{rel}: listed twice")
        elif type(size) is not int or size < 0 or not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            problems.append(f"{rel}: its size or SHA-256 in the manifest is malformed")
        else:
            listed[rel] = entry
    return listed


def _check_entries(root: Path, listed: dict[str, dict], problems: list[str]) -> None:
    files, folders, others = bundle_entries(root)
    for rel in others:
        role = "where the manifest lists a file" if rel in listed else "not listed in the manifest"
        problems.append(f"{rel}: a {_kind(os.lstat(root / rel).st_mode)}, {role} (bundles hold regular files only; "
                        "a link may lead outside the bundle)")
    present = set(files) - {BUNDLE_MANIFEST}
    needed_folders = {"/".join(p.split("/")[:i]) for p in listed for i in range(1, p.count("/") + 1)}
    for rel in sorted(set(folders) - needed_folders):
        problems.append(f"{rel}/: a folder not listed in the manifest")
    for rel in sorted(present - set(listed)):
        problems.append(f"{rel}: not listed in the manifest")
    for rel, entry in sorted(listed.items()):
        if rel not in present:
            if rel not in others:
                problems.append(f"{rel}: missing" + (" (or not a regular file)" if os.path.lexists(root / rel) else ""))
        elif (root / rel).stat().st_size != entry["bytes"]:
            problems.append(f"{rel}: {(root / rel).stat().st_size} bytes, manifest says {entry['bytes']}")
        elif sha256(root / rel) != entry["sha256"]:
            problems.append(f"{rel}: SHA-256 differs from the manifest (file changed)")


def _check_claims(root: Path, manifest: dict, listed: dict[str, dict], problems: list[str]) -> None:
    """The manifest's fields against the (already hash-checked) files."""
    target = manifest.get("target")
    expected_keys = TOP_LEVEL_KEYS | ({"coreml"} if target == "ios" else set())
    for key in sorted(set(manifest) ^ expected_keys):
        problems.append(f"{key}: " + ("not a field of a bundle manifest" if key in manifest else "missing"))
    if manifest.get("format") != TARGET_FORMATS[target]:
        problems.append(f"format {manifest.get('format')!r:.40} is not {TARGET_FORMATS[target]!r}, the {target} format")
    if not isinstance(manifest.get("qwen_edge_version"), str):
        problems.append("qwen_edge_version: not a string")
    for rel in REQUIRED_FILES[target]:
        if rel not in listed:
            problems.append(f"{rel}: the {target} target needs it, and the bundle does not list it")
    top = sorted(p for p in listed if "/" not in p)
    support = top if target == "web" else [p for p in top if p in SUPPORT_FILES]
    if manifest.get("support_files") != support:
        problems.append(f"support_files: must list the bundle's {'top-level' if target == 'web' else 'tokenizer and config'} "
                        "files, sorted")
    graphs = sorted(p for p in listed if p.endswith(".onnx"))
    derived = derived_fields(root, graphs, target == "ios")
    derived["total_bytes"] = sum(e["bytes"] for e in listed.values())
    for key in DERIVED:
        head, _, tail = key.partition(".")
        stated = manifest.get(head)
        if tail:
            stated = stated.get(tail) if isinstance(stated, dict) else None
        if stated != derived[key]:
            problems.append(f"{key}: the manifest's value differs from what the bundle's files say")
    model = manifest.get("model")
    if (not isinstance(model, dict) or set(model) != {"name", "architecture", "shape"}
            or model["architecture"] != "qwen3_5" or not isinstance(model["name"], str)):
        problems.append("model: must be {name (a string), architecture 'qwen3_5', shape}")
    recurrent = manifest.get("recurrent_ops")
    exported_as = recurrent.get("exported_as") if isinstance(recurrent, dict) else None
    if (not isinstance(recurrent, dict) or set(recurrent) != {"form", "domain", "exported_as"}
            or recurrent["form"] != "contrib" or recurrent["domain"] != CONTRIB_DOMAIN
            or exported_as not in tuple(RECURRENT_FORMS)):
        problems.append(f"recurrent_ops: every bundle carries the contrib form ({CONTRIB_DOMAIN}), exported as one of "
                        f"{', '.join(RECURRENT_FORMS)}")
    for rel in graphs:
        if standard_recurrent_nodes(load_graph(root / rel)):
            problems.append(f"{rel}: recurrent ops outside com.microsoft, but the manifest claims the contrib form")
    variants = manifest.get("variants")
    if not isinstance(variants, dict) or not variants:
        problems.append("variants: must be a non-empty object")
        variants = {}
    converted = exported_as == "standard" and "linear_attention" in (derived["model.shape"]["layer_types"])
    named: list[str] = []
    for name, record in variants.items():
        named += _check_variant(root, target, name, record, listed, converted, problems)
    models = sorted(p for p in listed if p.endswith((".onnx", ".ort")))
    if sorted(named) != models:
        problems.append("variants: must name every graph of the bundle, each once")
    if target == "ios":
        _check_coreml(manifest.get("coreml"), listed, problems)


def _check_coreml(coreml: object, listed: dict, problems: list[str]) -> None:
    packages = sorted({p.split("/")[1] for p in listed if p.startswith("coreml/") and p.count("/") >= 2
                       and p.split("/")[1].endswith(".mlpackage")})
    if (not isinstance(coreml, dict) or set(coreml) != {"packages", "export_record"}
            or coreml["packages"] != [f"coreml/{p}" for p in packages]
            or not all(f"coreml/{p}/Manifest.json" in listed for p in packages)
            or not isinstance(coreml["export_record"], (dict, type(None)))):
        problems.append("coreml: must name the bundle's coreml/*.mlpackage folders (each with its Manifest.json) "
                        "and the Core ML export's record")


def _check_variant(root: Path, target: str, name: object, record: object, listed: dict, converted: bool,
                   problems: list[str]) -> list[str]:
    """Check one variant's record; returns the graph files it names."""
    keys = VARIANT_FILE_KEYS[target]
    if not isinstance(record, dict) or set(record) != {*keys, "quantization", "converted_to_contrib"}:
        problems.append(f"variants.{name}: must be an object of {', '.join(keys)}, quantization and converted_to_contrib")
        return []
    files = [record[k] for k in keys if isinstance(record[k], str) and record[k] in listed]
    if len(files) != len(keys):
        problems.append(f"variants.{name}: {', '.join(keys)} must name files listed in the bundle")
    if record["converted_to_contrib"] is not converted:
        problems.append(f"variants.{name}.converted_to_contrib: must be {str(converted).lower()} for a bundle whose "
                        "recurrent_ops.exported_as is that")
    quant = record["quantization"]
    graph = record.get("onnx", record.get("decoder"))
    if not isinstance(quant, dict) or not set(quant) <= set(QUANT_KEYS):
        problems.append(f"variants.{name}.quantization: must be an object of {', '.join(QUANT_KEYS)}")
    elif graph in files:
        model = load_graph(root / graph)
        found = {**quantization_of(model), "activations": activations_of(model, bundle_config(root))}
        if quant != found:
            problems.append(f"variants.{name}.quantization: claims {quant}, the graph {graph} has {found}")
    return files


def verify_bundle(bundle: Path, manifest_sha256: str | None = None) -> dict:
    """Re-check a bundle against its manifest (see `check_bundle`); returns the manifest."""
    return check_bundle(bundle, manifest_sha256)[0]


def check_bundle(bundle: Path, manifest_sha256: str | None = None) -> tuple[dict, str]:
    """Re-check a bundle against its manifest; raise QwenEdgeError naming the problems found.

    `manifest_sha256` pins the release: the manifest must have exactly that SHA-256. Returns the
    manifest and its SHA-256 (of the very bytes that were checked).
    """
    bundle = Path(bundle)
    path = bundle / BUNDLE_MANIFEST
    if not bundle.is_dir() or bundle.is_symlink():
        what = "a symbolic link" if bundle.is_symlink() else "not a folder" if bundle.exists() else "not found"
        raise QwenEdgeError(f"{bundle}: {what}, so no {BUNDLE_MANIFEST} to check; pass a folder written by "
                            "'qwen-edge package'")
    if path.is_symlink() or not path.is_file():
        raise QwenEdgeError(f"{bundle}: no {BUNDLE_MANIFEST} (as a regular file); pass a folder written by "
                            "'qwen-edge package'")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise QwenEdgeError(f"{path}: {path.stat().st_size:,} bytes, larger than any bundle manifest; re-package the export")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if manifest_sha256 is not None and digest != manifest_sha256.lower():
        raise QwenEdgeError(f"{bundle}: {BUNDLE_MANIFEST} has SHA-256 {digest}, not the pinned {manifest_sha256}; "
                            "this is not the bundle that was released")
    manifest = parse_json(data, path, "re-package the export", strict=True)
    if not isinstance(manifest, dict):
        raise QwenEdgeError(f"{path}: not a qwen-edge bundle manifest (not a JSON object); re-package the export")
    if manifest.get("bundle_format") != BUNDLE_FORMAT or manifest.get("target") not in tuple(TARGET_FORMATS):
        raise QwenEdgeError(f"{path}: not a qwen-edge bundle manifest (bundle_format {BUNDLE_FORMAT} with a target "
                            f"among {', '.join(TARGET_FORMATS)}); re-package the export")
    problems: list[str] = []
    listed = _listed_files(manifest, problems)
    _check_entries(bundle, listed, problems)
    if not problems:  # the files are the listed ones: now what the manifest says about them
        try:
            _check_claims(bundle, manifest, listed, problems)
        except QwenEdgeError as exc:
            problems.append(str(exc))
    if problems:
        shown = problems[:_MAX_PROBLEMS_SHOWN]
        more = f" (and {len(problems) - 1} more: {'; '.join(shown[1:])}" if len(problems) > 1 else ""
        more += "; …)" if len(problems) > _MAX_PROBLEMS_SHOWN else (")" if more else "")
        raise QwenEdgeError(f"{bundle}: failed verification: {problems[0]}{more}; re-package the export")
    return manifest, digest
