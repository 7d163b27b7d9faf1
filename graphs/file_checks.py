"""Reading files that may be damaged or hostile: JSON documents, and the paths they name.

A path read from a file (a manifest's file list, an index's shards, a variant's graphs) is untrusted:
`../../home/me/.ssh/id_rsa`, `/etc/passwd` or a symbolic link out of the folder would make a reader
copy, hash or overwrite something it was never given. So every such name goes through `member`
before it is joined to a folder. JSON goes through `read_json`: a regular file of bounded size, valid
UTF-8, and (for qwen-edge's own manifests) no repeated keys and no NaN, which a tamperer could use to
make two readers see different documents.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

from graphs.errors import QwenEdgeError

MAX_JSON_BYTES = 256 << 20  # tokenizer.json of a real model is ~11 MB; manifests and configs are small


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice")
        seen[key] = value
    return seen


def read_json(path: Path, fix: str, *, strict: bool = False) -> object:
    """The parsed JSON document at `path`; any problem is one QwenEdgeError naming the file and `fix`.

    strict (qwen-edge's own manifests): repeated keys and NaN/Infinity are refused, as a reader that
    kept the first of two keys would see another document than one that kept the last.
    """
    path = Path(path)
    if not path.is_file():
        raise QwenEdgeError(f"{path}: not found (or not a regular file); {fix}")
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise QwenEdgeError(f"{path}: {path.stat().st_size:,} bytes, larger than any such JSON file; {fix}")
        data = path.read_bytes()
    except OSError as exc:
        raise QwenEdgeError(f"{path}: cannot be read ({exc.strerror}); {fix}") from None
    return parse_json(data, path, fix, strict=strict)


def parse_json(data: bytes, path: Path, fix: str, *, strict: bool = False) -> object:
    """`read_json` on bytes already read (so that what was hashed is what is parsed)."""
    try:
        text = data.decode("utf-8")
        if strict:
            return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_refuse_constant)
        return json.loads(text)
    except UnicodeDecodeError:
        raise QwenEdgeError(f"{path}: not UTF-8 text; {fix}") from None
    except (ValueError, RecursionError) as exc:
        raise QwenEdgeError(f"{path}: not valid JSON ({str(exc)[:160]}); {fix}") from None


def relative_name_problem(name: object) -> str | None:
    """Why `name` is not a plain relative path ('a/b.onnx'), or None when it is one.

    Refused: non-strings, empty names, absolute paths, `..`, `.` or empty components, backslashes
    (a Windows separator), and NUL or other control characters.
    """
    if not isinstance(name, str):
        return "not a string"
    if not name:
        return "empty"
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        return "holds a control character"
    if "\\" in name:
        return "holds a backslash"
    if name.startswith("/"):
        return "an absolute path"
    if any(p in ("", ".", "..") for p in name.split("/")):
        return "not a plain relative path (empty, '.' or '..' components)"
    return None


def member(folder: Path, name: object, where: str, *, follow_links: bool = False) -> Path:
    """`folder / name` for a `name` read from `where` (a file inside `folder`), refused unless it stays inside.

    follow_links=False (exports and bundles, which qwen-edge writes without links): the path, once
    every symbolic link is resolved, must still be inside `folder`. follow_links=True (checkpoints:
    the Hugging Face cache stores every file as a link into its blob store): only the name itself is
    checked, and a link is followed wherever it points, as transformers does.
    """
    problem = relative_name_problem(name)
    if problem is None and not follow_links:
        root = os.path.realpath(folder)
        real = os.path.realpath(os.path.join(folder, str(name)))
        if os.path.commonpath([root, real]) != root:
            problem = "it leads outside the folder through a symbolic link"
    if problem is not None:
        raise QwenEdgeError(f"{where}: names a path outside {folder}: {name!r:.80} ({problem}); "
                            "only files inside the folder are read, so fix or regenerate that file")
    return Path(folder) / PurePosixPath(str(name))
