"""Dynamic batching: requests queued for one model merged along dimension 0 into one run.

A runtime call has a fixed cost (thread wake-up, graph dispatch, reading the weights) that a
batch pays once. The policy is adaptive by default: a worker takes the first queued request and
whatever else queued while the previous run was in progress, and never waits for more, so a
lone request runs at once and batching costs nothing at low load. `max_queue_delay_us` adds a
bounded wait, as Triton's dynamic batcher does, for those who trade latency for throughput.

Only requests that can share a run are merged: same requested outputs, and every input with the
same dtype and the same dimensions beyond the first. The outputs are split back by each
request's row count; a model whose outputs turn out not to have that leading batch dimension
is switched to unbatched runs (see scheduler.py).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backends.base import Backend
from ..config import BatchingConfig

log = logging.getLogger("appliance.engine")

Arrays = dict[str, np.ndarray[Any, Any]]


@dataclass(frozen=True)
class BatchPolicy:
    """How a worker forms batches for one model (from its [models.NAME.batching] settings)."""

    #: Most rows (sum of the members' first dimensions) in one run.
    max_rows: int
    #: Longest the first request waits for more; 0: never wait.
    max_delay_s: float = 0.0
    #: Row counts to cut a batch at, ascending.
    preferred: tuple[int, ...] = ()

    @property
    def target(self) -> int:
        """The row count at which a timed wait ends early."""
        return self.preferred[-1] if self.preferred else self.max_rows


def cannot_batch(backend: Backend) -> str | None:
    """Why this loaded model cannot be batched, or None when it can."""
    if not backend.batchable:
        return f"the {backend.name} backend runs one request at a time"
    sig = backend.signature
    if not sig.inputs:
        return "it has no inputs"
    for kind, specs in (("input", sig.inputs), ("output", sig.outputs)):
        for spec in specs:
            if not spec.shape or spec.shape[0] != -1:
                return f"{kind} {spec.name!r} {list(spec.shape)} has no dynamic first dimension"
    return None


def policy_for(config: BatchingConfig, backend: Backend, label: str) -> BatchPolicy | None:
    """The batching policy of a model, or None where batching is off or impossible."""
    if config.enabled is False or config.max_batch_size < 2:
        return None
    why = cannot_batch(backend)
    if why is not None:
        if config.enabled is True:
            log.error("model %s: batching is enabled but %s: it runs unbatched", label, why)
        else:
            log.debug("model %s: not batched: %s", label, why)
        return None
    return BatchPolicy(
        config.max_batch_size,
        config.max_queue_delay_us / 1e6,
        tuple(sorted(set(config.preferred_batch_sizes))),
    )


def merge_key(names: Sequence[str], inputs: Arrays, outputs: list[str] | None) -> Hashable:
    """Requests with equal keys can share a run; None: this request runs alone (its inputs
    disagree on the first dimension, or one is a scalar)."""
    parts: list[Any] = [None if outputs is None else tuple(outputs)]
    rows = -1
    for name in names:
        array = inputs[name]
        if array.ndim == 0 or (rows >= 0 and array.shape[0] != rows):
            return None
        rows = array.shape[0]
        parts.append((array.dtype.str, array.shape[1:]))
    return tuple(parts)


def rows_of(names: Sequence[str], inputs: Arrays) -> int:
    return int(inputs[names[0]].shape[0])


def merge(names: Sequence[str], members: Sequence[Arrays]) -> Arrays:
    """Each input concatenated along dimension 0, in member order."""
    return {name: np.concatenate([m[name] for m in members]) for name in names}


def split(outputs: Arrays, rows: Sequence[int]) -> list[Arrays] | None:
    """Outputs cut back into one dict per member; None if an output lacks the batch dimension."""
    total = sum(rows)
    for array in outputs.values():
        if array.ndim == 0 or array.shape[0] != total:
            return None
    parts: list[Arrays] = []
    start = 0
    for n in rows:
        parts.append({name: array[start : start + n] for name, array in outputs.items()})
        start += n
    return parts


def preferred_cut(rows: Sequence[int], preferred: Sequence[int]) -> int:
    """How many leading members to run now: the longest prefix whose row count is a preferred
    size (all of them when the total is one, or when no prefix is)."""
    total = sum(rows)
    if not preferred or total in preferred:
        return len(rows)
    best, acc = 0, 0
    for i, n in enumerate(rows):
        acc += n
        if acc in preferred:
            best = i + 1
    return best or len(rows)
