"""The server's side of an isolated model: a `Backend` whose calls run in a worker process.

The engine and its scheduler use it as any backend: `run` is called from a worker thread (or
inline on the event loop, see below) and blocks until the worker answers. A `Supervisor` keeps
the worker process alive: when it dies, the calls in flight fail at once with `WorkerDied`
naming the signal, the model is reported not ready with that reason (through the engine's
`on_state` hook), and the worker is started again after a backoff that doubles while crashes
follow each other and resets once a worker has stayed up for `healthy_after_s`.

Inline runs: the scheduler runs a model whose measured runs stay under `inline_max_us` on the
event loop thread. For an isolated model that is a blocking round trip to the worker, which
costs less than the thread hand-off it replaces (two process wake-ups, no GIL hand-over), and
the measured time includes it. Such calls take the worker's loop channel, whose thread in the
worker runs at the event loop's CPU priority, not the lowered one of queued work (see
worker.py). A worker that does not answer a call made on the event loop within `LOOP_WAIT_S`
is treated as hung and killed, so a hang cannot hold the loop for long. On that channel the
server polls for the answer for a moment before it sleeps, and the worker for the next call
(`spin_us`, spin.py): at c=1 neither CPU halts between the two.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from .. import errors
from ..backends.base import Backend, LoadContext, Quantization
from ..device import Placement
from ..errors import ApplianceError, InferenceFailed, ModelError, Overloaded, WorkerDied
from ..llm import Cancelled, EmbeddingResult, Emit, Generation, GenerationResult
from ..manifest import Manifest
from ..tensors import DATATYPES, Signature, TensorSpec
from . import StateHook
from .process import WorkerProcess, load_call
from .wire import CALL, PIECE, REPLY, Arrays, Channel, Closed, ProtocolError

log = logging.getLogger("appliance.isolation")


#: How long a call made on the event loop thread may wait for the worker.
LOOP_WAIT_S = 1.0
#: Generous: a TensorRT engine build on first load takes minutes.
LOAD_TIMEOUT_S = 900.0
#: How often a streaming generation checks whether it was cancelled.
POLL_S = 0.1
#: How long a stopping worker may take to exit before it is killed.
STOP_GRACE_S = 5.0
#: How long a failed call waits for the supervisor to learn the worker's exit status.
EXIT_WAIT_S = 2.0

#: Errors a worker may report, by name; anything else becomes InferenceFailed.
_ERRORS: dict[str, type[ApplianceError]] = {
    cls.__name__: cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, ApplianceError) and cls is not ApplianceError
}


class Supervisor:
    """Keeps one model's worker process serving, and makes the calls to it."""

    def __init__(
        self, manifest: Manifest, path: Path, context: LoadContext, on_state: StateHook | None
    ) -> None:
        self.label = f"{manifest.name}/{manifest.version}"
        self.what = f"model {manifest.name!r} version {manifest.version}"
        self._settings = context.config.process
        self._timeout_s = max(context.config.timeout_s, LOOP_WAIT_S)
        self._on_state = on_state
        self._doc = load_call(manifest, path, context.config, context.cache_dir)
        # Started from a thread at the event loop's priority (the engine does not lower an
        # isolated model's loading thread): the worker lowers all but its loop channel's thread.
        self._doc["nice"] = min(19, self._doc["nice"] + context.config.worker_nice)
        self._doc["loop_channel"] = True
        self._doc["spin_us"] = self._settings.spin_us
        self._max_concurrency = context.config.max_concurrency
        self._worker: WorkerProcess | None = None
        #: The error calls get while no worker serves.
        self._down: WorkerDied | None = None
        self._delay = self._settings.restart_backoff_s
        self._closing = False
        #: Told the report of each worker started after the first (the proxy's placement).
        self.on_report: Callable[[dict[str, Any]], None] | None = None
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> dict[str, Any]:
        """Start the first worker and load the model; its report. ModelError if it fails."""
        self._worker, report = self._spawn()
        self._monitor = threading.Thread(target=self._watch, name=f"worker-{self.label}",
                                         daemon=True)  # fmt: skip
        self._monitor.start()
        return report

    def _spawn(self) -> tuple[WorkerProcess, dict[str, Any]]:
        worker = WorkerProcess.spawn(self.label)
        try:
            report = worker.load(self._doc, self._channel_count, LOAD_TIMEOUT_S)
        except BaseException:
            worker.stop(STOP_GRACE_S)
            raise
        return worker, report

    def _channel_count(self, report: dict[str, Any]) -> int:
        """One channel per request the scheduler runs at once (see ModelRunner)."""
        if report.get("thread_safe") is False:
            return 1
        parallel = report.get("parallelism")
        return parallel if type(parallel) is int and parallel > 0 else self._max_concurrency

    def close(self) -> None:
        self._closing = True
        self._stop.set()
        worker = self._worker
        if worker is not None:
            worker.stop(STOP_GRACE_S)
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(STOP_GRACE_S * 2)

    def _state(self, status: str, reason: str | None) -> None:
        if self._on_state is not None and not self._closing:
            try:
                self._on_state(status, reason)
            except Exception:
                log.exception("model %s: the state hook failed", self.label)

    def _watch(self) -> None:
        """The supervisor's thread: wait for the worker to exit, then restart it."""
        settings = self._settings
        following = settings.restart_backoff_s
        while True:
            worker = self._worker
            assert worker is not None
            returncode = worker.proc.wait()
            lived = time.monotonic() - worker.started
            delay = settings.restart_backoff_s if lived >= settings.healthy_after_s else following
            self._delay = delay
            worker.returncode, worker.dead = returncode, True
            how = worker.how_it_ended()
            self._down = WorkerDied(
                f"model {self.label} is restarting: its worker process {how}", delay
            )
            if self._closing:
                worker.exited.set()
                worker.release()
                return
            reason = f"its worker process {how}; restarting in {delay:g} s"
            # the model is not ready before the calls that failed are answered
            self._state("restarting", reason)
            worker.exited.set()
            log.error("model %s: %s", self.label, reason)
            _drain(worker)
            while True:
                if self._stop.wait(delay):
                    return
                try:
                    new, report = self._spawn()
                except Exception as exc:  # this thread must live on: it is the only restarter
                    why = exc.message if isinstance(exc, ApplianceError) else repr(exc)
                    delay = min(delay * 2, settings.restart_backoff_max_s)
                    self._down = WorkerDied(f"model {self.label} is restarting: {why}", delay)
                    log.error("model %s: restart failed: %s", self.label, why)
                    self._state("restarting", f"{why}; next try in {delay:g} s")
                    continue
                break
            if self._closing:
                new.stop(STOP_GRACE_S)
                return
            if self.on_report is not None:
                try:
                    self.on_report(report)
                except ModelError as exc:
                    log.error("model %s: %s", self.label, exc.message)
            self._worker = new
            self._down = None
            following = min(delay * 2, settings.restart_backoff_max_s)
            log.info("model %s: its worker process serves again", self.label)
            self._state("ready", None)

    # -- calls ---------------------------------------------------------------------------------
    def call(
        self,
        doc: dict[str, Any],
        arrays: Arrays,
        emit: Emit | None = None,
        cancelled: Cancelled | None = None,
    ) -> tuple[dict[str, Any], Arrays]:
        """One call to the worker: the reply's JSON and tensors (copied out of shared memory).
        The worker's own errors are raised as the same ApplianceError."""
        worker = self._worker
        if worker is None or worker.dead:
            raise self._down or WorkerDied(f"model {self.label} is not running", self._delay)
        pool = worker.pool
        try:
            asyncio.get_running_loop()
            wait = min(self._timeout_s, LOOP_WAIT_S)
            pool = worker.loop_pool
        except RuntimeError:
            wait = self._timeout_s
        try:
            channel = pool.get_nowait()
        except queue.Empty:
            pool = worker.pool
            channel = self._wait_for_channel(worker, wait)
        try:
            packet = self._exchange(worker, channel, doc, arrays, wait, emit, cancelled)
            try:
                answer, out, _ = channel.message(packet, copy=True)
            except ProtocolError as exc:
                raise self._broken(worker, f"sent a malformed answer ({exc})") from None
        finally:
            pool.put(channel)
        error = answer.get("error")
        if error is not None:
            raise _rebuild(error, self.label)
        return answer, out

    def _wait_for_channel(self, worker: WorkerProcess, wait: float) -> Channel:
        """A channel once a call gives one back (only callers from outside the scheduler, such
        as a smoke test, make this wait); the worker's death ends the wait at once."""
        deadline = time.monotonic() + wait
        while True:
            if worker.dead:
                raise self._died(worker)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Overloaded(f"model {self.label}: every channel to its worker is busy")
            try:
                return worker.pool.get(timeout=min(remaining, POLL_S))
            except queue.Empty:
                continue

    def _exchange(
        self,
        worker: WorkerProcess,
        channel: Channel,
        doc: dict[str, Any],
        arrays: Arrays,
        wait: float,
        emit: Emit | None,
        cancelled: Cancelled | None,
    ) -> bytes:
        """Send the call and wait for its REPLY packet (passing text pieces to `emit`)."""
        streaming = cancelled is not None
        sent = False
        try:
            channel.set_timeout(min(wait, POLL_S) if streaming else wait)
            channel.send(CALL, doc, arrays, 0)
            sent = True
            quiet_since = time.monotonic()
            told = False
            polled = streaming  # a call that streams does not poll (spin.py)
            while True:
                try:
                    if polled:
                        packet = channel.receive()
                    else:
                        packet = channel.receive_polling(time.perf_counter())
                        polled = True
                except TimeoutError:
                    if not streaming or time.monotonic() - quiet_since >= wait:
                        raise
                    packet = b""
                op = packet[:1]
                if op == REPLY:
                    return packet
                if op == PIECE:
                    quiet_since = time.monotonic()
                    if emit is not None:
                        emit(packet[1:].decode("utf-8", errors="replace"))
                elif op:
                    raise ProtocolError(f"an unexpected packet {op!r}")
                if streaming and not told and cancelled is not None and cancelled():
                    channel.send_cancel()
                    told = True
        except TimeoutError:
            raise self._broken(worker, f"did not answer within {wait:g} s") from None
        except (Closed, OSError):
            raise self._died(worker) from None
        except ProtocolError as exc:
            raise self._broken(worker, f"sent a malformed answer ({exc})") from None
        except BaseException:  # emit or cancelled raised (the loop closed, say): the call ends
            if sent:
                self._resync(worker, channel, wait)
            raise

    def _resync(self, worker: WorkerProcess, channel: Channel, wait: float) -> None:
        """Bring a channel whose call was abandoned back to a clean state: cancel the call and
        read up to its reply, so that the next call does not read this one's answer. A worker
        that will not answer is killed (and restarted)."""
        try:
            channel.send_cancel()
            channel.set_timeout(wait)
            while channel.receive()[:1] != REPLY:
                pass
        except Exception:
            worker.kill("lost track of an abandoned call")

    def _broken(self, worker: WorkerProcess, why: str) -> WorkerDied:
        worker.kill(why)
        return self._died(worker)

    def _died(self, worker: WorkerProcess) -> WorkerDied:
        worker.dead = True
        worker.exited.wait(EXIT_WAIT_S)
        how = worker.how_it_ended()
        return WorkerDied(
            f"model {self.label}: its worker process {how} while running this request; it is "
            f"restarting",
            self._delay,
        )


