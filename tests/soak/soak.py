"""Soak: one `appliance serve` process under mixed load for a while, its resources sampled.

    PYTHONPATH=. .venv/bin/python -m tests.soak.soak --seconds 1800 --out build/soak
    make soak                      # 30 min (SOAK_SECONDS=180 for 3 min)

Real parts only: a hub (`appliance hub serve`), a mosquitto broker, and the device serving the
sample ONNX model and the tiny GGUF chat model, with MQTT and fleet sync on. Load, each at a
modest fixed rate so that a shared 2-core machine is not saturated (this measures leaks, not
speed): KServe infer on the HTTP fast path, aiohttp routes (model metadata, /metrics, /v2/sync),
MQTT v5 QoS 1 requests (each tracked by its correlation id), SSE chat streams; a new version
rolled out from the hub every `rollout_every_s`; the broker and the hub restarted every
`broker_restart_every_s` / `hub_restart_every_s`.

Sampled every `sample_every_s` from /proc: the serve process's RSS, file descriptors, threads
and open regular files. Written to OUT/soak.json (samples and summary), OUT/soak.csv and
OUT/soak.svg (a plot of the four). Checks (the summary's `ok`): RSS growth after the warm-up at
most 5 % (median of the last tenth against the median of the tenth after warm-up), fds and
threads flat (the same comparison, a small slack for a connection or a thread in flight), no
QoS 1 request lost, no gap in the telemetry sequence the hub stored, no failed HTTP or SSE
request. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.registry import Registry
from tests.conftest import ROOT, ServerProcess, start_server_process, stop_server_process
from tests.support.mosquitto import Mosquitto
from tests.sync.conftest import Hub, http_json, variant

DEVICE = "soak"
INFER = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":[5.1,3.5,1.4,0.2]}]}'
CHAT = json.dumps(
    {
        "model": "chat",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 8,
        "stream": True,
    }
).encode()
#: Slack for "flat": a connection or a worker thread in flight at the moment of a sample.
FD_SLACK = 8
THREAD_SLACK = 4
RSS_GROWTH_MAX = 0.05


@dataclass
class Plan:
    seconds: float
    warmup_s: float
    sample_every_s: float = 2.0
    rollout_every_s: float = 180.0
    broker_restart_every_s: float = 300.0
    hub_restart_every_s: float = 420.0
    #: Requests per second of each load.
    fast_rps: float = 50.0
    aiohttp_rps: float = 10.0
    mqtt_rps: float = 10.0
    sse_rps: float = 1.0

    @classmethod
    def for_seconds(cls, seconds: float) -> Plan:
        """Events spaced so that even a 60 s run sees one of each after its warm-up."""
        if seconds >= 600:
            return cls(seconds, warmup_s=120.0)
        return cls(
            seconds,
            warmup_s=min(20.0, seconds / 3),
            rollout_every_s=seconds / 3,
            broker_restart_every_s=seconds / 2.4,
            hub_restart_every_s=seconds / 1.7,
        )


@dataclass
class Counts:
    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def fail(self, what: str) -> None:
        self.failed += 1
        if len(self.errors) < 20:
            self.errors.append(what)


def proc_sample(pid: int) -> dict[str, float]:
    """RSS (MiB), fds, threads and open regular files of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    fds = 0
    files = 0
    for fd in os.scandir(f"/proc/{pid}/fd"):
        fds += 1
        try:
            if os.readlink(fd.path).startswith("/"):
                files += 1
        except OSError:
            pass
    return {
        "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
        "fds": fds,
        "threads": int(fields["Threads"]),
        "files": files,
    }


