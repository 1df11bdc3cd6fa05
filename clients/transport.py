"""The institution's authenticated ZeroMQ link to the coordinator (a CurveZMQ DEALER).

Messages are msgspec Structs, msgpack-encoded, one frame each. The link encrypts and
authenticates both ends (CurveZMQ): the institution proves its key to the coordinator's
authenticator and checks the coordinator's public key. Bad frames from the coordinator are
logged and dropped; :meth:`InstitutionEndpoint.recv` never raises on them.

Network loss: ZeroMQ reconnects by itself (every ``reconnect_ivl_s``, backing off to
``reconnect_ivl_max_s``). Messages sent while the link is down wait in the socket's queue (up
to :data:`SEND_HWM` messages) and go out after the reconnect, also to a restarted coordinator
on the same address. A message already handed to TCP when the link broke can be lost; the
round protocol's per-stage timeouts cover that case.

This module also holds the pieces both ends share (errors, socket options, frame checks), since
the coordinator may import ``clients`` but not the other way round.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import msgspec
import zmq

from secagg.control import FromServer, decode_from_server
from secagg.errors import MalformedMessage
from secagg.messages import DEFAULT_MAX_MESSAGE_BYTES, encode

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


def configure_socket(socket: zmq.Socket, max_message_bytes: int) -> None:
    """Options both ends set: size cap, no linger, keepalives, heartbeats, queue depth.

    libzmq cuts a connection that announces a frame over twice the message limit before
    buffering it; frames between the limit and that cap are read and refused with a log line
    naming the sender (:func:`decode_frame`).
    """
    if max_message_bytes < 1:
        raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
    socket.setsockopt(zmq.MAXMSGSIZE, 2 * max_message_bytes)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, SEND_HWM)
    socket.setsockopt(zmq.RCVHWM, SEND_HWM)
    socket.setsockopt(zmq.TCP_KEEPALIVE, 1)
    socket.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 60)
    socket.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 10)
    socket.setsockopt(zmq.TCP_KEEPALIVE_CNT, 6)
    socket.setsockopt(zmq.HEARTBEAT_IVL, 2_000)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10_000)


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


class InstitutionEndpoint:
    """An institution's connection to the coordinator.

    Keys are CurveZMQ keys in Z85 (``zmq.curve_keypair()``). :meth:`recv` returns the next
    valid message from the coordinator, or ``None`` when ``timeout_s`` passes first.
    """

    def __init__(
        self,
        connect: str,
        secret_key: bytes,
        public_key: bytes,
        server_public_key: bytes,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        *,
        decode: Decoder = decode_from_server,
        reconnect_ivl_s: float = 0.1,
        reconnect_ivl_max_s: float = 5.0,
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self._decode = decode
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        try:
            configure_socket(self._socket, max_message_bytes)
            self._socket.setsockopt(zmq.RECONNECT_IVL, round(reconnect_ivl_s * 1000))
            self._socket.setsockopt(zmq.RECONNECT_IVL_MAX, round(reconnect_ivl_max_s * 1000))
            self._socket.curve_secretkey = secret_key
            self._socket.curve_publickey = public_key
            self._socket.curve_serverkey = server_public_key
            self._socket.connect(connect)
        except Exception:
            self.close()
            raise

    def send(self, message: msgspec.Struct) -> None:
        """Queue ``message`` for the coordinator (see the module docstring on disconnects)."""
        send_frames(self._socket, [encode(message)], "the coordinator")

    def recv(self, timeout_s: float) -> FromServer | msgspec.Struct | None:
        """The next valid message, or ``None`` after ``timeout_s``; bad frames are logged."""
        deadline = time.monotonic() + timeout_s
        while (frames := poll_frames(self._socket, deadline)) is not None:
            try:
                if len(frames) != 1:
                    raise FrameRejected(f"{len(frames)} frames; a message is exactly one frame")
                return decode_frame(frames[0], self._decode, self.max_message_bytes)
            except FrameRejected as exc:
                log.warning("dropped a frame from the coordinator: %s", exc)
            if time.monotonic() >= deadline:
                break
        return None

    def close(self) -> None:
        """Drop the connection and anything still queued (linger 0). Safe to call twice."""
        self._socket.close(linger=0)
        self._context.term()

    def __enter__(self) -> InstitutionEndpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
