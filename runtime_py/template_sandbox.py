"""Jinja rendering as transformers configures it for chat templates, with bounded work.

The environment is transformers 5.24's (transformers/utils/chat_template_utils.py): an
ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks, loop controls and the `{% generation %}`
tag; globals `raise_exception`, `strftime_now`, a limited `dict` and `namespace`; transformers' `tojson`
(a plain string, no HTML escaping). On top of that, every render is bounded: it runs in a long-lived
worker process under a wall-clock and memory limit, inside a sandbox that counts operations, so a
hostile template ends in a QwenEdgeError carrying the reason instead of a hang. Torch-free.
"""

from __future__ import annotations

import atexit
import json
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
import time
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from graphs.errors import QwenEdgeError

# Limits. Module attributes so that a caller (or a test) can tighten or relax them.
#: Wall-clock seconds one render may take. The worker is killed when it overruns this by `_KILL_GRACE_S`.
TIME_LIMIT_S = 10.0
#: Address-space limit of the render worker (POSIX only), so a memory bomb fails instead of swapping.
MEMORY_LIMIT_BYTES = 1 << 30
#: Sandbox operations (attribute and item reads, calls, loop iterations, intercepted operators).
MAX_OPERATIONS = 20_000_000
#: Longest rendered prompt, and longest value `*` may build, in characters or items.
MAX_OUTPUT_CHARS = 8 << 20
#: Largest integer `**` may build, in bits.
MAX_POWER_BITS = 1 << 20
#: Render in a separate worker process (hard limits). Without one (no interpreter to start, e.g. an
#: embedded Python), rendering falls back to this process, bounded by the operation budget and a
#: deadline checked between sandbox operations; work inside one filter or C call is not interrupted.
USE_WORKER = True

_KILL_GRACE_S = 1.0
_WORKER_START_TIMEOUT_S = 60.0


# The sandbox: transformers' environment, plus an operation budget.

class _LimitExceeded(Exception):
    """A render went over one of the limits above."""


class _Budget:
    __slots__ = ("left", "limit", "deadline", "tick", "max_value", "max_bits")

    def __init__(self, limits: dict) -> None:
        self.left = self.limit = limits["operations"]
        self.deadline = time.monotonic() + limits["seconds"]
        self.tick = 256
        self.max_value = limits["output"]
        self.max_bits = limits["power_bits"]

    def charge(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise _LimitExceeded(f"rendering used more than {self.limit:,} template operations")
        self.tick -= 1
        if self.tick <= 0:
            self.tick = 256
            if time.monotonic() > self.deadline:
                raise _LimitExceeded("rendering took longer than the time limit")


_BUDGET: ContextVar[_Budget | None] = ContextVar("qwen_edge_chat_budget", default=None)


def _charge() -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.charge()


def _check_binop(operator: str, left: Any, right: Any) -> None:
    budget = _BUDGET.get()
    max_value = budget.max_value if budget is not None else MAX_OUTPUT_CHARS
    max_bits = budget.max_bits if budget is not None else MAX_POWER_BITS
    if operator == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            if right * abs(left).bit_length() > max_bits:
                raise _LimitExceeded(f"{left} ** {right} is larger than {max_bits:,} bits")
    elif operator == "*":
        for seq, count in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and len(seq) * count > max_value:
                raise _LimitExceeded(f"a repetition would build {len(seq) * count:,} items (limit {max_value:,})")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """transformers' ImmutableSandboxedEnvironment, charging every attribute and item read, call,
    loop iteration and `*`/`**` against the current render's budget."""

    # Intercepted operators are also never constant-folded at compile time, so `9 ** (9 ** 9)` cannot
    # hang the compiler either.
    intercepted_binops = frozenset({"*", "**"})

    def getattr(self, obj: Any, attribute: str) -> Any:
        _charge()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _charge()
        return super().getitem(obj, argument)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _charge()
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _charge()
        _check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)


