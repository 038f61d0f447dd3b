"""The per-batch channel between a client actor and the cloud actor on the same machine.

An SFL-v2 batch is a round trip from a client actor to the cloud actor: features up, dL/dz
back. As a Ray actor call it costs about 2 ms on an idle 2-core machine and 7-8 ms on a busy
one, on the critical path of every batch (measured: docs/decisions.md). On the cloud's own node
the clients use this channel instead, a Unix stream socket served by the cloud actor's event
loop: 0.37 ms a round trip for the same 50 kB batch. Clients on other nodes call the actor
through Ray as before, with the same request and the same reply.

Linux only (elsewhere clients call through Ray): the socket is in the abstract namespace, so
no file is left behind when Ray kills the cloud. Any local user can connect to such a socket, so
the channel authenticates: the client's first 32 bytes must be the cloud's random token, which
only reaches processes through the run's token-authenticated Ray; the cloud closes any
connection that does not send it within :data:`AUTH_TIMEOUT_S`, before reading anything else.

A message is a frame: two little-endian uint32 (header and body lengths), a JSON header, and
the body, the raw bytes of the header's arrays in order, each padded to 64 bytes; each array
travels in its own memory layout (the header says its axes in memory order). Only plain
numeric dtypes are read back, so a frame holds data and never code (no pickle). The arrays are
read into 64-byte aligned memory: torch's kernels can sum in another order on data aligned
otherwise, and a run would then differ in the last bits from the same run through Ray.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

TOKEN_BYTES = 32
AUTH_TIMEOUT_S = 10.0
MAX_HEADER = 1 << 20
MAX_BODY = 1 << 31
ALIGN = 64  # where each array starts in a frame's body, as Ray aligns the arrays it deserialises
_LENGTHS = struct.Struct("<II")
AVAILABLE = sys.platform == "linux"  # abstract socket addresses are a Linux feature

Handler = Callable[[dict[str, Any], list[np.ndarray]], Awaitable[tuple[dict[str, Any], list[np.ndarray]]]]


class ChannelError(RuntimeError):
    """The cloud refused the request; the message is its error's."""


def _padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _in_memory_order(a: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """``a`` with its axes in memory order, C-contiguous, and that order (a copy in C order
    only when ``a`` does not fill its memory densely, e.g. a strided slice)."""
    axes = [int(i) for i in np.argsort([-s for s in a.strides], kind="stable")]
    dense = a.transpose(axes)
    if dense.flags.c_contiguous:
        return dense, axes
    return np.ascontiguousarray(a), list(range(a.ndim))


def encode(header: dict[str, Any], arrays: Sequence[np.ndarray]) -> list[bytes | memoryview]:
    """A frame, as buffers to send in order (the arrays are not copied); each array's bytes are
    padded to a multiple of :data:`ALIGN`. An array keeps its memory layout (a channels-last
    tensor's features stay channels-last), as through Ray: torch computes on the layout it gets,
    and another layout can round otherwise."""
    dense = [_in_memory_order(np.asarray(a)) for a in arrays]
    head = json.dumps(header | {"arrays": [[a.dtype.str, list(a.shape), axes] for a, axes in dense]}).encode()
    frame: list[bytes | memoryview] = [_LENGTHS.pack(len(head), sum(_padded(a.nbytes) for a, _ in dense)), head]
    for a, _ in dense:
        frame += [a.reshape(-1).view(np.uint8).data, bytes(_padded(a.nbytes) - a.nbytes)]
    return frame


def aligned(nbytes: int) -> np.ndarray:
    """An uninitialised byte buffer whose start is a multiple of :data:`ALIGN`."""
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + nbytes]


def lengths(prefix: bytes) -> tuple[int, int]:
    """The header and body lengths a frame starts with, refused when out of bounds."""
    head, body = _LENGTHS.unpack(prefix)
    if head > MAX_HEADER or body > MAX_BODY:
        raise ValueError(f"a frame of {head} + {body} bytes is over the channel's limits")
    return head, body


