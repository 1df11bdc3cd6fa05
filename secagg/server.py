"""The server side of a SecAgg+ round as a pure state machine.

The server collects each stage's messages (:meth:`SecAggServer.receive`), and when every
expected client has answered or the transport's timeout expires, :meth:`SecAggServer.advance`
closes the stage and returns the messages to send. Masked inputs are summed as they arrive, so
memory stays O(vector length). What it learns is the sum over the clients whose masked input
it accepted, and nothing about any single input.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from secagg import kex
from secagg import messages as m
from secagg import shamir
from secagg.client import pairwise_mask_sign
from secagg.errors import DuplicateMessage
from secagg.errors import InconsistentShares
from secagg.errors import InvalidAccusation
from secagg.errors import MalformedMessage
from secagg.errors import ProtocolError
from secagg.errors import TooFewSurvivors
from secagg.errors import UnknownParty
from secagg.errors import WrongRound
from secagg.errors import WrongStage
from secagg.graph import neighbour_graph
from secagg.graph import survivor_quorum
from secagg.prg import add_keystream

log = logging.getLogger(__name__)

_EXPECTED = {
    m.Stage.ADVERTISE: m.AdvertiseKeys,
    m.Stage.SHARE: m.ShareKeys,
    m.Stage.MASKED_INPUT: m.MaskedInput,
    m.Stage.CONSISTENCY: m.SurvivorSignature,
    m.Stage.UNMASK: m.UnmaskShares,
}


class SecAggServer:
    """The server's part in one round.

    ``stage`` is the stage whose messages are being collected; ``None`` once the round ended
    (see :attr:`result`) or aborted (see :attr:`error`).
    """

    def __init__(self, params: m.RoundParams, identities: Mapping[int, Ed25519PublicKey]) -> None:
        missing = set(params.client_ids) - set(identities)
        if missing:
            raise UnknownParty(f"no identity key registered for clients {sorted(missing)}")
        self.params = params
        self._identities = dict(identities)
        self._graph = neighbour_graph(params.client_ids, params.neighbours, params.graph_seed)
        self.stage: m.Stage | None = m.Stage.ADVERTISE
        self._ids = frozenset(params.client_ids)
        self._awaiting: set[int] = set(self._ids)  # who was asked for the current stage
        self._inbox: dict[int, m.Message] = {}
        self.advertised: dict[int, m.AdvertiseKeys] = {}
        self.shared: dict[int, m.ShareKeys] = {}
        self.masked: list[int] = []  # survivors: masked input accepted and not accused
        self.dropped: list[int] = []  # shared keys, then sent no masked input or were accused
        self.accused: dict[int, set[int]] = {}  # accused party -> the clients that accused it
        self.attested: dict[int, m.SurvivorSignature] = {}
        self.unmasking: dict[int, m.UnmaskShares] = {}
        self._masked_sum = np.zeros(params.vector_length, dtype=params.codec.dtype)
        self.result: np.ndarray | None = None
        self.wrong_shares: set[int] = set()  # holders that sent a share off the polynomial
        self.error: TooFewSurvivors | None = None

    # ------------------------------------------------------------------------------ intake

    @property
    def expected(self) -> set[int]:
        """Clients whose message for the current stage is still awaited."""
        return self._awaiting - self._inbox.keys()

    def give_up_on(self, client_id: int) -> None:
        """Stop waiting for ``client_id`` at the current stage (it declined, or is known gone)."""
        self._awaiting.discard(client_id)

    def receive(self, sender: int, message: m.Message) -> None:
        """Validate and accept one client message; raise a typed error and change nothing if bad."""
        if message.round_id != self.params.round_id:
            raise WrongRound(
                f"message from {sender} for round {message.round_id}, "
                f"current round is {self.params.round_id} (replay?)"
            )
        if sender not in self._ids:
            raise UnknownParty(f"sender {sender} is not part of round {self.params.round_id}")
        if getattr(message, "client_id", None) != sender:
            raise ProtocolError(f"sender {sender} sent a message that claims another client id")
        expected_type = _EXPECTED.get(self.stage)
        if type(message) is not expected_type:
            raise WrongStage(
                f"{type(message).__name__} from {sender} while the server is collecting "
                f"{expected_type.__name__ if expected_type else 'nothing (round over)'}"
            )
        if sender in self._inbox:
            raise DuplicateMessage(f"client {sender} already sent its {self.stage.value} message")
        if sender not in self._awaiting:
            raise UnknownParty(f"client {sender} dropped out earlier and cannot rejoin this round")
        {
            m.Stage.ADVERTISE: self._check_advertisement,
            m.Stage.SHARE: self._check_shares,
            m.Stage.MASKED_INPUT: self._add_masked_input,
            m.Stage.CONSISTENCY: self._check_attestation,
            m.Stage.UNMASK: self._check_unmask,
        }[self.stage](sender, message)
        self._inbox[sender] = message

    def _check_advertisement(self, sender: int, msg: m.AdvertiseKeys) -> None:
        """Signature, key order and uniqueness: a party failing any is left out of the round."""
        payload = kex.advertisement_payload(msg.round_id, sender, msg.enc_pk, msg.mask_pk)
        kex.verify(self._identities[sender], msg.signature, payload, who=sender, what="public keys")
        for key in (msg.enc_pk, msg.mask_pk):
            kex.check_public(key, who=sender)
        taken = {k for m in self._inbox.values() for k in (m.enc_pk, m.mask_pk)}
        if msg.enc_pk == msg.mask_pk or {msg.enc_pk, msg.mask_pk} & taken:
            raise DuplicateMessage(
                f"client {sender} advertised a public key that is its other key or another "
                f"party's; it is left out of this round"
            )

    def _check_shares(self, sender: int, msg: m.ShareKeys) -> None:
        recipients = [s.peer for s in msg.shares]
        wanted = self._graph[sender] & set(self.advertised)
        if len(set(recipients)) != len(recipients) or set(recipients) != wanted:
            raise MalformedMessage(
                f"client {sender} sent shares for {sorted(recipients)}; expected exactly one for "
                f"each advertised neighbour {sorted(wanted)}"
            )

    def _add_masked_input(self, sender: int, msg: m.MaskedInput) -> None:
        dtype = self._masked_sum.dtype
        if msg.vector.nbytes != self.params.vector_length * dtype.itemsize:
            raise MalformedMessage(
                f"masked input from {sender} has {msg.vector.nbytes} bytes; expected "
                f"{self.params.vector_length} elements of {dtype.itemsize} bytes"
            )
        self._check_accusation(sender, msg.accused)
        self._masked_sum += np.frombuffer(msg.vector, dtype=dtype)
        for accused in msg.accused:
            log.warning("round %d: client %d accuses client %d of an invalid share; "
                        "client %d is excluded", self.params.round_id, sender, accused,
                        accused)  # fmt: skip
            self.accused.setdefault(accused, set()).add(sender)

    def _check_accusation(self, sender: int, accused: list[int]) -> None:
        """Only neighbours that shared keys with ``sender`` can have sent it a bad share."""
        try:
            if len(accused) > self.params.neighbours:
                raise InvalidAccusation(
                    f"client {sender} accuses {len(accused)} clients; it has only "
                    f"{self.params.neighbours} neighbours"
                )
            if len(set(accused)) != len(accused):
                raise InvalidAccusation(f"client {sender} accuses {accused}: repeated ids")
            if sender in accused:
                raise InvalidAccusation(f"client {sender} accuses itself")
            strangers = set(accused) - (self._graph[sender] & set(self.shared))
            if strangers:
                raise InvalidAccusation(
                    f"client {sender} accuses {sorted(strangers)}, who sent it no share "
                    f"(not in the round, not its neighbours, or did not share keys)"
                )
        except InvalidAccusation as exc:
            log.warning("round %d: refused masked input: %s", self.params.round_id, exc)
            raise

    def _check_attestation(self, sender: int, msg: m.SurvivorSignature) -> None:
        payload = kex.survivors_payload(self.params.round_id, self.masked)
        kex.verify(self._identities[sender], msg.signature, payload, who=sender, what="survivors")

    def _check_unmask(self, sender: int, msg: m.UnmaskShares) -> None:
        holds = {owner for owner in self.shared if sender in self._graph[owner]}
        holds.add(sender)
        survivors, dropped = set(self.masked), set(self.dropped)
        if not set(msg.self_mask_shares) <= survivors & holds:
            raise MalformedMessage(f"client {sender} sent self-mask shares it was not asked for")
        if not set(msg.mask_key_shares) <= dropped & holds:
            raise MalformedMessage(f"client {sender} sent mask-key shares it was not asked for")
        for blob in (*msg.self_mask_shares.values(), *msg.mask_key_shares.values()):
            share = shamir.decode_share(blob)
            if share.x != sender + 1:
                raise MalformedMessage(f"client {sender} sent a share of another holder")
        self._check_seeds(sender, [item.peer for item in msg.mask_seeds])

    def _check_seeds(self, sender: int, peers: list[int]) -> None:
        """A survivor reveals at most one seed per dropped neighbour, and no other seed."""
        try:
            if len(set(peers)) != len(peers):
                raise MalformedMessage(f"client {sender} reveals seeds with {peers}: repeated ids")
            unasked = set(peers) - (self._graph[sender] & set(self.dropped))
            if unasked:
                raise MalformedMessage(
                    f"client {sender} reveals seeds with {sorted(unasked)}, who are not its "
                    f"dropped neighbours"
                )
        except MalformedMessage as exc:
            log.warning("round %d: refused unmask message: %s", self.params.round_id, exc)
            raise

    # ------------------------------------------------------------------------------ stages

    def advance(self) -> dict[int, m.Message]:
        """Close the current stage; return the message for each client that goes on.

        Raises :class:`TooFewSurvivors` (and ends the round) when fewer than the threshold
        remain, at any stage.
        """
        if self.stage is None:
            raise WrongStage("the round is over")
        inbox, self._inbox = self._inbox, {}
        step = {
            m.Stage.ADVERTISE: self._close_advertise,
            m.Stage.SHARE: self._close_share,
            m.Stage.MASKED_INPUT: self._close_masked_input,
            m.Stage.CONSISTENCY: self._close_consistency,
            m.Stage.UNMASK: self._close_unmask,
        }[self.stage]
        try:
            self._require(len(inbox), f"{self.stage.value} messages")
            outgoing = step(inbox)
        except TooFewSurvivors as exc:
            self.stage, self.error = None, exc
            log.warning("round %d aborted: %s", self.params.round_id, exc)
            raise
        self._awaiting = set(outgoing)
        return outgoing

    def _close_advertise(self, inbox: dict[int, m.AdvertiseKeys]) -> dict[int, m.Message]:
        self.advertised = dict(sorted(inbox.items()))
        out: dict[int, m.Message] = {}
        for u in self.advertised:
            keys = [self.advertised[v] for v in sorted(self._graph[u] | {u}) if v in inbox]
            if len(keys) >= self.params.threshold:
                out[u] = m.KeyRoster(round_id=self.params.round_id, keys=keys)
        self.stage = m.Stage.SHARE
        return out

    def _close_share(self, inbox: dict[int, m.ShareKeys]) -> dict[int, m.Message]:
        self.shared = dict(sorted(inbox.items()))
        relayed: dict[int, list] = {u: [] for u in self.shared}
        for sender, msg in self.shared.items():
            for item in msg.shares:
                if item.peer in relayed:
                    relayed[item.peer].append(type(item)(peer=sender, ciphertext=item.ciphertext))
        self.stage = m.Stage.MASKED_INPUT
        return {
            u: m.RelayedShares(round_id=self.params.round_id, shares=items)
            for u, items in relayed.items()
        }

    def _close_masked_input(self, inbox: dict[int, m.MaskedInput]) -> dict[int, m.Message]:
        # An accused party is excluded like one that dropped after sharing: its masked input
        # (if any) leaves the sum, and the pairwise masks its neighbours added are cancelled at
        # unmasking (their revealed seeds, or its mask key). Its self-mask is never asked for.
        for v in sorted(self.accused.keys() & inbox.keys()):
            self._masked_sum -= np.frombuffer(inbox[v].vector, dtype=self._masked_sum.dtype)
        self.masked = sorted(inbox.keys() - self.accused.keys())
        self.dropped = sorted(set(self.shared) - set(self.masked))
        self._require(len(self.masked), "masked inputs remain after excluding accused clients")
        if self.params.check_survivors:
            self.stage = m.Stage.CONSISTENCY
            request = m.SurvivorSetRequest(round_id=self.params.round_id, survivors=self.masked)
            return dict.fromkeys(self.masked, request)
        return self._unmask_requests(self.masked, [])

    def _close_consistency(self, inbox: dict[int, m.SurvivorSignature]) -> dict[int, m.Message]:
        quorum = survivor_quorum(
            len(self.params.client_ids), self.params.neighbours, self.params.threshold
        )
        if len(inbox) < quorum:  # the clients would refuse to unmask: end the round here
            raise TooFewSurvivors(
                f"round {self.params.round_id}: only {len(inbox)} clients signed the survivor "
                f"set; {quorum} signatures are needed; no sum is released"
            )
        self.attested = dict(sorted(inbox.items()))
        return self._unmask_requests(list(self.attested), list(self.attested.values()))

    def _unmask_requests(self, recipients: list[int], signatures: list) -> dict[int, m.Message]:
        self.stage = m.Stage.UNMASK
        request = m.UnmaskRequest(
            round_id=self.params.round_id,
            survivors=self.masked,
            dropped=self.dropped,
            signatures=signatures,
        )
        return dict.fromkeys(recipients, request)

    def _close_unmask(self, inbox: dict[int, m.UnmaskShares]) -> dict[int, m.Message]:
        self.unmasking = inbox
        t = self.params.threshold
        # Rebuild every secret before touching the sum, so a failure leaves nothing half-done.
        self_seeds = [self._reconstruct(u, "self_mask_shares", t) for u in self.masked]
        pair_seeds = self._dropped_pair_seeds()
        total = self._masked_sum
        for seed in self_seeds:
            add_keystream(total, seed, -1)
        for (u, v), seed in pair_seeds.items():
            add_keystream(total, seed, -pairwise_mask_sign(u, v))
        self.result = total
        self.stage = None
        return {}

    def _dropped_pair_seeds(self) -> dict[tuple[int, int], bytes]:
        """The seed of every mask between a survivor u and a dropped neighbour v, by (u, v).

        u's own revealed seed where it sent one; otherwise the seed from v's mask key rebuilt
        from t shares. So a dropped or accused v needs no t valid shares of its key when each
        surviving neighbour answered; a survivor lost during unmasking still needs them, and
        without them the round ends with :class:`TooFewSurvivors` (never a wrong sum).
        """
        revealed = {
            (u, item.peer): item.seed
            for u, msg in self.unmasking.items()
            for item in msg.mask_seeds
        }
        seeds: dict[tuple[int, int], bytes] = {}
        for v in self.dropped:
            partners = sorted(self._graph[v] & set(self.masked))
            silent = [u for u in partners if (u, v) not in revealed]
            mask_key = self._dropped_mask_key(v, silent) if silent else None
            for u in partners:
                if (u, v) in revealed:
                    seeds[u, v] = revealed[u, v]
                else:
                    seeds[u, v] = kex.agree(
                        mask_key, self.advertised[u].mask_pk, purpose=kex.MASK_PURPOSE,
                        round_id=self.params.round_id, me=v, peer=u,
                    )  # fmt: skip
        return seeds

    def _dropped_mask_key(self, v: int, silent: list[int]) -> X25519PrivateKey:
        """Dropped v's mask key, needed because survivors ``silent`` revealed no seed with v."""
        t = self.params.threshold
        count = sum(v in msg.mask_key_shares for msg in self.unmasking.values())
        if count < t:
            raise TooFewSurvivors(
                f"round {self.params.round_id}: survivors {silent} revealed no seed with dropped "
                f"client {v} and only {count} of the {t} shares of client {v}'s mask key "
                f"arrived; its pairwise masks cannot be removed; no sum is released"
            )
        return X25519PrivateKey.from_private_bytes(self._reconstruct(v, "mask_key_shares", t))

    def _reconstruct(self, owner: int, field: str, threshold: int) -> bytes:
        shares = [
            shamir.decode_share(getattr(msg, field)[owner])
            for msg in self.unmasking.values()
            if owner in getattr(msg, field)
        ]
        if len(shares) < threshold:
            raise TooFewSurvivors(
                f"only {len(shares)} of the {threshold} shares needed to unmask client {owner} "
                f"arrived; no sum is released"
            )
        try:
            secret, wrong = shamir.robust_combine(shares, threshold)
        except shamir.ShamirError as exc:
            raise InconsistentShares(
                f"shares of client {owner}'s {field.replace('_', ' ')[:-1]} are inconsistent "
                f"({exc}); no sum is released"
            ) from exc
        if wrong:
            holders = sorted(x - 1 for x in wrong)  # share point x is holder id + 1 (intake check)
            log.warning("round %d: holders %s sent wrong shares of client %d; excluded",
                        self.params.round_id, holders, owner)  # fmt: skip
            self.wrong_shares.update(holders)
        return secret

    def _require(self, count: int, what: str) -> None:
        if count < self.params.threshold:
            raise TooFewSurvivors(
                f"round {self.params.round_id}: only {count} {what}, below the threshold "
                f"{self.params.threshold}; no sum is released"
            )

    @property
    def included(self) -> list[int]:
        """Clients whose input is in the sum (those whose masked input was accepted)."""
        return list(self.masked)
