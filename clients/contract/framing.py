"""The ZeroMQ pieces both ends share: errors, socket options, frame checks.

Messages are msgspec Structs, msgpack-encoded, one frame each. A frame over the size limit or
that does not decode is refused here with :class:`FrameRejected`, before any handler sees it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import msgspec
import zmq

from secagg.errors import MalformedMessage

log = logging.getLogger(__name__)


Decoder = Callable[..., msgspec.Struct]
"""``decode(data, max_bytes=...)`` returning a Struct or raising ``MalformedMessage``."""


SEND_HWM = 1000
"""Messages a socket queues per peer before :meth:`send` refuses with :class:`SendQueueFull`."""


class TransportError(Exception):
    """Base class of the transport's errors."""


class PeerUnreachable(TransportError):
    """The coordinator has no live connection to the named institution."""


class SendQueueFull(TransportError):
    """The outgoing queue is full (the peer is slow or has been gone for long)."""


class FrameRejected(TransportError):
    """A received frame was not one acceptable message (logged and dropped, never raised out)."""


def receive_queue_depth(max_message_bytes: int, max_queued_bytes: int | None) -> int:
    """Messages a socket may queue from one peer so that they hold at most ``max_queued_bytes``
    (each frame is at most twice ``max_message_bytes``, see :func:`configure_socket`); at least
    one. ``None`` keeps :data:`SEND_HWM`. A full queue stops reading from that peer's
    connection (TCP back-pressure), it drops nothing."""
    if max_queued_bytes is None:
        return SEND_HWM
    if max_queued_bytes < 1:
        raise ValueError(f"max_queued_bytes must be positive, got {max_queued_bytes}")
    return max(1, min(SEND_HWM, max_queued_bytes // (2 * max_message_bytes)))


def configure_socket(
    socket: zmq.Socket, max_message_bytes: int, max_queued_bytes: int | None = None
) -> None:
    """Options both ends set: size cap, no linger, keepalives, heartbeats, queue depths.

    libzmq cuts a connection that announces a frame over twice the message limit before
    buffering it; frames between the limit and that cap are read and refused with a log line
    naming the sender (:func:`decode_frame`). The receive queue is per peer (one pipe per
    connection), so ``max_queued_bytes`` bounds what any one peer can make this socket buffer.
    """
    if max_message_bytes < 1:
        raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
    socket.setsockopt(zmq.MAXMSGSIZE, 2 * max_message_bytes)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, SEND_HWM)
    socket.setsockopt(zmq.RCVHWM, receive_queue_depth(max_message_bytes, max_queued_bytes))
    socket.setsockopt(zmq.TCP_KEEPALIVE, 1)
    socket.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 60)
    socket.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 10)
    socket.setsockopt(zmq.TCP_KEEPALIVE_CNT, 6)
    socket.setsockopt(zmq.HEARTBEAT_IVL, 2_000)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10_000)


def curve_socket(
    context: zmq.Context,
    kind: int,
    secret_key: bytes,
    public_key: bytes,
    max_message_bytes: int,
    *,
    server_key: bytes | None = None,
    max_queued_bytes: int | None = None,
) -> zmq.Socket:
    """A socket with both ends' options and its CurveZMQ keys: the server side when
    ``server_key`` is None, else a client that only talks to the server holding that key.
    Closed again if an option is refused."""
    socket = context.socket(kind)
    try:
        configure_socket(socket, max_message_bytes, max_queued_bytes)
        if server_key is None:
            socket.curve_server = True
        else:
            socket.curve_serverkey = server_key
        socket.curve_secretkey = secret_key
        socket.curve_publickey = public_key
    except Exception:
        socket.close(linger=0)
        raise
    return socket


def decode_frame(frame: zmq.Frame, decode: Decoder, max_message_bytes: int) -> msgspec.Struct:
    """One frame into one message, or :class:`FrameRejected` saying what was wrong."""
    if len(frame) > max_message_bytes:
        raise FrameRejected(
            f"frame of {len(frame)} bytes exceeds the {max_message_bytes}-byte limit"
        )
    try:
        return decode(frame.buffer, max_bytes=max_message_bytes)
    except MalformedMessage as exc:
        raise FrameRejected(str(exc)) from exc


def poll_frames(socket: zmq.Socket, deadline: float) -> list[zmq.Frame] | None:
    """The next multipart message before ``deadline`` (monotonic seconds), else ``None``."""
    remaining_ms = max(0, round((deadline - time.monotonic()) * 1000))
    if not socket.poll(remaining_ms, zmq.POLLIN):
        return None
    return socket.recv_multipart(copy=False)


def send_frames(socket: zmq.Socket, frames: list[bytes], peer: str) -> None:
    """Queue one multipart message without blocking; typed errors for the ways it can fail."""
    try:
        socket.send_multipart(frames, flags=zmq.NOBLOCK)
    except zmq.Again as exc:
        raise SendQueueFull(f"the send queue to {peer} is full ({SEND_HWM} messages)") from exc
    except zmq.ZMQError as exc:
        if exc.errno == zmq.EHOSTUNREACH:
            raise PeerUnreachable(f"{peer} is not connected") from exc
        raise
