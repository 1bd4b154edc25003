"""One name rule (appliance/names.py): the store, the config, the hub, the sync client, the
MQTT topic parser and the HTTP route pattern accept and refuse exactly the same names."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from appliance import names
from appliance.api.mqtt import parse_topic
from appliance.api.routes import KSERVE
from appliance.config import load_config
from appliance.errors import ApplianceError, ConfigError, InvalidInput, ModelError, NotFound
from appliance.hub.service import Hub, HubConfig, init_hub
from appliance.registry import Registry, check_name
from appliance.sync.client import Assignment
from appliance.sync.tuf_client import Refused

PREFIX = "appliance/dev1"
P = names.NAME_PATTERN
#: The KServe v2 infer routes as the HTTP fast path builds them from the route table.
INFER, INFER_VERSION = (r.regex() for r in KSERVE if r.handler == "infer")

#: Mostly name characters, with the ones that break names mixed in.
_CHARS = st.sampled_from([*"aZ09_.-", "/", " ", "+", "#", "\n", "\x00", "é", "%", ":", "\\"])
NAMES = st.one_of(
    st.text(_CHARS, max_size=12),
    st.from_regex(r"[A-Za-z0-9._-]{1,6}", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{120,135}", fullmatch=True),  # around the limit
    st.sampled_from(["ACTIVE", "ACTIVE.1", "ACTIVEx", "active", ".", "..", "a..", "..a", "a.b"]),
    st.text(max_size=8),
)
EDGES = ["x" * 128, "x" * 129, "y" * 100, "abc\n", "\nabc", "-a", ".a", "a/b", "", "ACTIVE"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    config = HubConfig(data_dir=tmp_path_factory.mktemp("hub") / "data")
    init_hub(config)
    h = Hub(config)
    yield h
    h.close()


def accepts(call: Callable[[], object], refused: type[ApplianceError]) -> bool:
    """True when `call` gets past the name check (a NotFound for a valid name counts as
    accepted: nothing by that name exists), False when it refuses the name."""
    try:
        call()
    except refused:
        return False
    except NotFound:
        return True
    return True


def config_accepts(data: dict[str, object]) -> bool:
    try:
        load_config(None, data, environ={})
    except ConfigError:
        return False
    return True


def topic_accepts(topic: str, model: str, version: str | None) -> bool:
    try:
        route = parse_topic(topic, [PREFIX])
    except (InvalidInput, NotFound):
        return False
    return (route.model, route.version) == (model, version)


def sync_accepts(name: str, version: str) -> bool:
    try:
        Assignment.from_json(
            {"name": name, "version": version, "target": f"{name}/{version}/model.onnx"}
        )
    except Refused:
        return False
    return True


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(NAMES)
@example("x" * 128)
@example("x" * 129)
@example("y" * 100)
@example("abc\n")
@example("ACTIVE")
@example("a..b")
@example(".hidden")
@example("raw")
@example("versions")
def test_every_part_accepts_the_same_names(hub: Hub, tmp_path: Path, value: str) -> None:
    valid = names.is_name(value)
    assert (re.fullmatch(P, value) is not None) == valid
    m = INFER.fullmatch(f"/v2/models/{value}/infer")
    assert (m is not None and m.group("name") == value) == valid
    m = INFER_VERSION.fullmatch(f"/v2/models/m/versions/{value}/infer")
    assert (m is not None and m.group("version") == value) == valid

    store = Registry(tmp_path / "store")
    assert accepts(lambda: store.get(value, "1"), ModelError) == valid
    assert accepts(lambda: store.get("m", value), ModelError) == valid

    assert config_accepts({"tasks": {value: {"variants": [{"model": "m"}]}}}) == valid
    assert config_accepts({"tasks": {"t": {"variants": [{"model": value}]}}}) == valid
    assert config_accepts({"models": {value: {}}}) == valid

    target = {"devices": ["dev1"]}
    assert accepts(lambda: hub.create_rollout(value, "1", target), InvalidInput) == valid
    assert accepts(lambda: hub.create_rollout("m", value, target), InvalidInput) == valid

    assert sync_accepts(value, "1") == valid
    assert sync_accepts("m", value) == valid

    assert topic_accepts(f"{PREFIX}/infer/{value}", value, None) == valid
    assert topic_accepts(f"{PREFIX}/infer/m/versions/{value}/raw", "m", value) == valid


@pytest.mark.parametrize("value", EDGES)
def test_the_error_names_what_the_value_and_the_problem(value: str) -> None:
    problem = names.name_problem(value)
    if problem is None:
        assert names.check_name(value, "model name") == value
        return
    with pytest.raises(InvalidInput) as info:
        names.check_name(value, "model name")
    assert info.value.message == (
        f"invalid model name {value!r}: use 1-128 letters, digits, '_', '-' or '.', starting "
        f"with a letter or digit, with no '..' ({problem})"
    )
    with pytest.raises(ModelError, match=re.escape(f"invalid version {value!r}: use 1-128")):
        check_name(value, "version")


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "it is empty"),
        ("x" * 129, "it has 129 characters"),
        ("a/b", "'/' is not allowed"),
        ("abc\n", "'\\n' is not allowed"),
        (".a", "it starts with '.'"),
        ("-a", "it starts with '-'"),
        ("a..b", "it contains '..'"),
        ("ACTIVE", "'ACTIVE' is reserved for the model store's own files"),
        (7, "not a string"),
    ],
)
def test_each_problem_is_named(value: object, problem: str) -> None:
    assert names.name_problem(value) == problem


def test_device_ids_have_the_host_name_limit() -> None:
    assert names.is_name("d" * 64, names.DEVICE_ID_MAX_LENGTH)
    assert not names.is_name("d" * 65, names.DEVICE_ID_MAX_LENGTH)
    with pytest.raises(ConfigError, match=r"^mqtt\.device_id = 'a/b': must be a device id"):
        load_config(None, {"mqtt": {"device_id": "a/b"}}, environ={})
    with pytest.raises(ConfigError, match=r"^hub\.device_id = '.{65}': .*it has 65 characters"):
        load_config(None, {"hub": {"device_id": "d" * 65}}, environ={})
    with pytest.raises(ConfigError, match=r"^mqtt\.shared_group = 'g\+': must be a group name"):
        load_config(None, {"mqtt": {"shared_group": "g+"}}, environ={})
    config = load_config(None, {"mqtt": {"device_id": "cam-7.local"}}, environ={})
    assert config.mqtt.device_id == "cam-7.local"


async def test_an_aiohttp_route_built_from_the_pattern_takes_exactly_the_names(
    aiohttp_client: Any,
) -> None:
    """The fragment fits aiohttp's {var:regex} syntax (its braces nest one level only)."""

    async def handler(request: web.Request) -> web.Response:
        return web.json_response(dict(request.match_info))

    app = web.Application()
    app.router.add_post(f"/v2/models/{{name:{P}}}/infer", handler)
    app.router.add_post(f"/v2/models/{{name:{P}}}/versions/{{version:{P}}}/infer", handler)
    client = await aiohttp_client(app)
    for value in [*EDGES, "a..b", "ACTIVE.1", "%2E%2E"]:
        valid = names.is_name(value)
        r = await client.post(f"/v2/models/{quote(value, safe='')}/infer")
        assert (r.status == 200) == valid, value
        if valid:
            assert await r.json() == {"name": value}
        r = await client.post(f"/v2/models/m/versions/{quote(value, safe='')}/infer")
        assert (r.status == 200) == valid, value
