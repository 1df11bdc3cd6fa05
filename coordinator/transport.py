"""The coordinator's authenticated ZeroMQ endpoint (a CurveZMQ ROUTER) and a round driver.

Only institutions whose CurveZMQ public key is in the roster get through the handshake: a ZAP
authenticator checks each key and names the connection after the institution that owns it
(ZAP User-Id). :meth:`CoordinatorEndpoint.recv` hands the application ``(name, message)``
where ``name`` comes from that authentication, never from the payload. Bad frames (too big,
several parts, undecodable, a type the coordinator does not accept) are logged with the
sender's name and dropped; ``recv`` keeps serving.

The coordinator can send to an institution once it has received one message (e.g.
:class:`~clients.contract.messages.Hello`) on that institution's current connection: a ROUTER
routes by connection, and the connection is learnt from authenticated traffic only.

:func:`run_secagg_round` drives one :class:`~secagg.server.SecAggServer` round over the endpoint.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping

import msgspec
import numpy as np
import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from clients.contract.framing import Decoder
from clients.contract.framing import FrameRejected
from clients.contract.framing import PeerUnreachable
from clients.contract.framing import TransportError
from clients.contract.framing import curve_socket
from clients.contract.framing import decode_frame
from clients.contract.framing import poll_frames
from clients.contract.framing import send_frames
from clients.contract.messages import Decline
from clients.contract.messages import FromClient
from clients.contract.messages import Hello
from clients.contract.messages import RoundEnd
from clients.contract.messages import RoundStart
from clients.contract.messages import decode_from_client
from secagg.errors import ConfigError
from secagg.errors import SecAggError
from secagg.messages import DEFAULT_MAX_MESSAGE_BYTES
from secagg.messages import AdvertiseKeys
from secagg.messages import MaskedInput
from secagg.messages import ShareKeys
from secagg.messages import SurvivorSignature
from secagg.messages import UnmaskShares
from secagg.messages import encode
from secagg.server import SecAggServer

log = logging.getLogger(__name__)

ZAP_DOMAIN = "sealmoe"

OtherMessage = Callable[[str, int, msgspec.Struct], bool]

SECAGG_FROM_CLIENT = (AdvertiseKeys, ShareKeys, MaskedInput, SurvivorSignature, UnmaskShares)
"""The messages :class:`~secagg.server.SecAggServer` takes; anything else mid-round is ignored."""


def key_fingerprint(public_key: bytes | str) -> str:
    """A short, log-friendly name for a CurveZMQ public key (Z85): SHA-256 of the raw key."""
    raw = z85.decode(public_key)
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:16]


def _raw_roster(roster: Mapping[str, bytes | str]) -> dict[bytes, str]:
    by_key: dict[bytes, str] = {}
    for name, key in roster.items():
        if not name:
            raise ConfigError("roster has an institution with an empty name")
        try:
            raw = z85.decode(key)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"roster key of {name!r} is not Z85: {exc}") from exc
        if len(raw) != 32:
            raise ConfigError(f"roster key of {name!r} is {len(raw)} bytes; a CURVE key is 32")
        if raw in by_key:
            raise ConfigError(f"roster gives {by_key[raw]!r} and {name!r} the same key")
        by_key[raw] = name
    return by_key


class _RosterAuthenticator(ThreadAuthenticator):
    """ZAP handler: admit roster keys only, and make the institution's name the User-Id."""

    def __init__(self, context: zmq.Context, roster: dict[bytes, str]) -> None:
        super().__init__(context=context, log=log.getChild("zap"))
        self._roster = roster

    def callback(self, domain: str, z85_key: bytes) -> bool:
        """Credentials provider hook: is this key in the roster?"""
        if z85.decode(z85_key) in self._roster:
            return True
        log.warning(
            "refused a CurveZMQ client with key %s (%s): not in the roster",
            key_fingerprint(z85_key),
            z85_key.decode("ascii"),
        )
        return False

    def curve_user_id(self, client_public_key: bytes) -> str:
        """The institution's name becomes the connection's User-Id (only called if admitted)."""
        return self._roster[client_public_key]


