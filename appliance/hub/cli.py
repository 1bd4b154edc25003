"""`appliance hub ...`: run the hub and administer it.

Administrative commands work on the data directory directly (SQLite in WAL mode lets them run
beside a serving hub), or, with `--url`, through the admin API with the admin token.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from ..errors import ApplianceError, ConfigError, InvalidInput

DEFAULT_DATA = "hub-data"
DEFAULT_PORT = 8700


def _data_dir(args: argparse.Namespace) -> Path:
    return Path(args.data or os.environ.get("APPLIANCE_HUB_DATA") or DEFAULT_DATA)


def _config(args: argparse.Namespace) -> Any:
    # Imported here: `appliance serve` on a device never loads python-tuf or the hub.
    try:
        from .repository import Expiry
        from .service import HubConfig
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"the hub needs {exc.name}: install it with pip install 'appliance[hub]'"
        ) from None

    if args.device_cache_size is not None and args.device_cache_size < 0:
        raise ConfigError(f"--device-cache-size must be 0 or more, got {args.device_cache_size}")
    expiry = Expiry(
        root=args.root_expiry_days * 86400.0,
        targets=args.targets_expiry_days * 86400.0,
        snapshot=args.snapshot_expiry_days * 86400.0,
        timestamp=args.timestamp_expiry_hours * 3600.0,
    )
    return HubConfig(
        data_dir=_data_dir(args),
        max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
        max_custom_bytes=int(args.max_acceptance_kb * 1024),
        poll_interval_s=args.poll_interval,
        expiry=expiry,
        database=args.database or os.environ.get("APPLIANCE_HUB_DATABASE") or None,
        event_retention_days=args.event_retention_days or None,
        **({} if args.device_cache_size is None else {"device_cache_size": args.device_cache_size}),
    )


def _hub(args: argparse.Namespace) -> Any:
    from .service import Hub

    return Hub(_config(args))


class _Remote:
    """The admin API over HTTP (for `--url`)."""

    def __init__(self, url: str, token_file: str | None, data: Path) -> None:
        self.url = url.rstrip("/")
        path = Path(token_file) if token_file else data / "admin.token"
        try:
            self.token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the admin token {path}: {exc.strerror}") from None

    def call(
        self,
        method: str,
        path: str,
        body: bytes | Iterator[bytes] | None = None,
        ctype: str = "application/json",
        length: int | None = None,
    ) -> Any:
        import urllib.error  # here: `appliance serve` imports this module for its parser
        import urllib.request

        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": ctype}
        if length is not None:
            headers["Content-Length"] = str(length)
        req = urllib.request.Request(  # noqa: S310 (the operator's own hub URL)
            self.url + path, data=body, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(req, timeout=600) as resp:  # noqa: S310
                return orjson.loads(resp.read())
        except urllib.error.HTTPError as exc:
            try:
                message = orjson.loads(exc.read()).get("error", exc.reason)
            except (orjson.JSONDecodeError, AttributeError):
                message = exc.reason
            err = ApplianceError(f"hub answered {exc.code}: {message}")
            err.status = exc.code
            raise err from None
        except urllib.error.URLError as exc:
            raise ApplianceError(f"cannot reach the hub at {self.url}: {exc.reason}") from None

    def json(self, method: str, path: str, obj: Any = None) -> Any:
        return self.call(method, path, orjson.dumps(obj) if obj is not None else None)

    def publish(self, fields: dict[str, str], file: Path) -> Any:
        """multipart/form-data, the file streamed from disk (models can be gigabytes)."""
        import mimetypes
        import secrets

        boundary = "hub-" + secrets.token_hex(16)
        head = b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n'
            f"{value}\r\n".encode()
            for key, value in fields.items()
        )
        ctype = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        head += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{file.name}"\r\nContent-Type: {ctype}\r\n\r\n'
        ).encode()
        from ..progress import Progress

        tail = f"\r\n--{boundary}--\r\n".encode()
        size = file.stat().st_size

        def body() -> Iterator[bytes]:
            yield head
            done = 0
            with file.open("rb") as f, Progress(f"uploading {file.name}", size) as progress:
                while block := f.read(1 << 20):
                    yield block
                    done += len(block)
                    progress(done)
            yield tail

        return self.call(
            "POST",
            "/api/v1/admin/models",
            body(),
            f"multipart/form-data; boundary={boundary}",
            length=len(head) + size + len(tail),
        )


def _remote(args: argparse.Namespace) -> _Remote | None:
    if getattr(args, "url", None):
        return _Remote(args.url, args.admin_token_file, _data_dir(args))
    return None


def _print_json(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


# -- commands --------------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    from .service import init_hub

    config = _config(args)
    root_dir = Path(args.root_key_dir) if args.root_key_dir else None
    _, root_key_dir = init_hub(config, root_dir)
    print(f"hub initialised in {config.data_dir}")
    print(f"  admin token: {config.admin_token_path} (mode 0600)")
    print(f"  online keys (targets, snapshot, timestamp): {config.key_dir}")
    print(f"  ROOT KEY: {root_key_dir / 'root.pem'}: move it offline; it is needed only to")
    print("  rotate keys (`appliance hub rotate-key`) and before root metadata expires")
    print(f"  trust anchor for devices: {config.data_dir / '1.root.json'}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    config = _config(args)
    if not config.on_postgres:
        print("SQLite: the schema is created when the hub opens it; nothing to migrate")
        return 0
    from .pgstore import describe, migrate

    applied = migrate(config.database)
    done = ", ".join(map(str, applied)) if applied else "none (up to date)"
    print(f"{describe(config.database)}: migrations applied: {done}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ..logs import setup_logging
    from .server import serve

    if not args.static_interval > 0:
        raise InvalidInput("--static-interval must be greater than 0")
    setup_logging(args.log_level)
    hub = _hub(args)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"appliance hub: listening on {args.host} over plain HTTP: put TLS in front",
            file=sys.stderr,
        )
    tracer = _tracer(args)
    try:
        static = Path(args.static_dir) if args.static_dir else None
        serve(hub, args.host, args.port, args.refresh_interval, static, args.static_interval)
    finally:
        if tracer is not None:
            tracer.shutdown()
    return 0


def _tracer(args: argparse.Namespace) -> Any:
    """With --trace-endpoint: a span per hub request (under the device's sync spans, whose
    traceparent it sends), exported like the appliance's own ([tracing], the otel extra)."""
    if not args.trace_endpoint:
        return None
    from .. import tracing
    from ..config import _build
    from ..tracing.config import TracingConfig

    config = _build(
        TracingConfig,
        {"enabled": True, "endpoint": args.trace_endpoint, "sampling_ratio": args.trace_ratio,
         "service_name": "appliance-hub"},
        "hub serve: trace",
    )  # fmt: skip
    try:
        from ..tracing.otel import Tracer
    except ImportError as exc:
        raise ConfigError(
            f"--trace-endpoint needs the otel extra (pip install 'appliance[otel]'): {exc}"
        ) from None
    tracer = Tracer(config)
    tracing.use(tracer)
    return tracer


