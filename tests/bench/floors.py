"""The appliance against what a Python server on this machine can physically do (issue 22's
floors), side by side in one run.

    PYTHONPATH=. .venv/bin/python tests/bench/floors.py [--part http,mqtt,memory]
        [--model build/samples/sample.onnx] [--rounds 3] [--seconds 6] [--requests 2000]

- http: KServe v2 JSON infer at concurrency 1 with wrk (one thread, keep-alive) against
  `appliance serve` and against the floor: a bare uvloop `asyncio.Protocol` that reads each
  request (headers, Content-Length body), calls the raw `session.run` on a fixed input and answers
  a fixed 10-float JSON body. Both servers are pinned to CPU 0 (taskset) and the client to the
  other CPUs; rounds alternate; the figure is the median of the per-round p50 ratios.
- mqtt: MQTT 5 QoS 1 request/response (the `appliance bench --mqtt` client) through one real
  mosquitto against the appliance and against a bare paho responder that echoes each request to
  its response topic with its correlation data (the floor). Rounds alternate.
- memory: idle RSS of `appliance serve` with the one ONNX model (after one request) next to the
  floor server's (Python, uvloop, numpy, onnxruntime and the same session: what no Python server
  of this model can go below).

The same file, run with `--serve-floor PORT MODEL` or `--echo-floor URL DEVICE MODEL`, is the
floor server or the MQTT echo responder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.triton_compare import _stop, run_wrk  # noqa: E402

_FLOOR_BODY = json.dumps(
    {
        "model_name": "floor",
        "outputs": [
            {"name": "out", "datatype": "FP32", "shape": [1, 10], "data": [0.125] * 10},
        ],
    }
).encode()


# -- the floors (run in their own processes) ------------------------------------------------------
def serve_floor(port: int, model: str) -> None:
    """A bare HTTP/1.1 keep-alive server: parse, run the model on a fixed input, fixed answer."""
    import asyncio

    import numpy as np
    import onnxruntime as ort
    import uvloop

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
    feed = {spec.name: np.ones(shape, np.float32)}
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(_FLOOR_BODY)).encode()
        + b"\r\n\r\n"
    )
    answer = head + _FLOOR_BODY
    ready = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"

    class Floor(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            buf = self.buf + data
            while True:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                length = 0
                for line in buf[:end].split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if len(buf) < end + 4 + length:
                    break
                request_line = buf[: buf.find(b"\r\n")]
                buf = buf[end + 4 + length :]
                if request_line.startswith(b"GET"):
                    self.transport.write(ready)
                else:
                    session.run(None, feed)
                    self.transport.write(answer)
            self.buf = buf

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Floor, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    uvloop.run(main())


def echo_floor(url: str, device: str, model: str) -> None:
    """A bare paho responder on the appliance's topics: each request echoed to its response
    topic with its correlation data, QoS 1 (no decoding, no model)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from appliance.api.mqtt import parse_url

    broker = parse_url(url)
    topic = f"appliance/{device}/infer/{model}"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"echo-{os.getpid()}", protocol=mqtt.MQTTv5
    )

    def on_socket_open(_c: Any, _u: Any, sock: Any) -> None:
        import socket

        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_connect(c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        c.subscribe(topic, qos=1)
        c.publish(f"appliance/{device}/status", b'{"status":"online"}', qos=1, retain=True)

    def on_message(c: Any, _u: Any, msg: Any) -> None:
        props = Properties(PacketTypes.PUBLISH)
        got = msg.properties
        props.CorrelationData = getattr(got, "CorrelationData", b"")
        c.publish(got.ResponseTopic, msg.payload, qos=1, properties=props)

    client.on_socket_open = on_socket_open
    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(broker.host, broker.port, 60)
    client.loop_forever()


# -- the driver ---------------------------------------------------------------------------------
def _pin(cpus: str) -> list[str]:
    return ["taskset", "-c", cpus] if cpus and (os.cpu_count() or 1) > 1 else []


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _wait_http(port: int, path: str, timeout_s: float = 60.0) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"nothing ready on port {port} within {timeout_s:g} s")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used (its threads together)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wrk_cpu(
    pid: int, url: str, body: bytes, seconds: float, cpus: set[int] | None
) -> dict[str, float]:
    """One wrk run, with the server's CPU per answered request (µs): steadier than latency on a
    shared machine, since time the server waits for a CPU is not counted."""
    before = _cpu_s(pid)
    out = run_wrk(url, body, 1, seconds, cpus)
    out["cpu_us"] = (_cpu_s(pid) - before) / (out["rps"] * seconds) * 1e6
    return out


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _appliance(model: str, port: int, cpus: str, extra: list[str]) -> subprocess.Popen[bytes]:
    cmd = [
        *_pin(cpus),
        sys.executable,
        "-m",
        "appliance",
        "serve",
        "--model",
        model,
        "--name",
        "sample",
        "--port",
        str(port),
        "--log-level",
        "warning",
        *extra,
    ]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def request_body(model: str) -> bytes:
    """A KServe v2 JSON body for `model`'s first input, every element 0.5."""
    import onnxruntime as ort

    spec = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
    n = 1
    for d in shape:
        n *= d
    return json.dumps(
        {"inputs": [{"name": spec.name, "shape": shape, "datatype": "FP32", "data": [0.5] * n}]}
    ).encode()


