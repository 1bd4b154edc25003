"""A real mosquitto broker for tests, in its own process, with its files in tmp_path.

`Mosquitto` writes a config (a listener on a free loopback port, anonymous access or a password
file, TCP_NODELAY, persistence in tmp_path, optionally a TLS listener), starts `mosquitto -c`,
waits until the port accepts connections, and can be stopped (SIGTERM: it saves its persistence
file) and started again on the same port. The fixtures `mosquitto` (one started broker) and
`mosquitto_factory` stop every broker they made; a test module imports them with
`from tests.support.mosquitto import mosquitto_factory_fixture, mosquitto_fixture  # noqa: F401`.

Where the binary is missing the tests are skipped, except in CI (CI set), where that fails.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

#: Debian installs the broker in /usr/sbin, which is not on a normal user's PATH.
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in _SBIN:
        candidate = Path(d) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def require_tool(name: str, why: str = "") -> str:
    """The tool's path; skip the test where it is missing, fail instead under CI."""
    path = find_tool(name)
    if path is None:
        msg = f"`{name}` is not installed{why} (apt-get install mosquitto mosquitto-clients)"
        if os.environ.get("CI"):
            pytest.fail(f"CI needs it: {msg}")
        pytest.skip(msg)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class Certificates:
    """A self-made CA and a server certificate for 127.0.0.1 and localhost."""

    ca: Path
    cert: Path
    key: Path


def make_certificates(out: Path) -> Certificates:
    """A CA and a server certificate signed by it (openssl CLI; nothing is downloaded)."""
    openssl = require_tool("openssl", " (needed to make test certificates)")
    out.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (
        out / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt")
    )
    ext = out / "server.ext"
    ext.write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
        "/CN=appliance test CA", "-keyout", str(ca_key), "-out", str(ca))  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", str(key), "-out", str(csr))  # fmt: skip
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert))  # fmt: skip
    return Certificates(ca, cert, key)


class Mosquitto:
    """One broker; `start()` and `stop()` may alternate, always on the same port(s)."""

    def __init__(
        self,
        root: Path,
        users: dict[str, str] | None = None,
        tls: Certificates | None = None,
        debug: bool = False,
    ) -> None:
        self.binary = require_tool("mosquitto")
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls = tls
        self.tls_port = free_port() if tls else None
        self.users = users
        self.debug = debug  # the log names every packet (PINGREQs too)
        self.conf = root / "mosquitto.conf"
        self.log = root / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        data = self.root / "data"
        data.mkdir(exist_ok=True)
        lines = [
            # When run as root mosquitto drops to the `mosquitto` user, which cannot write here.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            "per_listener_settings false",
            f"listener {self.port} 127.0.0.1",
        ]
        if self.tls is not None:
            lines += [
                f"listener {self.tls_port} 127.0.0.1",
                f"cafile {self.tls.ca}",
                f"certfile {self.tls.cert}",
                f"keyfile {self.tls.key}",
                "require_certificate false",
            ]
        if self.users:
            passwd = require_tool("mosquitto_passwd")
            pw_file = self.root / "passwd"
            for i, (user, password) in enumerate(self.users.items()):
                create = ["-c"] if i == 0 else []
                subprocess.run(
                    [passwd, "-b", *create, str(pw_file), user, password],
                    check=True,
                    capture_output=True,
                )
            pw_file.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {pw_file}"]
        else:
            lines.append("allow_anonymous true")
        lines += [
            "set_tcp_nodelay true",
            "persistence true",
            f"persistence_location {data}/",
            "persistence_file mosquitto.db",
            "autosave_interval 0",  # saved on shutdown (SIGTERM) only
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            *(["log_type debug"] if self.debug else []),
            "connection_messages true",
            "log_timestamp_format %H:%M:%S",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 15.0) -> None:
        """Start the broker and wait until every listener accepts connections."""
        if self.running:
            return
        out = (self.root / "stdout.log").open("ab")
        try:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            out.close()
        ports = [self.port] + ([self.tls_port] if self.tls_port else [])
        deadline = time.monotonic() + timeout
        for port in ports:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"mosquitto exited with {self.proc.returncode}:\n{self.log_text()}"
                        f"{(self.root / 'stdout.log').read_text(errors='replace')}"
                    )
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        self.stop(signal.SIGKILL)
                        raise RuntimeError(
                            f"mosquitto never listened on {port}:\n{self.log_text()}"
                        ) from None
                    time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the broker; SIGTERM lets it write its persistence file first."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


MosquittoFactory = Callable[..., Mosquitto]


@pytest.fixture(name="mosquitto_factory")
def mosquitto_factory_fixture(tmp_path: Path) -> Iterator[MosquittoFactory]:
    """make(users=None, tls=None, start=True, debug=False) -> a Mosquitto; all are stopped at
    teardown."""
    brokers: list[Mosquitto] = []

    def make(
        users: dict[str, str] | None = None,
        tls: Certificates | None = None,
        start: bool = True,
        debug: bool = False,
    ) -> Mosquitto:
        broker = Mosquitto(tmp_path / f"mosquitto{len(brokers)}", users=users, tls=tls, debug=debug)
        brokers.append(broker)
        if start:
            broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.stop()


@pytest.fixture(name="mosquitto")
def mosquitto_fixture(mosquitto_factory: MosquittoFactory) -> Mosquitto:
    """A started broker with anonymous access on a free loopback port."""
    return mosquitto_factory()
