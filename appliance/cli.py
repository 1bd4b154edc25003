"""`appliance` command line: serve, models, bench, build."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .errors import ApplianceError, ConfigError, is_disk_full


def _config(args: argparse.Namespace) -> Any:
    """The config with the setting flags this sub-command has (each has some of them)."""
    from dataclasses import fields

    from .config_flags import ConfigFlags, config_from_flags

    flags = ConfigFlags(**{f.name: getattr(args, f.name, None) for f in fields(ConfigFlags)})
    return config_from_flags(flags)


def cmd_serve(args: argparse.Namespace) -> int:
    from .logs import setup_logging
    from .registry import Registry
    from .server import serve, source_from_file, sources_from_store

    config = _config(args)
    setup_logging(config.server.log_level)
    store = None
    if args.model is not None:
        sources = [source_from_file(Path(args.model), args.name)]
    else:
        if args.name is not None:
            raise ConfigError("--name only applies together with --model FILE")
        sources = sources_from_store(Path(config.store.path))
        store = Registry(Path(config.store.path))
    serve(config, sources, store)
    return 0


def _registry(args: argparse.Namespace) -> Any:
    from .plugins import use_dirs
    from .registry import Registry

    config = _config(args)
    use_dirs(config.plugins.dirs)  # `models add --backend` may name a plugin's backend
    return Registry(Path(config.store.path))


def _json_object(value: str | None, flag: str, typed: bool = True) -> dict[str, Any] | None:
    """A manifest declaration from the command line: JSON text, or a file holding it (`typed`:
    an object with a string 'type')."""
    if value is None:
        return None
    import orjson

    from .errors import ConfigError

    text = value
    if not value.lstrip().startswith(("{", "[")):
        try:
            text = Path(value).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{flag} {value!r}: cannot read: {exc.strerror}") from None
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{flag}: not JSON: {exc}") from None
    if typed and not (isinstance(obj, dict) and isinstance(obj.get("type"), str)):
        raise ConfigError(f"{flag}: must be a JSON object with a string 'type'")
    if not isinstance(obj, dict):
        raise ConfigError(f"{flag}: must be a JSON object")
    return obj


def _templates(values: list[str] | None) -> dict[str, Path]:
    """--template FORMAT=FILE, repeated: format -> template file."""
    out: dict[str, Path] = {}
    for value in values or ():
        fmt, sep, file = value.partition("=")
        if not sep or not fmt or not file:
            raise ConfigError(f"--template {value!r}: expected FORMAT=FILE (html=report.html.j2)")
        if fmt in out:
            raise ConfigError(f"--template: format {fmt!r} is given twice")
        out[fmt] = Path(file)
    return out


def cmd_models(args: argparse.Namespace) -> int:
    from .registry import describe

    reg = _registry(args)
    action = args.action
    if action == "add" and args.pipeline:
        if args.preprocess or args.postprocess:
            raise ConfigError("--pipeline FILE: a pipeline declares its steps as nodes")
        mv = reg.add_pipeline(
            args.name, Path(args.pipeline), version=args.version, activate=not args.no_activate
        )
        m = mv.manifest
        state = "active" if not args.no_activate else "inactive"
        print(f"added pipeline {m.name} version {m.version} (sha256 {m.sha256[:12]}…, {state})")
        print(f"  {describe(m.signature)}")
    elif action == "add":
        from .progress import Progress

        source = Path(args.file)
        size = source.stat().st_size if source.is_file() else None
        with Progress(f"copying {source.name}", size) as progress:
            mv = reg.add(
                args.name,
                source,
                version=args.version,
                activate=not args.no_activate,
                backend=args.backend,
                preprocess=_json_object(args.preprocess, "--preprocess"),
                postprocess=_json_object(args.postprocess, "--postprocess"),
                steps=_json_object(args.steps, "--steps", typed=False),
                templates=_templates(args.template),
                progress=progress,
            )
        m = mv.manifest
        state = "active" if not args.no_activate else "inactive"
        print(
            f"added {m.name} version {m.version} ({m.backend}, {m.size} bytes, "
            f"sha256 {m.sha256[:12]}…, {state})"
        )
        print(f"  {describe(m.signature)}")
    elif action == "list":
        names = reg.names()
        if not names:
            print(f"no models in {reg.root}")
        for name in names:
            entry = reg.entry(name)
            print(
                f"{name}  active={entry.active or '-'}  versions={','.join(entry.versions) or '-'}"
            )
            for v in entry.versions:
                mv = reg.get(name, v)
                mark = "*" if v == entry.active else " "
                print(
                    f"  {mark} {v:<8} {mv.manifest.backend:<6} {mv.manifest.size:>10} B  "
                    f"{mv.manifest.created_at}  {describe(mv.manifest.signature)}"
                )
    elif action == "activate":
        reg.activate(args.name, args.version)
        print(f"{args.name}: version {args.version} is active")
    elif action == "rollback":
        version = reg.rollback(args.name)
        print(f"{args.name}: rolled back to version {version}")
    elif action == "remove":
        reg.remove(args.name, args.version)
        print(f"{args.name}: removed version {args.version}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    """List the plugin steps and backends installed, each imported to say whether it works;
    exit status 1 when one does not (a check for a device's deployment script)."""
    from .plugins import active_dirs, report, use_dirs

    use_dirs(_config(args).plugins.dirs)
    entries = report()
    if args.json:
        from dataclasses import asdict

        import orjson

        doc = {"dirs": active_dirs(), "plugins": [asdict(e) for e in entries]}
        print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
    else:
        print("plugin directories: " + (", ".join(active_dirs()) or "none"))
        if not entries:
            print("no plugins installed")
        for e in entries:
            print(f"{e.group:<8} {e.name:<16} {e.distribution} {e.version}  {e.target}")
            print(f"         {e.status}  ({e.location})")
    return 0 if all(e.ok or e.status.startswith("ignored") for e in entries) else 1


def cmd_selftest(args: argparse.Namespace) -> int:
    import logging

    from .selftest import run_selftest

    logging.basicConfig(level=logging.ERROR)
    ok, reason = run_selftest(args.timeout)
    print(f"selftest {'ok' if ok else 'failed'}: {reason}")
    return 0 if ok else 1


class _VersionAction(argparse.Action):
    """`--version` reports the runtimes too, so it imports them only when asked."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show version, build and backends")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        from .version import version_text

        print(version_text())
        parser.exit()


def cmd_worker(args: argparse.Namespace) -> int:
    from .isolation.worker import main

    return main(args.fd)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run
    from .bench.options import (
        BenchOptions,
        IsolationOptions,
        PriorityOptions,
        SweepOptions,
        parse_levels,
    )

    priority = None
    if args.priority:
        priority = PriorityOptions(
            seconds=args.priority_seconds,
            high_share=args.high_share,
            flood_factor=args.flood_factor,
            flood_rps=args.flood_rps,
            flood_connections=args.flood_connections,
            flood_nice=args.flood_nice,
            flood_batch=args.flood_batch,
            server_cpus=args.server_cpus,
            by=args.priority_by,
        )
    sweep = None
    if args.sweep:
        sweep = SweepOptions(
            levels=parse_levels(args.sweep),
            server_cpus=args.server_cpus,
            overload=args.overload,
            overload_connections=args.overload_connections,
            rounds=args.rounds,
        )
    isolation = None
    if args.isolation:
        isolation = IsolationOptions(parse_levels(args.isolation, "--isolation"), args.rounds)
    options = BenchOptions(
        model=args.model,
        requests=args.requests,
        warmup=args.warmup,
        concurrency=args.concurrency,
        batch=args.batch,
        binary=args.binary,
        mqtt=args.mqtt,
        device=args.device,
        config=getattr(args, "config", None),
        models=getattr(args, "models", None),
        json=args.json,
        runs=args.runs,
        max_tokens=args.max_tokens,
        sweep=sweep,
        priority=priority,
        isolation=isolation,
    )
    return run(options)


def cmd_status(args: argparse.Namespace) -> int:
    """The running appliance's /api/status (appliance/status_view.py); its URL and token from
    the flags, else from the config (the port it serves on, its token file)."""
    from .status_view import fetch, render

    url, token = args.url, ""
    if args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"--token-file {args.token_file}: {exc.strerror}") from None
    if url is None or not args.token_file:
        config = _config(args)
        host = config.server.host
        if host in ("0.0.0.0", "::"):  # noqa: S104 (served on every address: ask loopback)
            host = "127.0.0.1"
        url = url or f"http://{f'[{host}]' if ':' in host else host}:{config.server.port}"
        token = token or config.token()
    summary = fetch(url, token)
    if args.json:
        import orjson

        print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    else:
        print(render(summary))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from .build.command import run

    store = Path(_config(args).store.path)
    return run(args, store)


def _common(p: argparse.ArgumentParser, store: bool = True) -> None:
    # SUPPRESS: a flag given before the sub-command is not reset by the sub-command's parser.
    p.add_argument(
        "--config", default=argparse.SUPPRESS, help="TOML config file (default: $APPLIANCE_CONFIG)"
    )
    if store:
        p.add_argument(
            "--models", default=argparse.SUPPRESS, help="model store directory (default: ./models)"
        )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="appliance", description="Edge inference appliance")
    ap.add_argument("--version", action=_VersionAction)
    sub = ap.add_subparsers(
        dest="command",
        required=True,
        metavar="{serve,status,models,plugins,selftest,bench,build,hub}",
    )

    s = sub.add_parser("serve", help="serve the model store (or one file) over HTTP")
    _common(s)
    s.add_argument("--model", help="serve this one model file instead of the store")
    s.add_argument("--name", help="model name for --model (default: the file name)")
    s.add_argument("--host", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 8080; 0 picks a free one)")
    s.add_argument("--device", choices=["auto", "cuda", "cpu"], help="device for every model")
    s.add_argument("--token-file", help="file holding the bearer token clients must send")
    s.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS (and gRPC over TLS): certificate")
    s.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    s.add_argument(
        "--tls-client-ca", metavar="PEM", help="require client certificates signed by this CA"
    )
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    s.add_argument("--mqtt", metavar="URL", help="also serve MQTT: mqtt[s]://user:pass@host:port")
    s.add_argument(
        "--grpc-port",
        type=int,
        metavar="PORT",
        help="also serve KServe v2 gRPC on this port (Triton's is 8001; needs the grpc extra)",
    )
    s.add_argument(
        "--device-id", help="this appliance's id in MQTT topics and on the hub (default: host name)"
    )
    s.add_argument("--hub", metavar="URL", help="sync models and telemetry with this hub")
    s.add_argument("--hub-token-file", help="file holding the device token from `hub enroll`")
    s.add_argument("--hub-root", metavar="ROOT_JSON", help="the hub's trusted root.json")
    s.set_defaults(func=cmd_serve)

    st = sub.add_parser("status", help="the running appliance's status summary (/api/status)")
    _common(st, store=False)
    st.add_argument("--url", help="its base URL (default: the config's host and port)")
    st.add_argument("--token-file", help="file holding its bearer token (default: the config's)")
    st.add_argument("--json", action="store_true", help="the JSON summary as it is")
    st.set_defaults(func=cmd_status)

    m = sub.add_parser("models", help="manage the model store")
    msub = m.add_subparsers(dest="action", required=True)
    a = msub.add_parser("add", help="copy a model file in as a new version")
    a.add_argument("name")
    a.add_argument("file", nargs="?", help="the model file (none with --pipeline)")
    a.add_argument(
        "--pipeline", metavar="FILE", help="store a pipeline declaration (NAME.pipeline.json)"
    )
    a.add_argument("--version", help="version name (default: the next integer)")
    a.add_argument("--no-activate", action="store_true", help="add without activating")
    a.add_argument(
        "--backend",
        help="the backend that reads the file (default: from its format); a plugin's backend name",
    )
    a.add_argument("--preprocess", metavar="JSON", help="pre-processing (a file or JSON text)")
    a.add_argument("--postprocess", metavar="JSON", help="post-processing (a file or JSON text)")
    a.add_argument(
        "--steps",
        metavar="JSON",
        help='processing steps {"input": [step, ...], "output": [step, ...]} (a file or JSON text)',
    )
    a.add_argument(
        "--template", action="append", metavar="FORMAT=FILE",
        help="a report template (Jinja2) for output format html, markdown or text; repeatable",
    )  # fmt: skip
    msub.add_parser("list", help="list models and versions")
    act = msub.add_parser("activate", help="make a version the active one")
    act.add_argument("name")
    act.add_argument("version")
    rb = msub.add_parser("rollback", help="re-activate the previously active version")
    rb.add_argument("name")
    rm = msub.add_parser("remove", help="delete a version that is not active")
    rm.add_argument("name")
    rm.add_argument("version")
    for p in (m, *msub.choices.values()):
        _common(p)
    m.set_defaults(func=cmd_models)

    pl = sub.add_parser("plugins", help="list plugin steps and backends and whether they import")
    _common(pl, store=False)
    pl.add_argument("--json", action="store_true", help="print the list as JSON")
    pl.set_defaults(func=cmd_plugins)

    t = sub.add_parser("selftest", help="serve the bundled sample model and check one answer")
    t.add_argument("--timeout", type=float, default=60.0, help="seconds before giving up")
    t.set_defaults(func=cmd_selftest)

    # Internal: a model's worker process, and the first load of a file (appliance/isolation).
    w = sub.add_parser("_worker")
    w.add_argument("fd", type=int, help="the inherited socket of its first channel")
    w.set_defaults(func=cmd_worker)

    b = sub.add_parser("bench", help="raw runtime latency vs HTTP round trip, side by side")
    _common(b)
    b.add_argument("model", help="a model file, or the name of a model in the store")
    b.add_argument("--requests", type=int, default=2000, help="timed requests per measurement")
    b.add_argument("--warmup", type=int, default=200)
    b.add_argument("--concurrency", type=int, default=4, help="connections for the throughput run")
    b.add_argument("--batch", type=int, default=1, help="size of each dynamic dimension")
    b.add_argument("--binary", action="store_true", help="send tensors as binary data")
    b.add_argument(
        "--mqtt", metavar="URL", help="also time QoS 1 round trips through this MQTT broker"
    )
    b.add_argument("--device", choices=["auto", "cuda", "cpu"])
    b.add_argument("--json", action="store_true", help="print the figures as JSON")
    sweep = b.add_argument_group("dynamic batching on vs off (two servers, side by side)")
    sweep.add_argument(
        "--sweep", metavar="LEVELS", help="concurrency levels, e.g. 1,8,32: replaces the usual run"
    )
    sweep.add_argument(
        "--server-cpus",
        metavar="LIST",
        help="pin the server(s) to these CPUs (taskset -c LIST); the clients keep off them",
    )
    sweep.add_argument(
        "--overload",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="then offer 10x the sustained rate this long to the batching server",
    )
    sweep.add_argument("--overload-connections", type=int, default=128, metavar="N")
    sweep.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds per level (the median counts)"
    )
    prio = b.add_argument_group("priority levels: an urgent stream through a flood (one server)")
    prio.add_argument(
        "--priority", action="store_true", help="level-1 requests alone, then beside a flood"
    )
    prio.add_argument("--priority-seconds", type=float, default=10.0, metavar="S",
                      help="length of each phase")  # fmt: skip
    prio.add_argument("--high-share", type=float, default=0.05, metavar="F",
                      help="the level-1 rate, as a fraction of the measured capacity")  # fmt: skip
    prio.add_argument("--flood-factor", type=float, default=10.0, metavar="X",
                      help="the level-2 flood's rate, as a multiple of the capacity")  # fmt: skip
    prio.add_argument("--flood-rps", type=float, default=0.0, metavar="R",
                      help="a fixed flood rate instead, so runs compare alike (level 1 at "
                      "--high-share of R / --flood-factor)")  # fmt: skip
    prio.add_argument("--flood-connections", type=int, default=160, metavar="N",
                      help="more than the model admits, or the flood stalls")  # fmt: skip
    prio.add_argument("--flood-nice", type=int, default=0, metavar="N",
                      help="the flood client's CPU priority, N steps lower")  # fmt: skip
    prio.add_argument("--flood-batch", type=int, default=0, metavar="ROWS",
                      help="level 2's max_batch_size (0: the model's own)")  # fmt: skip
    prio.add_argument("--priority-by", choices=["header", "body"], default="header",
                      help="each request's level in the X-Request-Priority header (read before "
                      "the body) or in parameters.priority (default: header)")  # fmt: skip
    llm = b.add_argument_group("GGUF chat models (streamed /v1/chat/completions)")
    llm.add_argument("--runs", type=int, default=3, help="timed streamed completions per side")
    llm.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each completion")
    iso = b.add_argument_group("in-process vs a worker process (two servers, side by side)")
    iso.add_argument(
        "--isolation",
        metavar="LEVELS",
        nargs="?",
        const="1,32",
        help="concurrency levels (default 1,32): the model in-process and with isolation = "
        '"process", added µs at the lowest, req/s ratio at the highest (--rounds applies)',
    )
    b.set_defaults(func=cmd_bench)

    from .build.command import add_arguments

    bl = sub.add_parser(
        "build", help="export, quantize and validate a Hugging Face model into the store"
    )
    _common(bl)
    add_arguments(bl)
    bl.set_defaults(func=cmd_build)

    from .hub.cli import add_parser as add_hub_parser

    add_hub_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command == "models" and args.action == "add":
        if not args.file and not args.pipeline:
            p.error("the following arguments are required: file (or --pipeline FILE)")
        if args.file and args.pipeline:
            p.error("models add: give a model file or --pipeline FILE, not both")
    try:
        result: int = args.func(args)
        return result
    except ConfigError as exc:
        print(f"appliance: config error: {exc.message}", file=sys.stderr)
        return 2
    except ApplianceError as exc:
        print(f"appliance: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        print(f"appliance: no space left on the device: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
