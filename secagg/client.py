"""The client side of a SecAgg+ round as a pure state machine (message in, message out).

A client masks its encoded input with a self mask (seed b_u, Shamir-shared) and one pairwise
mask per neighbour (seed from X25519 agreement; the mask key is Shamir-shared too), so the
server can remove exactly the masks of the clients that dropped while learning nothing else.
The client refuses every request that would let the server strip both masks from one input,
and checks every survivor set against its own view before it signs or reveals anything, so a
coordinator that lies about who survived learns nothing (see docs/security.md).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from secagg import kex
from secagg import shamir
from secagg.errors import ConfigError
from secagg.errors import DecryptionError
from secagg.errors import DuplicateMessage
from secagg.errors import InvalidShare
from secagg.errors import MalformedMessage
from secagg.errors import RefusedRequest
from secagg.errors import TooFewSurvivors
from secagg.errors import UnknownParty
from secagg.errors import WrongRound
from secagg.errors import WrongStage
from secagg.graph import active_threshold
from secagg.graph import neighbour_graph
from secagg.graph import survivor_quorum
from secagg.messages import AdvertiseKeys
from secagg.messages import EncryptedShare
from secagg.messages import KeyRoster
from secagg.messages import MaskedInput
from secagg.messages import Message
from secagg.messages import RelayedShares
from secagg.messages import RevealedSeed
from secagg.messages import RoundParams
from secagg.messages import ShareKeys
from secagg.messages import Stage
from secagg.messages import SurvivorSetRequest
from secagg.messages import SurvivorSignature
from secagg.messages import UnmaskRequest
from secagg.messages import UnmaskShares
from secagg.prg import add_keystream
from secagg.prg import random_seed

log = logging.getLogger(__name__)

_SHARE_HEADER = struct.Struct(">II")


def pairwise_mask_sign(owner: int, peer: int) -> int:
    """+1 if ``owner`` adds the mask it shares with ``peer``, -1 if it subtracts it."""
    return 1 if owner < peer else -1


def share_xs(ids: list[int]) -> list[int]:
    """Shamir evaluation points for client ids (0 is the secret's point, so shift by one)."""
    return [i + 1 for i in ids]


class SecAggClient:
    """One client's part in one round. Call :meth:`advertise`, then :meth:`handle` each reply.

    ``identities`` maps every client id of the round to its registered Ed25519 public key.
    Any violation raises a :class:`~secagg.errors.SecAggError` and leaves the client aborted,
    except a relayed share that does not decrypt or parse: the client then names its sender in
    :attr:`accused` (and in its :class:`~secagg.messages.MaskedInput`) and goes on, so the
    server can exclude that sender instead of losing this client.
    With ``active_bound`` (the default) the client refuses round parameters that are not safe
    against an active coordinator: a threshold at or below 2/3 of the share holders, or the
    signed-survivor-set stage turned off. Only in-process runs with no adversary turn it off.
    """

    def __init__(
        self,
        params: RoundParams,
        client_id: int,
        values: np.ndarray,
        identity_key: Ed25519PrivateKey,
        identities: Mapping[int, Ed25519PublicKey],
        *,
        active_bound: bool = True,
    ) -> None:
        if active_bound:
            check_active_bound(params)
        if client_id not in params.client_ids:
            raise UnknownParty(f"client {client_id} is not part of round {params.round_id}")
        missing = set(params.client_ids) - set(identities)
        if missing:
            raise UnknownParty(f"no identity key registered for clients {sorted(missing)}")
        values = np.asarray(values)
        if values.size != params.vector_length:
            raise MalformedMessage(
                f"input has {values.size} values but the round expects {params.vector_length}"
            )
        self.params = params
        self.client_id = client_id
        self._identity_key = identity_key
        self._identities = dict(identities)
        self._encoded = params.codec.encode(values)
        self._neighbours = neighbour_graph(params.client_ids, params.neighbours, params.graph_seed)[
            client_id
        ]
        self._enc_key = X25519PrivateKey.generate()
        self._mask_key = X25519PrivateKey.generate()
        self._self_seed = random_seed()
        self._roster: dict[int, AdvertiseKeys] = {}
        self._shares_from: dict[int, tuple[bytes, bytes]] = {}
        self._masked_with: frozenset[int] = frozenset()  # neighbours whose pairwise mask is in y_u
        self.accused: frozenset[int] = frozenset()  # neighbours whose relayed share was invalid
        self._signed_survivors: list[int] | None = None
        self.stage: Stage | None = None
        self.aborted = False

    # ------------------------------------------------------------------------------ stages

    def advertise(self) -> AdvertiseKeys:
        """Stage 0: fresh public keys, signed with the identity key."""
        self._expect(None, Stage.ADVERTISE)
        enc_pk, mask_pk = kex.raw_public(self._enc_key), kex.raw_public(self._mask_key)
        payload = kex.advertisement_payload(self.params.round_id, self.client_id, enc_pk, mask_pk)
        return AdvertiseKeys(
            round_id=self.params.round_id,
            client_id=self.client_id,
            enc_pk=enc_pk,
            mask_pk=mask_pk,
            signature=self._identity_key.sign(payload),
        )

    def handle(self, message: Message) -> Message:
        """Answer one server message; raises (and aborts) on anything unacceptable."""
        if self.aborted:
            raise WrongStage(f"client {self.client_id} has aborted this round")
        if message.round_id != self.params.round_id:
            raise WrongRound(
                f"message for round {message.round_id} reached client {self.client_id} "
                f"in round {self.params.round_id} (replay?)"
            )
        handlers = {
            KeyRoster: self._on_roster,
            RelayedShares: self._on_shares,
            SurvivorSetRequest: self._on_survivor_set,
            UnmaskRequest: self._on_unmask,
        }
        handler = handlers.get(type(message))
        if handler is None:
            raise MalformedMessage(f"a client does not accept {type(message).__name__}")
        try:
            return handler(message)
        except Exception:
            self.aborted = True
            raise

    def _on_roster(self, msg: KeyRoster) -> ShareKeys:
        self._expect(Stage.ADVERTISE, Stage.SHARE)
        allowed = self._neighbours | {self.client_id}
        roster: dict[int, AdvertiseKeys] = {}
        for adv in msg.keys:
            if adv.client_id not in allowed:
                raise UnknownParty(f"roster lists client {adv.client_id}, not a neighbour")
            if adv.client_id in roster:
                raise DuplicateMessage(f"roster lists client {adv.client_id} twice")
            if adv.round_id != self.params.round_id:
                raise WrongRound(f"advertisement of client {adv.client_id} is from another round")
            payload = kex.advertisement_payload(
                adv.round_id, adv.client_id, adv.enc_pk, adv.mask_pk
            )
            kex.verify(
                self._identities[adv.client_id], adv.signature, payload,
                who=adv.client_id, what="public keys",
            )  # fmt: skip
            roster[adv.client_id] = adv
        mine = roster.get(self.client_id)
        if mine is None or mine.mask_pk != kex.raw_public(self._mask_key):
            raise RefusedRequest("the roster does not carry this client's own advertised keys")
        keys = [k for a in roster.values() for k in (a.enc_pk, a.mask_pk)]
        if len(set(keys)) != len(keys):
            raise RefusedRequest("the roster repeats a public key")
        self._require(len(roster), "neighbours advertised keys")
        self._roster = roster

        holders = sorted(roster)
        xs = share_xs(holders)
        t = self.params.threshold
        self_mask_shares = shamir.split(self._self_seed, t, xs)
        mask_key_shares = shamir.split(_private_bytes(self._mask_key), t, xs)
        shares = []
        for holder, b_share, s_share in zip(
            holders, self_mask_shares, mask_key_shares, strict=True
        ):
            b_bytes, s_bytes = shamir.encode_share(b_share), shamir.encode_share(s_share)
            if holder == self.client_id:
                self._shares_from[holder] = (b_bytes, s_bytes)
                continue
            plain = _SHARE_HEADER.pack(self.client_id, holder) + b_bytes + s_bytes
            key = self._share_key(holder)
            blob = kex.encrypt_share(
                key, plain, round_id=self.params.round_id, sender=self.client_id, recipient=holder
            )
            shares.append(EncryptedShare(peer=holder, ciphertext=blob))
        return ShareKeys(round_id=self.params.round_id, client_id=self.client_id, shares=shares)

    def _on_shares(self, msg: RelayedShares) -> MaskedInput:
        self._expect(Stage.SHARE, Stage.MASKED_INPUT)
        accused: set[int] = set()
        for item in msg.shares:
            sender = item.peer
            if sender not in self._roster or sender == self.client_id:
                raise UnknownParty(f"relayed share from {sender}, who is not a roster neighbour")
            if sender in self._shares_from or sender in accused:
                raise DuplicateMessage(f"two relayed shares from client {sender}")
            try:
                self._shares_from[sender] = self._open_share(sender, item.ciphertext)
            except InvalidShare as exc:
                # Not fatal: name the sender to the server, which excludes it. We still mask
                # with it (the pairwise key comes from its signed advertisement, not from the
                # share), so our masked input matches the server's view whatever it decides.
                log.warning("client %d, round %d: accuses client %d: %s",
                            self.client_id, self.params.round_id, exc.sender, exc)  # fmt: skip
                accused.add(exc.sender)
        self._require(len(self._shares_from) + len(accused), "neighbours shared keys")
        self._require(len(self._shares_from), "neighbours sent valid shares")

        self.accused = frozenset(accused)
        self._masked_with = (frozenset(self._shares_from) | self.accused) - {self.client_id}
        masked, self._encoded = self._encoded, None  # the input is masked in place, once
        add_keystream(masked, self._self_seed)
        for peer in sorted(self._masked_with):
            add_keystream(masked, self._pair_seed(peer), pairwise_mask_sign(self.client_id, peer))
        return MaskedInput(
            round_id=self.params.round_id, client_id=self.client_id, vector=memoryview(masked),
            accused=sorted(self.accused),
        )  # fmt: skip

    def _on_survivor_set(self, msg: SurvivorSetRequest) -> SurvivorSignature:
        self._expect(Stage.MASKED_INPUT, Stage.CONSISTENCY)
        if not self.params.check_survivors:
            raise RefusedRequest("this round has no consistency check")
        survivors = self._check_survivor_list(msg.survivors)
        self._check_view(survivors, None)
        self._signed_survivors = survivors
        payload = kex.survivors_payload(self.params.round_id, survivors)
        return SurvivorSignature(
            round_id=self.params.round_id,
            client_id=self.client_id,
            signature=self._identity_key.sign(payload),
        )

    def _on_unmask(self, msg: UnmaskRequest) -> UnmaskShares:
        previous = Stage.CONSISTENCY if self.params.check_survivors else Stage.MASKED_INPUT
        self._expect(previous, Stage.UNMASK)
        survivors = self._check_survivor_list(msg.survivors)
        dropped = set(msg.dropped)
        both = dropped & set(survivors)
        if both:
            raise RefusedRequest(
                f"unmask request asks for both the self-mask and the mask-key share of "
                f"clients {sorted(both)}; revealing both would expose their inputs"
            )
        unknown = dropped - set(self.params.client_ids)
        if unknown or len(dropped) != len(msg.dropped):
            raise UnknownParty(
                f"unmask request lists unknown or repeated dropped ids {msg.dropped}"
            )
        self._check_view(survivors, sorted(dropped))
        if self.params.check_survivors:
            self._check_attestations(survivors, msg.signatures)
        self_mask_shares = {
            owner: pair[0] for owner, pair in self._shares_from.items() if owner in survivors
        }
        mask_key_shares = {
            owner: pair[1] for owner, pair in self._shares_from.items() if owner in dropped
        }
        # Our own seed with each dropped partner: derivable from that partner's mask key, which
        # the same checked request already asks for, so it reveals nothing more; it lets the
        # server cancel the mask without t valid shares of that key (docs/security.md, 2.7).
        mask_seeds = [
            RevealedSeed(peer=peer, seed=self._pair_seed(peer))
            for peer in sorted(dropped & self._masked_with)
        ]
        return UnmaskShares(
            round_id=self.params.round_id,
            client_id=self.client_id,
            self_mask_shares=self_mask_shares,
            mask_key_shares=mask_key_shares,
            mask_seeds=mask_seeds,
        )

    # ------------------------------------------------------------------------------ checks

    def _check_survivor_list(self, survivors: list[int]) -> list[int]:
        ids = sorted(survivors)
        if len(set(ids)) != len(ids):
            raise RefusedRequest("survivor set repeats a client")
        if not set(ids) <= set(self.params.client_ids):
            raise UnknownParty(f"survivor set names clients outside the round: {ids}")
        if self.client_id not in ids:
            raise RefusedRequest(f"survivor set omits client {self.client_id} itself")
        if self._signed_survivors is not None and ids != self._signed_survivors:
            raise RefusedRequest("unmask request's survivor set differs from the one signed")
        self._require(len(ids), "clients survived masking")
        return ids

    def _check_view(self, survivors: list[int], dropped: list[int] | None) -> None:
        """Hold the coordinator's survivor (and dropped) lists to what this client saw.

        Every neighbour named a survivor must be one this client masked with (else its input
        would be unmasked without that neighbour's mask), every neighbour named dropped must
        be one it masked with too (a dropped peer's mask key only removes masks it shares),
        and at least t of its closed neighbourhood must survive. ``dropped`` is None when
        signing (the request names survivors only). This stops a coordinator that
        withholds shares and then declares the victim's only mask partners dropped.
        A neighbour this client accused must be dropped, never a survivor: it masked with it,
        holds no valid share of it, and the server must exclude every accused party.
        """
        near = self._neighbours & set(survivors)
        ignored = near & self.accused
        if ignored:
            raise RefusedRequest(
                f"client {self.client_id}: survivor set keeps clients {sorted(ignored)}, whom "
                f"it accused of sending an invalid share; they must be excluded"
            )
        strangers = near - self._masked_with
        if strangers:
            raise RefusedRequest(
                f"client {self.client_id}: survivor set names neighbours {sorted(strangers)} "
                f"whose shares never reached it (it did not mask with them)"
            )
        listed = near | (self._neighbours & set(dropped or ()))
        if dropped is not None and listed != self._masked_with:
            raise RefusedRequest(
                f"client {self.client_id}: survivors and dropped name neighbours "
                f"{sorted(listed)}, but it masked with {sorted(self._masked_with)}"
            )
        self._require(len(near) + 1, "of its neighbourhood (itself included) survived")

    def _check_attestations(
        self, survivors: list[int], signatures: list[SurvivorSignature]
    ) -> None:
        """Enough survivors (:func:`~secagg.graph.survivor_quorum`) signed this exact set."""
        quorum = survivor_quorum(
            len(self.params.client_ids), self.params.neighbours, self.params.threshold
        )
        payload = kex.survivors_payload(self.params.round_id, survivors)
        signers: set[int] = set()
        for sig in signatures:
            if sig.client_id not in survivors or sig.client_id in signers:
                raise RefusedRequest(f"survivor signature from unexpected client {sig.client_id}")
            if sig.round_id != self.params.round_id:
                raise WrongRound(f"survivor signature of {sig.client_id} is from another round")
            kex.verify(
                self._identities[sig.client_id], sig.signature, payload,
                who=sig.client_id, what="survivor set",
            )  # fmt: skip
            signers.add(sig.client_id)
            if len(signers) == quorum:
                return
        raise TooFewSurvivors(
            f"client {self.client_id}: only {len(signers)} clients attested the survivor set; "
            f"{quorum} signatures are needed before it reveals any share"
        )

    def _require(self, count: int, what: str) -> None:
        if count < self.params.threshold:
            raise TooFewSurvivors(
                f"client {self.client_id}: only {count} {what}; threshold is "
                f"{self.params.threshold}, so the round cannot continue safely"
            )

    def _expect(self, current: Stage | None, following: Stage) -> None:
        if self.stage != current:
            raise WrongStage(
                f"client {self.client_id} is at stage {self.stage and self.stage.value} "
                f"and cannot move to {following.value}"
            )
        self.stage = following

    def _open_share(self, sender: int, ciphertext: bytes) -> tuple[bytes, bytes]:
        """(self-mask share, mask-key share) from ``sender``; :class:`InvalidShare` names it."""
        try:
            plain = kex.decrypt_share(
                self._share_key(sender), ciphertext,
                round_id=self.params.round_id, sender=sender, recipient=self.client_id,
            )  # fmt: skip
        except (DecryptionError, MalformedMessage) as exc:
            raise InvalidShare(f"share from client {sender}: {exc}", sender=sender) from exc
        if len(plain) != _SHARE_HEADER.size + 2 * shamir.SHARE_BYTES:
            raise InvalidShare(f"share from client {sender} has the wrong length", sender=sender)
        if _SHARE_HEADER.unpack_from(plain) != (sender, self.client_id):
            raise InvalidShare(f"share from client {sender} names other parties", sender=sender)
        body = plain[_SHARE_HEADER.size :]
        for part in (body[: shamir.SHARE_BYTES], body[shamir.SHARE_BYTES :]):
            try:
                share = shamir.decode_share(part)
            except MalformedMessage as exc:
                raise InvalidShare(f"share from client {sender}: {exc}", sender=sender) from exc
            if share.x != self.client_id + 1:
                raise InvalidShare(f"client {sender} sent a share of another holder", sender=sender)
        return body[: shamir.SHARE_BYTES], body[shamir.SHARE_BYTES :]

    def _pair_seed(self, peer: int) -> bytes:
        """The pairwise mask seed with ``peer`` (X25519 of our mask key and its signed key)."""
        return kex.agree(
            self._mask_key, self._roster[peer].mask_pk, purpose=kex.MASK_PURPOSE,
            round_id=self.params.round_id, me=self.client_id, peer=peer,
        )  # fmt: skip

    def _share_key(self, peer: int) -> bytes:
        return kex.agree(
            self._enc_key, self._roster[peer].enc_pk, purpose=kex.SHARE_PURPOSE,
            round_id=self.params.round_id, me=self.client_id, peer=peer,
        )  # fmt: skip


def check_active_bound(params: RoundParams) -> None:
    """Refuse round parameters below the active-adversary bound; the message names the field."""
    if not params.check_survivors:
        raise ConfigError(
            "check_survivors is off: without signed survivor sets a coordinator can show "
            "clients different survivor sets and unmask one input; set check_survivors = true"
        )
    holders = params.neighbours + 1
    needed = active_threshold(holders)
    if params.threshold < needed:
        raise ConfigError(
            f"threshold={params.threshold} is below the active-adversary bound for "
            f"{holders} share holders (more than 2/3 of them): set threshold >= {needed}"
        )


def _private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
