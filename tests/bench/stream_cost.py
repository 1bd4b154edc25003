"""What serving one streamed token costs the server, without llama.cpp's noise
(python -m tests.bench.stream_cost [--tokens 400] [--interval-ms 2] [--rounds 5]).

A paced text model (a worker thread emitting one piece every `--interval-ms`, no compute)
behind the real HTTP front (api/http_server.py + the OpenAI routes, on uvloop as `appliance
serve` runs), streamed to a client in another process (curl, or the bench's raw-socket
reader). Reported per token: the CPU time of the event loop's thread (the hand-off from the
worker, the chunk's encoding, the write) and of the whole server process, medians over
rounds. CPU time of the server's own threads is what other load on the machine touches least:
compare trees side by side in one sitting, e.g.

    for p in /work/start $PWD; do PYTHONPATH=$p python -m tests.bench.stream_cost; done
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import shlex
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.support.gated import SIGNATURE, TickingTextBackend


class PacedTextBackend(TickingTextBackend):
    """One piece of text every `interval` seconds, `count` of them (set by the bench)."""

    name = "paced"
    platform = "test_paced"
    interval = 0.002
    count = 400

    def generate(self, request: Any, emit: Any, cancelled: Any) -> Any:
        from appliance.llm import GenerationResult

        cls = type(self)
        text = "tok "
        next_at = time.perf_counter()
        for _ in range(cls.count):
            next_at += cls.interval
            pause = next_at - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            if emit is not None:
                emit(text)
            if cancelled():
                break
        return GenerationResult(text * cls.count, "length", 3, cls.count)


def _main_thread_ns() -> int:
    return time.thread_time_ns()  # called on the loop's thread


def _process_ns() -> int:
    return time.process_time_ns()


async def _serve_and_measure(args: argparse.Namespace) -> dict[str, Any]:
    from aiohttp.test_utils import TestClient

    from appliance import backends
    from appliance.api.http import LOADER
    from appliance.config import load_config
    from appliance.engine import ModelSource
    from appliance.manifest import Manifest
    from appliance.server import build
    from tests.support.front import FrontServer

    backends._BACKENDS["paced"] = "tests.bench.stream_cost:PacedTextBackend"
    # the class the server loads (this file may run as __main__, a module of its own)
    paced = importlib.import_module("tests.bench.stream_cost").PacedTextBackend
    paced.gate.set()
    paced.interval = args.interval_ms / 1000
    paced.count = args.tokens
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "paced.bin"
        f.write_bytes(b"")
        manifest = Manifest("paced", "1", "paced", f.name, "", 0, SIGNATURE, "", "bench")
        overrides = {
            "server": {"log_level": "warning"},
            "model_defaults": {"probe_first_load": False},
        }
        config = load_config(None, overrides, {})
        app = build(config, [ModelSource(manifest, f, verify=False)])
        client = TestClient(FrontServer(app, host="127.0.0.1"))
        await client.start_server()
        try:
            await app[LOADER]
            url = str(client.make_url("/v1/chat/completions"))
            body = json.dumps({"model": "paced", "stream": True,
                               "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
            out = Path(tmp) / "stream.txt"
            command = ["curl", "-fsN", "-o", str(out), url, "-H",
                       "Content-Type: application/json", "-d", body]  # fmt: skip
            # curl is started by a shell, one per line it reads: no fork of this (large)
            # process counts as the server's CPU time
            script = f"while read -r _; do {shlex.join(command)}; echo $?; done"
            shell = await asyncio.create_subprocess_exec(
                "sh", "-c", script, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
            )
            assert shell.stdin is not None and shell.stdout is not None
            loop_us: list[float] = []
            proc_us: list[float] = []
            for i in range(args.rounds + 1):
                l0, p0 = _main_thread_ns(), _process_ns()
                shell.stdin.write(b"go\n")
                status = (await shell.stdout.readline()).strip()
                if status != b"0":
                    raise SystemExit(f"curl failed: status {status!r}")
                l1, p1 = _main_thread_ns(), _process_ns()
                events = out.read_bytes().count(b"data: ")
                if events != args.tokens + 3:  # role, pieces, finish, [DONE]
                    raise SystemExit(
                        f"{events} events for {args.tokens} tokens: {out.read_text()[-300:]}"
                    )
                if i:  # the first round warms up
                    loop_us.append((l1 - l0) / 1e3 / args.tokens)
                    proc_us.append((p1 - p0) / 1e3 / args.tokens)
            shell.stdin.close()
            await shell.wait()
        finally:
            await client.close()
    return {
        "tokens": args.tokens,
        "interval_ms": args.interval_ms,
        "rounds": args.rounds,
        "loop_cpu_us_per_token": round(statistics.median(loop_us), 2),
        "process_cpu_us_per_token": round(statistics.median(proc_us), 2),
        "loop_cpu_us_per_token_rounds": [round(x, 2) for x in loop_us],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--interval-ms", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import uvloop

    figures = uvloop.run(_serve_and_measure(args))
    import appliance

    figures["appliance"] = str(Path(appliance.__file__).parent)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