def http_part(args: argparse.Namespace, out: dict[str, Any]) -> None:
    from appliance.bench.client import free_port

    body = request_body(args.model)
    fport, aport = free_port(), free_port()
    cpus = set(range(1, os.cpu_count() or 1)) or None
    floor = subprocess.Popen(
        [
            *_pin(args.server_cpus),
            sys.executable,
            __file__,
            "--serve-floor",
            str(fport),
            args.model,
        ],
        env=_env(),
    )
    app = _appliance(args.model, aport, args.server_cpus, [])
    try:
        _wait_http(fport, "/")
        _wait_http(aport, "/v2/health/ready")
        rows: list[dict[str, float]] = []
        for i in range(args.rounds + 1):
            f = _wrk_cpu(floor.pid, f"http://127.0.0.1:{fport}/", body, args.seconds, cpus)
            url = f"http://127.0.0.1:{aport}/v2/models/sample/infer"
            a = _wrk_cpu(app.pid, url, body, args.seconds, cpus)
            if i == 0:
                continue  # warm-up
            rows.append(
                {
                    "floor_p50_us": f["p50_us"],
                    "floor_p99_us": f["p99_us"],
                    "appliance_p50_us": a["p50_us"],
                    "appliance_p99_us": a["p99_us"],
                    "ratio_p50": a["p50_us"] / f["p50_us"],
                    "floor_cpu_us": f["cpu_us"],
                    "appliance_cpu_us": a["cpu_us"],
                    "ratio_cpu": a["cpu_us"] / f["cpu_us"],
                }
            )
            print(
                f"  http round {i}: floor p50 {f['p50_us']:.0f} µs, appliance p50 "
                f"{a['p50_us']:.0f} µs: {a['p50_us'] / f['p50_us']:.2f}x; server CPU per request "
                f"{f['cpu_us']:.0f} vs {a['cpu_us']:.0f} µs: {a['cpu_us'] / f['cpu_us']:.2f}x",
                flush=True,
            )
        out["http_c1"] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        out["memory"] = {
            "floor_rss_mib": round(_rss_mib(floor.pid), 1),
            "appliance_rss_mib": round(_rss_mib(app.pid), 1),
        }
    finally:
        _stop(floor)
        _stop(app)


