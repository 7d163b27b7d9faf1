"""Progress over the named stages of a long job, on stderr so stdout stays clean.

On a terminal: one bar over the stages, naming the current one; a stage that streams (the weights of
an export) shows tensors and bytes done and an estimate of the time left. Elsewhere (a log, CI): one
line per finished stage with its elapsed time and the peak memory so far, so a log says where the
time and memory went.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Callable
from typing import IO, TypeVar

import click

T = TypeVar("T")
REDRAW_S = 0.2  # at most this often while a stage streams


class Stages:
    """A progress display over named stages; `run` executes the next one."""

    def __init__(self, names: list[str], enabled: bool, label: str = "export", stream: IO[str] | None = None) -> None:
        self.names, self.done, self.enabled, self.label = names, 0, enabled, label
        self.stream = stream or sys.stderr
        self.current, self.detail = names[0], ""
        tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = click.progressbar(length=len(names), label=label, file=self.stream, show_eta=False,
                                     item_show_func=lambda _: self._status()) if tty else None
        self._drawn = 0.0
        if self.bar:
            self.bar.__enter__()
            self.bar.render_progress()

    def _status(self) -> str:
        return f"{self.current} ({self.detail})" if self.detail else self.current

    def run(self, fn: Callable[[], T]) -> T:
        return self._run(fn)

    def run_with_progress(self, fn: Callable[[Callable[[int, int], None]], T], total_bytes: int, total_items: int,
                          unit: str = "tensors") -> T:
        """Run a stage that reports `(bytes done, items done)` as it goes; shows counts and an ETA."""
        start = time.perf_counter()

        def report(done_bytes: int, done_items: int) -> None:
            elapsed = time.perf_counter() - start
            self.detail = streaming_detail(done_bytes, total_bytes, done_items, total_items, elapsed, unit)
            if self.bar and time.perf_counter() - self._drawn >= REDRAW_S:
                self._drawn = time.perf_counter()
                self.bar.render_progress()

        return self._run(lambda: fn(report))

    def _run(self, fn: Callable[[], T]) -> T:
        self.current, self.detail = self.names[self.done], ""
        start = time.perf_counter()
        if self.bar:
            self.bar.render_progress()
        try:
            result = fn()
        except BaseException:
            if self.bar:  # end the bar's line so the error message stands on its own line
                click.echo(err=True)
            raise
        self.done += 1
        if self.bar:
            self.bar.update(1)
            if self.done == len(self.names):
                self.bar.__exit__(None, None, None)
        elif self.enabled:
            extra = f"; {self.detail}" if self.detail else ""
            click.echo(f"{self.label} [{self.done}/{len(self.names)}] {self.current}: "
                       f"{time.perf_counter() - start:.1f} s (peak RSS {peak_rss_bytes() / 2**20:,.0f} MiB{extra})",
                       file=self.stream)
        return result


def streaming_detail(done_bytes: int, total_bytes: int, done_items: int, total_items: int, elapsed: float,
                     unit: str = "tensors") -> str:
    """'312/1,200 tensors, 1.20/4.50 GB, 1m05s left' (time left from the bytes rate so far)."""
    text = f"{done_items:,}/{total_items:,} {unit}, {done_bytes / 1e9:.2f}/{total_bytes / 1e9:.2f} GB"
    if 0 < done_bytes < total_bytes and elapsed > 0:
        text += f", {_duration(elapsed * (total_bytes - done_bytes) / done_bytes)} left"
    return text


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


_with_helpers = 0  # the largest (own peak so far + peak of the helpers waited for) at any helper's end


def _maxrss(who: int) -> int:
    peak = resource.getrusage(who).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 where that is missing)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def own_peak_rss_bytes() -> int:
    """This process's own peak resident memory (the kernel's maxrss)."""
    return _maxrss(resource.RUSAGE_SELF)


def helper_finished(added: int | None = None) -> None:
    """Record that a helper process which ran beside this one has been waited for: the vision trace
    (its peak comes from the kernel), or a forked weight writer (`added`: the memory it added to what
    it shares with this process). Its peak plus this process's peak so far bounds what was resident
    while it ran."""
    global _with_helpers
    helper = _maxrss(resource.RUSAGE_CHILDREN) if added is None else added
    _with_helpers = max(_with_helpers, _maxrss(resource.RUSAGE_SELF) + helper)


def peak_rss_bytes() -> int:
    """Peak resident memory of this job so far: the kernel's maxrss of this process, or the bound that
    includes a helper running beside it if that is larger (an upper bound, never an understatement)."""
    return max(_maxrss(resource.RUSAGE_SELF), _with_helpers)