def decode(head: bytes, body: np.ndarray) -> tuple[dict[str, Any], list[np.ndarray]]:
    """A frame's header and its arrays (writable views into ``body``, a buffer from
    :func:`aligned`); ValueError when the header is not a JSON object with a list of arrays, or
    its arrays are not plain numbers or do not fill the body exactly."""
    header = json.loads(head)
    entries = header.pop("arrays", None) if isinstance(header, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, list) and len(e) == 3 for e in entries):
        raise ValueError("a frame's header must be a JSON object listing its arrays")
    arrays, offset = [], 0
    for dtype_str, shape, axes in entries:
        try:
            dtype = np.dtype(str(dtype_str))
        except TypeError:
            raise ValueError(f"no dtype {dtype_str!r}") from None
        if (dtype.kind not in "biuf" or not all(isinstance(n, int) and n >= 0 for n in shape)
                or sorted(axes) != list(range(len(shape)))):
            raise ValueError(f"the channel carries plain numeric arrays only, not {dtype_str} {shape} {axes}")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset + size > len(body):
            raise ValueError(f"the frame's arrays take more than its {len(body)} bytes")
        arrays.append(body[offset:offset + size].view(dtype).reshape(shape).transpose(np.argsort(axes)))
        offset += _padded(size)
    if offset != len(body):
        raise ValueError(f"the frame's arrays take {offset} bytes of its {len(body)}")
    return header, arrays


def address() -> str:
    """A fresh abstract socket address (the leading NUL: no file)."""
    return f"\0sfl-cloud-{secrets.token_hex(8)}"


async def serve(addr: str, token: bytes, handle: Handler, after: Callable[[], None] = lambda: None
                ) -> asyncio.AbstractServer:
    """Serve ``handle`` on ``addr`` in the running event loop, one request at a time per
    connection, to clients that open with ``token``. A request that ``handle`` fails is
    answered with the error's text; a malformed frame closes the connection. ``after`` runs
    once each answer is handed to the socket, before the loop runs anything else."""

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            offered = await asyncio.wait_for(reader.readexactly(TOKEN_BYTES), AUTH_TIMEOUT_S)
            if not hmac.compare_digest(offered, token):
                return
            while True:
                head_len, body_len = lengths(await reader.readexactly(_LENGTHS.size))
                head = await reader.readexactly(head_len)
                body = aligned(body_len)
                body[:] = np.frombuffer(await reader.readexactly(body_len), np.uint8)
                header, arrays = decode(head, body)
                try:
                    reply = await handle(header, arrays)
                except Exception as exc:  # the caller's error, e.g. a client dropped from its wave
                    reply = ({"error": f"{type(exc).__name__}: {exc}"}, [])
                try:
                    writer.writelines(encode(*reply))
                finally:
                    after()
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass  # the client left, never authenticated, or sent a malformed frame
        finally:
            writer.close()

    return await asyncio.start_unix_server(connection, addr)


class ChannelClient:
    """A client actor's blocking connection to the cloud; one request at a time."""

    def __init__(self, addr: str, token: bytes) -> None:
        self.addr, self.token = addr, token
        self._sock: socket.socket | None = None

    def request(self, header: dict[str, Any], arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Send a request and return the reply's arrays; raises ChannelError with the cloud's
        error. A request cut off midway (an error, an interrupt) closes the connection, and the
        next request opens a new one."""
        try:
            sock = self._connect()
            frame = encode(header, arrays)
            sent = sock.sendmsg(frame)
            if sent < sum(len(b) for b in frame):  # a blocking stream socket rarely sends less
                sock.sendall(b"".join(frame)[sent:])
            head_len, body_len = lengths(self._read(_LENGTHS.size).tobytes())
            reply, out = decode(self._read(head_len).tobytes(), self._read(body_len))
        except BaseException:
            self.close()
            raise
        if "error" in reply:
            raise ChannelError(reply["error"])
        return out

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.addr)
            sock.sendall(self.token)
            self._sock = sock
        return self._sock

    def _read(self, n: int) -> np.ndarray:
        assert self._sock is not None  # request() connected first
        buf = aligned(n)
        view, got = buf.data, 0
        while got < n:
            k = self._sock.recv_into(view[got:])
            if k == 0:
                raise ConnectionError("the cloud closed the channel")
            got += k
        return buf
