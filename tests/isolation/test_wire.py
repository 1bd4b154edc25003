"""The worker protocol over a real socket pair and real shared memory: every datatype round
trips, segments grow, and whatever a (possibly compromised) worker sends is checked."""

from __future__ import annotations

import array
import socket
from typing import Any

import numpy as np
import orjson
import pytest

from appliance.isolation import wire
from appliance.isolation.wire import CALL, REPLY, Channel, Closed, ProtocolError, Segment
from appliance.tensors import DATATYPES


def roundtrip(src: Channel, dst: Channel, arrays: dict[str, Any], copy: bool) -> dict[str, Any]:
    src.send(CALL, {"call": "run"}, arrays, 0)
    packet = dst.receive()
    assert packet[:1] == CALL
    doc, layout = dst.header(packet)
    assert doc == {"call": "run"}
    out, _ = dst.arrays(layout, copy)
    return out


def every_datatype() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    for name, dtype in DATATYPES.items():
        if name == "BYTES":
            out[name] = np.array([b"ab", "é", b""], dtype=object).reshape(3, 1)
        elif name == "BOOL":
            out[name] = rng.random((2, 3)) < 0.5
        else:
            out[name] = (rng.random((2, 3)) * 100).astype(dtype)
    out["scalar"] = np.float32(2.5)
    out["empty"] = np.zeros((0, 4), np.int64)
    out["strided"] = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2].T
    out["big_endian"] = np.arange(5, dtype=">i4")
    return out


def test_every_datatype_and_layout_round_trips_both_ways(pair) -> None:
    server, worker = pair
    sent = every_datatype()
    got = roundtrip(server, worker, sent, copy=False)
    back = roundtrip(worker, server, got, copy=True)
    for name, value in sent.items():
        want = np.asarray(value)
        if want.dtype == object:
            want = np.array([x.encode() if isinstance(x, str) else x for x in want.reshape(-1)],
                            dtype=object).reshape(want.shape)  # fmt: skip
        for result in (got[name], back[name]):
            assert result.shape == want.shape, name
            assert result.tolist() == want.tolist(), name
            assert result.dtype == want.dtype.newbyteorder("="), name
    assert back["FP32"].flags.writeable and back["FP32"].base is None  # copied out


def test_segments_grow_on_either_side_and_the_peer_adopts_them(pair) -> None:
    server, worker = pair
    big = np.arange(600_000, dtype=np.float32)  # 2.4 MB: more than the first segment
    got = roundtrip(server, worker, {"x": big}, copy=False)
    assert worker.segment.size >= big.nbytes and np.array_equal(got["x"], big)
    bigger = np.ones((2, 1_000_000), np.float64)  # the worker needs more still for its reply
    worker.send(REPLY, {}, {"y": bigger}, 0)
    out, _ = server.arrays(server.header(server.receive())[1], copy=True)
    assert np.array_equal(out["y"], bigger)
    assert server.segment.size == worker.segment.size >= bigger.nbytes


def test_a_closed_peer_is_noticed(pair) -> None:
    server, worker = pair
    server.sock.close()
    with pytest.raises(Closed):
        worker.receive()


def forged(server: Channel, worker: Channel, layout: Any, header: bytes | None = None) -> None:
    """The worker answers with a hand-made header: as a compromised runtime could."""
    mm = worker.segment.map
    assert mm is not None
    body = header if header is not None else orjson.dumps({"tensors": layout})
    mm[0 : len(body)] = body
    worker.sock.send(REPLY + wire.SHARED + wire._WHERE.pack(0, len(body)))


@pytest.mark.parametrize(
    ("layout", "header"),
    [
        ([["y", "FP32", [4], 1 << 40, 16]], None),  # beyond the segment
        ([["y", "FP32", [4], 64, 12]], None),  # bytes that do not hold the shape
        ([["y", "FP32", [-4], 64, 16]], None),  # negative dimension
        ([["y", "COMPLEX", [1], 64, 8]], None),  # not a datatype
        ([["y", "FP32", "4", 64, 16]], None),  # not a shape
        ([["y", "FP32", [4], 64]], None),  # too short
        ([{"name": "y"}], None),  # not a list
        ([["y", "BYTES", [2], 64, 6]], None),  # BYTES whose lengths run past their bytes
        (None, b"not json"),
        (None, b"[1, 2]"),
    ],
)
def test_whatever_a_worker_sends_is_checked(pair, layout: Any, header: bytes | None) -> None:
    server, worker = pair
    roundtrip(server, worker, {"x": np.zeros(4, np.float32)}, copy=False)  # maps the segment
    assert worker.segment.map is not None
    worker.segment.map[64:70] = b"\xff\xff\x00\x00ab"
    forged(server, worker, layout, header)
    packet = server.receive()
    with pytest.raises(ProtocolError):
        _, got = server.header(packet)
        server.arrays(got, copy=True)


def test_a_header_outside_the_segment_is_refused(pair) -> None:
    server, worker = pair
    roundtrip(server, worker, {"x": np.zeros(4, np.float32)}, copy=False)
    worker.sock.send(REPLY + wire.SHARED + wire._WHERE.pack(server.segment.size - 2, 10))
    with pytest.raises(ProtocolError, match="outside"):
        server.header(server.receive())


def test_headers_too_large_for_a_packet_go_through_the_segment(pair) -> None:
    server, worker = pair
    texts = ["x" * 1000] * 40  # a 40 kB header
    server.send(CALL, {"call": "embed", "texts": texts}, {}, 0)
    packet = worker.receive()
    assert packet[1:2] == wire.SHARED
    assert worker.header(packet)[0]["texts"] == texts


def test_a_receive_past_its_timeout_raises_timeout_error_and_the_channel_still_works(
    pair,
) -> None:
    server, worker = pair
    server.set_timeout(0.05)
    with pytest.raises(TimeoutError):
        server.receive()
    worker.send(REPLY, {}, {"y": np.ones(2, np.float32)}, 0)
    assert server.message(server.receive(), copy=True)[1]["y"].tolist() == [1.0, 1.0]
    server.set_timeout(None)  # for ever again: the next receive waits for the packet
    worker.sock.send(REPLY + wire.INLINE + b"{}")
    assert server.receive() == REPLY + wire.INLINE + b"{}"


def test_a_message_seen_before_is_read_anew_and_checked_again_in_another_segment(pair) -> None:
    """Requests of one shape send the same packet each time: its header is parsed and checked
    once, but the tensors are read from the segment every time, and a new segment (which may be
    smaller) is checked again."""
    server, worker = pair
    for value in (1.0, 2.0, 3.0):
        server.send(CALL, {"call": "run", "outputs": None}, {"x": np.full(4, value, "f4")}, 0)
        doc, arrays, _ = worker.message(worker.receive(), copy=True)
        assert doc == {"call": "run", "outputs": None}
        assert arrays["x"].tolist() == [value] * 4
        doc["call"] = "changed"  # each reader gets its own header
    big = {"a": np.ones(4, np.float32), "x": np.ones(600_000, np.float32)}  # past 1 MiB
    server.send(CALL, {"call": "run"}, big, 0)
    packet = worker.receive()
    assert worker.message(packet, copy=False)[1]["x"].shape == (600_000,)
    # the same packet again, with a segment of 1 MiB: its tensor now lies outside
    small = Segment.create(1)
    fds = array.array("i", [small.fd])
    server.sock.sendmsg([packet], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    again = worker.receive()
    assert again == packet and worker.segment.size == wire.INITIAL_BYTES
    with pytest.raises(ProtocolError):
        worker.message(again, copy=False)
    small.close()
