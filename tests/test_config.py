"""Configuration: defaults < TOML file < APPLIANCE_* environment < overrides, and clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from appliance.config import (
    Config,
    ModelConfig,
    OnnxConfig,
    ServerConfig,
    StoreConfig,
    load_config,
)
from appliance.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "appliance.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ={})
    return info.value.message


def test_defaults() -> None:
    config = load_config(environ={})
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8080
    assert config.server.auth_token == "" and config.token() == ""
    assert config.store.path == "models"
    assert config.model_defaults == ModelConfig()
    assert config.model_defaults.device == "auto"
    assert config.models == {}
    assert config == Config()
    # a model without a table of its own gets the defaults
    assert config.model_config("anything") == ModelConfig()


def test_toml_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [server]
        host = "0.0.0.0"
        port = 9000
        access_log = false
        log_level = "debug"
        shutdown_timeout_s = 3

        [store]
        path = "/var/lib/appliance/models"

        [model_defaults]
        device = "cpu"
        max_concurrency = 2
        timeout_s = 1.5

        [model_defaults.onnx]
        intra_op_threads = 2
        graph_optimization = "basic"
        """,
    )
    config = load_config(path, environ={})
    assert config.server == ServerConfig(
        host="0.0.0.0", port=9000, access_log=False, log_level="debug", shutdown_timeout_s=3.0
    )
    assert isinstance(config.server.shutdown_timeout_s, float)
    assert config.store == StoreConfig(path="/var/lib/appliance/models")
    assert config.model_defaults == ModelConfig(
        device="cpu",
        max_concurrency=2,
        timeout_s=1.5,
        onnx=OnnxConfig(intra_op_threads=2, graph_optimization="basic"),
    )
    assert load_config(str(path), environ={}) == config  # a str path works too


def test_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), environ={}) == Config()


def test_environment_overrides() -> None:
    environ = {
        "APPLIANCE_SERVER__PORT": "9100",
        "APPLIANCE_SERVER__HOST": "0.0.0.0",
        "APPLIANCE_SERVER__ACCESS_LOG": "false",
        "APPLIANCE_STORE__PATH": "/data/models",
        "APPLIANCE_MODEL_DEFAULTS__TIMEOUT_S": "2.5",
        "APPLIANCE_MODEL_DEFAULTS__DEVICE": "cpu",
        "APPLIANCE_MODEL_DEFAULTS__ONNX__GRAPH_OPTIMIZATION": "extended",
        "APPLIANCE_MODELS__SAMPLE__MAX_CONCURRENCY": "3",
        # not settings: no prefix, or no section separator
        "APPLIANCE_CONFIG": "/does/not/matter.toml",
        "SERVER__PORT": "1",
        "PATH": "/usr/bin",
    }
    config = load_config(environ=environ)
    assert (config.server.port, config.server.host) == (9100, "0.0.0.0")
    assert config.server.access_log is False
    assert config.store.path == "/data/models"
    assert config.model_defaults.timeout_s == 2.5
    assert config.model_defaults.device == "cpu"
    assert config.model_defaults.onnx.graph_optimization == "extended"
    assert config.model_config("sample").max_concurrency == 3
    assert config.model_config("other").max_concurrency == 1


@pytest.mark.parametrize("token", ["12345", "true", "1e5", "s3cret", "inf", "0x1F"])
def test_environment_keeps_string_settings_as_text(token: str) -> None:
    config = load_config(environ={"APPLIANCE_SERVER__AUTH_TOKEN": token})
    assert config.server.auth_token == token
    assert config.token() == token


def test_environment_values_may_be_quoted_toml() -> None:
    config = load_config(
        environ={"APPLIANCE_SERVER__HOST": '"::1"', "APPLIANCE_STORE__PATH": "'/a b/c'"}
    )
    assert config.server.host == "::1"
    assert config.store.path == "/a b/c"


def test_environment_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^server\.port = 'abc': must be an integer$"):
        load_config(environ={"APPLIANCE_SERVER__PORT": "abc"})
    with pytest.raises(ConfigError, match=r"^server\.prot: unknown key"):
        load_config(environ={"APPLIANCE_SERVER__PROT": "1"})


