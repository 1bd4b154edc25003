"""gRPC messages and WebSocket frames that are not what they claim, against the real server of
this folder (fast_server: HTTP, MQTT and gRPC in one process).

gRPC: random bytes and valid messages cut short or with flipped bits on every method of
GRPCInferenceService (and on the stream): a status that says what is wrong, never INTERNAL or
UNKNOWN. WebSocket, over a raw socket (no client library would send these): unmasked frames,
reserved bits, unknown opcodes, stray continuations, fragmented or oversized control frames,
invalid UTF-8 in a text frame, a length past the message limit, frames after the close, a frame
cut off by a disconnect, random bytes: the connection is closed with the RFC 6455 code that
says why (or dropped), and the server answers the next client.

Each example ends with a good request, and each test with a look at the server's log."""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import struct
from collections.abc import Iterator
from typing import Any

import grpc
import orjson
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from appliance.api.oip import grpc_service_pb2 as pb
from tests.conftest import ServerProcess

from .conftest import EXAMPLES
from .fronts import assert_clean_log
from .test_kserve_http import GOOD

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
BAD_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS)


def _good_infer() -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="sample", id="good")
    msg.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    msg.raw_input_contents.append(struct.pack("<4f", 1, 2, 3, 4))
    return msg


def _base(method: Any) -> bytes:
    """A valid request of `method` (names that exist, but not for load/unload)."""
    cls = getattr(pb, method.input_type.name)
    if method.input_type.name == "ModelInferRequest":
        return bytes(_good_infer().SerializeToString())
    msg = cls()
    for field in ("name", "model_name"):
        if field in cls.DESCRIPTOR.fields_by_name:
            keep = "Repository" not in method.name
            setattr(msg, field, "sample" if keep else "not-a-model")
    return bytes(msg.SerializeToString())


@st.composite
def payloads(draw: st.DrawFn, method: Any) -> bytes:
    base = _base(method)
    kind = draw(st.sampled_from(["random", "cut", "flip", "extend", "varint"]), label="kind")
    event(f"payload {kind}")
    if kind == "random":
        return draw(st.binary(max_size=200))
    if kind == "cut" and base:
        return base[: draw(st.integers(0, len(base) - 1))]
    if kind == "flip" and base:
        data = bytearray(base)
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(data) - 1))
            data[at] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if kind == "varint":  # a length-delimited field claiming far more bytes than follow
        return base + b"\x3a" + b"\xff" * 9 + b"\x01" + b"x"
    return base + draw(st.binary(min_size=1, max_size=32))


@pytest.fixture(scope="module")
def channel(fast_server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{fast_server.grpc_port}") as ch:  # type: ignore[attr-defined]
        yield ch


@pytest.fixture(scope="module")
def grpc_serving(fast_server: ServerProcess, channel: grpc.Channel) -> Iterator[Any]:
    infer = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelInferResponse.FromString,
    )
    first = infer(_good_infer(), timeout=30)
    seen = [assert_clean_log(fast_server)]

    def check() -> None:
        seen[0] = assert_clean_log(fast_server, seen[0])
        assert infer(_good_infer(), timeout=30).raw_output_contents == first.raw_output_contents

    yield check
    assert_clean_log(fast_server, seen[0])


@given(data=st.data())
def test_malformed_protobuf_on_every_method(
    channel: grpc.Channel, grpc_serving: Any, data: st.DataObject
) -> None:
    method = data.draw(st.sampled_from(list(SERVICE.methods)), label="method")
    payload = data.draw(payloads(method), label="payload")
    path = f"/inference.GRPCInferenceService/{method.name}"
    try:
        if method.client_streaming:
            call = channel.stream_stream(path, request_serializer=None, response_deserializer=None)
            for reply in call(iter([payload, payload]), timeout=30):
                answer = pb.ModelStreamInferResponse.FromString(reply)
                event(f"{method.name}: stream error {bool(answer.error_message)}")
        else:
            call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
            call(payload, timeout=30)
            event(f"{method.name}: OK")
    except grpc.RpcError as err:
        event(f"{method.name}: {err.code().name}")
        assert err.code() not in BAD_CODES, (method.name, payload, err.code(), err.details())
        assert err.details(), (method.name, err.code())
    grpc_serving()


