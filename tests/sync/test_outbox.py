"""The telemetry outbox on a real SQLite file: order, acknowledgement, the cap, SIGKILL."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from appliance.sync.outbox import Outbox


def test_events_keep_their_order_and_leave_only_when_acknowledged(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", 1 << 20)
    seqs = [box.append("metrics", {"i": i}) for i in range(10)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 10
    batch = box.batch(4)
    assert [e.data["i"] for e in batch] == [0, 1, 2, 3]
    assert box.acknowledge(batch[-1].seq) == 4
    assert [e.data["i"] for e in box.batch(100)] == list(range(4, 10))
    assert box.depth == 6
    box.close()


def test_sequence_numbers_are_never_reused_after_restart(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    box = Outbox(path, 1 << 20)
    for i in range(5):
        box.append("status", {"i": i})
    box.acknowledge(box.last_seq())  # everything uploaded: the table is empty
    box.close()
    box = Outbox(path, 1 << 20)
    assert box.depth == 0
    assert box.append("status", {}) == 6
    box.close()


def test_a_full_outbox_drops_the_oldest_and_says_so(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", 64 * 1024)
    payload = {"blob": "x" * 900}
    for i in range(200):
        box.append("metrics", {**payload, "i": i})
    assert box.bytes <= 64 * 1024
    assert box.dropped > 0
    events = box.batch(500)
    drops = [e for e in events if e.kind == "dropped"]
    assert drops, "a drop must be reported as an event"
    assert sum(e.data["count"] for e in drops) == box.dropped
    kept = [e.data["i"] for e in events if e.kind == "metrics"]
    assert kept == list(range(kept[0], 200)), "the newest events survive, in order"
    # every dropped seq is accounted for: dropped ranges + kept rows cover 1..last
    covered = set()
    for e in drops:
        covered |= set(range(e.data["first_seq"], e.data["last_seq"] + 1))
    covered |= {e.seq for e in events}
    assert covered == set(range(1, box.last_seq() + 1))
    box.close()
    assert Outbox(tmp_path / "o.sqlite", 64 * 1024).dropped == box.dropped


_WRITER = """
import sys
from pathlib import Path
from appliance.sync.outbox import Outbox
box = Outbox(Path(sys.argv[1]), 1 << 24)
i = 0
while True:
    seq = box.append("metrics", {"i": i})
    print(seq, flush=True)
    i += 1
"""


def test_sigkill_loses_no_committed_event(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    for _trial in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        printed: list[int] = []
        deadline = time.monotonic() + 30
        while len(printed) < 50 and time.monotonic() < deadline:
            printed.append(int(proc.stdout.readline()))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        box = Outbox(path, 1 << 24)
        stored = {e.seq for e in box.batch(1_000_000)}
        assert set(printed) <= stored
        box.close()
    box = Outbox(path, 1 << 24)
    seqs = [e.seq for e in box.batch(1_000_000)]
    assert seqs == sorted(set(seqs))
    box.close()
