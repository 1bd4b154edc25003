"""`appliance status`: the running appliance's `GET /api/status` in the terminal (the same
summary the status page draws), or as JSON for scripts. Standard library only: it must work on
a device where nothing beyond the appliance is installed."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from .errors import ApplianceError


def fetch(url: str, token: str = "", timeout_s: float = 10.0) -> dict[str, Any]:
    """The summary from the appliance at `url` (its base URL); an ApplianceError saying why not."""
    if urlsplit(url).scheme not in ("http", "https"):
        raise ApplianceError(f"--url {url!r}: expected http://HOST:PORT or https://HOST:PORT")
    request = urllib.request.Request(url.rstrip("/") + "/api/status")  # noqa: S310 (checked)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            data = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise ApplianceError(
                f"{url}: the bearer token is missing or wrong (--token-file FILE)"
            ) from None
        raise ApplianceError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ApplianceError(f"{url}: cannot reach the appliance: {reason}") from None
    except json.JSONDecodeError:
        raise ApplianceError(f"{url}: /api/status did not answer JSON") from None
    if not isinstance(data, dict):
        raise ApplianceError(f"{url}: /api/status did not answer a JSON object")
    return data


def _n(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _uptime(seconds: float) -> str:
    s = int(seconds)
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    return f"{d}d {h}h {m}m" if d else f"{h}h {m}m {s % 60}s" if h else f"{m}m {s % 60}s"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in [header, *rows]]  # fmt: skip


def render(s: dict[str, Any]) -> str:
    """The summary as text: one line of who and how long, a table of models, then the rest."""
    a = s["appliance"]
    minutes = round(s.get("window_s", 300) / 60)
    lines = [
        f"appliance {a['version']} ({a['revision']}) on {a['hostname']}, "
        f"up {_uptime(a['uptime_s'])}, {'ready' if a['ready'] else 'NOT READY'}",
    ]
    d = s["device"]
    lines.append(
        "device: "
        + (f"accelerator ({', '.join(d['models_on_accelerator'])})" if d["accelerated"] else "CPU")
    )
    lines += [f"  fallback {f['model']}: {f['reason']}" for f in d["fallbacks"]]
    lines += ["", f"models (last {minutes} min):"]
    rows = []
    for m in s["models"]:
        w = m["last_5m"]
        batch = m.get("batch") or {}
        rows.append(
            [
                m["name"], m["version"], m["backend"], m["status"], m["device"] or "-",
                str(m["queue_depth"]), _n(batch.get("mean")), str(w["requests"]),
                _n(w["rate"], 3), _n(w["p50_ms"], 3), _n(w["p99_ms"], 3), _n(w["error_rate"], 4),
            ]
        )  # fmt: skip
    header = ["NAME", "VERSION", "BACKEND", "STATUS", "DEVICE", "QUEUE", "BATCH", "REQS", "REQ/S",
              "P50MS", "P99MS", "ERR"]  # fmt: skip
    lines += ["  " + line for line in _table(header, rows)] if rows else ["  none"]
    for m in s["models"]:
        if m.get("reason"):
            lines.append(f"  {m['name']}: {m['reason']}")
    if s.get("tasks"):
        lines += ["", "tasks:"]
        for t in s["tasks"]:
            w = t["last_5m"]
            variants = ", ".join(f"{v['model']} x{v['weight']}" for v in t["variants"])
            lines.append(
                f"  {t['name']}: {variants}; serving {t['serving'] or '-'}; {w['requests']} reqs,"
                f" p99 {_n(w['p99_ms'], 3)} ms, errors {_n(w['error_rate'], 4)}"
            )
    mqtt = s["mqtt"]
    if mqtt.get("enabled"):
        state = "connected" if mqtt["connected"] else "DISCONNECTED"
        lines += ["", f"mqtt: {mqtt['broker']} {state}; {', '.join(mqtt['subscriptions'])}"]
    sync = s.get("sync")
    if sync:
        lines += [
            "",
            f"sync: {sync['hub']} as {sync['device_id']}: {sync['state']}, tuf {sync['tuf']}",
        ]
        for key in ("pending", "progress", "rejected"):
            if sync.get(key):
                lines.append(f"  {key}: {json.dumps(sync[key])}")
        box = sync["outbox"]
        lines.append(f"  outbox: {box['events']} events, {box['bytes']} bytes")
        if sync.get("last_error"):
            lines.append(f"  last error: {sync['last_error']}")
    if s["errors"]:
        lines += ["", "last errors:"]
        for e in s["errors"][:10]:
            lines.append(f"  {e['status']} {e['name'] or '-'} {e['path']}: {e['message']}")
    return "\n".join(lines)
