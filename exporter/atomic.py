"""Write outputs all at once, never over an input, never over a folder qwen-edge did not write.

An output folder is built in a temporary sibling `.{OUT}.partial-{pid}@{host}.{random}` and moved
into place only when complete, so a failed or interrupted run leaves nothing at OUT. A run killed
before it could clean up (SIGKILL, power loss) leaves that sibling behind, named after its process;
the next run on the same OUT removes it once that process is gone (never one of a live run, nor of
another host sharing the folder).

What is refused, before any work, with or without --force:
  - an output that is, contains or lies inside one of the command's inputs (checkpoint, export, …);
  - an output that is a symbolic link;
  - replacing a folder that holds neither an export manifest nor a bundle manifest (--force replaces
    only what qwen-edge wrote, or an empty folder).
Outputs follow the user's umask (files 0666 & ~umask, folders 0777 & ~umask).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from graphs.errors import QwenEdgeError
from runtime_py.export_format import MANIFEST as EXPORT_MANIFEST

BUNDLE_MANIFEST = "manifest.json"  # exporter/package/verify.py; a bundle's manifest holds "bundle_format"
SIBLING_KINDS = ("partial", "old")  # a folder being built; a replaced folder being deleted


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _real(path: Path) -> str:
    return os.path.realpath(os.path.abspath(path))


def _within(inner: str, outer: str) -> bool:
    return os.path.commonpath([inner, outer]) == outer


def overlap(out: Path, inputs: Iterable[Path]) -> str | None:
    """How `out` overlaps one of `inputs` (both as resolved paths), or None."""
    target = _real(out)
    for given in inputs:
        source = _real(given)
        if target == source:
            return f"is the input {given}"
        if _within(target, source):
            return f"lies inside the input {given}"
        if _within(source, target):
            return f"contains the input {given}"
    return None


def written_by_qwen_edge(folder: Path) -> bool:
    """Does `folder` hold an export manifest, or a bundle manifest (a JSON object with `bundle_format`)?"""
    if (folder / EXPORT_MANIFEST).is_file():
        return True
    bundle = folder / BUNDLE_MANIFEST
    if not bundle.is_file():
        return False
    try:
        manifest = json.loads(bundle.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "bundle_format" in manifest


def check_destination(out: Path, force: bool, inputs: Iterable[Path] = ()) -> None:
    """Refuse early, before any work, an output folder that would overwrite an input or a user's folder."""
    out = Path(out)
    how = overlap(out, inputs)
    if how is not None:
        raise QwenEdgeError(f"{out}: the output folder {how}; an input is never written to, "
                            "so choose an output path outside it")
    if out.is_symlink():
        raise QwenEdgeError(f"{out}: is a symbolic link; pass the folder it points to, or another output path")
    if not out.exists():
        return
    if not out.is_dir():
        raise QwenEdgeError(f"{out}: exists and is not a folder; remove it or choose another output path")
    if not force:
        raise QwenEdgeError(f"{out}: output folder already exists; choose another path or pass --force to replace it")
    if any(out.iterdir()) and not written_by_qwen_edge(out):
        raise QwenEdgeError(f"{out}: --force replaces only a folder qwen-edge wrote (one holding {EXPORT_MANIFEST} or "
                            f"a bundle {BUNDLE_MANIFEST}), and this one holds neither; it was left as it is, "
                            "so remove it yourself or choose another path")


def _sibling_prefix(out: Path, kind: str) -> str:
    return f".{out.name}.{kind}-{os.getpid()}@{socket.gethostname()}."


def _abandoned(out: Path, sibling: Path, kind: str) -> bool:
    """Is `sibling` a `kind` folder of a run on `out` whose process (on this host) no longer runs?"""
    pattern = rf"\.{re.escape(out.name)}\.{kind}-(\d+)@(.+)\.[a-z0-9_]{{8}}"
    match = re.fullmatch(pattern, sibling.name)
    if match is None or match.group(2) != socket.gethostname() or int(match.group(1)) == os.getpid():
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def remove_leftovers(out: Path) -> list[Path]:
    """Delete the folders earlier runs on `out` left behind (killed before they could). Returns them."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    removed = []
    for kind in SIBLING_KINDS:
        for sibling in sorted(out.parent.glob(f".{glob_escape(out.name)}.{kind}-*")):
            if sibling.is_dir() and not sibling.is_symlink() and _abandoned(out, sibling, kind):
                shutil.rmtree(sibling, ignore_errors=True)
                removed.append(sibling)
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _new_sibling(out: Path, kind: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=_sibling_prefix(out, kind), dir=out.parent))


def apply_umask(root: Path) -> None:
    """Give every folder and file under `root` (itself included) the modes the user's umask asks for.

    Temporary folders are created 0700 and some writers copy their own modes; the output should
    look like any file the user creates."""
    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


@contextmanager
def atomic_output_dir(out: Path, force: bool = False, inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes `out`, on any error or interrupt it is deleted."""
    out, inputs = Path(out), list(inputs)
    check_destination(out, force, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    tmp = _new_sibling(out, "partial")
    try:
        yield tmp
        apply_umask(tmp)
        check_destination(out, force, inputs)  # again: the folder may have appeared meanwhile
        if out.exists():
            old = _new_sibling(out, "old")
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_file(path: Path, option: str, inputs: Iterable[Path] = ()) -> None:
    """Refuse, before any work, an output file (`--json FILE`) that cannot be written or would touch an input."""
    path = Path(path)
    if not path.parent.is_dir():
        raise QwenEdgeError(f"{option} {path}: folder {path.parent} does not exist; create it or choose another path")
    if path.is_dir():
        raise QwenEdgeError(f"{option} {path}: is a folder; give a file path")
    how = overlap(path, inputs)
    if how is not None:
        raise QwenEdgeError(f"{option} {path}: the output file {how}; an input is never written to, "
                            "so choose a path outside it")


def write_text_atomically(path: Path, text: str) -> None:
    """Write `path` as a new file (never through an existing link to another file), all at once."""
    path = Path(path)
    fd, partial = tempfile.mkstemp(prefix=f".{path.name}.partial-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(partial, 0o666 & ~current_umask())
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
