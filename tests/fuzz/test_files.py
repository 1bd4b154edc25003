"""Files an attacker (or a bad disk) can hand the appliance, mutated: truncated, bits flipped,
counts made huge. Model files (ONNX, TFLite, GGUF) go through the real first load in a child
process (appliance/isolation/probe.py), where a runtime that crashes on them is contained;
manifest.json through the store, config.toml through the config loader, acceptance cases
through the hub's check, a device's TUF root through its sync client. Each is loaded, or
refused with the appliance's own error and a message (never a traceback, another exception
type, or a crash of this process)."""

from __future__ import annotations

import copy
import struct
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from appliance.backends.base import LoadContext
from appliance.config import load_config
from appliance.errors import ApplianceError, ConfigError, ModelError
from appliance.hub.service import check_acceptance
from appliance.isolation.probe import probe
from appliance.registry import Registry
from appliance.server import source_from_file
from tests.conftest import ROOT

from .conftest import EXAMPLES
from .mutate import NASTY, Raw, dumps

#: A child process per example: a small share of the examples (fuzz-long runs more).
PROBES = max(4, EXAMPLES // 50)
#: Files parsed in this process: a quarter.
PARSES = max(10, EXAMPLES // 4)


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["cut", "flip", "count", "zero", "append"]), label="mutation")
    event(kind)
    if kind == "cut":
        return data[: draw(st.integers(0, len(data) - 1))]
    out = bytearray(data)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            at = draw(st.integers(0, len(out) - 1))
            out[at] ^= 1 << draw(st.integers(0, 7))
    elif kind == "count":  # a length or count field made huge (8 bytes, little-endian)
        at = draw(st.integers(0, max(0, min(len(out), 4096) - 8)))
        out[at : at + 8] = struct.pack("<Q", draw(st.sampled_from([2**63 - 1, 2**32, 2**40])))
    elif kind == "zero":
        at = draw(st.integers(0, len(out) - 1))
        out[at : at + 64] = bytes(len(out[at : at + 64]))
    else:
        out += draw(st.binary(min_size=1, max_size=64))
    return bytes(out)


def _model_files(samples: Path, tflite_models: Path) -> dict[str, Path]:
    files = {"onnx": samples / "multi_io.onnx", "tflite": tflite_models / "tfl_float.tflite"}
    gguf = ROOT / "build" / "gguf" / "tiny-llama-q4_0.gguf"
    if gguf.is_file():
        files["gguf"] = gguf
    return files


@settings(max_examples=PROBES, suppress_health_check=list(HealthCheck), deadline=None)
@given(data=st.data())
def test_mutated_model_files_fail_their_first_load_cleanly(
    tmp_path_factory: pytest.TempPathFactory, samples: Path, tflite_models: Path,
    data: st.DataObject,
) -> None:  # fmt: skip
    files = _model_files(samples, tflite_models)
    kind = data.draw(st.sampled_from(sorted(files)), label="format")
    original = files[kind]
    body = data.draw(mutated(original.read_bytes()), label="bytes")
    where = tmp_path_factory.mktemp("mutated")
    path = where / original.name
    path.write_bytes(body)
    config = load_config(None, {"store": {"path": str(where)}}, {}).model_config("m")
    try:
        source = source_from_file(path, "m")
        probe(source.manifest, path, LoadContext(config, where / ".cache"))
    except ModelError as exc:
        event(f"{kind}: refused")
        assert exc.message and "Traceback" not in exc.message, exc.message
        assert original.name in exc.message or "m" in exc.message, exc.message
    else:
        event(f"{kind}: loaded")  # a flipped weight is still a model


# -- manifest.json ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory, samples: Path) -> Path:
    root = tmp_path_factory.mktemp("manifest-store")
    Registry(root).add("sample", samples / "sample.onnx")
    return root


def _json_mutations(doc: Any) -> st.SearchStrategy[Any]:
    """`doc` with one value replaced by something nasty, or a key dropped."""
    paths: list[tuple[Any, ...]] = []

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, (*path, i))

    walk(doc, ())

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        out = copy.deepcopy(doc)
        path = draw(st.sampled_from(paths[1:]))
        parent = out
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            value = draw(NASTY.filter(lambda v: not isinstance(v, Raw)))
            parent[path[-1]] = value
        return out

    return build()


