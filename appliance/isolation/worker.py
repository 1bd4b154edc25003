"""The worker process (`appliance _worker`): loads one model and answers the server's calls.

It inherits its first channel as a file descriptor. The first call on it says what to load;
the answer reports what the server needs to know of the loaded backend (signature, placement,
quantization, batching), and the server then sends the worker's other channels (one per
request the model runs at once). Each channel is served by a thread of its own until the
server closes it, which is also how the worker learns to exit.

CPU priority: the process starts at the server's event loop's. The load and the threads of
the pool's channels run `nice` steps lower, like the server's inference threads; the loop
channel's thread (the last channel) keeps the loop's priority, since the server's event loop
waits for each of its calls, as it waits for an in-process model's inline run. On a busy CPU a
lowered thread waits its turn after every wake-up (measured on a shared 2-core machine: 190-240
µs of run-queue wait per call at nice 5, 20-40 µs at the loop's). After answering on the loop
channel, its thread polls for the next call for a moment before it sleeps (spin.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import resource
import signal
import socket
import sys
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .. import backends, heap, plugins
from ..backends.base import Backend, LoadContext
from ..config import Config, ModelConfig
from ..errors import ApplianceError, InvalidInput, ModelError
from ..llm import Generation, Sampling, TextModel
from ..manifest import Manifest
from .process import receive_channels
from .spin import Spin
from .wire import CALL, CANCEL, REPLY, Arrays, Channel, Closed, Segment

log = logging.getLogger("appliance.worker")


def main(fd: int) -> int:
    # Ctrl-C in a terminal reaches the whole process group: the server stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    first = Channel(socket.socket(fileno=fd), Segment.empty())
    channels = [first]
    try:
        packet = first.receive()
    except Closed:
        return 0
    doc, _ = first.header(packet)
    loop_box: queue.SimpleQueue[tuple[Channel, Backend, AbstractContextManager[Any]] | None]
    loop_box = queue.SimpleQueue()
    if doc.get("loop_channel") is True:  # started before load() lowers this thread's priority
        threading.Thread(target=_serve_from, args=(loop_box,), name="loop", daemon=True).start()
    try:
        backend = load(doc)
    except ApplianceError as exc:
        first.send(REPLY, {"error": error_json(_memory_hint(exc, doc))}, {}, 0)
        return 1
    except Exception as exc:
        log.exception("loading failed")
        error = _memory_hint(ModelError(f"{type(exc).__name__}: {exc}"), doc)
        first.send(REPLY, {"error": error_json(error)}, {}, 0)
        return 1
    heap.release()  # what loading allocated and freed again (appliance/heap.py)
    first.send(REPLY, {"report": report(backend)}, {}, 0)
    channels += [Channel(sock, Segment.empty()) for sock in receive_channels(first.sock)]
    lock: AbstractContextManager[Any] = (
        contextlib.nullcontext() if backend.thread_safe else threading.Lock()
    )
    if doc.get("loop_channel") is True:
        loop = channels.pop()
        loop.spin = Spin(float(doc.get("spin_us", 0)) / 1e6)
        loop_box.put((loop, backend, lock))
    for channel in channels[1:]:
        threading.Thread(target=serve, args=(channel, backend, lock), daemon=True).start()
    serve(first, backend, lock)
    with contextlib.suppress(Exception):  # best effort: the process ends next
        backend.unload()
    sys.stderr.flush()
    os._exit(0)  # the other channels' threads and the runtime's own go with it


def load(doc: dict[str, Any]) -> Backend:
    """The backend the server asked for, loaded with the model's settings."""
    from ..logs import setup_logging

    setup_logging(str(doc.get("log_level", "info")))
    manifest = Manifest.from_json(doc["manifest"], "the server's call")
    _tag_logs(f"{manifest.name}/{manifest.version}")
    nice = int(doc.get("nice", 0))
    # Linux: this thread's priority (each thread has its own), which the runtime's threads and
    # the pool's channel threads inherit. Only ever lowered: that needs no privilege.
    with contextlib.suppress(OSError):
        if nice > os.getpriority(os.PRIO_PROCESS, 0):
            os.setpriority(os.PRIO_PROCESS, 0, nice)
    config: ModelConfig = Config(models={manifest.name: doc["config"]}).model_config(manifest.name)
    if config.max_memory_mb:  # before the runtime is imported: it counts too
        limit = config.max_memory_mb << 20
        _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    context = LoadContext(config, Path(doc["cache_dir"]))
    plugins.use_dirs(doc.get("plugin_dirs", []))  # the server's, already checked there
    return backends.load(manifest, Path(doc["path"]), context)


_OUT_OF_MEMORY = ("MemoryError", "bad_alloc", "bad allocation", "out of memory", "Cannot allocate")


