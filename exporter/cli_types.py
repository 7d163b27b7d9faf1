"""Option types of the `qwen-edge` command line that click does not have: finite floats and a
context length bounded by what a config.json may declare."""

from __future__ import annotations

import math

import click


class FiniteFloat(click.ParamType):
    """A finite number within [min, max] (min excluded with min_open): click's FloatRange lets nan and inf through."""

    name = "number"

    def __init__(self, min: float | None = None, max: float | None = None, min_open: bool = False) -> None:  # noqa: A002
        self.min, self.max, self.min_open = min, max, min_open

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        low_ok = self.min is None or (number > self.min if self.min_open else number >= self.min)
        if not low_ok or (self.max is not None and number > self.max):
            low = "" if self.min is None else f"{'>' if self.min_open else '>='} {self.min:g}"
            high = "" if self.max is None else f"<= {self.max:g}"
            self.fail(f"{number:g} is not {' and '.join(x for x in (low, high) if x)}", param, ctx)
        return number


class ContextLength(click.IntRange):
    """A context length from 1 to the longest one a config.json may declare (graphs/config.py LIMITS,
    read when the option is parsed: the CLI module imports no command's work)."""

    def _bounds(self) -> None:
        from graphs.config import LIMITS

        self.min, self.max = 1, LIMITS["max_position_embeddings"]

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        self._bounds()
        return super().convert(value, param, ctx)

    def _describe_range(self) -> str:
        self._bounds()
        return super()._describe_range()
