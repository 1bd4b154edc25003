"""Debian's nginx serving static directories with the packaged mirror configuration.

The server block of packaging/nginx/mirror.conf is used as shipped, with only its `listen` port
and `root` substituted, once per directory, inside a generated nginx.conf whose pid, logs and
temp paths lie in a temp dir. As root, workers run as nobody (the `user` directive), so the
served directories must be readable by others: `world_readable_dir()` makes one.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
MIRROR_CONF = ROOT / "packaging" / "nginx" / "mirror.conf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def world_readable_dir(prefix: str) -> Path:
    """A directory nginx's unprivileged workers can read (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def server_block(port: int, root: Path) -> str:
    text = MIRROR_CONF.read_text(encoding="utf-8")
    text, n_listen = re.subn(r"(?m)^(\s*)listen\s+\S+;", rf"\1listen 127.0.0.1:{port};", text)
    text, n_root = re.subn(r"(?m)^(\s*)root\s+\S+;", rf"\1root {root};", text)
    assert (n_listen, n_root) == (1, 1), "mirror.conf must have one listen and one root"
    return text


class Nginx:
    """One nginx process with one mirror server block per served directory."""

    def __init__(self, workdir: Path, roots: list[Path]) -> None:
        if not Path(NGINX).exists():
            pytest.skip("nginx is not installed (apt-get install nginx-light)")
        self.workdir = workdir
        self.roots = roots
        self.ports = [free_port() for _ in roots]
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.access_log = workdir / "access.log"
        self.error_log = workdir / "error.log"

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def conf(self) -> str:
        w = self.workdir
        user = "user nobody nogroup;\n" if os.geteuid() == 0 else ""
        temps = "".join(
            f"    {kind}_temp_path {w / kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        servers = "\n".join(server_block(p, r) for p, r in zip(self.ports, self.roots, strict=True))
        return (
            f"{user}daemon off;\nworker_processes 1;\npid {w / 'nginx.pid'};\n"
            f"error_log {self.error_log} info;\n"
            "events { worker_connections 256; }\n"
            "http {\n"
            "    log_format mirror '$server_port $request $status $body_bytes_sent "
            '"$http_authorization" "$http_range"\';\n'
            f"    access_log {self.access_log} mirror;\n"
            f"{temps}{servers}\n}}\n"
        )

    def start(self) -> None:
        conf = self.workdir / "nginx.conf"
        conf.write_text(self.conf(), encoding="utf-8")
        self.proc = subprocess.Popen(
            [NGINX, "-c", str(conf), "-p", str(self.workdir), "-e", str(self.error_log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 15
        for port in self.ports:
            while True:
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise RuntimeError(f"nginx exited: {err}{self.errors()}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"nginx did not listen on {port}") from None
                    time.sleep(0.05)

    def errors(self) -> str:
        try:
            return self.error_log.read_text(encoding="utf-8")
        except OSError:
            return ""

    def requests(self) -> list[str]:
        """Access log lines: `PORT METHOD PATH PROTO STATUS BYTES "AUTHORIZATION" "RANGE"`."""
        try:
            return self.access_log.read_text(encoding="utf-8").splitlines()
        except OSError:
            return []

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
