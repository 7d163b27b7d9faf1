"""Progress over the named stages of a long job, on stderr so stdout stays clean."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

import click

T = TypeVar("T")


class Stages:
    """A progress bar over named stages; `run` executes the next one."""

    def __init__(self, names: list[str], enabled: bool, label: str = "export") -> None:
        self.names, self.done = names, 0
        self.bar = click.progressbar(length=len(names), label=label, file=sys.stderr,
                                     item_show_func=lambda _: self.current, show_eta=False) if enabled else None
        self.current = names[0]
        if self.bar:
            self.bar.__enter__()
            self.bar.render_progress()

    def run(self, fn: Callable[[], T]) -> T:
        self.current = self.names[self.done]
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
        return result