def test_precedence(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [server]
        port = 9000
        host = "10.0.0.1"
        [store]
        path = "from-file"
        """,
    )
    env = {"APPLIANCE_SERVER__PORT": "9100", "APPLIANCE_STORE__PATH": "from-env"}
    overrides = {"server": {"port": 9200}}
    assert load_config(environ={}).server.port == 8080
    assert load_config(path, environ={}).server.port == 9000
    assert load_config(path, environ=env).server.port == 9100
    config = load_config(path, overrides, environ=env)
    assert config.server.port == 9200
    # each layer replaces single keys, not whole tables
    assert config.server.host == "10.0.0.1"
    assert config.store.path == "from-env"
    assert config.server.max_body_bytes == ServerConfig().max_body_bytes
    # the environment alone also beats the defaults
    assert load_config(environ=env).store.path == "from-env"


def test_environ_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIANCE_SERVER__PORT", "9300")
    assert load_config().server.port == 9300
    assert load_config(environ={}).server.port == 8080


def test_model_tables_merge_over_model_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [model_defaults]
        device = "cpu"
        max_concurrency = 2
        timeout_s = 5

        [model_defaults.onnx]
        intra_op_threads = 2
        graph_optimization = "basic"

        [models.sample]
        max_concurrency = 4

        [models.sample.onnx]
        inter_op_threads = 3

        [models.fast]
        device = "auto"
        """,
    )
    config = load_config(path, environ={"APPLIANCE_MODELS__FAST__TIMEOUT_S": "0.5"})
    sample = config.model_config("sample")
    assert sample == ModelConfig(
        device="cpu",
        max_concurrency=4,
        timeout_s=5.0,
        onnx=OnnxConfig(intra_op_threads=2, inter_op_threads=3, graph_optimization="basic"),
    )
    fast = config.model_config("fast")
    assert (fast.device, fast.max_concurrency, fast.timeout_s) == ("auto", 2, 0.5)
    assert fast.onnx == OnnxConfig(intra_op_threads=2, graph_optimization="basic")
    other = config.model_config("other")
    assert other == config.model_defaults
    # the raw tables are kept as written
    assert config.models["sample"] == {"max_concurrency": 4, "onnx": {"inter_op_threads": 3}}