def cmd_enroll(args: argparse.Namespace) -> int:
    remote = _remote(args)
    if remote:
        out = remote.json(
            "POST", "/api/v1/admin/devices", {"device_id": args.device_id, "group": args.group}
        )
        token = out["token"]
    else:
        token = _hub(args).enroll(args.device_id, args.group)
    if args.token_out:
        from .repository import write_private

        write_private(Path(args.token_out), (token + "\n").encode())
        print(f"enrolled {args.device_id} (group {args.group}); token written to {args.token_out}")
    else:
        print(token)
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from .service import read_json_file

    file = Path(args.file)
    if not file.is_file():
        raise InvalidInput(f"{file}: no such file")
    acceptance = read_json_file(Path(args.acceptance), "acceptance file") if args.acceptance else []
    manifest = read_json_file(Path(args.manifest), "manifest") if args.manifest else None
    if manifest is None and args.store_manifest:
        manifest = read_json_file(file.parent / "manifest.json", "manifest")
    backend = args.backend
    if backend is None:
        from .service import detect

        backend = detect(file)
    remote = _remote(args)
    if remote:
        if manifest is None and backend != "pipeline":  # the hub checks a pipeline itself
            from .service import _inspect

            manifest = _inspect(file, backend)
        fields = {
            "name": args.name,
            "version": args.version,
            "backend": backend,
            "acceptance": orjson.dumps(acceptance).decode(),
            "manifest": orjson.dumps(manifest).decode(),
        }
        out = remote.publish(fields, file)
        path, new = out["target"], out["new"]
    else:
        from ..progress import Progress

        with Progress(f"copying {file.name}", file.stat().st_size) as progress:
            target, new = _hub(args).publish(
                args.name, args.version, file, backend, manifest, acceptance, progress=progress
            )
        path = target.path
    print(f"{'published' if new else 'already published'}: {path}")
    return 0


