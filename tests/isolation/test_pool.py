"""The pool of channels to a worker: the channel used last is taken first (so one request at
a time keeps one warm worker thread), and a caller that finds it empty waits for one."""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Iterator

import pytest

from appliance.isolation.process import ChannelPool
from appliance.isolation.wire import Channel


@pytest.fixture
def channels() -> Iterator[list[Channel]]:
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(3)]
    made = [Channel.create(ours) for ours, _ in pairs]
    yield made
    for channel, (_, theirs) in zip(made, pairs, strict=True):
        channel.close()
        theirs.close()


def test_the_channel_given_back_last_is_taken_first(channels: list[Channel]) -> None:
    pool = ChannelPool()
    for channel in channels:
        pool.put(channel)
    for _ in range(3):  # one call at a time: always the same channel
        taken = pool.get_nowait()
        assert taken is channels[-1]
        pool.put(taken)
    assert [pool.get_nowait() for _ in channels] == channels[::-1]
    with pytest.raises(queue.Empty):
        pool.get_nowait()


def test_a_caller_waits_for_a_channel_given_back(channels: list[Channel]) -> None:
    pool = ChannelPool()
    with pytest.raises(queue.Empty):
        pool.get(0.01)
    got: list[Channel] = []
    waiter = threading.Thread(target=lambda: got.append(pool.get(10.0)))
    waiter.start()
    pool.put(channels[0])
    waiter.join(10.0)
    assert got == [channels[0]]
