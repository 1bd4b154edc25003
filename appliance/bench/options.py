"""What `appliance bench` is asked to do, as typed options (the CLI builds them from its flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..config_flags import ConfigFlags
from ..errors import ConfigError


@dataclass(frozen=True)
class SweepOptions:
    """`--sweep`: dynamic batching on and off, two servers side by side."""

    #: Concurrency levels, ascending, without repeats (`parse_levels`).
    levels: list[int]
    #: Pin both servers (and the raw runtime) to these CPUs (taskset's list syntax).
    server_cpus: str | None = None
    #: Then offer 10x the sustained rate this many seconds to the batching server (0: no).
    overload: float = 0.0
    overload_connections: int = 128
    #: Alternating rounds per level (the median counts).
    rounds: int = 3


#: Where the priority bench's requests carry their level: the `X-Request-Priority` header (read
#: before the body, so a refused request's body is never decoded) or `parameters.priority`.
PriorityBy = Literal["header", "body"]


@dataclass(frozen=True)
class PriorityOptions:
    """`--priority`: an urgent stream alone, then through a flood (one server, two levels)."""

    #: Length of each phase.
    seconds: float = 10.0
    #: The level-1 rate, as a fraction of the measured capacity.
    high_share: float = 0.05
    #: The level-2 flood's rate, as a multiple of the capacity.
    flood_factor: float = 10.0
    #: A fixed flood rate (req/s) instead: runs compare alike whatever capacity each measured
    #: (the level-1 rate is then high_share of flood_rps / flood_factor). 0: from the capacity.
    flood_rps: float = 0.0
    #: The flood's connections: more than the model admits, or the flood stalls.
    flood_connections: int = 160
    #: The flood client's CPU priority, this many steps lower.
    flood_nice: int = 0
    #: Level 2's max_batch_size (0: the model's own).
    flood_batch: int = 0
    #: Pin the server to these CPUs (taskset's list syntax); the clients keep off them.
    server_cpus: str | None = None
    #: How each request names its level.
    by: PriorityBy = "header"

    def check(self) -> None:
        """Values a run cannot work with are refused, naming the flag."""
        for key, flag, least in (
            ("seconds", "priority-seconds", 0.5),
            ("flood_connections", "flood-connections", 1),
            ("flood_factor", "flood-factor", 1),
            ("flood_batch", "flood-batch", 0),
            ("flood_nice", "flood-nice", 0),
            ("flood_rps", "flood-rps", 0),
        ):
            value = getattr(self, key)
            if value < least:
                raise ConfigError(f"--{flag} = {value}: must be at least {least}")
        if not 0 < self.high_share < 1:
            raise ConfigError(
                f"--high-share = {self.high_share}: must be a fraction between 0 and 1"
            )
        if self.by not in ("header", "body"):
            raise ConfigError(f"--priority-by {self.by!r}: expected header or body")
        if self.server_cpus:
            parse_cpus(self.server_cpus)


@dataclass(frozen=True)
class IsolationOptions:
    """`--isolation`: the model in-process and in a worker process, two servers side by side."""

    #: Concurrency levels, ascending (`parse_levels`): the lowest gives the added latency, the
    #: highest the throughput ratio.
    levels: list[int]
    #: Alternating rounds per level (the median counts).
    rounds: int = 3


@dataclass(frozen=True)
class BenchOptions:
    """One `appliance bench` run; the defaults are the CLI's."""

    #: A model file, or the name of a model in the store.
    model: str
    #: Timed requests per measurement, after `warmup` untimed ones.
    requests: int = 2000
    warmup: int = 200
    #: Connections of the throughput run.
    concurrency: int = 4
    #: Size of each dynamic dimension of the inputs.
    batch: int = 1
    #: Tensors as binary data (both ways) instead of JSON.
    binary: bool = False
    #: Also time QoS 1 round trips through the MQTT broker at this URL.
    mqtt: str | None = None
    #: Device for the model (auto, cuda, cpu); None: the config's.
    device: str | None = None
    #: The config file and model store, as `--config` and `--models` (None: the defaults).
    config: str | None = None
    models: str | None = None
    #: Print the figures as one JSON object instead of a table.
    json: bool = False
    #: GGUF chat models: timed streamed completions per side, and max_tokens of each.
    runs: int = 3
    max_tokens: int = 64
    #: Batching on vs off instead of the usual run.
    sweep: SweepOptions | None = field(default=None)
    #: An urgent stream through a flood instead of the usual run (before `sweep` if both).
    priority: PriorityOptions | None = field(default=None)
    #: In-process vs isolated instead of the usual run.
    isolation: IsolationOptions | None = field(default=None)

    @property
    def quiet(self) -> bool:
        """No progress lines on stderr when the output is JSON."""
        return self.json

    def flags(self) -> ConfigFlags:
        """The settings flags both the bench process and the servers it starts are given."""
        return ConfigFlags(
            config=self.config, models=self.models, device=self.device, mqtt=self.mqtt
        )

    def check(self) -> None:
        """Counts a run cannot work with are refused, naming the flag."""
        for key, least in (("requests", 1), ("warmup", 0), ("concurrency", 1), ("batch", 1),
                           ("runs", 1), ("max_tokens", 1)):  # fmt: skip
            value = getattr(self, key)
            if value < least:
                flag = key.replace("_", "-")
                raise ConfigError(f"--{flag} = {value}: must be at least {least}")


def parse_levels(text: str, flag: str = "--sweep") -> list[int]:
    """`--sweep 1,8,32`: the concurrency levels, sorted, without repeats."""
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise ConfigError(f"{flag} {text!r}: expected concurrency levels such as 1,8,32")
    return sorted(set(levels))


def parse_cpus(text: str) -> set[int]:
    """taskset's list syntax: 0,2-3."""
    out: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ConfigError(f"--server-cpus {text!r}: expected CPUs such as 0 or 0,2-3") from None
    return out