def mqtt_part(args: argparse.Namespace, out: dict[str, Any]) -> None:
    from appliance.bench.client import free_port
    from appliance.bench.mqtt import time_mqtt
    from appliance.bench.timing import Latency

    body = request_body(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        bport = free_port()
        conf = Path(tmp) / "mosquitto.conf"
        conf.write_text(f"listener {bport} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n")
        broker = subprocess.Popen(
            ["/usr/sbin/mosquitto", "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"mqtt://127.0.0.1:{bport}"
        time.sleep(0.5)
        echo = subprocess.Popen(
            [
                *_pin(args.server_cpus),
                sys.executable,
                __file__,
                "--echo-floor",
                url,
                "floor",
                "sample",
            ],
            env=_env(),
        )
        aport = free_port()
        app = _appliance(
            args.model, aport, args.server_cpus, ["--mqtt", url, "--device-id", "bench-dev"]
        )
        try:
            _wait_http(aport, "/v2/health/ready")
            rows: list[dict[str, float]] = []
            for i in range(args.rounds + 1):
                c0 = _cpu_s(echo.pid)
                f = Latency.of(time_mqtt(url, "floor", "sample", body, 50, args.requests, 30.0))
                c1 = _cpu_s(app.pid)
                a = Latency.of(time_mqtt(url, "bench-dev", "sample", body, 50, args.requests, 30.0))
                c2 = _cpu_s(app.pid)
                f_cpu = (_cpu_s(echo.pid) - c0) / (args.requests + 50) * 1e6
                a_cpu = (c2 - c1) / (args.requests + 50) * 1e6
                if i == 0:
                    continue
                rows.append(
                    {
                        "floor_p50_us": f.p50_us,
                        "floor_p99_us": f.p99_us,
                        "appliance_p50_us": a.p50_us,
                        "appliance_p99_us": a.p99_us,
                        "ratio_p50": a.p50_us / f.p50_us,
                        "floor_cpu_us": f_cpu,
                        "appliance_cpu_us": a_cpu,
                    }
                )
                print(
                    f"  mqtt round {i}: echo p50 {f.p50_us:.0f} µs p99 {f.p99_us:.0f} "
                    f"(CPU {f_cpu:.0f} µs/request), appliance p50 {a.p50_us:.0f} µs "
                    f"p99 {a.p99_us:.0f} (CPU {a_cpu:.0f}): {a.p50_us / f.p50_us:.2f}x",
                    flush=True,
                )
            out["mqtt_qos1"] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        finally:
            _stop(app)
            _stop(echo)
            _stop(broker)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--serve-floor", nargs=2, metavar=("PORT", "MODEL"))
    ap.add_argument("--echo-floor", nargs=3, metavar=("URL", "DEVICE", "MODEL"))
    ap.add_argument("--part", default="http,mqtt", help="http, mqtt (memory comes with http)")
    ap.add_argument("--model", default=str(ROOT / "build" / "samples" / "sample.onnx"))
    ap.add_argument("--server-cpus", default="0")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=6.0, help="one wrk run")
    ap.add_argument("--requests", type=int, default=2000, help="MQTT round trips a round")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.serve_floor:
        serve_floor(int(args.serve_floor[0]), args.serve_floor[1])
        return 0
    if args.echo_floor:
        echo_floor(*args.echo_floor)
        return 0
    out: dict[str, Any] = {"cpus": os.cpu_count()}
    parts = set(args.part.split(","))
    if "http" in parts or "memory" in parts:
        http_part(args, out)
    if "mqtt" in parts:
        mqtt_part(args, out)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if "http_c1" in out:
        h = out["http_c1"]
        print(
            f"KServe v2 JSON infer, c=1, wrk: floor p50 {h['floor_p50_us']:.0f} µs "
            f"(p99 {h['floor_p99_us']:.0f}), appliance p50 {h['appliance_p50_us']:.0f} µs "
            f"(p99 {h['appliance_p99_us']:.0f}): {h['ratio_p50']:.2f}x (goal ≤ 1.5x); server CPU "
            f"per request {h['floor_cpu_us']:.0f} vs {h['appliance_cpu_us']:.0f} µs: "
            f"{h['ratio_cpu']:.2f}x"
        )
        m = out["memory"]
        print(
            f"idle RSS: floor (python, uvloop, numpy, onnxruntime, the session) "
            f"{m['floor_rss_mib']} MiB, appliance {m['appliance_rss_mib']} MiB"
        )
    if "mqtt_qos1" in out:
        q = out["mqtt_qos1"]
        print(
            f"MQTT 5 QoS 1: echo floor p50 {q['floor_p50_us']:.0f} µs (p99 "
            f"{q['floor_p99_us']:.0f}), appliance p50 {q['appliance_p50_us']:.0f} µs (p99 "
            f"{q['appliance_p99_us']:.0f}): {q['ratio_p50']:.2f}x (goal ≤ 1.3x, p99 ≤ 1 ms)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