class CoordinatorEndpoint:
    """The coordinator's socket: roster-only admission, names from authentication.

    ``bind`` may use a wildcard port (``tcp://127.0.0.1:*``); :attr:`address` is the real one.
    Keys are CurveZMQ keys in Z85 (``zmq.curve_keypair()``); ``roster`` maps each institution's
    name to its public key. ``max_queued_bytes`` bounds what each institution can make the
    socket buffer (one receive queue per connection,
    :func:`~clients.contract.framing.receive_queue_depth`). Like any ZeroMQ socket, use one
    endpoint from one thread.
    """

    def __init__(
        self,
        bind: str,
        secret_key: bytes,
        public_key: bytes,
        roster: Mapping[str, bytes | str],
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        *,
        decode: Decoder = decode_from_client,
        max_queued_bytes: int | None = None,
    ) -> None:
        by_key = _raw_roster(roster)
        self.max_message_bytes = max_message_bytes
        self._decode = decode
        self._names = frozenset(roster)
        self._routes: dict[str, bytes] = {}
        self._context = zmq.Context()
        self._auth = _RosterAuthenticator(self._context, by_key)
        try:
            self._socket = curve_socket(
                self._context, zmq.ROUTER, secret_key, public_key, max_message_bytes,
                max_queued_bytes=max_queued_bytes,
            )  # fmt: skip
        except Exception:
            self._context.term()
            raise
        try:
            self._auth.start()
            self._auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self._auth)
            self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self._socket.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
            self._socket.zap_domain = ZAP_DOMAIN.encode()
            self._socket.bind(bind)
        except Exception:
            self.close()
            raise
        self.address: str = self._socket.last_endpoint.decode()

    @property
    def connected(self) -> frozenset[str]:
        """Institutions the endpoint can send to (it has heard from their current connection)."""
        return frozenset(self._routes)

    def send(self, name: str, message: msgspec.Struct) -> None:
        """Queue ``message`` for ``name``; :class:`PeerUnreachable` if it is not connected."""
        route = self._routes.get(name)
        if route is None:
            raise PeerUnreachable(f"no message from {name!r} yet on a live connection")
        try:
            send_frames(self._socket, [route, encode(message)], repr(name))
        except PeerUnreachable:
            del self._routes[name]
            raise

    def recv(self, timeout_s: float) -> tuple[str, FromClient | msgspec.Struct] | None:
        """The next valid ``(institution, message)``, or ``None`` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while (frames := poll_frames(self._socket, deadline)) is not None:
            name = self._sender(frames)
            try:
                if name is None:
                    raise FrameRejected("no authenticated institution name on the connection")
                if len(frames) != 2:
                    raise FrameRejected(f"{len(frames) - 1} frames; a message is exactly one")
                return name, decode_frame(frames[1], self._decode, self.max_message_bytes)
            except FrameRejected as exc:
                log.warning("dropped a frame from %s: %s", name or "an unnamed peer", exc)
            if time.monotonic() >= deadline:
                break
        return None

    def _sender(self, frames: list[zmq.Frame]) -> str | None:
        """The authenticated name of a message's sender; remember its route."""
        if len(frames) < 2:
            return None
        user_id = frames[1].get("User-Id")
        if user_id not in self._names:
            return None
        route = frames[0].bytes
        if self._routes.get(user_id) != route:
            log.info("%s connected", user_id)
            self._routes[user_id] = route
        return user_id

    def close(self, linger_s: float = 0.0) -> None:
        """Close the socket, stop the authenticator. Safe to call twice.

        ``linger_s`` is how long queued messages may still take to leave (0: drop them).
        """
        self._socket.close(linger=int(linger_s * 1000))
        self._auth.stop()
        self._context.term()

    def __enter__(self) -> CoordinatorEndpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def run_secagg_round(
    endpoint: CoordinatorEndpoint,
    server: SecAggServer,
    names: Mapping[int, str],
    stage_timeout_s: float,
    *,
    start: Mapping[str, RoundStart] | None = None,
    on_message: OtherMessage | None = None,
    before_stages: Callable[[], Iterable[int]] | None = None,
    first_stage_timeout_s: float | None = None,
) -> np.ndarray:
    """Drive ``server``'s round over ``endpoint``; return the decoded float sum.

    ``names`` maps each client id of the round to its institution. Each institution gets a
    :class:`~clients.contract.messages.RoundStart` (``start[name]`` if given); a stage closes when
    every awaited client answered or ``stage_timeout_s`` passed (``first_stage_timeout_s``, if
    given, for the first stage, which includes the institutions' local training), so silent
    institutions are dropped.
    ``on_message(name, client_id, message)`` sees every message of the round first and returns
    True when it consumed it (e.g. a CKKS input). A :class:`~clients.contract.messages.Decline`
    drops its sender at once. Bad or stale messages are logged and ignored. ``before_stages()`` runs
    once the round starts went out (a selection stage); the client ids it returns are given up
    on. Every institution gets a :class:`~clients.contract.messages.RoundEnd` at the end, also when
    the round aborts (the error, e.g. :class:`~secagg.errors.TooFewSurvivors`, is raised after
    telling them).
    """
    params = server.params
    missing = set(params.client_ids) - set(names)
    if missing:
        raise ConfigError(f"no institution name for client ids {sorted(missing)}")
    ids = {names[i]: i for i in params.client_ids}
    unreachable = []
    for name, client_id in ids.items():
        first = RoundStart(params=params, client_id=client_id) if start is None else start[name]
        if not _try_send(endpoint, name, first):
            unreachable.append(client_id)
    try:
        for client_id in unreachable:  # gone since the round was formed: do not wait for it
            server.give_up_on(client_id)
        for client_id in before_stages() if before_stages is not None else ():
            server.give_up_on(client_id)
        timeout = stage_timeout_s if first_stage_timeout_s is None else first_stage_timeout_s
        while server.stage is not None:
            _collect(endpoint, server, ids, time.monotonic() + timeout, on_message)
            timeout = stage_timeout_s
            for client_id, message in server.advance().items():
                _try_send(endpoint, names[client_id], message)
    except Exception as exc:
        end = RoundEnd(round_id=params.round_id, included=[], error=str(exc)[:1024])
        for name in ids:
            _try_send(endpoint, name, end)
        raise
    end = RoundEnd(round_id=params.round_id, included=server.included)
    for name in ids:
        _try_send(endpoint, name, end)
    assert server.result is not None
    return params.codec.decode(server.result)


