"""The worker protocol: small packets over a socket pair, the data in shared memory.

Each channel (one per request a model runs at once) is an AF_UNIX SOCK_SEQPACKET pair and one
shared memory segment (a memfd both processes map). A message is its tensors, then a JSON
header naming them, written into the segment; the packet that follows only says where the
header lies (`op`, offset, length). Nothing is pickled in either direction: the worker runs
model files the server does not trust, so the server reads its answers as data only, checks
every offset, shape and type against the segment, and copies results out.

A side that needs more room than the segment has makes a larger one and sends its file
descriptor with the packet (SCM_RIGHTS); the other side adopts it. Generated text travels
inside the packets instead (op PIECE), so a stream never overwrites what is still being read.

Timeouts are the kernel's (SO_RCVTIMEO, SO_SNDTIMEO on a blocking socket): a receive is one
system call, where a Python socket timeout makes it a poll() and then the receive.
"""

from __future__ import annotations

import array
import math
import mmap
import os
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

from ..tensors import DATATYPES, datatype_of
from .spin import PREEMPTED_S, Spin

#: Packet kinds, the first byte. Server to worker: CALL (a JSON header), CANCEL (stop the
#: generation running). Worker to server: REPLY (a JSON header), PIECE (text).
CALL, CANCEL, REPLY, PIECE = b"C", b"X", b"R", b"P"
#: The second byte of a CALL or REPLY: the JSON header follows (INLINE), or lies in the segment
#: at the offset and length that follow (SHARED).
INLINE, SHARED = b"J", b"S"
_TIMEVAL = struct.Struct("@ll")
_WHERE = struct.Struct("<QQ")
#: Headers up to this size travel inside the packet.
INLINE_HEADER = 8 * 1024
#: Largest packet (a piece of text is cut to fit).
MAX_PACKET = 16 * 1024
_FD_SPACE = socket.CMSG_SPACE(array.array("i", [0]).itemsize)
ALIGN = 64
#: A new segment's size; it grows (to the next power of two) when a message needs more.
INITIAL_BYTES = 1 << 20
_LEN = struct.Struct("<I")
_NOWAIT = socket.MSG_DONTWAIT
_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)
#: The datatypes of native, little-endian arrays (the common case, looked up directly).
_NATIVE = {dtype: name for name, dtype in DATATYPES.items() if name != "BYTES"}

Arrays = dict[str, np.ndarray[Any, Any]]
#: A tensor of a message already checked: name, dtype, shape, offset in the segment.
_Checked = tuple[str, np.dtype[Any], tuple[int, ...], int]


class ProtocolError(Exception):
    """The peer sent something this side cannot read: it is treated as broken."""


class Closed(Exception):
    """The peer closed its end (it exited, or was killed)."""


