"""What a person or a program reads: progress lines on stderr, then the figures as a table or
as one JSON object on stdout."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def say(quiet: bool, text: str) -> None:
    """A progress line on stderr (none with --json)."""
    if not quiet:
        print(text, file=sys.stderr, flush=True)


def emit(figures: dict[str, Any], as_json: bool, table: Callable[[dict[str, Any]], str]) -> None:
    """The figures on stdout: JSON on one line, or the table for a person."""
    if as_json:
        import orjson

        sys.stdout.write(orjson.dumps(figures).decode() + "\n")
    else:
        sys.stdout.write(table(figures))
    sys.stdout.flush()


def format_table(f: dict[str, Any]) -> str:
    """The figures for a person: raw, HTTP and their difference in one table."""

    def num(x: Any, fmt: str = ",.1f") -> str:
        return "n/a" if x is None else format(x, fmt)

    shapes = ", ".join(f"{i['name']}:{i['datatype']}{i['shape']}" for i in f["inputs"])
    rows = [
        ("raw runtime call", "raw"),
        ("  with idle gaps", "raw_paced"),
        ("HTTP /v2/health/live", "http_floor"),
        ("HTTP infer round trip", "http"),
        ("added by the appliance", "overhead"),
        ("  vs raw with idle gaps", "overhead_vs_paced"),
    ]
    lines = [
        f"model    {f['model']} ({f['model_file']}), {f['backend']} on {f['device']} "
        f"({f['runtime_detail']})",
        f"inputs   {shapes}",
        f"body     {f['encoding']}: request {f['request_bytes']} B, response "
        f"{f['response_bytes']} B",
        f"machine  {f['cpu_count']} CPUs; {f['requests']} timed requests after "
        f"{f['warmup']} warm-up",
        "",
        f"{'latency (µs)':<26}{'p50':>10}{'p99':>10}{'mean':>10}",
    ]
    if f.get("mqtt_p50_us") is not None:
        rows.append(("MQTT round trip (QoS 1)", "mqtt"))
    for label, key in rows:
        lines.append(
            f"{label:<26}{num(f[key + '_p50_us']):>10}{num(f[key + '_p99_us']):>10}"
            f"{num(f[key + '_mean_us']):>10}"
        )
    lines.append(
        f"{'server CPU per request':<26}{num(f['server_cpu_us_per_request']):>10}"
        "   (user+system, all threads, sequential run)"
    )
    lines += [
        "",
        f"throughput at concurrency {f['concurrency']}: {num(f['throughput_rps'], ',.0f')} req/s "
        f"(p50 {num(f['throughput_p50_us'])} µs, p99 {num(f['throughput_p99_us'])} µs)",
        f"server RSS: idle {num(f['server_idle_rss_mib'])} MiB, after the run "
        f"{num(f['server_after_rss_mib'])} MiB (peak {num(f['server_peak_rss_mib'])} MiB)",
    ]
    return "\n".join(lines) + "\n"


def format_llm_table(f: dict[str, Any]) -> str:
    """The LLM figures for a person: raw llama-cpp-python and HTTP streaming side by side."""

    def num(x: Any, fmt: str = ",.2f") -> str:
        return "n/a" if x is None else format(x, fmt)

    clients = [("http", "", "HTTP stream"), ("openai", "openai_", "openai client")]
    clients = [c for c in clients if c[0] in f.get("clients", ["http"])]
    lines = [
        f"model    {f['model']} ({f['model_file']}), {f['backend']} on {f['device']} "
        f"({f['runtime_detail']})",
        f"request  streamed chat completion, max_tokens {f['max_tokens']}, temperature 0, "
        f"seed {f['seed']}: {f['tokens']} tokens (finish: {f['finish_reason']})",
        f"machine  {f['cpu_count']} CPUs, load average {f.get('load_average_before')} before, "
        f"{f.get('load_average_after')} after; medians of {f['runs']} rounds (the sides in "
        f"turn) after {f['warmup_runs']} warm-up",
        "",
        f"{'':<26}{'raw llama.cpp':>15}" + "".join(f"{title:>15}{'vs raw':>10}"
                                                  for _, _, title in clients),
    ]  # fmt: skip
    ttft = f"{'time to first token (ms)':<26}{num(f['raw_ttft_ms'], ',.3f'):>15}"
    tps = f"{'decode (tokens/s)':<26}{num(f['raw_tokens_per_s']):>15}"
    cpu = f"{'CPU ms per token':<26}{num(f.get('raw_cpu_ms_per_token'), ',.3f'):>15}"
    loop = f"{'event loop CPU µs/token':<26}{'':>15}"
    for side, prefix, _ in clients:
        added, ratio = f[f"{prefix}added_ttft_ms"], f[f"{prefix}tokens_per_s_ratio"]
        over = f.get(f"{side}_server_cpu_over_raw_ms_per_token")
        ttft += f"{num(f[f'{side}_ttft_ms'], ',.3f'):>15}"
        ttft += f"{'n/a' if added is None else format(added, '+,.3f'):>10}"
        tps += f"{num(f[f'{side}_tokens_per_s']):>15}"
        tps += f"{'n/a' if ratio is None else f'{ratio:.4f} x':>10}"
        cpu += f"{num(f.get(f'{side}_server_cpu_ms_per_token'), ',.3f'):>15}"
        cpu += f"{'n/a' if over is None else format(over, '+,.3f'):>10}"
        loop += f"{num(f.get(f'{side}_server_loop_cpu_us_per_token'), ',.1f'):>15}{'':>10}"
    lines += [ttft, tps, cpu + "  (the server's: all threads)", loop + "  (the server's)"]
    for _, prefix, title in clients:  # the same round's runs against each other
        ratio, ratio_q = (
            f.get(f"{prefix}paired_tokens_per_s_ratio"),
            f.get(f"{prefix}paired_tokens_per_s_ratio_quartiles"),
        )
        added, added_q = (
            f.get(f"{prefix}paired_added_ttft_ms"),
            f.get(f"{prefix}paired_added_ttft_ms_quartiles"),
        )
        spread = f" (quartiles {ratio_q[0]:.4f}-{ratio_q[1]:.4f})" if ratio_q else ""
        line = f"paired   {title}: tokens/s ratio {num(ratio, '.4f')} x{spread}"
        if added is not None:
            spread = f" (quartiles {added_q[0]:+.3f} to {added_q[1]:+.3f})" if added_q else ""
            line += f", TTFT {added:+.3f} ms{spread}"
        lines.append(line + ", medians over rounds")
    for _, prefix, title in clients:
        if f.get(f"{prefix}tokens_per_s_note"):
            lines.append(f"note     {title} decode speed n/a: {f[f'{prefix}tokens_per_s_note']}")
    if f.get("openai_note"):
        lines.append(f"note     no openai client run: {f['openai_note']}")
    lines += [
        "",
        f"server RSS: idle {num(f['server_idle_rss_mib'], ',.1f')} MiB, after the run "
        f"{num(f['server_after_rss_mib'], ',.1f')} MiB "
        f"(peak {num(f['server_peak_rss_mib'], ',.1f')} MiB)",
    ]
    return "\n".join(lines) + "\n"


def format_sweep(f: dict[str, Any]) -> str:
    lines = [
        f"model    {f['model']} ({f['model_file']}), {f['rows_per_request']} row(s) per request,"
        f" {f['encoding']} tensors",
        f"machine  {f['cpu_count']} CPUs, servers on CPUs {f['server_cpus']}; load average "
        f"{f['load_average_before']} before, {f['load_average_after']} after",
        f"raw runtime: batch 1 p50 {f['raw_batch1_p50_us']:,.1f} µs ({f['raw_batch1_rps']:,.0f}"
        f" req/s); batch {f['raw_ceiling_rows']} p50 {f['raw_ceiling_call_p50_us']:,.1f} µs "
        f"(ceiling {f['raw_ceiling_rps']:,.0f} req/s; rounds "
        f"{', '.join(f'{x:,.0f}' for x in f['raw_ceiling_rounds_rps'])})",
        "",
        f"{'concurrency':>11} {'batching':>9} {'req/s':>10} {'p50 µs':>10} {'p99 µs':>10}",
    ]
    for r in f["runs"]:
        lines.append(
            f"{r['concurrency']:>11} {r['batching']:>9} {r['rps']:>10,.0f} {r['p50_us']:>10,.1f}"
            f" {r['p99_us']:>10,.1f}"
        )
    lines += [
        "",
        f"mean requests per runtime call with batching on: {f['batching_on_mean_batch']}",
        f"at the highest concurrency: on/off throughput {f['throughput_on_vs_off_at_top']}x, "
        f"on/raw ceiling {f['throughput_on_vs_raw_ceiling_at_top']:.1%}",
        f"at the lowest concurrency: p50 on/off {f['p50_on_vs_off_at_lowest']}",
    ]
    o = f.get("overload")
    if o:
        lines += [
            "",
            f"overload: {o['target_rps']:,.0f} req/s targeted, {o['offered_rps']:,.0f} offered "
            f"for {o['seconds']:g} s over {o['connections']} connections",
            f"  200: {o['answered_200']} {o['latency_200']}; 503: {o['answered_503']} "
            f"{o['latency_503']}; other statuses {o['other_statuses']}; every 503 had "
            f"Retry-After: {o['all_503_have_retry_after']}",
            f"  RSS MiB: before {o['rss_before_mib']}, during {o['rss_min_mib']}-"
            f"{o['rss_max_mib']}, after {o['rss_after_mib']}",
            f"  after the load stopped: first 200 in {o['first_200_after_stop_ms']} ms, all "
            f"200 since: {o['all_200_after_first']}, p50 over the first second "
            f"{o['probe_p50_us_first_second']} µs",
        ]
    return "\n".join(lines) + "\n"


def format_priority(f: dict[str, Any]) -> str:
    """The priority figures for a person: the urgent level alone and under the flood."""

    def lat(x: dict[str, Any] | None) -> str:
        return "-" if not x else f"p50 {x['p50_us'] / 1e3:,.2f} ms, p99 {x['p99_us'] / 1e3:,.2f} ms"

    def cpu(run: dict[str, Any]) -> str:
        c = run.get("server_cpu")
        return "-" if not c else f"{c['total_us_per_request']} us (loop {c['loop_us_per_request']})"

    high, low_level = f["high_level"], f["flood_level"]
    alone, flood = f["alone"], f["flood"]
    low = flood["low"]
    lines = [
        f"model    {f['model']} ({f['model_file']}), {f['encoding']} tensors, the level in the "
        f"{f['priority_by']}; batching {f['batching']}, max_batch_size {f['max_batch_size']}, "
        f"level {low_level}'s {f['flood_max_batch_size']}; max_queue {f['max_queue']}",
        f"machine  {f['cpu_count']} CPUs, the server on CPUs {f['server_cpus']}; load average "
        f"{f['load_average_before']} before, {f['load_average_after']} after",
        f"capacity {f['capacity_rps']:,.1f} req/s (level {low_level}, closed loop; p50 "
        f"{f['capacity_p50_us'] / 1e3:,.2f} ms)",
        "",
        f"level {high} at {f['high_target_rps']:,.1f} req/s:",
        f"  alone        {lat(alone['high']['latency_200'])}; statuses {alone['high']['statuses']}",
        f"  under flood  {lat(flood['high']['latency_200'])}; statuses {flood['high']['statuses']}",
        f"  the server's own view (queue to answer; histogram bounds): alone p50 <= "
        f"{alone['high']['server_p50_under_ms']} ms, p99 <= {alone['high']['server_p99_under_ms']}"
        f" ms; under flood p50 <= {flood['high']['server_p50_under_ms']} ms, p99 <= "
        f"{flood['high']['server_p99_under_ms']} ms",
        f"  p99 under flood / alone: {f['high_p99_flood_vs_alone']}x; not 200 under flood: "
        f"{f['high_not_200_under_flood']}",
        f"level {low_level} flood: {f['flood_target_rps']:,.0f} req/s targeted"
        f"{' (fixed)' if f.get('flood_rps_fixed') else ''}, "
        f"{low['offered_rps']:,.0f} offered over {low['connections']} connections (client nice "
        f"+{f['flood_nice']}); statuses {low['statuses']}",
        f"  200: {lat(low['latency_200'])}",
        f"  503: {lat(low['latency_503'])}; every 503 had Retry-After: "
        f"{low['all_503_have_retry_after']}",
        f"CPU per request answered: the server {cpu(alone)} alone, {cpu(flood)} under the "
        f"flood; the flood's client {low['client'].get('cpu_us_per_request', '-')} us"
        " (the server's log goes to a file, not a pipe the bench reads)",
        f"server counters: {f['server_counters']}",
    ]
    errors = alone["client_errors"] + flood["client_errors"]
    if errors:
        lines.append(f"client errors: {errors}")
    return "\n".join(lines) + "\n"