class _GenerationTag(jinja2.ext.Extension):
    """transformers' AssistantTracker: `{% generation %}…{% endgeneration %}` renders its body. (The
    assistant-token mask it can also record is not offered here.) Also owns the loop-budget hook that
    `_compile` puts around every `for` iterable: an extension attribute, so a template cannot shadow it."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_generation_support"), [], [], body).set_lineno(lineno)

    @jinja2.pass_eval_context
    def _generation_support(self, context: jinja2.nodes.EvalContext, caller: jinja2.runtime.Macro) -> str:
        return caller()

    def _budget_iter(self, iterable: Any) -> Any:
        for item in iterable:
            _charge()
            yield item


def _raise_exception(message: Any) -> None:
    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' override: a plain str (jinja's own filter returns Markup and escapes <, >, &, ')
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:  # noqa: A002 - the template calls it with this name
    return datetime.now().strftime(format)


class _TemplateDict:
    # transformers: a limited `dict` so templates can't break out through dict attributes
    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # transformers: namespaces reject underscore-prefixed attributes
    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}. "
                "Please rename the attribute."
            )


@lru_cache(maxsize=1)
def _environment() -> _BoundedSandbox:
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True,
                          extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = _environment()
    tree = env.parse(source)
    tag = next(ext for ext in env.extensions.values() if isinstance(ext, _GenerationTag))
    for loop in list(tree.find_all(jinja2.nodes.For)):
        loop.iter = tag.call_method("_budget_iter", [loop.iter], lineno=loop.lineno)
    return env.from_string(tree)


def _render_here(source: str, context: dict, limits: dict) -> str:
    """Render in this process under an operation budget (and a soft deadline)."""
    budget = _Budget(limits)
    token = _BUDGET.set(budget)
    try:
        template = _compile(source)
        pieces, size = [], 0
        for piece in template.generate(**context):
            size += len(piece)
            if size > limits["output"]:
                raise _LimitExceeded(f"the rendered prompt is longer than {limits['output']:,} characters")
            pieces.append(piece)
        return "".join(pieces)
    finally:
        _BUDGET.reset(token)


def _reply(source: str, context: dict, limits: dict) -> dict:
    """Render, turning every failure into a plain (JSON-able) description."""
    try:
        return {"ok": True, "text": _render_here(source, context, limits)}
    except TemplateSyntaxError as e:
        return {"ok": False, "kind": "syntax", "message": str(e.message), "lineno": e.lineno}
    except TemplateError as e:  # raise_exception, undefined, security, runtime errors
        return {"ok": False, "kind": "template", "message": str(e)}
    except _LimitExceeded as e:
        return {"ok": False, "kind": "limit", "message": str(e)}
    except MemoryError:
        return {"ok": False, "kind": "limit", "message": "rendering ran out of its memory limit"}
    except RecursionError:
        return {"ok": False, "kind": "limit", "message": "rendering recursed too deeply"}
    except Exception as e:  # noqa: BLE001 - a template can raise anything Python can
        return {"ok": False, "kind": "exception", "message": f"{type(e).__name__}: {e}"}


def _raise_for(reply: dict) -> str:
    if reply.get("ok"):
        return reply["text"]
    kind, message = reply.get("kind"), reply.get("message", "")
    if kind == "syntax":
        raise QwenEdgeError(f"chat template syntax error on line {reply.get('lineno')}: {message}")
    if kind == "template":
        raise QwenEdgeError(f"chat template error: {message}")
    if kind == "limit":
        raise QwenEdgeError(f"chat template stopped: {message}; the template is broken or hostile")
    raise QwenEdgeError(f"chat template failed: {message}")


# The render worker: a child interpreter that renders requests one at a time. Requests go in as pickles
# (from this trusted process), replies come back as JSON, so nothing the child sends is executed here.

_FRAME = struct.Struct(">Q")


def _read_frame(stream: Any) -> bytes | None:
    header = stream.read(_FRAME.size)
    if len(header) < _FRAME.size:
        return None
    (size,) = _FRAME.unpack(header)
    data = stream.read(size)
    return data if len(data) == size else None


def _write_frame(stream: Any, data: bytes) -> None:
    stream.write(_FRAME.pack(len(data)) + data)
    stream.flush()


def _set_memory_limit(limit: int | None) -> None:
    try:
        import resource
    except ImportError:  # not POSIX
        return
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        soft = resource.RLIM_INFINITY if not limit else limit
        if hard != resource.RLIM_INFINITY and (soft == resource.RLIM_INFINITY or soft > hard):
            soft = hard
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    except (ValueError, OSError):  # e.g. macOS refuses RLIMIT_AS
        pass


def _worker_main() -> None:
    """Entry point of the render worker (see `_Worker`)."""
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but replies may reach the reply stream
    _write_frame(replies, b'{"ready": true}')
    while True:
        data = _read_frame(requests)
        if data is None:
            return
        source, context, limits = pickle.loads(data)
        _set_memory_limit(limits.get("memory"))
        try:
            reply = _reply(source, context, limits)
            encoded = json.dumps(reply).encode()
        except MemoryError:
            encoded = b'{"ok": false, "kind": "limit", "message": "rendering ran out of its memory limit"}'
        _write_frame(replies, encoded)


_WORKER_CODE = ("import json, sys; sys.path[:0] = json.loads(sys.argv[1]); "
                "from runtime_py.template_sandbox import _worker_main; _worker_main()")


class _Worker:
    """One long-lived render process, restarted after it is killed or dies."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.owner = os.getpid()
        self.unavailable = False
        self.replies: queue.Queue = queue.Queue()
        self.lock = threading.Lock()

    def _start(self) -> None:
        if self.unavailable:
            raise OSError("no render worker can run here")
        try:
            self._spawn()
        except OSError:
            self.unavailable = True  # do not pay for a failing start on every render
            raise

    def _spawn(self) -> None:
        if not sys.executable:
            raise OSError("no Python interpreter to start a render worker with")
        root = str(Path(__file__).resolve().parents[1])
        paths = [root] + [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _WORKER_CODE, json.dumps(paths)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True,
        )
        self.replies = queue.Queue()
        threading.Thread(target=self._pump, args=(self.proc, self.replies), daemon=True).start()
        try:
            ready = self.replies.get(timeout=_WORKER_START_TIMEOUT_S)
        except queue.Empty:
            ready = None
        if ready is None:
            self._stop()
            raise OSError("the render worker did not start")

    @staticmethod
    def _pump(proc: subprocess.Popen, replies: queue.Queue) -> None:
        while True:
            data = _read_frame(proc.stdout)
            replies.put(data)
            if data is None:
                return

    def _stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.kill()
        except OSError:
            pass
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def close(self) -> None:
        """Let the worker exit (it stops when its request stream ends), killing it if it lingers."""
        with self.lock:
            proc = self.proc
            if proc is None:
                return
            try:
                proc.stdin.close()
                proc.wait(timeout=1)
            except (OSError, subprocess.TimeoutExpired):
                pass
            self._stop()

    def render(self, source: str, context: dict, limits: dict) -> dict:
        with self.lock:
            if self.owner != os.getpid():  # a forked copy of this process: the worker is the parent's
                self.proc, self.owner = None, os.getpid()
            if self.proc is None or self.proc.poll() is not None:
                self._stop()
                self._start()
            try:
                request = pickle.dumps((source, context, limits), protocol=4)
            except (pickle.PicklingError, RecursionError) as e:
                return {"ok": False, "kind": "exception", "message": f"the template variables cannot be sent: {e}"}
            try:
                _write_frame(self.proc.stdin, request)
            except OSError:
                self._stop()
                return {"ok": False, "kind": "exception", "message": "the render worker stopped unexpectedly"}
            try:
                data = self.replies.get(timeout=limits["seconds"] + _KILL_GRACE_S)
            except queue.Empty:
                self._stop()
                return {"ok": False, "kind": "limit",
                        "message": f"rendering took longer than {limits['seconds']:g} s and was stopped"}
            if data is None:
                try:
                    code = self.proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    code = None
                self._stop()
                return {"ok": False, "kind": "limit" if code is not None and code < 0 else "exception",
                        "message": f"the render worker died (exit code {code})"}
            return json.loads(data)


_WORKER = _Worker()
atexit.register(_WORKER.close)



def render_bounded(source: str, context: dict) -> str:
    """Render template `source` with `context` under the limits above; every failure is a QwenEdgeError."""
    limits = {"seconds": float(TIME_LIMIT_S), "operations": int(MAX_OPERATIONS), "output": int(MAX_OUTPUT_CHARS),
              "power_bits": int(MAX_POWER_BITS), "memory": MEMORY_LIMIT_BYTES}
    if USE_WORKER:
        try:
            return _raise_for(_WORKER.render(source, context, limits))
        except OSError:
            pass  # no worker can run here: render in this process
    return _raise_for(_reply(source, context, limits))