def _collect(
    endpoint: CoordinatorEndpoint,
    server: SecAggServer,
    ids: Mapping[str, int],
    deadline: float,
    on_message: OtherMessage | None,
) -> None:
    """Feed the server this stage's messages until none is awaited or the deadline passes."""
    while server.expected:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            log.info(
                "round %d: stage %s timed out without clients %s",
                server.params.round_id,
                server.stage.value,
                sorted(server.expected),
            )
            return
        received = endpoint.recv(remaining)
        if received is None:
            continue
        name, message = received
        if isinstance(message, Hello):
            continue
        client_id = ids.get(name)
        if client_id is None:
            log.warning("ignored %s from %s: not in this round", type(message).__name__, name)
            continue
        if on_message is not None and on_message(name, client_id, message):
            continue
        if isinstance(message, Decline):
            if message.round_id == server.params.round_id and message.client_id == client_id:
                log.info("%s declined round %d: %s", name, message.round_id, message.reason)
                server.give_up_on(client_id)
            continue
        if not isinstance(message, SECAGG_FROM_CLIENT):  # e.g. scores sent mid-round
            log.warning("ignored %s from %s during round %d", type(message).__name__, name,
                        server.params.round_id)  # fmt: skip
            continue
        try:
            server.receive(client_id, message)
        except SecAggError as exc:
            log.warning("rejected %s from %s: %s", type(message).__name__, name, exc)


def _try_send(endpoint: CoordinatorEndpoint, name: str, message: msgspec.Struct) -> bool:
    """Send, logging a failure; whether it was sent."""
    try:
        endpoint.send(name, message)
    except TransportError as exc:
        log.warning("could not send %s to %s: %s", type(message).__name__, name, exc)
        return False
    return True
