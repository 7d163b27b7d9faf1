"""Progress over the named stages of a long job, on stderr so stdout stays clean.

On a terminal it is a progress bar; anywhere else (a CI log, a pipe) one line per finished stage with
its elapsed time and the peak memory so far, so a log shows where the time went.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import click

T = TypeVar("T")


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


class Stages:
    """Named stages run one after another; `run` executes the next one and reports it."""

    def __init__(self, names: list[str], enabled: bool, label: str = "export") -> None:
        self.names, self.done, self.label = names, 0, label
        self.enabled, self.start = enabled, time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = click.progressbar(length=len(names), label=label, file=sys.stderr,
                                         item_show_func=lambda _: self.current, show_eta=False)
        self.current = names[0]
        if self.bar:
            self.bar.__enter__()
            self.bar.render_progress()

    def run(self, fn: Callable[[], T]) -> T:
        self.current = self.names[self.done]
        if self.bar:
            self.bar.render_progress()
        began = time.perf_counter()
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
            click.echo(f"{self.label} [{self.done}/{len(self.names)}] {self.current}: "
                       f"{time.perf_counter() - began:.1f} s (peak RSS {peak_rss_mib():,.0f} MiB)", err=True)
        return result