def _memory_hint(exc: ApplianceError, doc: dict[str, Any]) -> ApplianceError:
    """A load that ran out of the memory `max_memory_mb` allows says so, and names the key."""
    limit = int(doc.get("config", {}).get("max_memory_mb") or 0)
    if not limit or not any(word in exc.message for word in _OUT_OF_MEMORY):
        return exc
    name = doc.get("manifest", {}).get("name", "?")
    return ModelError(
        f"does not fit in the memory its process may use (models.{name}.max_memory_mb = "
        f"{limit} MiB): {exc.message}"
    )


def _tag_logs(label: str) -> None:
    """Every line this process logs names the model and the process (the server's stderr and
    journal hold the workers' lines too)."""
    tag = {"worker": label, "pid": os.getpid()}

    def add(record: logging.LogRecord) -> bool:
        record.fields = {**(getattr(record, "fields", None) or {}), **tag}
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(add)


def report(backend: Backend) -> dict[str, Any]:
    """What the server's side of the backend mirrors."""
    sig, place = backend.signature, backend.placement
    out: dict[str, Any] = {
        "name": backend.name,
        "platform": backend.platform,
        "batchable": backend.batchable,
        "thread_safe": backend.thread_safe,
        "parallelism": backend.parallelism,
        "inputs": [t.to_json() for t in sig.inputs],
        "outputs": [t.to_json() for t in sig.outputs],
        "placement": asdict(place),
        "quantization": {name: q.to_json() for name, q in backend.quantization.items()},
        "text": None,
    }
    if isinstance(backend, TextModel):
        out["text"] = {
            "mode": backend.mode,
            "n_ctx": getattr(backend, "n_ctx", None),
            "dim": getattr(backend, "dim", None),
            "has_chat_template": getattr(backend, "has_chat_template", None),
        }
    return out


def error_json(exc: ApplianceError) -> dict[str, Any]:
    return {"type": type(exc).__name__, "message": exc.message}


def _serve_from(
    box: queue.SimpleQueue[tuple[Channel, Backend, AbstractContextManager[Any]] | None],
) -> None:
    """Serve the channel that comes through `box` (a thread started before the load)."""
    got = box.get()
    if got is not None:
        serve(*got)


def serve(channel: Channel, backend: Backend, lock: AbstractContextManager[Any]) -> None:
    """Answer the calls on one channel until the server closes it."""
    answered = time.perf_counter()
    while True:
        try:
            packet = channel.receive_polling(answered)
        except (Closed, OSError):  # the server closed the channel, or is gone
            return
        op = packet[:1]
        if op == CANCEL:  # it came after its generation had ended
            continue
        if op != CALL:
            log.error("unexpected packet %r from the server: closing the channel", op)
            return
        doc, inputs, end = channel.message(packet, copy=False)
        outputs: Arrays = {}
        try:
            with lock:
                answer, outputs = _handle(doc, inputs, backend, channel)
        except ApplianceError as exc:
            answer = {"error": error_json(exc)}
        except (Closed, BrokenPipeError, ConnectionResetError):  # a stream's server went away
            return
        except Exception as exc:
            log.exception("%s failed", doc.get("call"))
            why = backends.failure(backend, exc, typed=True)
            answer = {"error": {"type": "Exception", "message": why}}
        del inputs
        try:
            try:
                channel.send(REPLY, answer, outputs, end)
            except (TypeError, ValueError) as exc:  # outputs no tensor datatype can carry
                why = f"the model's outputs cannot be sent: {exc}"
                channel.send(REPLY, {"error": {"type": "InferenceFailed", "message": why}}, {}, end)
        except OSError:
            return
        answered = time.perf_counter()


def _handle(
    doc: dict[str, Any], inputs: Arrays, backend: Backend, channel: Channel
) -> tuple[dict[str, Any], Arrays]:
    call = doc.get("call")
    if call == "run":
        return {}, backend.run(inputs, doc.get("outputs"))
    if not isinstance(backend, TextModel):
        raise InvalidInput(f"this model is not a text model: it cannot {call}")
    if call == "embed":
        result = backend.embed([str(t) for t in doc["texts"]])
        return {"prompt_tokens": result.prompt_tokens}, {"vectors": result.vectors}
    if call == "generate":
        g = doc["generation"]
        request = Generation(g["kind"], g["messages"], g["prompt"], Sampling(**g["sampling"]))
        for key in Generation("chat").structure():
            if key in g:
                setattr(request, key, g[key])
        emit = channel.send_piece if doc.get("stream") else None
        gen = backend.generate(request, emit, _cancelled(channel))
        return {
            "text": gen.text,
            "finish_reason": gen.finish_reason,
            "prompt_tokens": gen.prompt_tokens,
            "completion_tokens": gen.completion_tokens,
        }, {}
    raise InvalidInput(f"unknown call {call!r}")


def _cancelled(channel: Channel) -> Any:
    """A generation's cancelled(): true once the server sent CANCEL (or went away)."""
    seen = [False]

    def cancelled() -> bool:
        if not seen[0]:
            try:
                packet = channel.sock.recv(64, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return False
            seen[0] = packet[:1] in (CANCEL, b"")
        return seen[0]

    return cancelled