def _rollout_line(r: dict[str, Any]) -> str:
    return (
        f"{r['rollout']}  {r['model']} {r['version']}  target={orjson.dumps(r['target']).decode()}"
        f"  percent={r['percent']}  {r['state']}"
    )


def cmd_rollout(args: argparse.Namespace) -> int:
    if args.all:
        target: dict[str, Any] = {"all": True}
    elif args.group:
        target = {"group": args.group}
    else:
        target = {"devices": [d for d in args.devices.split(",") if d]}
    remote = _remote(args)
    if remote:
        out = remote.json(
            "POST",
            "/api/v1/admin/rollouts",
            {
                "model": args.model,
                "version": args.version,
                "target": target,
                "percent": args.percent,
            },
        )
    else:
        out = _hub(args).create_rollout(args.model, args.version, target, args.percent).to_json()
    print(_rollout_line(out))
    return 0


def cmd_rollout_action(args: argparse.Namespace) -> int:
    action = args.hub_command
    remote = _remote(args)
    if remote:
        payload = {"percent": args.percent} if action == "percent" else None
        out = remote.json("POST", f"/api/v1/admin/rollouts/{args.rollout}/{action}", payload)
    else:
        hub = _hub(args)
        if action == "halt":
            r = hub.halt(args.rollout)
        elif action == "rollback":
            r = hub.rollback(args.rollout)
        else:
            r = hub.set_percent(args.rollout, args.percent)
        out = r.to_json()
    print(_rollout_line(out))
    return 0


def cmd_rollouts(args: argparse.Namespace) -> int:
    remote = _remote(args)
    rows = (
        remote.json("GET", "/api/v1/admin/rollouts")
        if remote
        else [r.to_json() for r in _hub(args).store.rollouts()]
    )
    if args.json:
        _print_json(rows)
    for r in [] if args.json else rows:
        print(_rollout_line(r))
    return 0


def _versions(d: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(d.items())) or "-"


def cmd_devices(args: argparse.Namespace) -> int:
    remote = _remote(args)
    rows = remote.json("GET", "/api/v1/admin/devices") if remote else _hub(args).devices()
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("no devices enrolled")
    for d in rows:
        print(
            f"{d['device_id']:<20} group={d['group']:<10} last_seen={d['last_seen'] or 'never'}"
            f"  active={_versions(d['active'])}  pending={_versions(d['pending'])}"
            f"  error={d['last_error'] or '-'}"
        )
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    remote = _remote(args)
    if remote:
        rows = remote.json(
            "GET",
            f"/api/v1/admin/devices/{args.device_id}/events?after={args.after}&limit={args.limit}",
        )
    else:
        rows = _hub(args).events(args.device_id, args.after, args.limit)
    if args.json:
        _print_json(rows)
        return 0
    for e in rows:
        print(f"{e['seq']:>8}  {e['time']}  {e['kind']:<20} {orjson.dumps(e['data']).decode()}")
    return 0


def cmd_export_root(args: argparse.Namespace) -> int:
    remote = _remote(args)
    if remote:
        body = orjson.dumps(remote.json("GET", "/api/v1/admin/root.json"))
    else:
        body = _hub(args).repo.root_bytes(args.root_version)
    if args.out:
        Path(args.out).write_bytes(body)
        print(f"root metadata written to {args.out}")
    else:
        sys.stdout.write(body.decode() + "\n")
    return 0


def cmd_export_static(args: argparse.Namespace) -> int:
    from .static import export_static

    hub = _hub(args)
    out = export_static(hub.store, hub.artifacts, Path(args.directory))
    print(
        f"static TUF mirror in {args.directory}: timestamp {out.timestamp_version}, snapshot "
        f"{out.snapshot_version}, targets {out.targets_version}, root {out.root_version}; "
        f"{len(out.written)} files written, {len(out.removed)} removed"
    )
    return 0


