"""The .deb (build/make_deb.py) from a fake one-folder bundle, its systemd unit and default config.

Everything is inspected with dpkg-deb itself; nothing is installed.
"""

from __future__ import annotations

import configparser
import dataclasses
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import appliance
from appliance.config import (
    BatchingConfig,
    BreakerConfig,
    Config,
    GgufConfig,
    GrpcConfig,
    HubConfig,
    ModelConfig,
    MqttConfig,
    OnnxConfig,
    PluginsConfig,
    ServerConfig,
    StoreConfig,
    WebSocketConfig,
    load_config,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
MAKE_DEB = ROOT / "build" / "make_deb.py"
UNIT = ROOT / "packaging" / "appliance.service"
CONFIG = ROOT / "packaging" / "config.toml"

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb not installed")


def _make_deb_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_deb", MAKE_DEB)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_deb: Any = _make_deb_module()


def fake_bundle(parent: Path, version: str = appliance.__version__) -> Path:
    """What PyInstaller's one-folder build looks like: the executable, _internal/ with libraries."""
    bundle = parent / "appliance"
    (bundle / "_internal" / "numpy").mkdir(parents=True)
    exe = bundle / "appliance"
    exe.write_text(f'#!/bin/sh\necho "appliance {version}"\n')
    exe.chmod(0o755)
    (bundle / "_internal" / "libpython3.so").write_bytes(b"\x7fELF" + bytes(range(256)) * 4)
    (bundle / "_internal" / "base_library.zip").write_bytes(b"PK\x05\x06" + b"\0" * 18)
    (bundle / "_internal" / "numpy" / "__init__.pyc").write_bytes(b"\x00" * 64)
    (bundle / "_internal" / "libpython3.11.so").symlink_to("libpython3.so")
    return bundle


def run_make_deb(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(MAKE_DEB), *map(str, args)], capture_output=True, text=True, cwd=ROOT
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def host_arch() -> str:
    return subprocess.run(
        ["dpkg", "--print-architecture"], check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb not installed")
    work = tmp_path_factory.mktemp("deb")
    bundle = fake_bundle(work / "dist")
    out = work / "out"
    proc = run_make_deb("--bundle", bundle, "--out", out)
    deb = Path(proc.stdout.strip())
    assert deb == out / f"appliance_{appliance.__version__}_{host_arch()}.deb"
    tree = work / "tree"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
    control = work / "control"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
    return {"deb": deb, "tree": tree, "control": control, "work": work}


def listing(deb: Path) -> dict[str, str]:
    """`dpkg-deb -c`: path -> permissions column (and ' -> target' kept for symlinks)."""
    out = subprocess.run(["dpkg-deb", "-c", str(deb)], check=True, capture_output=True, text=True)
    entries = {}
    for line in out.stdout.splitlines():
        perms, owner, _size, _date, _time, name = line.split(None, 5)
        assert owner == "root/root", line
        entries[name.split(" -> ")[0]] = perms + (
            " -> " + name.split(" -> ")[1] if " -> " in name else ""
        )
    return entries


# -- the package ------------------------------------------------------------------------------
def test_package_holds_exactly_the_expected_paths(built: dict[str, Path]) -> None:
    entries = listing(built["deb"])
    assert sorted(entries) == sorted(
        [
            "./",
            "./etc/",
            "./etc/appliance/",
            "./etc/appliance/config.toml",
            "./lib/",
            "./lib/systemd/",
            "./lib/systemd/system/",
            "./lib/systemd/system/appliance.service",
            "./opt/",
            "./opt/appliance/",
            "./opt/appliance/appliance",
            "./opt/appliance/_internal/",
            "./opt/appliance/_internal/base_library.zip",
            "./opt/appliance/_internal/libpython3.so",
            "./opt/appliance/_internal/libpython3.11.so",
            "./opt/appliance/_internal/numpy/",
            "./opt/appliance/_internal/numpy/__init__.pyc",
            "./usr/",
            "./usr/bin/",
            "./usr/bin/appliance",
        ]
    )
    assert entries["./usr/bin/appliance"] == "lrwxrwxrwx -> /opt/appliance/appliance"
    assert entries["./opt/appliance/_internal/libpython3.11.so"].endswith("-> libpython3.so")
    assert entries["./opt/appliance/appliance"] == "-rwxr-xr-x"
    assert entries["./etc/appliance/config.toml"] == "-rw-r--r--"
    assert entries["./lib/systemd/system/appliance.service"] == "-rw-r--r--"
    assert all(p in ("drwxr-xr-x",) for n, p in entries.items() if n.endswith("/"))
    # the installed command runs the bundle
    tree = built["tree"]
    assert (tree / "usr/bin/appliance").readlink() == Path("/opt/appliance/appliance")
    version = subprocess.run(
        [str(tree / "opt/appliance/appliance"), "--version"], capture_output=True, text=True
    )
    assert version.stdout.split() == ["appliance", appliance.__version__]


def test_control_fields(built: dict[str, Path]) -> None:
    def field(name: str) -> str:
        out = subprocess.run(
            ["dpkg-deb", "-f", str(built["deb"]), name], check=True, capture_output=True, text=True
        )
        return out.stdout.strip()

    assert field("Package") == "appliance"
    assert field("Version") == make_deb.debian_version(appliance.__version__)
    assert field("Architecture") == host_arch()
    assert re.fullmatch(r".+ <[^@\s]+@[^>\s]+>", field("Maintainer"))
    assert field("Depends") == "adduser"  # the bundle brings its own Python
    assert int(field("Installed-Size")) > 0
    description = field("Description")
    assert description.startswith("edge inference server")
    assert "systemctl start appliance" in description


def test_conffiles_and_maintainer_scripts(built: dict[str, Path]) -> None:
    control = built["control"]
    assert (control / "conffiles").read_text() == "/etc/appliance/config.toml\n"
    assert sorted(p.name for p in control.iterdir()) == [
        "conffiles",
        "control",
        "postinst",
        "postrm",
        "prerm",
    ]
    for name in ("postinst", "prerm", "postrm"):
        script = control / name
        assert script.stat().st_mode & 0o777 == 0o755
        assert script.read_text().startswith("#!/bin/sh\n")
        subprocess.run(["sh", "-n", str(script)], check=True)
        if shutil.which("shellcheck"):
            subprocess.run(["shellcheck", "-s", "sh", str(script)], check=True)
    # Enabled, never started on a fresh install: the only start is inside the block that runs
    # after an upgrade whose prerm stopped a running service.
    postinst = (control / "postinst").read_text()
    block = re.search(r'(?ms)^    if \[ -e "\$RESTART_FLAG" \]; then\n(.*?)^    fi\n', postinst)
    assert block is not None
    outside = re.sub(r"(?m)^\s*#.*$", "", postinst.replace(block.group(0), ""))
    assert re.search(r"\bstart\b", block.group(1))
    assert not re.search(r"(systemctl|deb-systemd-invoke)[^\n]*\bstart\b", outside)


class Stubs:
    """Runs a maintainer script with every command it may call replaced by a logging stub.

    PATH holds only the stubs, so a command the script calls without a stub fails the script
    (and the test) instead of touching this machine.
    """

    COMMANDS = (
        "adduser", "deluser", "delgroup", "getent", "install", "rm", "rmdir", "touch",
        "systemctl", "deb-systemd-helper", "deb-systemd-invoke",
    )  # fmt: skip

    def __init__(self, tmp_path: Path, known: str = "", was_enabled: bool = True) -> None:
        self.bin = tmp_path / "stubs"
        self.bin.mkdir()
        self.log = tmp_path / "calls.log"
        for name in self.COMMANDS:
            body = f'echo "{name} $*" >> "$LOG"\n'
            if name == "getent":  # known entries, e.g. "passwd:appliance group:video"
                body += 'case " $KNOWN " in *" $1:$2 "*) exit 0;; esac\nexit 2\n'
            if name == "deb-systemd-helper":
                body += '[ "$2" = was-enabled ] && exit "$WAS_ENABLED"\nexit 0\n'
            (self.bin / name).write_text("#!/bin/sh\n" + body)
            (self.bin / name).chmod(0o755)
        self.env = {"PATH": str(self.bin), "LOG": str(self.log), "KNOWN": known}
        self.env["WAS_ENABLED"] = "0" if was_enabled else "1"

    def run(self, script: Path, *args: str) -> list[str]:
        self.log.write_text("")
        proc = subprocess.run(
            ["/bin/sh", str(script), *args], env=self.env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        return [c for c in self.log.read_text().splitlines() if not c.startswith("getent ")]


needs_no_systemd = pytest.mark.skipif(
    Path("/run/systemd/system").exists(), reason="systemd runs here: the scripts would use it"
)


@needs_no_systemd
def test_postinst_fresh_install_creates_the_user_and_enables_without_starting(
    built: dict[str, Path], tmp_path: Path
) -> None:
    calls = Stubs(tmp_path, known="group:video").run(built["control"] / "postinst", "configure", "")
    assert calls == [
        "adduser --system --group --home /var/lib/appliance --no-create-home"
        " --shell /usr/sbin/nologin --quiet appliance",
        "adduser --quiet appliance video",  # GPU device nodes; no group render here
        "install -d -o appliance -g appliance -m 0750 /var/lib/appliance /var/lib/appliance/models",
        "deb-systemd-helper unmask appliance.service",
        "deb-systemd-helper --quiet was-enabled appliance.service",
        "deb-systemd-helper enable appliance.service",
    ]


@needs_no_systemd
def test_postinst_upgrade_keeps_the_user_and_a_disabled_service(
    built: dict[str, Path], tmp_path: Path
) -> None:
    stubs = Stubs(tmp_path, known="passwd:appliance group:appliance", was_enabled=False)
    calls = stubs.run(built["control"] / "postinst", "configure", "0.0.9")
    assert not any(c.startswith("adduser") for c in calls)
    assert "deb-systemd-helper update-state appliance.service" in calls
    assert "deb-systemd-helper enable appliance.service" not in calls


@needs_no_systemd
def test_postrm_deletes_models_and_user_only_on_purge(
    built: dict[str, Path], tmp_path: Path
) -> None:
    stubs = Stubs(tmp_path, known="passwd:appliance group:appliance")
    postrm = built["control"] / "postrm"
    assert stubs.run(postrm, "remove") == ["deb-systemd-helper mask appliance.service"]
    assert stubs.run(postrm, "purge") == [
        "deb-systemd-helper purge appliance.service",
        "deb-systemd-helper unmask appliance.service",
        "rm -rf /var/lib/appliance",
        "deluser --system --quiet appliance",
        "delgroup --system --quiet appliance",
        "rmdir /etc/appliance",
    ]
    assert stubs.run(postrm, "upgrade", "0.2.0") == []
    assert stubs.run(built["control"] / "prerm", "remove") == []  # no running systemd here


def test_no_build_machine_paths_in_the_package(built: dict[str, Path]) -> None:
    needles = [str(ROOT).encode(), str(built["work"]).encode()]
    for base in (built["tree"], built["control"]):
        for path in base.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                for needle in needles:
                    assert needle not in data, f"{path} contains {needle!r}"


def test_installed_unit_and_config_are_the_packaging_files(built: dict[str, Path]) -> None:
    tree = built["tree"]
    assert (tree / "lib/systemd/system/appliance.service").read_bytes() == UNIT.read_bytes()
    assert (tree / "etc/appliance/config.toml").read_bytes() == CONFIG.read_bytes()


@needs_dpkg
def test_a_path_of_the_build_machine_in_the_bundle_is_refused(tmp_path: Path) -> None:
    bundle = fake_bundle(tmp_path)
    (bundle / "_internal" / "RECORD").write_text(f"file://{bundle}/x.py\n")
    proc = run_make_deb("--bundle", bundle, "--out", tmp_path / "out", check=False)
    assert proc.returncode == 1
    assert "opt/appliance/_internal/RECORD: contains" in proc.stderr
    assert not list((tmp_path / "out").glob("*.deb"))
    proc = run_make_deb(
        "--bundle", bundle, "--out", tmp_path / "out", "--allow-bundle-leaks", check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "warning: build-machine path in the bundle" in proc.stderr


@needs_dpkg
def test_bad_bundles_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_make_deb("--bundle", empty, "--out", tmp_path / "out", check=False)
    assert proc.returncode == 1 and "one-folder" in proc.stderr

    stale = fake_bundle(tmp_path / "stale", version="0.0.1")
    proc = run_make_deb("--bundle", stale, "--out", tmp_path / "out", check=False)
    assert proc.returncode == 1 and "expected version" in proc.stderr

    escaping = fake_bundle(tmp_path / "escaping")
    (escaping / "_internal" / "libc.so").symlink_to("/lib/libc.so")
    proc = run_make_deb("--bundle", escaping, "--out", tmp_path / "out", check=False)
    assert proc.returncode == 1 and "leaves the bundle" in proc.stderr


@needs_dpkg
def test_cross_architecture_package(tmp_path: Path) -> None:
    arch = "arm64" if host_arch() != "arm64" else "amd64"
    # The bundle cannot run here, so it is not asked for its version.
    bundle = fake_bundle(tmp_path, version="not-run")
    proc = run_make_deb(
        "--bundle", bundle, "--out", tmp_path, "--arch", arch, "--version", "2.0rc1"
    )
    deb = Path(proc.stdout.strip())
    assert deb.name == f"appliance_2.0~rc1_{arch}.deb"


@pytest.mark.parametrize(
    ("pep440", "debian"),
    [("0.1.0", "0.1.0"), ("1.0rc1", "1.0~rc1"), ("1.0.dev3", "1.0~dev3"), ("2.1b2", "2.1~b2")],
)
def test_debian_version(pep440: str, debian: str) -> None:
    assert make_deb.debian_version(pep440) == debian


# -- the systemd unit -------------------------------------------------------------------------
def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=True, interpolation=None, empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def test_unit_is_a_hardened_notify_service() -> None:
    service = _unit()["Service"]
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30",
        "ExecStart": "/usr/bin/appliance serve --config /etc/appliance/config.toml",
        "Restart": "on-failure",
        "RestartSec": "2",
        "User": "appliance",
        "Group": "appliance",
        "StateDirectory": "appliance",
        "ConfigurationDirectory": "appliance",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ReadWritePaths": "/var/lib/appliance",
        "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
    }
    assert {k: service.get(k) for k in expected} == expected
    # These break onnxruntime's JIT or the GPU device nodes.
    for key in ("MemoryDenyWriteExecute", "PrivateDevices", "DevicePolicy", "ProtectClock"):
        assert key not in service
    assert _unit()["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart's program exists: point it at a stand-in, change nothing else.
    exe = fake_bundle(tmp_path) / "appliance"
    text = UNIT.read_text()
    assert text.count("ExecStart=/usr/bin/appliance ") == 1
    unit = tmp_path / "appliance.service"
    unit.write_text(text.replace("ExecStart=/usr/bin/appliance ", f"ExecStart={exe} "))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "appliance.service" not in proc.stderr, proc.stderr


# -- the default config -----------------------------------------------------------------------
def test_default_config_loads_and_sets_the_device_paths() -> None:
    config = load_config(CONFIG, environ={})
    assert config.store.path == "/var/lib/appliance/models"
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8080)
    defaults = Config()
    defaults.store.path = "/var/lib/appliance/models"
    assert config == defaults


def _uncommented(text: str) -> str:
    """The file with every `# key = value` line made live (examples are indented further)."""
    return re.sub(r"(?m)^# (\w+ = .*)$", r"\1", text)


def test_default_config_shows_every_key_with_its_true_default(tmp_path: Path) -> None:
    live = _uncommented(CONFIG.read_text())
    data = tomllib.loads(live)

    def names(cls: Any, skip: tuple[str, ...] = ()) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)} - set(skip)

    assert set(data) == {
        "server", "store", "model_defaults", "mqtt", "websocket", "grpc", "hub", "plugins"
    }  # fmt: skip
    assert set(data["grpc"]) == names(GrpcConfig)
    assert set(data["plugins"]) == names(PluginsConfig)
    assert set(data["mqtt"]) == names(MqttConfig)
    assert set(data["websocket"]) == names(WebSocketConfig)
    assert set(data["hub"]) == names(HubConfig)
    assert set(data["model_defaults"]["gguf"]) == names(GgufConfig)
    assert set(data["server"]) == names(ServerConfig)
    assert set(data["store"]) == names(StoreConfig)
    assert set(data["model_defaults"]) == names(ModelConfig)  # including the onnx table
    assert set(data["model_defaults"]["onnx"]) == names(OnnxConfig)
    assert set(data["model_defaults"]["batching"]) == names(BatchingConfig)
    assert set(data["model_defaults"]["breaker"]) == names(BreakerConfig)
    path = tmp_path / "live.toml"
    path.write_text(live)
    # Uncommenting changes nothing: each commented value is the real default.
    assert load_config(path, environ={}) == load_config(CONFIG, environ={})


def test_every_key_has_a_one_line_explanation() -> None:
    lines = CONFIG.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^(# )?\w+ = ", line):
            assert lines[i - 1].startswith("# ") and not re.match(r"^# \w+ = ", lines[i - 1]), (
                f"no explanation above line {i + 1}: {line}"
            )