class Segment:
    """Shared memory both processes map: a memfd (anonymous: nothing to clean up after a crash)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = os.fstat(fd).st_size if fd >= 0 else 0
        self.map = mmap.mmap(fd, self.size) if self.size else None

    @classmethod
    def empty(cls) -> Segment:
        """No memory yet: the worker's, until the server's first packet brings a segment."""
        return cls(-1)

    @classmethod
    def create(cls, least: int) -> Segment:
        size = max(INITIAL_BYTES, 1 << max(0, least - 1).bit_length())
        fd = os.memfd_create("appliance-worker", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd)

    def close(self) -> None:
        # A mapping that arrays still view stays until they go; the fd can go now.
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Channel:
    """One end of a channel: the socket, the segment, and reading and writing messages."""

    def __init__(self, sock: socket.socket, segment: Segment) -> None:
        self.sock = sock
        self.segment = segment
        #: The segment is new to the peer: its fd goes with the next packet.
        self._announce = False
        self._timeout: float | None = None
        #: The last message read whose header travelled in its packet: (packet, segment, header
        #: of scalars, its tensors as checked, end). Requests of one shape send the same packet
        #: again and again; one equal to it (and read from the same segment) is not parsed and
        #: checked again.
        self._seen: tuple[bytes, Segment, dict[str, Any], list[_Checked], int] | None = None
        #: Set on a channel whose receives may poll first (`receive_polling`; spin.py).
        self.spin: Spin | None = None

    def set_timeout(self, seconds: float | None) -> None:
        """How long a receive (or a send to a full socket) may wait, None: for ever; system
        calls only when it changes. A receive that waited that long raises TimeoutError."""
        if seconds != self._timeout:
            whole = 0.0 if seconds is None else max(seconds, 1e-6)
            value = _TIMEVAL.pack(int(whole), int(whole % 1 * 1e6))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
            self._timeout = seconds

    @classmethod
    def create(cls, sock: socket.socket) -> Channel:
        """The server's end: it makes the first segment, sent along with the first packet."""
        channel = cls(sock, Segment.create(INITIAL_BYTES))
        channel._announce = True
        return channel

    def close(self) -> None:
        self.sock.close()
        self.segment.close()

    # -- sending -------------------------------------------------------------------------------
    def send(self, op: bytes, doc: dict[str, Any], arrays: Mapping[str, Any], start: int) -> None:
        """Write `arrays` from offset `start` (or 0 of a new, larger segment), add their layout
        to `doc` under "tensors", and send `doc`: inside the packet when it is small, else in
        the segment after the tensors."""
        layout: list[tuple[str, str, Any, int, int]] = []
        blobs: list[Any] = []
        offset = start
        for name, value in arrays.items():
            arr = value if type(value) is np.ndarray else np.asarray(value)
            datatype = _NATIVE.get(arr.dtype)
            if datatype is None or not arr.flags.c_contiguous:
                datatype, arr = _encode(arr)
            nbytes = len(arr) if datatype == "BYTES" else arr.nbytes
            layout.append((name, datatype, arr.shape, offset, nbytes))
            blobs.append(arr)
            offset += (nbytes + ALIGN - 1) & -ALIGN
        if layout:
            doc["tensors"] = layout
        body = orjson.dumps(doc)
        inline = len(body) <= INLINE_HEADER
        if offset + (0 if inline else len(body)) > self.segment.size:  # rare: from 0 of a new one
            self._grow(offset - start + len(body))
            layout = [(n, d, sh, at - start, nb) for n, d, sh, at, nb in layout]
            offset -= start
            doc["tensors"] = layout
            body = orjson.dumps(doc)
        mm = self.segment.map
        for (_, _, _, at, nbytes), blob in zip(layout, blobs, strict=True):
            if nbytes:
                assert mm is not None
                mm[at : at + nbytes] = blob
        if inline:
            self._ring(op + INLINE + body)
        else:
            assert mm is not None
            mm[offset : offset + len(body)] = body
            self._ring(op + SHARED + _WHERE.pack(offset, len(body)))

    def send_piece(self, text: str) -> None:
        data = text.encode("utf-8")
        step = MAX_PACKET - 1
        for i in range(0, len(data), step):
            self.sock.send(PIECE + data[i : i + step])

    def send_cancel(self) -> None:
        self.sock.send(CANCEL)

    def _grow(self, least: int) -> None:
        self.segment.close()
        self.segment = Segment.create(least)
        self._announce = True

    def _ring(self, packet: bytes) -> None:
        if self._announce:
            fds = array.array("i", [self.segment.fd])
            self.sock.sendmsg([packet], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            self._announce = False
        else:
            self.sock.send(packet)

    # -- receiving -----------------------------------------------------------------------------
    def receive(self) -> bytes:
        """The next packet; a segment sent with it replaces this side's own. TimeoutError
        once the timeout set passed."""
        try:
            data, ancdata, flags, _ = self.sock.recvmsg(MAX_PACKET, _FD_SPACE)
        except BlockingIOError:  # SO_RCVTIMEO ran out
            raise TimeoutError("the peer did not answer in time") from None
        return self._received(data, ancdata, flags)

    def receive_polling(self, since: float) -> bytes:
        """`receive`, but first poll for the packet (non-blocking receives) as long as the
        channel's `spin` says, so that this thread (and its CPU) does not sleep if it comes by
        then; `since` (time.perf_counter) is when the wait began, which `spin` learns from."""
        spin = self.spin
        if spin is None:
            return self.receive()
        seconds = spin.window()
        if seconds > 0:
            recvmsg, clock, turn = self.sock.recvmsg, time.perf_counter, os.sched_yield
            last = clock()
            until = last + seconds
            while True:
                try:
                    data, ancdata, flags, _ = recvmsg(MAX_PACKET, _FD_SPACE, _NOWAIT)
                except BlockingIOError:
                    turn()
                    now = clock()
                    if now - last > PREEMPTED_S:
                        spin.wanted()
                        break
                    if now >= until:
                        spin.expired()
                        break
                    last = now
                    continue
                spin.caught()
                spin.observe(clock() - since)
                return self._received(data, ancdata, flags)
        packet = self.receive()
        spin.observe(time.perf_counter() - since)
        return packet

    def _received(self, data: bytes, ancdata: list[tuple[int, int, bytes]], flags: int) -> bytes:
        if ancdata:
            self._adopt(ancdata)
        if not data:
            raise Closed()
        if flags & _TRUNCATED:
            raise ProtocolError("a packet was larger than the protocol allows")
        return data

    def _adopt(self, ancdata: list[tuple[int, int, bytes]]) -> None:
        fds: list[int] = []
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(data[: len(data) - len(data) % got.itemsize])
                fds.extend(got)
        for extra in fds[1:]:
            os.close(extra)
        if fds:
            try:
                segment = Segment(fds[0])
            except (OSError, ValueError) as exc:
                os.close(fds[0])
                raise ProtocolError(f"cannot map the segment the peer sent: {exc}") from None
            self.segment.close()
            self.segment = segment

    def message(self, packet: bytes, copy: bool) -> tuple[dict[str, Any], Arrays, int]:
        """The header of a CALL or REPLY packet, its tensors (views into the segment, or
        copies) and where the last one ends: `header` and `arrays` in one."""
        seen = self._seen
        if seen is not None and seen[0] == packet and seen[1] is self.segment:
            mm = self.segment.map
            arrays: Arrays = {}
            for name, dtype, shape, offset in seen[3]:
                view: np.ndarray[Any, Any] = np.ndarray(shape, dtype, mm, offset)
                arrays[name] = view.copy() if copy else view
            return dict(seen[2]), arrays, seen[4]
        doc, layout = self.header(packet)
        arrays, end = self.arrays(layout, copy)
        if packet[1:2] == INLINE and self.segment.map is not None:
            self._remember(packet, doc, layout, end)
        return doc, arrays, end

    def _remember(self, packet: bytes, doc: dict[str, Any], layout: list[Any], end: int) -> None:
        """Keep a message that `arrays` accepted for `message` to recognise: only plain
        (scalar) header values and tensors of fixed-size types, none of them empty."""
        if not all(v is None or type(v) in (str, int, float, bool) for v in doc.values()):
            return
        checked: list[_Checked] = []
        for name, datatype, shape, offset, nbytes in layout:
            if datatype == "BYTES" or not nbytes:
                return
            checked.append((name, DATATYPES[datatype], tuple(shape), offset))
        self._seen = (bytes(packet), self.segment, dict(doc), checked, end)

    def header(self, packet: bytes) -> tuple[dict[str, Any], list[Any]]:
        """The JSON header of a CALL or REPLY packet (in it, or where it points), and its
        tensor layout."""
        where = packet[1:2]
        if where == INLINE:
            text: Any = memoryview(packet)[2:]
        elif where == SHARED and len(packet) == 2 + _WHERE.size:
            at, length = _WHERE.unpack_from(packet, 2)
            mm = self.segment.map
            if mm is None or at + length > self.segment.size:
                raise ProtocolError("a header outside the shared memory")
            text = mm[at : at + length]
        else:
            raise ProtocolError("a malformed packet")
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(f"a header that is not JSON: {exc}") from None
        if type(doc) is not dict:
            raise ProtocolError("a header that is not a JSON object")
        layout = doc.pop("tensors", None)
        if layout is None:
            layout = []
        elif type(layout) is not list:
            raise ProtocolError("'tensors' is not a list")
        return doc, layout

    def arrays(self, layout: list[Any], copy: bool) -> tuple[Arrays, int]:
        """The tensors a header lists (views into the segment, or copies), checked against
        the segment; and where the last one ends."""
        out: Arrays = {}
        end = 0
        mm = self.segment.map
        size = self.segment.size
        for entry in layout:
            try:
                if type(entry) is not list:
                    raise TypeError
                name, datatype, shape, offset, nbytes = entry
                dtype = DATATYPES[datatype]
                count = 1
                for d in shape:
                    if type(d) is not int or d < 0:
                        raise ValueError
                    count *= d
                ok = (
                    type(name) is str
                    and type(offset) is int
                    and type(nbytes) is int
                    and 0 <= offset <= offset + nbytes <= size
                )
            except (TypeError, ValueError, KeyError):
                ok = False
            if not ok:
                raise ProtocolError(f"a malformed tensor entry: {entry!r:.200}")
            if offset + nbytes > end:
                end = offset + nbytes
            if datatype == "BYTES":
                assert mm is not None
                out[name] = _decode_bytes(name, shape, mm[offset : offset + nbytes])
            elif count * dtype.itemsize != nbytes:
                raise ProtocolError(f"tensor {name!r}: {nbytes} bytes do not hold {shape}")
            elif count == 0 or mm is None:
                out[name] = np.empty(shape, dtype)
            else:
                view: np.ndarray[Any, Any] = np.ndarray(shape, dtype, mm, offset)
                out[name] = view.copy() if copy else view
        return out, (end + ALIGN - 1) & -ALIGN


def _encode(arr: np.ndarray[Any, Any]) -> tuple[str, Any]:
    """(datatype, data) for what the fast path does not take as is: data is a C-ordered
    little-endian array, or bytes for BYTES tensors (each element as a 4-byte little-endian
    length and its bytes, as KServe's binary form)."""
    datatype = datatype_of(arr)
    if datatype == "BYTES":
        chunks = []
        for item in arr.reshape(-1):
            raw = item.encode("utf-8") if isinstance(item, str) else bytes(item)
            chunks.append(_LEN.pack(len(raw)))
            chunks.append(raw)
        return datatype, _Blob(b"".join(chunks), arr.shape)
    return datatype, np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))


class _Blob(bytes):
    """The bytes of a BYTES tensor, with the tensor's shape."""

    shape: tuple[int, ...]

    def __new__(cls, data: bytes, shape: tuple[int, ...]) -> _Blob:
        blob = super().__new__(cls, data)
        blob.shape = shape
        return blob


def _decode_bytes(name: str, shape: tuple[int, ...], data: bytes) -> np.ndarray[Any, Any]:
    count = math.prod(shape)
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(data):
            raise ProtocolError(f"tensor {name!r}: element {i} lies beyond its bytes")
        (n,) = _LEN.unpack_from(data, pos)
        pos += 4
        if pos + n > len(data):
            raise ProtocolError(f"tensor {name!r}: element {i} lies beyond its bytes")
        out[i] = data[pos : pos + n]
        pos += n
    return out.reshape(shape)