def cmd_rotate_key(args: argparse.Namespace) -> int:
    from .service import default_root_key_dir

    hub = _hub(args)
    root_key_dir = (
        Path(args.root_key_dir) if args.root_key_dir else default_root_key_dir(hub.config.data_dir)
    )
    version = hub.repo.rotate(args.role, root_key_dir)
    print(f"rotated the {args.role} key; root metadata is now version {version}")
    if args.role == "root":
        print(f"the new root key is in {root_key_dir / 'root.pem'}: move it offline again")
    print("devices pick the new root up on their next update (root chain N -> N+1)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .repository import utcnow

    hub = _hub(args)
    now = utcnow()
    for role, when in hub.repo.expires().items():
        left = (when - now).total_seconds() / 86400
        print(f"{role:<10} expires {when.isoformat()}  ({left:.1f} days left)")
    print(f"devices: {len(hub.store.devices())}  targets: {len(hub.store.targets())}")
    return 0


# -- parser ----------------------------------------------------------------------------------
def add_parser(sub: Any) -> None:
    """Register `hub` and its sub-commands on the main parser's sub-parsers."""
    h = sub.add_parser("hub", help="the central hub: serve, enroll, publish, rollouts")
    hsub = h.add_subparsers(dest="hub_command", required=True)

    def common(p: argparse.ArgumentParser, remote: bool = True) -> None:
        p.add_argument(
            "--data", help=f"hub data directory (default: $APPLIANCE_HUB_DATA or ./{DEFAULT_DATA})"
        )
        if remote:
            p.add_argument("--url", help="talk to this hub's admin API instead of --data")
            p.add_argument(
                "--admin-token-file", help="admin token for --url (default: DATA/admin.token)"
            )
        p.add_argument(
            "--database",
            help="postgresql://user@host/db, or an SQLite file (default: "
            "$APPLIANCE_HUB_DATABASE or DATA/hub.db); keys and artifacts stay in DATA",
        )
        g = p.add_argument_group("hub settings")
        g.add_argument("--max-upload-mb", type=float, default=8192.0, help="largest model upload")
        g.add_argument(
            "--max-acceptance-kb",
            type=float,
            default=64.0,
            help="largest signed manifest + acceptance cases of one model version",
        )
        g.add_argument("--poll-interval", type=int, default=60, help="device poll interval (s)")
        g.add_argument(
            "--device-cache-size",
            type=int,
            default=None,
            help="devices whose identity a poll finds in memory (default 250,000, ~0.5 KB each; "
            "a larger fleet's other devices cost a database query per poll; 0: none)",
        )
        g.add_argument("--root-expiry-days", type=float, default=365.0)
        g.add_argument("--targets-expiry-days", type=float, default=90.0)
        g.add_argument("--snapshot-expiry-days", type=float, default=7.0)
        g.add_argument("--timestamp-expiry-hours", type=float, default=24.0)
        g.add_argument(
            "--event-retention-days",
            type=float,
            default=30.0,
            help="telemetry kept this long (0: forever)",
        )

    p = hsub.add_parser("init", help="create the data dir, TUF keys and metadata, admin token")
    common(p, remote=False)
    p.add_argument(
        "--root-key-dir",
        help="where the offline root key goes (default: DATA-root-key beside DATA)",
    )
    p.set_defaults(func=cmd_init)

    p = hsub.add_parser("migrate", help="apply pending PostgreSQL schema migrations")
    common(p, remote=False)
    p.set_defaults(func=cmd_migrate)

    p = hsub.add_parser("serve", help="run the hub's HTTP service")
    common(p, remote=False)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--refresh-interval", type=float, help="seconds between metadata expiry checks")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--trace-endpoint",
        help="OTLP/HTTP traces endpoint: a span per request (default: no tracing)",
    )
    p.add_argument(
        "--trace-ratio",
        type=float,
        default=0.001,
        help="share of requests traced that carry no sampled traceparent (default 0.001)",
    )
    p.add_argument(
        "--static-dir",
        help="keep a static TUF mirror (metadata/, targets/) in this directory for any HTTP "
        "server to serve (default: none)",
    )
    p.add_argument(
        "--static-interval",
        type=float,
        default=1.0,
        help="seconds between checks for new metadata to write to --static-dir (default 1)",
    )
    p.set_defaults(func=cmd_serve)

    p = hsub.add_parser("enroll", help="enrol a device; prints its token once")
    common(p)
    p.add_argument("device_id")
    p.add_argument("--group", default="default")
    p.add_argument("--token-out", help="write the token to this file (0600) instead of stdout")
    p.set_defaults(func=cmd_enroll)

    p = hsub.add_parser("publish", help="publish a model file as a signed TUF target")
    common(p)
    p.add_argument("name")
    p.add_argument("file")
    p.add_argument("--version", required=True)
    p.add_argument(
        "--backend",
        choices=["onnx", "gguf", "tflite", "pipeline"],
        help="default: detected (a .json file is a pipeline declaration)",
    )
    p.add_argument("--acceptance", help="JSON file: acceptance cases the device runs")
    p.add_argument(
        "--manifest", help="JSON file with inputs/outputs/parameters/pre/postprocess/steps"
    )
    p.add_argument(
        "--store-manifest",
        action="store_true",
        help="take those fields from manifest.json beside FILE (a model store version dir)",
    )
    p.set_defaults(func=cmd_publish)

    p = hsub.add_parser("rollout", help="assign a published version to devices")
    common(p)
    p.add_argument("model")
    p.add_argument("version")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--all", action="store_true", help="every device")
    who.add_argument("--group", help="the devices of one group")
    who.add_argument("--devices", help="comma-separated device ids")
    p.add_argument("--percent", type=int, default=100, help="staged: this share of them")
    p.set_defaults(func=cmd_rollout)

    for action, text in (
        ("halt", "stop a rollout spreading (devices that run it keep it)"),
        ("rollback", "send a rollout's devices back to the previous version"),
        ("percent", "change a staged rollout's percentage"),
    ):
        p = hsub.add_parser(action, help=text)
        common(p)
        p.add_argument("rollout", help="rollout id, e.g. r3")
        if action == "percent":
            p.add_argument("percent", type=int)
        p.set_defaults(func=cmd_rollout_action)

    p = hsub.add_parser("rollouts", help="list rollouts")
    common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rollouts)

    p = hsub.add_parser("devices", help="list devices: last seen, active, pending, last error")
    common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_devices)

    p = hsub.add_parser("events", help="a device's telemetry events in sequence order")
    common(p)
    p.add_argument("device_id")
    p.add_argument("--after", type=int, default=0)
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_events)

    p = hsub.add_parser("export-root", help="print root.json, the devices' trust anchor")
    common(p)
    p.add_argument("--root-version", type=int, help="a given version (default: the latest)")
    p.add_argument("--out", help="write to this file")
    p.set_defaults(func=cmd_export_root)

    p = hsub.add_parser(
        "export-static", help="write the TUF metadata and targets as a static mirror directory"
    )
    common(p, remote=False)
    p.add_argument("directory", help="metadata/ and targets/ go here (updated in place)")
    p.set_defaults(func=cmd_export_static)

    p = hsub.add_parser("rotate-key", help="replace a role's key (needs the offline root key)")
    common(p, remote=False)
    p.add_argument("role", choices=["root", "targets", "snapshot", "timestamp"])
    p.add_argument("--root-key-dir", help="where root.pem is (default: DATA-root-key)")
    p.set_defaults(func=cmd_rotate_key)

    p = hsub.add_parser("status", help="TUF metadata expiry and fleet size")
    common(p, remote=False)
    p.set_defaults(func=cmd_status)

    # `hub simulate`: a test/ops tool (hub/simulate.py), imported only when run
    p = hsub.add_parser("simulate", help="simulated devices against a hub: load figures")
    p.add_argument("--devices", type=int, required=True, help="how many devices")
    p.add_argument("--poll-interval", type=float, default=60.0, help="seconds between polls")
    p.add_argument("--duration", type=float, default=180.0, help="seconds to run")
    p.add_argument("--telemetry-per-poll", type=int, default=1, help="events uploaded per poll")
    p.add_argument("--hub", action="append", metavar="URL", help="hub replica(s) (default: spawn)")
    p.add_argument("--admin-token-file", help="admin token for --hub (enrols through the API)")
    p.add_argument("--hub-pid", type=int, action="append", help="hub process(es) for CPU figures")
    p.add_argument(
        "--db-pid", type=int, help="database server process (CPU of it and its children)"
    )
    p.add_argument("--spawn-replicas", type=int, default=1, help="hub processes to spawn")
    p.add_argument("--serve-arg", action="append", help="extra argument for spawned `hub serve`")
    p.add_argument("--database", help="spawn on this empty PostgreSQL database (postgresql://)")
    p.add_argument("--sources", default="127.0.0.1", help="source addresses, 127.0.0.1-127.0.0.50")
    p.add_argument("--connections", type=int, default=1024, help="keep-alive connections in all")
    p.add_argument("--timeout", type=float, default=30.0, help="request timeout (s)")
    p.add_argument("--rollout-at", type=float, help="create a 100%% rollout this many s in")
    p.add_argument("--full-tuf", type=int, default=3, help="devices running the device's TUF")
    p.add_argument("--model-bytes", type=int, default=4096, help="size of the rolled-out file")
    p.add_argument("--prefix", default="sim", help="device id prefix")
    p.add_argument("--workers", type=int, default=1, help="processes running the devices")
    p.add_argument("--mirror", help="static TUF mirror URL for --hub (default: the hub's /tuf)")
    p.add_argument("--no-mirror", action="store_true", help="spawned: download from the hub")
    p.add_argument("--json", help="write the figures as JSON here (default: stdout)")
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> int:
    from .simulate import main

    return main(args)
