"""Rendering a chat template with bounded work: a template comes with the checkpoint, from anywhere.

Jinja's sandbox already keeps a template away from Python internals; it does not bound the work.
`{% for i in range(99999) %}{% for j in range(99999) %}…`, `{{ 'x' * 10**10 }}` or
`{{ ''|center(10**10) }}` would hang or exhaust memory. So, on top of the immutable sandbox:
  - every call, loop step and filter counts against an operation budget (MAX_OPERATIONS);
  - integer arguments of calls and filters, repetition (`*`, `**`), concatenation (`+`, `~`) and `%`-formatting are checked
    before they run, so no single operation can build more than MAX_OUTPUT_CHARS;
  - the output is collected chunk by chunk against MAX_OUTPUT_CHARS and a wall-clock limit
    (TIME_LIMIT_S), which in the main thread is also an interrupting timer.
Real templates (Qwen3.5's with tools and thinking) use a few thousand operations and milliseconds.
Any failure of the template is a TemplateLimit or the template's own exception; callers turn both
into one QwenEdgeError.
"""

from __future__ import annotations

import functools
import operator
import re
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_OPERATIONS = 2_000_000
MAX_OUTPUT_CHARS = 16 << 20  # far beyond any context window's worth of text
MAX_INT_ARGUMENT = 1 << 20  # widths, counts and repeats a template may pass
TIME_LIMIT_S = 5.0
_LONG_NUMBER = re.compile(r"\d{7,}")  # a '%9999999s' or '{:>9999999}' width


class TemplateLimit(Exception):
    """The template asked for more work or output than a chat prompt can need."""


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else 1


class _BoundedCodeGenerator(CodeGenerator):
    """Compiles `a ~ b` to the environment's size-checked join (jinja's own join is not intercepted)."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.bounded_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """An immutable sandbox that counts operations and refuses oversized ones (see the module docstring)."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})
    code_generator_class = _BoundedCodeGenerator

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.operations = 0
        self.filters = {name: self._counted(f) for name, f in self.filters.items()}

    def count(self, n: int = 1) -> None:
        self.operations += n
        if self.operations > MAX_OPERATIONS:
            raise TemplateLimit(f"more than {MAX_OPERATIONS:,} operations")

    def _check_arguments(self, args: tuple, kwargs: dict) -> None:
        for value in (*args, *kwargs.values()):
            if type(value) is int and abs(value) > MAX_INT_ARGUMENT:
                raise TemplateLimit(f"an argument of {value:,} (at most {MAX_INT_ARGUMENT:,})")

    def _counted(self, function: Callable) -> Callable:
        # The filtered value comes first, after the context or environment for filters that take one.
        skip = 2 if hasattr(function, "jinja_pass_arg") else 1

        @functools.wraps(function)  # keeps the marker (jinja_pass_arg) saying what jinja passes first
        def bounded(*args: Any, **kwargs: Any) -> Any:
            self.count()
            self._check_arguments(args[skip:], kwargs)
            return function(*args, **kwargs)

        return bounded

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        __self.count()
        __self._check_arguments(args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(result, range):  # every loop step counts
            return __self._counted_iter(result)
        return result

    def _counted_iter(self, values: range) -> Any:
        for value in values:
            self.count()
            yield value

    def bounded_join(self, values: tuple) -> str:
        self.count()
        pieces = [str(v) for v in values]
        if sum(map(len, pieces)) > MAX_OUTPUT_CHARS:
            raise TemplateLimit("a concatenation longer than any prompt")
        return "".join(pieces)

    def getattr(self, obj: Any, attribute: str) -> Any:
        self.count()
        if isinstance(obj, str) and attribute in ("format", "format_map") and _LONG_NUMBER.search(obj):
            raise TemplateLimit("a format string with a huge width")
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        self.count()
        return super().getitem(obj, argument)

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        self.count()
        if op == "*" and (isinstance(left, int) or isinstance(right, int)):
            times, other = (left, right) if type(left) is int else (right, left)
            if type(times) is int and _size(other) * max(times, 0) > MAX_OUTPUT_CHARS:
                raise TemplateLimit("a repetition longer than any prompt")
        if op == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise TemplateLimit(f"a power of {right}")
        if op == "%" and isinstance(left, str) and _LONG_NUMBER.search(left):
            raise TemplateLimit("a format string with a huge width")
        if op == "+" and _size(left) + _size(right) > MAX_OUTPUT_CHARS:
            raise TemplateLimit("a concatenation longer than any prompt")
        return {"*": operator.mul, "**": operator.pow, "%": operator.mod, "+": operator.add}[op](left, right)


def render_bounded(source: str, variables: dict[str, Any]) -> str:
    """`source` rendered with `variables` within the limits above; raises TemplateLimit or the template's error."""
    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(source)
    deadline = time.monotonic() + TIME_LIMIT_S
    with _alarm(TIME_LIMIT_S):
        pieces, total = [], 0
        for piece in template.generate(**variables):
            total += len(piece)
            if total > MAX_OUTPUT_CHARS:
                raise TemplateLimit(f"more than {MAX_OUTPUT_CHARS:,} characters of output")
            if time.monotonic() > deadline:
                raise TemplateLimit(f"more than {TIME_LIMIT_S:g} s")
            pieces.append(piece)
    return "".join(pieces)


class _alarm:  # noqa: N801 (a context manager used as `with _alarm(s):`)
    """In the main thread, interrupt the render after `seconds` (a loop that outputs nothing)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.armed = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")

    def _expired(self, signum: int, frame: object) -> None:
        raise TemplateLimit(f"more than {self.seconds:g} s")

    def __enter__(self) -> None:
        if self.armed:
            self.previous = signal.signal(signal.SIGALRM, self._expired)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc: object) -> None:
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)