def test_model_config_returns_a_fresh_object(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[models.m]\nmax_queue = 5\n"), environ={})
    first = config.model_config("m")
    first.max_queue = 99
    first.onnx.intra_op_threads = 7
    assert config.model_config("m").max_queue == 5
    assert config.model_defaults.onnx.intra_op_threads == 0


BAD_FILES = [
    # (id, TOML text, the exact message or, ending in '…', its start)
    (
        "unknown key",
        "[server]\nprot = 8080\n",
        "server.prot: unknown key (known keys: host, port, …",
    ),
    ("unknown section", "[sever]\nport = 1\n", "sever: unknown key (known keys: server, store, …"),
    ("wrong type", '[server]\nport = "abc"\n', "server.port = 'abc': must be an integer"),
    ("bool for int", "[server]\nport = true\n", "server.port = True: must be an integer"),
    ("float for int", "[server]\nport = 80.5\n", "server.port = 80.5: must be an integer"),
    ("port range", "[server]\nport = 70000\n", "server.port = 70000: must be between 0 and 65535"),
    ("negative", "[server]\nport = -1\n", "server.port = -1: must not be negative"),
    (
        "body limit",
        "[server]\nmax_body_bytes = 100\n",
        "server.max_body_bytes = 100: must be at least 1024",
    ),
    (
        "not a bool",
        '[server]\naccess_log = "yes"\n',
        "server.access_log = 'yes': must be true or false",
    ),
    ("not a string", "[store]\npath = 5\n", "store.path = 5: must be a string"),
    ("not a table", "server = 5\n", "server = 5: must be a table"),
    (
        "concurrency",
        "[model_defaults]\nmax_concurrency = 0\n",
        "model_defaults.max_concurrency = 0: must be at least 1",
    ),
    (
        "timeout zero",
        "[model_defaults]\ntimeout_s = 0\n",
        "model_defaults.timeout_s = 0.0: must be greater than 0",
    ),
    (
        "timeout nan",
        "[model_defaults]\ntimeout_s = nan\n",
        "model_defaults.timeout_s = nan: must be a number",
    ),
    (
        "timeout text",
        '[model_defaults]\ntimeout_s = "1s"\n',
        "model_defaults.timeout_s = '1s': must be a number",
    ),
    (
        "bad literal",
        '[model_defaults]\ndevice = "tpu"\n',
        "model_defaults.device = 'tpu': must be one of 'auto', 'cuda', 'cpu'",
    ),
    (
        "log level",
        '[server]\nlog_level = "verbose"\n',
        "server.log_level = 'verbose': must be one of 'debug', 'info', 'warning', 'error'",
    ),
    (
        "nested literal",
        '[model_defaults.onnx]\ngraph_optimization = "max"\n',
        "model_defaults.onnx.graph_optimization = 'max': must be one of 'disable', 'basic', "
        "'extended', 'all'",
    ),
    (
        "nested type",
        "[model_defaults.onnx]\nintra_op_threads = 1.5\n",
        "model_defaults.onnx.intra_op_threads = 1.5: must be an integer",
    ),
    (
        "model unknown key",
        '[models.x]\ndevcie = "cpu"\n',
        "models.x.devcie: unknown key (known keys: device, …",
    ),
    (
        "model range",
        "[models.x]\nmax_concurrency = 0\n",
        "models.x.max_concurrency = 0: must be at least 1",
    ),
    (
        "model timeout",
        "[models.x]\ntimeout_s = 0\n",
        "models.x.timeout_s = 0.0: must be greater than 0",
    ),
    (
        "model literal",
        '[models.x]\ndevice = "gpu"\n',
        "models.x.device = 'gpu': must be one of 'auto', 'cuda', 'cpu'",
    ),
    (
        "model nested",
        "[models.x.onnx]\nthreads = 2\n",
        "models.x.onnx.threads: unknown key (known keys: …",
    ),
    ("model not a table", "[models]\nx = 3\n", "models.x = 3: must be a table"),
    ("models not a table", "models = 3\n", "models = 3: must be a table"),
]


@pytest.mark.parametrize(
    ("text", "expected"), [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES]
)
def test_errors_name_the_key_and_the_value(tmp_path: Path, text: str, expected: str) -> None:
    message = config_error(tmp_path, text)
    if expected.endswith("…"):
        assert message.startswith(expected[:-1]), message
    else:
        assert message == expected


def test_overrides_are_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"^server\.port = 70000: must be between 0 and 65535$"):
        load_config(None, {"server": {"port": 70000}}, environ={})
    with pytest.raises(ConfigError, match=r"^models\.m\.max_queue = -1: must not be negative$"):
        load_config(None, {"models": {"m": {"max_queue": -1}}}, environ={})