class Soak:
    def __init__(self, plan: Plan, out: Path, samples: Path, gguf: Path) -> None:
        self.plan = plan
        self.out = out
        self.work = out / "work"
        self.samples = samples
        self.gguf = gguf
        self.stop = threading.Event()
        self.counts = {k: Counts() for k in ("fast", "aiohttp", "sse", "mqtt")}
        self.events: list[tuple[float, str]] = []
        self.series: list[dict[str, float]] = []
        self.mqtt_pending: dict[bytes, float] = {}
        self.mqtt_lock = threading.Lock()
        self.mqtt_sent = 0
        self.mqtt_answered = 0
        self.t0 = 0.0

    # -- set-up ------------------------------------------------------------------------------
    def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.hub = Hub(self.work / "hub")
        self.hub.start()
        token = self.hub.enroll(DEVICE, self.work)
        self.broker = Mosquitto(self.work / "broker")
        self.broker.start()
        store = self.work / "models"
        registry = Registry(store)
        registry.add("sample", self.samples / "sample.onnx", version="1")
        registry.add("chat", self.gguf)
        (self.work / "manifest.json").write_text(
            json.dumps(
                {
                    k: v
                    for k, v in registry.active("sample").manifest.to_json().items()
                    if k in ("inputs", "outputs", "parameters")
                }
            )
        )
        config = self.work / "config.toml"
        config.write_text(
            "[server]\naccess_log = false\n"
            f'[mqtt]\nurl = "{self.broker.url}"\ndevice_id = "{DEVICE}"\n'
            "reconnect_max_s = 2.0\n"
            "[hub]\npoll_interval_s = 2.0\nrequest_timeout_s = 5.0\nmetrics_interval_s = 10.0\n"
        )
        self.device: ServerProcess = start_server_process(
            [
                "--config", str(config), "--models", str(store), "--hub", self.hub.url,
                "--device-id", DEVICE, "--hub-token-file", str(token),
                "--hub-root", str(self.hub.root_file),
            ]
        )  # fmt: skip
        self._mqtt_client()

    def _mqtt_client(self) -> None:
        """A persistent v5 session (it outlives broker restarts) with its reply topic."""
        self.replies = f"soak/replies/{uuid.uuid4().hex[:8]}"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="soak-client", protocol=mqtt.MQTTv5
        )
        client.reconnect_delay_set(1, 2)
        client.max_queued_messages_set(0)
        ready = threading.Event()

        def on_connect(c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if not reason.is_failure:
                c.subscribe(self.replies, 1)
                ready.set()

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            corr = getattr(msg.properties, "CorrelationData", None)
            with self.mqtt_lock:
                if corr in self.mqtt_pending:
                    del self.mqtt_pending[corr]
                    self.mqtt_answered += 1
                    body = json.loads(msg.payload)
                    if "outputs" in body:
                        self.counts["mqtt"].ok += 1
                    else:
                        self.counts["mqtt"].fail(str(body)[:200])

        client.on_connect = on_connect
        client.on_message = on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        client.connect("127.0.0.1", self.broker.port, 30, clean_start=False, properties=props)
        client.loop_start()
        if not ready.wait(20):
            raise RuntimeError("the soak's MQTT client could not connect")
        self.mqtt = client

    # -- load --------------------------------------------------------------------------------
    def _paced(self, rps: float, one: Callable[[], None]) -> None:
        period = 1.0 / rps
        next_at = time.monotonic()
        while not self.stop.is_set():
            one()
            next_at += period
            delay = next_at - time.monotonic()
            if delay > 0:
                self.stop.wait(delay)
            else:
                next_at = time.monotonic()

    def _http(self, name: str, rps: float, request: Callable[[http.client.HTTPConnection], None]):
        def loop() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", self.device.port, timeout=30)

            def one() -> None:
                nonlocal conn
                try:
                    request(conn)
                    self.counts[name].ok += 1
                except Exception as exc:
                    self.counts[name].fail(f"{time.monotonic() - self.t0:.0f}s {exc!r}")
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.device.port, timeout=30)

            self._paced(rps, one)
            conn.close()

        return loop

    @staticmethod
    def _expect(conn: http.client.HTTPConnection, status: int = 200) -> bytes:
        r = conn.getresponse()
        body = r.read()
        if r.status != status:
            raise RuntimeError(f"HTTP {r.status}: {body[:200]!r}")
        return body

    def _fast(self, conn: http.client.HTTPConnection) -> None:
        conn.request("POST", "/v2/models/sample/infer", INFER, {"Content-Type": "application/json"})
        self._expect(conn)

    def _aiohttp(self, conn: http.client.HTTPConnection) -> None:
        for path in ("/v2/models/sample", "/metrics", "/v2/sync"):
            conn.request("GET", path)
            self._expect(conn)

    def _sse(self, conn: http.client.HTTPConnection) -> None:
        conn.request("POST", "/v1/chat/completions", CHAT, {"Content-Type": "application/json"})
        body = self._expect(conn)
        if not body.rstrip().endswith(b"data: [DONE]"):
            raise RuntimeError(f"stream did not end with [DONE]: {body[-200:]!r}")

    def _mqtt_one(self) -> None:
        corr = uuid.uuid4().bytes
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.replies
        props.CorrelationData = corr
        with self.mqtt_lock:
            self.mqtt_pending[corr] = time.monotonic()
            self.mqtt_sent += 1
        self.mqtt.publish(f"appliance/{DEVICE}/infer/sample", INFER, qos=1, properties=props)

    # -- events ------------------------------------------------------------------------------
    def _note(self, what: str) -> None:
        self.events.append((round(time.monotonic() - self.t0, 1), what))
        print(f"[{self.events[-1][0]:7.1f}s] {what}", file=sys.stderr, flush=True)

    def _every(self, period: float, action: Callable[[], None]) -> Callable[[], None]:
        def loop() -> None:
            while not self.stop.wait(period):
                try:
                    action()
                except Exception as exc:
                    self._note(f"{action.__name__} failed: {exc!r}")

        return loop

    def rollout(self) -> None:
        version = str(2 + sum(1 for _, e in self.events if e.startswith("rollout ")))
        scale = 1.0 + int(version) / 10
        model = variant(self.samples / "sample.onnx", self.work / f"v{version}.onnx", scale)
        self.hub.cli(
            "publish", "sample", str(model), "--version", version,
            "--manifest", str(self.work / "manifest.json"),
        )  # fmt: skip
        self.hub.cli("rollout", "sample", version, "--devices", DEVICE)
        self._note(f"rollout sample {version}")

    def restart_broker(self) -> None:
        self.broker.stop()
        self._note("broker stopped")
        self.stop.wait(2.0)
        self.broker.start()
        self._note("broker started")

    def restart_hub(self) -> None:
        self.hub.stop()
        self._note("hub stopped")
        self.stop.wait(2.0)
        self.hub.start()
        self._note("hub started")

    def sample(self) -> None:
        row = {"t": round(time.monotonic() - self.t0, 2), **proc_sample(self.device.proc.pid)}
        self.series.append(row)

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        plan = self.plan
        self.t0 = time.monotonic()
        self.sample()
        threads = [
            self._http("fast", plan.fast_rps, self._fast),
            self._http("aiohttp", plan.aiohttp_rps, self._aiohttp),
            self._http("sse", plan.sse_rps, self._sse),
            lambda: self._paced(plan.mqtt_rps, self._mqtt_one),
            self._every(plan.sample_every_s, self.sample),
            self._every(plan.rollout_every_s, self.rollout),
            self._every(plan.broker_restart_every_s, self.restart_broker),
            self._every(plan.hub_restart_every_s, self.restart_hub),
        ]
        running = [threading.Thread(target=t, daemon=True) for t in threads]
        for t in running:
            t.start()
        self.stop.wait(plan.seconds)
        self.stop.set()
        for t in running:
            t.join(60)
        if not self.broker.running:
            self.broker.start()
        if self.hub.proc is None:
            self.hub.start()
        return self.finish()

    def finish(self) -> dict[str, Any]:
        # QoS 1 requests still on their way get a grace period, then count as lost.
        deadline = time.monotonic() + 60
        while self.mqtt_pending and time.monotonic() < deadline:
            time.sleep(0.2)
        with self.mqtt_lock:
            lost = len(self.mqtt_pending)
        # Telemetry: the outbox drains, then the hub must hold every sequence number once.
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            status = http_json(f"http://{self.device.url}/v2/sync")
            if status["outbox"]["events"] == 0:
                break
            time.sleep(0.5)
        seqs = self._hub_seqs()
        expected = set(range(1, max(seqs, default=0) + 1))
        gaps = sorted(expected - set(seqs))
        duplicates = len(seqs) - len(set(seqs))
        summary = summarize(self.series, self.plan.warmup_s)
        summary.update(
            {
                "loads": {k: asdict(v) for k, v in self.counts.items()},
                "mqtt": {"sent": self.mqtt_sent, "answered": self.mqtt_answered, "lost": lost},
                "telemetry": {
                    "events": len(seqs),
                    "gaps": len(gaps),
                    "first_gaps": gaps[:20],
                    "duplicates": duplicates,
                    "dropped": status["outbox"]["dropped"],
                },
                "events": self.events,
                "serving_version": http_json(f"http://{self.device.url}/v2/models/sample")[
                    "versions"
                ][0],
            }
        )
        failures = [
            f"{k}: {v.failed} failed" for k, v in self.counts.items() if v.failed and k != "mqtt"
        ]
        if lost:
            failures.append(f"{lost} QoS 1 requests lost")
        if gaps or duplicates:
            failures.append(f"telemetry: {len(gaps)} gaps, {duplicates} duplicates")
        failures += summary.pop("resource_failures")
        summary["failures"] = failures
        summary["ok"] = not failures
        return summary

    def _hub_seqs(self) -> list[int]:
        out: list[int] = []
        while True:
            after = out[-1] if out else 0
            page = self.hub.admin("GET", f"/api/v1/admin/devices/{DEVICE}/events?after={after}")
            page = page["events"] if isinstance(page, dict) else page
            if not page:
                return out
            out.extend(int(e["seq"]) for e in page)

    def close(self) -> None:
        self.stop.set()
        try:
            self.mqtt.loop_stop()
            self.mqtt.disconnect()
        except Exception:
            pass
        if getattr(self, "device", None) is not None and self.device.proc.poll() is None:
            stop_server_process(self.device)
        if getattr(self, "broker", None) is not None:
            self.broker.stop()
        if getattr(self, "hub", None) is not None:
            self.hub.stop()


