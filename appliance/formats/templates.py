"""Reports rendered from a model's own Jinja2 templates, in a sandbox with limits.

A manifest names them by format (`"templates": {"html": "report.html.j2", "markdown":
"report.md.j2", "text": "report.txt.j2"}`); the files lie in the version directory, listed in
its `files` with their sha256, so they are verified like the model file. They are read and
compiled once, at load (and checked at `models add`): a syntax error names the file and line
and the model does not load.

A template sees (all plain Python values, built per request):
  model_name, model_version, id       who answered, and the request's id (or None)
  outputs                              output name -> nested lists (numbers, bool, str)
  datatypes, shapes                    output name -> KServe datatype / list of dimensions
  parameters                           the answer's parameters (task, fallback, cached)
  request_parameters                   the request's parameters

The sandbox (why: a template ships with a model, maybe from someone else's hub, and renders
on every device): jinja2.sandbox.ImmutableSandboxedEnvironment (no attributes starting with
an underscore, no internals, no changing lists or dicts), no loader (no include, import or
extends: no file access), autoescaping for HTML, undefined names and refused attributes are
errors rather than empty text. On top, the limits of [models.NAME.formats]:
  render_timeout_s      a render runs in a thread of its own; at its deadline the event
                        loop raises an exception in that thread (loops included; costs
                        nothing until then, unlike a trace function on every line)
  max_output_bytes      the report's size; also the largest string or list a template may
                        build (`*`, `+`, `%`, the arguments of every call, macros included,
                        and filters such as center and replace are checked before they run;
                        str.format, lipsum and widening str methods are gone)
  max_elements          output elements a report is given (see formats/__init__.py)
  max_template_bytes    a template file's size
A template that breaks a limit or the sandbox fails the request with a 500 naming the template,
its line and the limit; the server goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ..errors import InferenceFailed, ModelError
from ..tensors import datatype_of
from .values import as_python

if TYPE_CHECKING:
    from jinja2 import Template
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from ..codec import InferResponse
    from ..config import FormatsConfig

#: The file name Jinja2 gives code compiled from a string (where error lines are found).
_TEMPLATE_FILE = "<template>"
#: Renders running at once (each bounded by its render_timeout_s); more wait their turn.
RENDER_THREADS = 2
#: Largest number a widening filter (indent, batch, slice, tojson's indent) may be given.
MAX_FILTER_NUMBER = 1000
#: Largest exponent of an integer power; largest integer product, in bits.
MAX_EXPONENT = 1024
MAX_INT_BITS = 4096
#: str methods a template may call: none of them makes a string much longer than its input.
SAFE_STR_METHODS = frozenset(
    [
        "capitalize",
        "casefold",
        "count",
        "endswith",
        "find",
        "index",
        "isalnum",
        "isalpha",
        "isascii",
        "isdecimal",
        "isdigit",
        "islower",
        "isnumeric",
        "isspace",
        "istitle",
        "isupper",
        "lower",
        "lstrip",
        "partition",
        "removeprefix",
        "removesuffix",
        "rfind",
        "rindex",
        "rpartition",
        "rsplit",
        "rstrip",
        "split",
        "splitlines",
        "startswith",
        "strip",
        "swapcase",
        "title",
        "upper",
        "escape",
        "striptags",
        "unescape",
    ]
)
_PRINTF_NUMBER = re.compile(r"%[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


@functools.lru_cache(maxsize=256)
def _printf_width(fmt: str) -> str | None:
    """The first %-conversion of `fmt` whose width or precision is `*` or above the limit
    (a report's format strings are few: cached)."""
    for m in _PRINTF_NUMBER.finditer(fmt):
        for group in m.groups():
            if group == "*" or (group and int(group) > MAX_FILTER_NUMBER):
                return m.group()
    return None


class RenderLimit(Exception):
    """A template went past a limit (raised inside the render, turned into a 500)."""


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(RENDER_THREADS, thread_name_prefix="render")
        return _pool


def _size(value: Any) -> int | None:
    if isinstance(value, (str, bytes, list, tuple)):
        return len(value)
    return None


class _Sandbox:
    """Builds the environment (jinja2 imported only when a model has templates)."""

    @staticmethod
    def make(autoescape: bool, max_chars: int) -> ImmutableSandboxedEnvironment:
        from jinja2 import StrictUndefined, filters
        from jinja2.exceptions import SecurityError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from jinja2.utils import Namespace

        def refuse(why: str) -> SecurityError:
            return SecurityError(why)

        def check_size(n: int, what: str) -> None:
            if n > max_chars:
                raise refuse(
                    f"{what} would hold {n} items, more than max_output_bytes ({max_chars})"
                )

        def check_printf(fmt: str) -> None:
            bad = _printf_width(fmt)
            if bad is not None:
                raise refuse(f"format {bad!r}: widths above {MAX_FILTER_NUMBER}")

        class Env(ImmutableSandboxedEnvironment):
            intercepted_binops = frozenset({"*", "**", "+", "%"})

            def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
                if operator == "*":
                    for seq, n in ((left, right), (right, left)):
                        size = _size(seq)
                        if size is not None and isinstance(n, int):
                            check_size(size * n, "a repeated string or list")
                    if (
                        isinstance(left, int)
                        and isinstance(right, int)
                        and left.bit_length() + right.bit_length() > MAX_INT_BITS
                    ):
                        raise refuse(f"an integer product above {MAX_INT_BITS} bits")
                elif operator == "+":
                    a, b = _size(left), _size(right)
                    if a is not None and b is not None:
                        check_size(a + b, "a joined string or list")
                elif operator == "**":
                    if isinstance(right, int) and isinstance(left, int) and right > MAX_EXPONENT:
                        raise refuse(f"an integer power above {MAX_EXPONENT}")
                elif operator == "%" and isinstance(left, str):
                    check_printf(left)
                return super().call_binop(context, operator, left, right)

            def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
                if isinstance(obj, str) and callable(value) and attr not in SAFE_STR_METHODS:
                    return False
                return super().is_safe_attribute(obj, attr, value)

            def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
                for value in (*args, *kwargs.values()):  # a macro calling itself with s ~ s
                    size = _size(value)
                    if size is not None:
                        check_size(size, "a call's argument")
                return super().call(__context, __obj, *args, **kwargs)

            def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
                return None  # str.format and format_map: refused by is_safe_attribute

        class BoundedNamespace(Namespace):
            def __setitem__(self, name: str, value: Any) -> None:
                size = _size(value)
                if size is not None:
                    check_size(size, f"namespace attribute {name!r}")
                super().__setitem__(name, value)

        def bounded(fn: Callable[..., Any], limit: Callable[..., None]) -> Callable[..., Any]:
            """`fn` with `limit(value, args, kwargs)` checked first (after the environment or
            context Jinja passes some filters)."""
            skip = 1 if hasattr(fn, "jinja_pass_arg") else 0

            def run(*args: Any, **kwargs: Any) -> Any:
                limit(args[skip], args[skip + 1 :], kwargs)
                return fn(*args, **kwargs)

            if skip:  # keep how Jinja passes the environment or context
                run.jinja_pass_arg = fn.jinja_pass_arg  # type: ignore[attr-defined]
            return run

        def numbers(value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            for v in (*args, *kwargs.values()):
                if isinstance(v, int) and not isinstance(v, bool) and v > MAX_FILTER_NUMBER:
                    raise refuse(f"a filter argument above {MAX_FILTER_NUMBER}")
                if isinstance(v, str) and len(v) > MAX_FILTER_NUMBER:
                    raise refuse(f"a filter argument longer than {MAX_FILTER_NUMBER}")

        def center(value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            width = (*args, *kwargs.values(), 80)[0]
            if isinstance(width, int):
                check_size(width, "a centered string")

        def replace(value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            old, new = (str(a) for a in (*args, *kwargs.values(), "", "")[:2])
            s = str(value)
            hits = s.count(old) if old else len(s) + 1
            check_size(len(s) + hits * max(0, len(new) - len(old)), "a replaced string")

        def printf(value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            check_printf(str(value))

        env = Env(autoescape=autoescape, undefined=StrictUndefined)
        env.globals.pop("lipsum", None)
        env.globals["namespace"] = BoundedNamespace
        f = env.filters
        for name in ("indent", "batch", "slice", "wordwrap", "truncate", "tojson"):
            f[name] = bounded(filters.FILTERS[name], numbers)
        f["center"] = bounded(filters.FILTERS["center"], center)
        f["replace"] = bounded(filters.FILTERS["replace"], replace)
        f["format"] = bounded(filters.FILTERS["format"], printf)
        return env


class Templates:
    """A model's (or a pipeline's) report templates, compiled, by format name."""

    def __init__(self, compiled: Mapping[str, tuple[str, Template]], limits: FormatsConfig,
                 where: str) -> None:  # fmt: skip
        self._compiled = dict(compiled)
        self.limits = limits
        self.where = where
        #: The formats these templates offer (html, markdown, text).
        self.names: tuple[str, ...] = tuple(self._compiled)

    def files(self) -> dict[str, str]:
        """format -> template file name (model metadata shows it)."""
        return {fmt: file for fmt, (file, _) in self._compiled.items()}

    async def render(
        self, fmt: str, response: InferResponse, parameters: Mapping[str, Any]
    ) -> bytes:
        """The report for `response`, rendered in a thread under the limits."""
        file, template = self._compiled[fmt]
        watch = _Watch(asyncio.get_running_loop(), self.limits.render_timeout_s)
        future = _executor().submit(self._render, fmt, file, template, response, parameters, watch)
        # The watch ends the render at its deadline; this one only guards against a render
        # stuck in one long C call (its thread then finishes that call on its own).
        backstop = self.limits.render_timeout_s + 5.0
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), backstop)
        except asyncio.TimeoutError:
            raise InferenceFailed(self._stopped(fmt, file, None, "did not finish")) from None
        finally:
            watch.disarm()

    def _stopped(self, fmt: str, file: str, line: int | None, why: str) -> str:
        at = f" line {line}" if line else ""
        return f"{self.where}: template {fmt!r} ({file}{at}): {why}"

    def _render(self, fmt: str, file: str, template: Template, response: InferResponse,
                parameters: Mapping[str, Any], watch: _Watch) -> bytes:  # fmt: skip
        limits = self.limits
        watch.start()
        try:
            context = {
                "model_name": response.model_name,
                "model_version": response.model_version,
                "id": response.id,
                "outputs": {
                    n: as_python(a, f"output {n!r}", fmt) for n, a in response.outputs.items()
                },
                "datatypes": {n: datatype_of(a) for n, a in response.outputs.items()},
                "shapes": {n: list(a.shape) for n, a in response.outputs.items()},
                "parameters": dict(response.parameters or {}),
                "request_parameters": dict(parameters),
            }
            parts: list[str] = []
            total = 0
            try:
                for chunk in template.generate(context):
                    total += len(chunk)
                    if total > limits.max_output_bytes:
                        raise RenderLimit(
                            f"the report is longer than max_output_bytes "
                            f"({limits.max_output_bytes})"
                        )
                    parts.append(chunk)
            finally:
                watch.finish()
            body = "".join(parts).encode("utf-8")
            if len(body) > limits.max_output_bytes:
                raise RenderLimit(
                    f"the report is longer than max_output_bytes ({limits.max_output_bytes})"
                )
            return body
        except RenderTimeout as exc:
            limit = limits.render_timeout_s
            why = f"render stopped: it took longer than render_timeout_s ({limit} s)"
            raise InferenceFailed(self._stopped(fmt, file, _line(exc.__traceback__), why)) from None
        except RenderLimit as exc:
            raise InferenceFailed(
                self._stopped(fmt, file, _line(exc.__traceback__), f"render stopped: {exc}")
            ) from None
        except RecursionError:
            raise InferenceFailed(self._stopped(fmt, file, None, "recursion too deep")) from None
        except MemoryError:
            raise InferenceFailed(self._stopped(fmt, file, None, "out of memory")) from None
        except Exception as exc:
            from jinja2.exceptions import SecurityError

            kind = "refused by the sandbox" if isinstance(exc, SecurityError) else "failed"
            why = f"{kind}: {type(exc).__name__}: {exc}"
            raise InferenceFailed(self._stopped(fmt, file, _line(exc.__traceback__), why)) from None


class RenderTimeout(Exception):
    """Raised inside a render thread at its deadline (by `_Watch`)."""


def _raise_in(thread_id: int, exc: type[BaseException] | None) -> None:
    """Raise `exc` in another thread at its next bytecode (None: drop one still pending)."""
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc is not None else None
    )


class _Watch:
    """The deadline of one render: armed by the render thread when it starts (the wait in
    the pool does not count), fired by the event loop, which raises RenderTimeout in that
    thread. A pending exception is dropped when the render finishes first, under the lock,
    so it can never reach the pool's next job."""

    __slots__ = ("_done", "_fired", "_handle", "_lock", "_loop", "_thread", "_timeout")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop = loop
        self._timeout = timeout
        self._lock = threading.Lock()
        self._thread = 0
        self._done = self._fired = False
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:  # render thread
        self._thread = threading.get_ident()
        with contextlib.suppress(RuntimeError):  # the loop closed: the backstop is moot too
            self._loop.call_soon_threadsafe(self._arm)

    def _arm(self) -> None:  # loop
        if not self._done:
            self._handle = self._loop.call_later(self._timeout, self._fire)

    def _fire(self) -> None:  # loop
        with self._lock:
            if not self._done:
                self._fired = True
                _raise_in(self._thread, RenderTimeout)

    def finish(self) -> None:  # render thread
        with self._lock:
            self._done = True
            if self._fired:
                _raise_in(self._thread, None)

    def disarm(self) -> None:  # loop
        self._done = True
        if self._handle is not None:
            self._handle.cancel()


def _line(tb: TracebackType | None) -> int | None:
    """The template line of the innermost template frame of a traceback."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == _TEMPLATE_FILE:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def compile_templates(
    sources: Mapping[str, tuple[str, str]], limits: FormatsConfig, where: str
) -> Templates:
    """Templates from format -> (file name, source text); ModelError naming the file and
    line of a template that does not compile."""
    from jinja2 import TemplateSyntaxError

    compiled = {}
    for fmt, (file, source) in sources.items():
        env = _Sandbox.make(fmt == "html", limits.max_output_bytes)
        try:
            compiled[fmt] = (file, env.from_string(source))
        except TemplateSyntaxError as exc:
            raise ModelError(
                f"{where}: template {fmt!r} ({file} line {exc.lineno}): {exc.message}"
            ) from None
    return Templates(compiled, limits, where)


def load_templates(
    directory: Path, names: Mapping[str, str], limits: FormatsConfig, where: str
) -> Templates:
    """The templates a manifest names (format -> file in `directory`), read and compiled."""
    sources = {}
    for fmt, file in names.items():
        path = directory / file
        try:
            size = path.stat().st_size
            if size > limits.max_template_bytes:
                raise ModelError(
                    f"{where}: template {fmt!r} ({file}) has {size} bytes, more than "
                    f"formats.max_template_bytes ({limits.max_template_bytes})"
                )
            source = path.read_bytes().decode("utf-8")
        except OSError as exc:
            raise ModelError(f"{where}: cannot read template {file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ModelError(f"{where}: template {fmt!r} ({file}) is not UTF-8 text") from None
        sources[fmt] = (file, source)
    return compile_templates(sources, limits, where)