# -- WebSocket, byte by byte ----------------------------------------------------------------------
class RawWs:
    """A WebSocket client that sends whatever bytes it is given after a real handshake."""

    def __init__(self, port: int, path: str = "/v2/models/sample/stream") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            assert chunk, head
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head
        self.buffer = head.split(b"\r\n\r\n", 1)[1]

    @staticmethod
    def frame(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0,
              mask: bool = True, length: int | None = None) -> bytes:  # fmt: skip
        n = len(payload) if length is None else length
        out = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
        bit = 0x80 if mask else 0
        if n < 126:
            out += bytes([bit | n])
        elif n < 1 << 16:
            out += bytes([bit | 126]) + struct.pack(">H", n)
        else:
            out += bytes([bit | 127]) + struct.pack(">Q", n)
        if not mask:
            return out + payload
        key = os.urandom(4)
        return out + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))

    def send(self, data: bytes) -> None:
        # the server may have closed first: what it said is read next
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendall(data)

    def _read(self, n: int) -> bytes | None:
        while len(self.buffer) < n:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                return None
            if not chunk:
                return None
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def receive(self) -> tuple[int, bytes] | None:
        """(opcode, payload) of the server's next frame; None once the connection is gone."""
        head = self._read(2)
        if head is None:
            return None
        n = head[1] & 0x7F
        if n == 126:
            raw = self._read(2)
            n = struct.unpack(">H", raw)[0] if raw else 0
        elif n == 127:
            raw = self._read(8)
            n = struct.unpack(">Q", raw)[0] if raw else 0
        payload = self._read(n) if n else b""
        return head[0] & 0x0F, payload or b""

    def close_code(self, answered: bool = False) -> int | None:
        """The code of the server's close frame (skipping data frames, or with `answered`
        ANSWERED for a data frame); None if it just hung up."""
        while (got := self.receive()) is not None:
            opcode, payload = got
            if opcode == 0x8:
                return struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
            if answered and opcode in (0x1, 0x2):
                return ANSWERED
        return None

    def close(self) -> None:
        self.sock.close()


#: What RawWs.close_code says of a data frame where a close was expected.
ANSWERED = -1


def _good_message() -> bytes:
    return orjson.dumps({**orjson.loads(GOOD), "id": "good"})


@pytest.fixture(scope="module")
def ws_serving(fast_server: ServerProcess) -> Iterator[Any]:
    seen = [assert_clean_log(fast_server)]

    def check() -> None:
        seen[0] = assert_clean_log(fast_server, seen[0])
        ws = RawWs(fast_server.port)
        ws.send(RawWs.frame(0x1, _good_message()))
        got = ws.receive()
        assert got is not None and got[0] == 0x1, got
        assert orjson.loads(got[1])["id"] == "good", got
        ws.send(RawWs.frame(0x8, struct.pack(">H", 1000)))
        ws.close()

    yield check
    assert_clean_log(fast_server, seen[0])


F = RawWs.frame
TEXT, BINARY, CONT, CLOSE, PING = 0x1, 0x2, 0x0, 0x8, 0x9
HUGE = 1 << 62


@pytest.mark.parametrize(
    ("frames", "codes"),
    [
        # RFC 6455 says close; aiohttp reads it like a masked frame and answers (harmless)
        ([F(TEXT, _good_message(), mask=False)], {1002, ANSWERED}),
        ([F(TEXT, b"{}", rsv=4)], {1002}),
        ([F(0x3, b"x")], {1002}),
        ([F(0xB, b"x")], {1002}),
        ([F(CONT, b"stray")], {1002}),
        ([F(PING, b"x", fin=False)], {1002}),
        ([F(PING, b"x" * 126)], {1002}),
        ([F(TEXT, b'{"id": "\xff\xfe"}')], {1007}),
        ([F(TEXT, b"", length=HUGE)], {1009}),
        ([F(BINARY, b"", length=HUGE)], {1009}),
        ([F(TEXT, b"[", fin=False), F(CONT, b"1", length=HUGE)], {1009}),
        ([F(TEXT, b"[", fin=False), F(TEXT, b"1]")], {1002}),
        ([F(CLOSE, b"\x03\xe8"), F(TEXT, _good_message()), F(BINARY, b"\x00" * 10)], {1000}),
        ([F(CLOSE, b"\x00\x01")], {1002}),  # a close code no one may send
        ([F(CLOSE, b"\x03")], {1002}),  # a close payload of one byte
        ([F(CLOSE, b"\x03\xe8\xff")], {1002, 1007}),  # a reason that is not UTF-8
    ],
    ids=[
        "unmasked", "rsv", "opcode-3", "opcode-B", "stray-continuation", "fragmented-ping",
        "long-ping", "text-not-utf8", "huge-text", "huge-binary", "huge-continuation",
        "text-inside-fragments", "frames-after-close", "close-code-1", "close-1-byte",
        "close-reason-not-utf8",
    ],
)  # fmt: skip
def test_broken_websocket_frames(
    fast_server: ServerProcess, ws_serving: Any, frames: list[bytes], codes: set[int]
) -> None:
    ws = RawWs(fast_server.port)
    for frame in frames:
        ws.send(frame)
    code = ws.close_code(answered=ANSWERED in codes)
    ws.close()
    assert code in codes, code
    ws_serving()


def test_a_frame_cut_off_by_a_disconnect(fast_server: ServerProcess, ws_serving: Any) -> None:
    for cut in (1, 2, 5, 9):
        ws = RawWs(fast_server.port)
        ws.send(RawWs.frame(TEXT, _good_message())[:cut])
        ws.close()
    ws_serving()


@settings(max_examples=max(10, EXAMPLES // 8))
@given(junk=st.binary(min_size=1, max_size=300))
def test_random_bytes_after_the_handshake(
    fast_server: ServerProcess, ws_serving: Any, junk: bytes
) -> None:
    ws = RawWs(fast_server.port)
    ws.send(junk)
    ws.sock.settimeout(0.3)  # bytes that leave a frame unfinished get no answer: fine
    code = ws.close_code()
    ws.close()
    event(f"close {code}")
    assert code is None or code in (1002, 1007, 1009, 1000), code
    ws_serving()