@settings(max_examples=PARSES)
@given(data=st.data())
def test_mutated_manifests_are_refused_with_a_message(stored: Path, data: st.DataObject) -> None:
    manifest = stored / "sample" / "1" / "manifest.json"
    original = manifest.read_bytes()
    if data.draw(st.booleans(), label="as bytes"):
        body = data.draw(mutated(original), label="bytes")
    else:
        doc = data.draw(_json_mutations(orjson.loads(original)), label="json")
        body = dumps(doc)
    manifest.write_bytes(body)
    try:
        Registry(stored).get("sample", "1")
        event("accepted")
    except ApplianceError as exc:
        event("refused")
        assert exc.message and "Traceback" not in exc.message
    finally:
        manifest.write_bytes(original)


# -- config.toml -----------------------------------------------------------------------------------
CONFIG = ROOT / "packaging" / "config.toml"
TOML_VALUES = [
    "-1", "0", "1e999", "nan", "inf", "99999999999999999999999", '""', '"x"', "[]", "{}",
    "true", "1979-05-27T07:32:00Z", '"\\u0000"', "[[1]]", "{a = {b = 1}}",
]  # fmt: skip


@st.composite
def mutated_toml(draw: st.DrawFn) -> bytes:
    text = CONFIG.read_text(encoding="utf-8")
    lines = text.splitlines()
    settings_at = [i for i, line in enumerate(lines) if "=" in line and not line.startswith("#")]
    if draw(st.booleans(), label="value or bytes"):
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.sampled_from(settings_at))
            key = lines[i].split("=", 1)[0].lstrip("# ").rstrip()
            lines[i] = f"{key} = {draw(st.sampled_from(TOML_VALUES))}"
        return "\n".join(lines).encode()
    return bytes(draw(mutated(text.encode())))


@settings(max_examples=PARSES)
@given(body=mutated_toml())
def test_mutated_config_files_are_refused_with_a_message(
    tmp_path_factory: pytest.TempPathFactory, body: bytes
) -> None:
    path = tmp_path_factory.mktemp("config") / "config.toml"
    path.write_bytes(body)
    try:
        load_config(path, None, {})
        event("accepted")
    except ConfigError as exc:
        event("refused")
        assert exc.message and "Traceback" not in exc.message


# -- acceptance cases ------------------------------------------------------------------------------
GOOD_CASES = [
    {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],
     "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [1, 3],
                  "data": [0.1, 0.2, 0.7]}]},
]  # fmt: skip


@settings(max_examples=PARSES)
@given(data=st.data())
def test_mutated_acceptance_cases_are_refused_with_a_message(data: st.DataObject) -> None:
    cases = data.draw(_json_mutations({"cases": GOOD_CASES}), label="cases").get("cases")
    try:
        check_acceptance(cases)
        event("accepted")
    except ApplianceError as exc:
        event("refused")
        assert exc.status == 400 and exc.message


# -- TUF root metadata (a device's trust anchor, hub.root_file) ------------------------------------
@pytest.fixture(scope="module")
def hub_root(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    from appliance.hub.service import HubConfig, init_hub

    data = tmp_path_factory.mktemp("tuf-hub") / "data"
    init_hub(HubConfig(data_dir=data))
    return (data / "1.root.json").read_bytes()


@settings(max_examples=PARSES)
@given(data=st.data())
def test_mutated_root_metadata_is_refused(
    tmp_path_factory: pytest.TempPathFactory, hub_root: bytes, data: st.DataObject
) -> None:
    """The sync agent's TUF client on a mutated root.json (bytes, or one JSON value): Refused
    with python-tuf's reason, or, for a root that still verifies, Unreachable (no hub here)."""
    from appliance.sync.tuf_client import Refused, SyncError, TufClient, Unreachable

    if data.draw(st.booleans(), label="as bytes"):
        body = data.draw(mutated(hub_root), label="bytes")
    else:
        body = dumps(data.draw(_json_mutations(orjson.loads(hub_root)), label="json"))
    work = tmp_path_factory.mktemp("tuf-device")
    (work / "root.json").write_bytes(body)
    client = TufClient("http://127.0.0.1:9", "token", "dev", work / "root.json",
                       work / "metadata", work / "downloads", 2.0, 1 << 20)  # fmt: skip
    with pytest.raises(SyncError) as err:
        client.refresh()
    event(type(err.value).__name__)
    assert isinstance(err.value, (Refused, Unreachable)) and err.value.reason