def _drain(worker: WorkerProcess) -> None:
    """Close a dead worker's channels once the calls that hold them have given them back."""
    pooled = worker.pooled
    for pool, count in ((worker.pool, pooled), (worker.loop_pool, len(worker.channels) - pooled)):
        for _ in range(count):
            try:
                pool.get(timeout=STOP_GRACE_S * 6)
            except queue.Empty:
                log.warning("model %s: a call kept a dead worker's channel", worker.label)
                return
    worker.release()


def _rebuild(error: Any, label: str) -> ApplianceError:
    if not isinstance(error, dict):
        return InferenceFailed(f"model {label} failed: {error!s:.2000}")
    message = str(error.get("message", ""))[:4000]
    cls = _ERRORS.get(str(error.get("type")))
    if cls is None or cls in (WorkerDied, Overloaded):
        return InferenceFailed(f"model {label} failed: {message}")
    return cls(message)


# -- the Backend the engine sees ---------------------------------------------------------------
class IsolatedBackend(Backend):
    """A tensor model whose runtime runs in a worker process."""

    name = "isolated"
    platform = "isolated"

    def __init__(self, supervisor: Supervisor, report: dict[str, Any]) -> None:
        self.supervisor = supervisor
        where = f"model {supervisor.label}: the worker's report"
        try:
            self.signature = Signature(
                tuple(_spec(t) for t in report["inputs"]),
                tuple(_spec(t) for t in report["outputs"]),
            )
            self.placement = _placement(report["placement"])
            self.quantization = {
                str(name): Quantization(str(q["datatype"]), float(q["scale"]),
                                        int(q["zero_point"]))
                for name, q in dict(report["quantization"]).items()
            }  # fmt: skip
            parallel = report.get("parallelism")
            self.parallelism = parallel if type(parallel) is int and parallel > 0 else None
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{where} is malformed: {exc!r}") from None
        supervisor.on_report = self._restarted

    def _restarted(self, report: dict[str, Any]) -> None:
        """A new worker serves: where it runs now (the rest cannot change, the file is the
        same)."""
        try:
            self.placement = _placement(report["placement"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"the new worker's report is malformed: {exc!r}") from None

    @classmethod
    def inspect(cls, path: Path) -> tuple[Signature, dict[str, Any]]:
        raise ModelError("an isolated model is inspected by its own backend")

    def run(self, inputs: Arrays, outputs: list[str] | None) -> Arrays:
        _, result = self.supervisor.call({"call": "run", "outputs": outputs}, inputs)
        return result

    def unload(self) -> None:
        self.supervisor.close()


class IsolatedTextBackend(IsolatedBackend):
    """A language or embedding model whose runtime runs in a worker process."""

    mode: Literal["chat", "embedding"]

    def __init__(self, supervisor: Supervisor, report: dict[str, Any]) -> None:
        super().__init__(supervisor, report)
        text = report["text"]
        try:
            if text["mode"] not in ("chat", "embedding"):
                raise ValueError(f"mode {text['mode']!r}")
            self.mode = text["mode"]
            for key in ("n_ctx", "dim", "has_chat_template"):
                value = text.get(key)
                if value is not None:
                    setattr(self, key, bool(value) if key == "has_chat_template" else int(value))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"model {supervisor.label}: the worker's report: {exc!r}") from None

    def generate(
        self, request: Generation, emit: Emit | None, cancelled: Cancelled
    ) -> GenerationResult:
        doc = {
            "call": "generate",
            "stream": emit is not None,
            "generation": {
                "kind": request.kind,
                "messages": request.messages,
                "prompt": request.prompt,
                "sampling": asdict(request.sampling),
                **request.structure(),
            },
        }
        answer, _ = self.supervisor.call(doc, {}, emit, cancelled)
        try:
            return GenerationResult(
                str(answer["text"]),
                str(answer["finish_reason"]),
                int(answer["prompt_tokens"]),
                int(answer["completion_tokens"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            label = self.supervisor.label
            raise InferenceFailed(f"model {label}: a malformed answer: {exc!r}") from None

    def embed(self, texts: list[str]) -> EmbeddingResult:
        answer, arrays = self.supervisor.call({"call": "embed", "texts": texts}, {})
        vectors = arrays.get("vectors")
        tokens = answer.get("prompt_tokens")
        if vectors is None or type(tokens) is not int:
            raise InferenceFailed(f"model {self.supervisor.label}: a malformed answer")
        return EmbeddingResult(vectors, tokens)


def _placement(obj: Any) -> Placement:
    reason = obj.get("fallback_reason")
    return Placement(
        str(obj["device"]), str(obj["detail"]), None if reason is None else str(reason)
    )


def _spec(obj: Any) -> TensorSpec:
    spec = TensorSpec.from_json(obj)
    if spec.datatype not in DATATYPES:
        raise ValueError(f"tensor {spec.name!r}: unknown datatype {spec.datatype!r}")
    return spec


@functools.lru_cache(maxsize=64)
def _proxy_class(
    text: bool, name: str, platform: str, batchable: bool, thread_safe: bool
) -> type[IsolatedBackend]:
    """A proxy class carrying the real backend's class attributes (the scheduler reads them)."""
    base = IsolatedTextBackend if text else IsolatedBackend
    attrs = {"name": name, "platform": platform, "batchable": batchable,
             "thread_safe": thread_safe}  # fmt: skip
    return type(f"Isolated_{name}", (base,), attrs)


def start(
    manifest: Manifest, path: Path, context: LoadContext, on_state: StateHook | None
) -> IsolatedBackend:
    """Load the model in a worker process; the backend that stands for it in the server."""
    supervisor = Supervisor(manifest, path, context, on_state)
    report = supervisor.start()
    try:
        cls = _proxy_class(
            report.get("text") is not None,
            str(report.get("name", manifest.backend)),
            str(report.get("platform", manifest.backend)),
            report.get("batchable") is True,
            report.get("thread_safe") is not False,
        )
        return cls(supervisor, report)
    except BaseException:
        supervisor.close()
        raise