def summarize(series: list[dict[str, float]], warmup_s: float) -> dict[str, Any]:
    """Resource figures after the warm-up: the median of the first and of the last tenth."""
    after = [s for s in series if s["t"] >= warmup_s] or series
    tenth = max(1, len(after) // 10)
    first, last = after[:tenth], after[-tenth:]
    out: dict[str, Any] = {"samples": len(series), "warmup_s": warmup_s}
    failures: list[str] = []
    for key in ("rss_mib", "fds", "threads", "files"):
        a = statistics.median(s[key] for s in first)
        b = statistics.median(s[key] for s in last)
        out[key] = {
            "after_warmup": a,
            "end": b,
            "min": min(s[key] for s in after),
            "max": max(s[key] for s in after),
        }
    rss = out["rss_mib"]
    rss["growth"] = round((rss["end"] - rss["after_warmup"]) / rss["after_warmup"], 4)
    if rss["growth"] > RSS_GROWTH_MAX:
        failures.append(f"RSS grew {rss['growth']:.1%} after warm-up (limit {RSS_GROWTH_MAX:.0%})")
    if out["fds"]["end"] - out["fds"]["after_warmup"] > FD_SLACK:
        failures.append(f"fds grew from {out['fds']['after_warmup']} to {out['fds']['end']}")
    if out["threads"]["end"] - out["threads"]["after_warmup"] > THREAD_SLACK:
        failures.append(
            f"threads grew from {out['threads']['after_warmup']} to {out['threads']['end']}"
        )
    out["resource_failures"] = failures
    return out


def write_outputs(out: Path, series: list[dict[str, float]], summary: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps({"summary": summary, "samples": series}, indent=1))
    keys = ["t", "rss_mib", "fds", "threads", "files"]
    lines = [",".join(keys)] + [",".join(str(s[k]) for k in keys) for s in series]
    (out / "soak.csv").write_text("\n".join(lines) + "\n")
    (out / "soak.svg").write_text(svg_plot(series, summary))


def svg_plot(series: list[dict[str, float]], summary: dict[str, Any]) -> str:
    """Four small line charts over time (no plotting library on a device or in CI)."""
    w, h, pad = 640, 150, 40
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{4 * h + 20}" '
        'font-family="sans-serif" font-size="11">',
        '<rect width="100%" height="100%" fill="white"/>',
    ]
    t_max = max((s["t"] for s in series), default=1.0) or 1.0
    events = summary.get("events", [])
    for i, (key, label) in enumerate(
        (("rss_mib", "RSS (MiB)"), ("fds", "file descriptors"), ("threads", "threads"),
         ("files", "open files"))
    ):  # fmt: skip
        top = i * h + 10
        values = [s[key] for s in series] or [0.0]
        lo, hi = min(values), max(values)
        lo, hi = (lo - 1, hi + 1) if hi == lo else (lo - (hi - lo) * 0.1, hi + (hi - lo) * 0.1)

        def x(t: float) -> float:
            return pad + (w - 2 * pad) * t / t_max

        def y(v: float, lo: float = lo, hi: float = hi, top: int = top) -> float:
            return top + (h - 30) * (1 - (v - lo) / (hi - lo))

        parts.append(
            f'<rect x="{pad}" y="{top}" width="{w - 2 * pad}" height="{h - 30}" '
            'fill="none" stroke="#ccc"/>'
        )
        parts.append(f'<text x="{pad}" y="{top - 1 + 10}" dx="4" dy="4">{label}</text>')
        parts.append(f'<text x="{pad - 4}" y="{y(hi) + 4:.1f}" text-anchor="end">{hi:.0f}</text>')
        parts.append(f'<text x="{pad - 4}" y="{y(lo):.1f}" text-anchor="end">{lo:.0f}</text>')
        for t, what in events:
            color = "#d62728" if "stopped" in what else "#2ca02c" if "rollout" in what else "#999"
            parts.append(
                f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{top}" y2="{top + h - 30}" '
                f'stroke="{color}" stroke-dasharray="2,2"/>'
            )
        points = " ".join(f"{x(s['t']):.1f},{y(s[key]):.1f}" for s in series)
        parts.append(
            f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{points}"/>'
        )
    parts.append(
        f'<text x="{pad}" y="{4 * h + 12}">time (s), 0 to {t_max:.0f}; dashed: rollouts (green), '
        "broker/hub stops (red), starts (grey)</text>"
    )
    parts.append("</svg>")
    return "\n".join(parts)


def soak(seconds: float, out: Path, samples: Path, gguf: Path) -> dict[str, Any]:
    s = Soak(Plan.for_seconds(seconds), out, samples, gguf)
    try:
        s.start()
        summary = s.run()
    finally:
        s.close()
    write_outputs(out, s.series, summary)
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", 1800)))
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "soak")
    ap.add_argument("--samples", type=Path, default=ROOT / "build" / "samples")
    ap.add_argument("--gguf", type=Path, default=ROOT / "build" / "gguf" / "tiny-llama-q8_0.gguf")
    args = ap.parse_args()
    summary = soak(args.seconds, args.out, args.samples, args.gguf)
    printable = {k: v for k, v in summary.items() if k != "events"}
    print(json.dumps(printable, indent=1))
    print(f"samples: {args.out / 'soak.csv'}, plot: {args.out / 'soak.svg'}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
