"""Write an output folder all at once: build it in a temporary sibling, move it into place at the end.

A failed or interrupted run leaves nothing behind at the destination, and an existing destination is
only replaced (with --force) once the new one is complete.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from graphs.errors import QwenEdgeError


def check_destination(out: Path, force: bool) -> None:
    """Refuse early, before any work, when the destination exists and --force was not given."""
    if out.exists() and not force:
        raise QwenEdgeError(f"{out}: output folder already exists; choose another path or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise QwenEdgeError(f"{out}: exists and is not a folder; remove it or choose another output path")


@contextmanager
def atomic_output_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes `out`, on any error it is deleted."""
    out = Path(out)
    check_destination(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
