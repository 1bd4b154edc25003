"""packaging/grafana/appliance.json: it parses as a Grafana dashboard, and every PromQL query in
it names only metrics that a served device (with MQTT and a hub) and a served hub export, read
from their live /metrics."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.support.mosquitto import Mosquitto, mosquitto_factory_fixture, mosquitto_fixture
from tests.sync.conftest import Fleet, infer, sync_status, wait_for

__all__ = ["mosquitto_factory_fixture", "mosquitto_fixture"]

DASHBOARD = ROOT / "packaging" / "grafana" / "appliance.json"
#: What a metric family's TYPE makes of its name in the exposition format.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "untyped": ("",),
    "unknown": ("",),
}
#: PromQL words that look like metric names: functions, keywords, Grafana's variables.
NAME = re.compile(r"(?<![\w$\"{.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w\"(])")


def _queries(dash: dict[str, Any]) -> list[str]:
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append(target["expr"])
    for var in dash["templating"]["list"]:
        out.append(var["query"]["query"])
    return out


def _metric_names(expr: str) -> set[str]:
    """The metric names a query reads: identifiers before a selector or standing alone,
    without label names (inside braces or by/without lists) and function names."""
    stripped = re.sub(r"\{[^}]*\}", "{}", expr)  # label matchers
    stripped = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", stripped
    )
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)  # ranges
    return {n for n in NAME.findall(stripped) if n.startswith("appliance_")}


def exported(text: str) -> set[str]:
    """Every series name /metrics can carry: each family's TYPE with its suffixes, and samples."""
    names = set()
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if m:
            # A counter's TYPE line already carries _total (text format 0.0.4).
            base = m.group(1).removesuffix("_total") if m.group(2) == "counter" else m.group(1)
            names |= {base + s for s in SUFFIXES[m.group(2)]}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_the_dashboard_is_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"][
            "w"
        ] <= 24
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}"
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            assert t["expr"].count("{") == t["expr"].count("}"), t["expr"]
    assert all(_metric_names(q) for q in _queries(dash)), "a query names no appliance metric"
    assert _metric_names(
        'histogram_quantile(0.99, sum by (le, model) (rate(appliance_x_bucket{a="b"}[5m])))'
    ) == {"appliance_x_bucket"}


def test_every_query_names_a_metric_device_and_hub_export(
    tmp_path: Path, samples: Path, mosquitto: Mosquitto
) -> None:
    fleet = Fleet(tmp_path, samples)
    try:
        device = fleet.start_device(
            "dev1", fleet.store("dev1"), {"APPLIANCE_MQTT__URL": mosquitto.url}
        )
        wait_for("the first sync", lambda: sync_status(device)["last_success"])
        infer(device)
        with urllib.request.urlopen(f"http://{device.url}/metrics", timeout=10) as r:
            names = exported(r.read().decode())
        req = urllib.request.Request(
            fleet.hub.url + "/metrics",
            headers={"Authorization": f"Bearer {fleet.hub.admin_token}"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            names |= exported(r.read().decode())
    finally:
        fleet.close()
    assert {"appliance_mqtt_connected", "appliance_sync_state", "appliance_hub_devices"} <= names
    dash = json.loads(DASHBOARD.read_text())
    missing = {}
    for q in _queries(dash):
        unknown = _metric_names(q) - names
        if unknown:
            missing[q] = sorted(unknown)
    assert not missing, json.dumps(missing, indent=1)


@pytest.mark.parametrize(
    "expr, names",
    [
        ("appliance_hub_targets", {"appliance_hub_targets"}),
        ('label_values(appliance_model_ready{instance=~"$instance"}, model)',
         {"appliance_model_ready"}),
        ("time() - appliance_a > 0 and appliance_b", {"appliance_a", "appliance_b"}),
    ],
)  # fmt: skip
def test_metric_names_are_read_from_promql(expr: str, names: set[str]) -> None:
    assert _metric_names(expr) == names
