"""`appliance bench`: what the appliance adds on top of the runtime, measured in one run.

The same model and settings are timed side by side: the runtime in-process (the floor no server
can beat) and a real `appliance serve` subprocess (what a client sees). Modes, one module each:

- `latency`: raw runtime call vs HTTP round trip (and MQTT), throughput, server memory and CPU;
- `llm`: GGUF chat models, streamed chat completions (time to first token, tokens/s);
- `batching` (`--sweep`): dynamic batching on vs off over concurrency levels, then overload;
- `priority` (`--priority`): an urgent level alone, then through a flood of a lower one.
- `isolation` (`--isolation`): the model in-process vs in a worker process (added µs, req/s).

Shared parts: `options` (what to run, built by the CLI), `model` (the file and its bare runtime
call), `inputs` (tensors, encoded by the appliance's own codec), `client` (a socket HTTP client),
`server` (the subprocess), `timing` (timers and percentiles), `report` (table or JSON).
Nothing heavy is imported until `run` is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .options import BenchOptions


def run(options: BenchOptions) -> int:
    """Run the benchmark `options` ask for and print its figures; the exit status."""
    from ..config_flags import config_from_flags
    from .model import resolve_model
    from .report import emit, format_llm_table, format_priority, format_sweep, format_table

    if options.priority is not None:
        options.check()
        options.priority.check()
        config = config_from_flags(options.flags())
        target = resolve_model(options.model, config)
        from .priority import run_priority

        figures = run_priority(options, options.priority, config, target)
        emit(figures, options.json, format_priority)
        return 0
    if options.sweep is not None:
        config = config_from_flags(options.flags())
        target = resolve_model(options.model, config)
        from .batching import run_sweep

        emit(run_sweep(options, options.sweep, config, target), options.json, format_sweep)
        return 0
    if options.isolation is not None:
        options.check()
        config = config_from_flags(options.flags())
        target = resolve_model(options.model, config)
        from .isolation import format_isolation, run_isolation

        figures = run_isolation(options, options.isolation, config, target)
        emit(figures, options.json, format_isolation)
        return 0
    options.check()
    config = config_from_flags(options.flags())
    target = resolve_model(options.model, config)
    from .llm import gguf_chat_config

    gguf_chat = gguf_chat_config(target, config)
    if gguf_chat is not None:
        from .llm import run_llm

        emit(run_llm(options, config, target, gguf_chat), options.json, format_llm_table)
        return 0
    from .latency import run_latency

    emit(run_latency(options, config, target), options.json, format_table)
    return 0
