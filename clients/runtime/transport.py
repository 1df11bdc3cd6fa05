"""The institution's authenticated ZeroMQ link to the coordinator (a CurveZMQ DEALER).

The link encrypts and authenticates both ends (CurveZMQ): the institution proves its key to
the coordinator's authenticator and checks the coordinator's public key. Bad frames from the
coordinator are logged and dropped; :meth:`InstitutionEndpoint.recv` never raises on them.

Network loss: ZeroMQ reconnects by itself (every ``reconnect_ivl_s``, backing off to
``reconnect_ivl_max_s``). Messages sent while the link is down wait in the socket's queue (up
to :data:`~clients.contract.framing.SEND_HWM` messages) and go out after the reconnect, also to
a restarted coordinator on the same address. A message already handed to TCP when the link
broke can be lost; the round protocol's per-stage timeouts cover that case.
"""

from __future__ import annotations

import logging
import time

import msgspec
import zmq

from clients.contract.framing import Decoder
from clients.contract.framing import FrameRejected
from clients.contract.framing import curve_socket
from clients.contract.framing import decode_frame
from clients.contract.framing import poll_frames
from clients.contract.framing import send_frames
from clients.contract.messages import FromServer
from clients.contract.messages import decode_from_server
from secagg.messages import DEFAULT_MAX_MESSAGE_BYTES
from secagg.messages import encode

log = logging.getLogger(__name__)


class InstitutionEndpoint:
    """An institution's connection to the coordinator.

    Keys are CurveZMQ keys in Z85 (``zmq.curve_keypair()``). :meth:`recv` returns the next
    valid message from the coordinator, or ``None`` when ``timeout_s`` passes first.
    ``max_queued_bytes`` bounds what the coordinator can make this socket buffer
    (:func:`~clients.contract.framing.receive_queue_depth`).
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
        max_queued_bytes: int | None = None,
        reconnect_ivl_s: float = 0.1,
        reconnect_ivl_max_s: float = 5.0,
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self._decode = decode
        self._context = zmq.Context()
        try:
            self._socket = curve_socket(
                self._context, zmq.DEALER, secret_key, public_key, max_message_bytes,
                server_key=server_public_key, max_queued_bytes=max_queued_bytes,
            )  # fmt: skip
        except Exception:
            self._context.term()
            raise
        try:
            self._socket.setsockopt(zmq.RECONNECT_IVL, round(reconnect_ivl_s * 1000))
            self._socket.setsockopt(zmq.RECONNECT_IVL_MAX, round(reconnect_ivl_max_s * 1000))
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