def test_edge_values_are_accepted(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
            [server]
            port = 0
            max_body_bytes = 1024
            [model_defaults]
            max_queue = 0
            timeout_s = 0.001
            """,
        ),
        environ={},
    )
    assert (config.server.port, config.server.max_body_bytes) == (0, 1024)
    assert (config.model_defaults.max_queue, config.model_defaults.timeout_s) == (0, 0.001)
    assert load_config(None, {"server": {"port": 65535}}, {}).server.port == 65535


def test_bad_toml_syntax(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\nport = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.message.startswith(f"config file {str(path)!r}: invalid TOML: ")
    assert "line 1" in info.value.message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert (
        info.value.message == f"config file {str(path)!r}: cannot read: No such file or directory"
    )


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[server]\nhost = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(path, environ={})


# -- the bearer token --------------------------------------------------------------------------


def test_token_inline() -> None:
    config = load_config(None, {"server": {"auth_token": "s3cret"}}, environ={})
    assert config.token() == "s3cret"


def test_token_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("  from-file \n")
    config = load_config(None, {"server": {"auth_token_file": str(token)}}, environ={})
    assert config.token() == "from-file"  # surrounding whitespace and the newline go
    both = {"server": {"auth_token_file": str(token), "auth_token": "inline"}}
    assert load_config(None, both, environ={}).token() == "from-file"


def test_token_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "missing-token"
    config = load_config(None, {"server": {"auth_token_file": str(path)}}, environ={})
    with pytest.raises(ConfigError) as info:
        config.token()
    assert info.value.message == (
        f"server.auth_token_file = {str(path)!r}: cannot read: No such file or directory"
    )


@pytest.mark.parametrize("content", ["", "\n", "   \n\t\n"])
def test_token_file_empty(tmp_path: Path, content: str) -> None:
    path = tmp_path / "token"
    path.write_text(content)
    config = load_config(None, {"server": {"auth_token_file": str(path)}}, environ={})
    with pytest.raises(ConfigError) as info:
        config.token()
    assert info.value.message == f"server.auth_token_file = {str(path)!r}: the file is empty"


def test_batching_settings_per_model_and_from_the_environment() -> None:
    config = load_config(
        None,
        {"models": {"a": {"batching": {"enabled": True, "preferred_batch_sizes": [8, 4]}}}},
        environ={"APPLIANCE_MODELS__B__BATCHING__ENABLED": "false"},
    )
    a, b, c = (config.model_config(n).batching for n in "abc")
    assert (a.enabled, a.preferred_batch_sizes, a.max_batch_size) == (True, [8, 4], 32)
    assert b.enabled is False
    assert (c.enabled, c.max_queue_delay_us, c.preferred_batch_sizes) == ("auto", 0.0, [])


@pytest.mark.parametrize(
    ("batching", "message"),
    [
        ({"enabled": 1}, "enabled = 1: must be one of 'auto', true, false"),
        ({"enabled": "yes"}, "enabled = 'yes': must be one of 'auto', true, false"),
        ({"max_batch_size": 0}, "max_batch_size = 0: must be at least 1"),
        ({"preferred_batch_sizes": 4}, "preferred_batch_sizes = 4: must be a list"),
        ({"preferred_batch_sizes": ["4"]}, "preferred_batch_sizes[0] = '4': must be an integer"),
        ({"preferred_batch_sizes": [64]}, "each must be between 1 and max_batch_size"),
        ({"max_queue_delay_us": -1}, "max_queue_delay_us = -1: must not be negative"),
    ],
)
def test_bad_batching_settings_name_the_key(batching: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {"model_defaults": {"batching": batching}}, environ={})
    assert info.value.message.startswith("model_defaults.batching.") and message in (
        info.value.message
    )


def test_worker_nice_range() -> None:
    assert load_config(None, {}, environ={}).model_defaults.worker_nice == 5
    with pytest.raises(ConfigError, match="worker_nice = 20: must be between 0 and 19"):
        load_config(None, {"model_defaults": {"worker_nice": 20}}, environ={})


# -- constraints declared on the fields, and the sections' cross-field checks -------------------

RULE = "use 1-128 letters, digits, '_', '-' or '.', starting with a letter or digit, with no '..'"
ONE_VARIANT = {"variants": [{"model": "m"}]}
CONSTRAINTS = [
    # (override, the exact message): one per kind of constraint, and each section check
    ({"server": {"port": 65536}}, "server.port = 65536: must be between 0 and 65535"),
    ({"hub": {"upload_batch": 0}}, "hub.upload_batch = 0: must be between 1 and 500"),
    ({"model_defaults": {"gguf": {"instances": 0}}},
     "model_defaults.gguf.instances = 0: must be at least 1"),
    ({"model_defaults": {"text": {"max_chars": 0}}},
     "model_defaults.text.max_chars = 0: must be at least 1"),
    ({"model_defaults": {"image": {"max_images": 0}}},
     "model_defaults.image.max_images = 0: must be at least 1"),
    ({"hub": {"poll_interval_s": 0}}, "hub.poll_interval_s = 0.0: must be greater than 0"),
    ({"hub": {"poll_jitter": 1}}, "hub.poll_jitter = 1.0: must be below 1"),
    ({"hub": {"error_rate_threshold": 1.5}},
     "hub.error_rate_threshold = 1.5: must be between 0 and 1"),
    ({"models": {"m": {"breaker": {"error_rate": 0}}}},
     "models.m.breaker.error_rate = 0.0: must be a fraction above 0 and at most 1"),
    ({"mqtt": {"qos": 2}}, "mqtt.qos = 2: must be 0 or 1"),
    ({"mqtt": {"url": "tcp://broker"}}, "mqtt.url = 'tcp://broker': must start with mqtt:// or mqtts://"),
    ({"hub": {"url": "ftp://hub"}}, "hub.url = 'ftp://hub': must start with http:// or https://"),
    ({"tasks": {"t": {"variants": []}}},
     "tasks.t.variants = []: must list at least one {model = \"NAME\", weight = W}"),
    ({"tasks": {"t": {"variants": [{"model": "m", "weight": float("inf")}]}}},
     "tasks.t.variants[0].weight = inf: must be a finite number greater than 0"),
    ({"tasks": {"t": {"variants": [{"weight": 1}]}}},
     f"tasks.t.variants[0].model = '': must name a model: {RULE} (it is empty)"),
    ({"tasks": {"t": {**ONE_VARIANT, "fallback": "a..b"}}},
     f"tasks.t.fallback = 'a..b': must name a model (or be empty): {RULE} (it contains '..')"),
    ({"tasks": {"t": {**ONE_VARIANT, "sticky_key": "1st"}}},
     "tasks.t.sticky_key = '1st': must be a parameter name: a letter, then up to 63 letters, "
     "digits and '_'"),
    ({"tasks": {"t": {**ONE_VARIANT, "prompt_template": "{0}"}}},
     "tasks.t.prompt_template = '{0}': {0}: fields must be plain names like {device}"),
    ({"tasks": {"a/b": ONE_VARIANT}}, f"tasks.a/b: invalid task name: {RULE} ('/' is not allowed)"),
    ({"models": {"ACTIVE": {}}},
     f"models.ACTIVE: invalid model name: {RULE} ('ACTIVE' is reserved for the model store's own "
     "files)"),
    ({"mqtt": {"device_id": "cam 7"}},
     "mqtt.device_id = 'cam 7': must be a device id (or empty): use 1-64 letters, digits, '_', "
     "'-' or '.', starting with a letter or digit, with no '..' (' ' is not allowed)"),
    ({"mqtt": {"reconnect_min_s": 5, "reconnect_max_s": 1}},
     "mqtt.reconnect_max_s = 1.0: must not be below reconnect_min_s"),
    ({"models": {"m": {"retry_backoff_s": 2}}},
     "models.m.retry_backoff_max_s = 1.0: must not be below retry_backoff_s"),
    ({"model_defaults": {"batching": {"max_batch_size": 8, "preferred_batch_sizes": [4, 16]}}},
     "model_defaults.batching.preferred_batch_sizes = [4, 16]: each must be between 1 and "
     "max_batch_size (8)"),
]  # fmt: skip


@pytest.mark.parametrize(("override", "message"), CONSTRAINTS, ids=[c[1] for c in CONSTRAINTS])
def test_constraints_name_the_key_the_value_and_the_reason(
    override: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, override, environ={})
    assert info.value.message == message


def test_constraints_accept_their_edges() -> None:
    config = load_config(
        None,
        {
            "server": {"port": 65535},
            "hub": {"upload_batch": 500, "error_rate_threshold": 1, "poll_jitter": 0.99},
            "mqtt": {"qos": 0, "url": "mqtts://b", "reconnect_min_s": 1, "reconnect_max_s": 1},
            "model_defaults": {
                "worker_nice": 19,
                "retry_backoff_s": 1,
                "breaker": {"error_rate": 1},
                "batching": {"max_batch_size": 8, "preferred_batch_sizes": [1, 8]},
            },
            "tasks": {"t" * 128: {"variants": [{"model": "m" * 128}], "fallback": ""}},
            "models": {"m" * 128: {}},
        },
        environ={},
    )
    assert config.model_defaults.batching.preferred_batch_sizes == [1, 8]
    assert config.task_config("t" * 128).variants[0].model == "m" * 128


def test_every_constraint_is_declared_on_its_field() -> None:
    """The checker reads field metadata: the constraint sits next to the field it guards."""
    meta = {f.name: f.metadata for f in dataclasses.fields(ModelConfig)}
    assert set(meta["max_concurrency"]) == {"appliance.config.check"}
    assert meta["max_concurrency"]["appliance.config.check"](0) == "must be at least 1"
    assert meta["max_concurrency"]["appliance.config.check"](1) is None
    assert not meta["retries"]  # no constraint beyond its type
