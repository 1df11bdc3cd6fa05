"""A scripted malicious coordinator against honest SecAgg+ clients.

Each test plays one attack over the pure client state machines, collects every share the
honest clients reveal, and then tries to unmask the victim's input with all of it. The
assertion is on what the adversary can reconstruct, not only on the error the clients raise.
"""

from __future__ import annotations

import logging

import msgspec
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

import secagg
from secagg import kex
from secagg import shamir
from secagg.client import SecAggClient
from secagg.client import pairwise_mask_sign
from secagg.graph import neighbour_graph
from secagg.messages import MAX_SEEDS
from secagg.messages import AdvertiseKeys
from secagg.messages import KeyRoster
from secagg.messages import MaskedInput
from secagg.messages import RelayedShares
from secagg.messages import RevealedSeed
from secagg.messages import ShareKeys
from secagg.messages import SurvivorSetRequest
from secagg.messages import SurvivorSignature
from secagg.messages import UnmaskRequest
from secagg.messages import UnmaskShares
from secagg.messages import decode
from secagg.messages import encode
from secagg.prg import add_keystream
from tests.secagg_harness import ManualRound


class Coordinator:
    """A coordinator that follows the wire format but chooses freely what it relays and asks."""

    def __init__(self, r: ManualRound) -> None:
        self.r = r
        self.params = r.params
        self.t = r.params.threshold
        self.graph = neighbour_graph(r.params.client_ids, r.params.neighbours, r.params.graph_seed)
        self.adverts = {c.client_id: c.advertise() for c in r.clients}
        self.share_msgs: dict[int, ShareKeys] = {}
        self.masked: dict[int, np.ndarray] = {}
        self.signatures: dict[frozenset[int], list[SurvivorSignature]] = {}
        self.self_mask_shares: dict[int, dict[int, shamir.Share]] = {}
        self.mask_key_shares: dict[int, dict[int, shamir.Share]] = {}
        self.pair_seeds: dict[tuple[int, int], bytes] = {}  # (revealer, peer) -> their seed
        self.refusals: dict[int, secagg.SecAggError] = {}

    def ask(self, who: int, message) -> object | None:
        """Send one message to an honest client; record its first refusal instead of raising."""
        try:
            return self.r.clients[who].handle(message)
        except secagg.SecAggError as exc:
            self.refusals.setdefault(who, exc)  # the first refusal; later ones say "aborted"
            return None

    def share_stage(self) -> None:
        rid = self.params.round_id
        for u, client in enumerate(self.r.clients):
            keys = [self.adverts[v] for v in sorted(self.graph[u] | {u})]
            reply = self.ask(u, KeyRoster(round_id=rid, keys=keys))
            assert isinstance(reply, ShareKeys)
            self.share_msgs[u] = reply

    def masked_stage(self, withheld: dict[int, set[int]] | None = None) -> None:
        """Relay shares, except those from ``withheld[u]`` to ``u``; collect masked inputs."""
        withheld = withheld or {}
        rid, dtype = self.params.round_id, self.params.codec.dtype
        for u in range(len(self.r.clients)):
            items = [
                type(s)(peer=sender, ciphertext=s.ciphertext)
                for sender, msg in self.share_msgs.items()
                for s in msg.shares
                if s.peer == u and sender not in withheld.get(u, set())
            ]
            reply = self.ask(u, RelayedShares(round_id=rid, shares=items))
            if isinstance(reply, MaskedInput):
                self.masked[u] = np.frombuffer(reply.vector, dtype=dtype).copy()

    def sign_stage(self, views: dict[int, list[int]]) -> None:
        """Show each client its own survivor set; collect signatures per set."""
        for u, survivors in views.items():
            reply = self.ask(
                u, SurvivorSetRequest(round_id=self.params.round_id, survivors=survivors)
            )
            if isinstance(reply, SurvivorSignature):
                self.signatures.setdefault(frozenset(survivors), []).append(reply)

    def unmask_stage(self, views: dict[int, tuple[list[int], list[int]]]) -> None:
        """Ask each client for shares under its own (survivors, dropped); keep all it reveals."""
        for u, (survivors, dropped) in views.items():
            sigs = self.signatures.get(frozenset(survivors), [])
            request = UnmaskRequest(
                round_id=self.params.round_id, survivors=survivors, dropped=dropped, signatures=sigs
            )
            reply = self.ask(u, request)
            if isinstance(reply, UnmaskShares):
                for owner, blob in reply.self_mask_shares.items():
                    self.self_mask_shares.setdefault(owner, {})[u] = shamir.decode_share(blob)
                for owner, blob in reply.mask_key_shares.items():
                    self.mask_key_shares.setdefault(owner, {})[u] = shamir.decode_share(blob)
                for item in reply.mask_seeds:
                    self.pair_seeds[u, item.peer] = item.seed

    def _secret(self, table: dict[int, dict[int, shamir.Share]], owner: int) -> bytes | None:
        shares = list(table.get(owner, {}).values())
        return shamir.combine(shares, self.t) if len(shares) >= self.t else None

    def unmask_alone(self, victim: int, partners: set[int]) -> np.ndarray | None:
        """The victim's encoded input from its masked input alone, or None if a secret is missing.

        ``partners`` are the peers the victim masked with (the adversary chose them by what it
        relayed). Each pairwise mask goes with a seed either side revealed, the partner's mask
        key or the victim's own.
        """
        if victim not in self.masked:
            return None
        seed = self._secret(self.self_mask_shares, victim)
        if seed is None:
            return None
        y = self.strip_pairwise(victim, partners)
        if y is None:
            return None
        add_keystream(y, seed, -1)
        return y

    def pair_seed(self, victim: int, w: int) -> bytes | None:
        """The victim's pairwise seed with ``w`` from anything revealed, or None."""
        for revealer, peer in ((w, victim), (victim, w)):
            if (revealer, peer) in self.pair_seeds:
                return self.pair_seeds[revealer, peer]
        for owner, other in ((w, victim), (victim, w)):
            key = self._secret(self.mask_key_shares, owner)
            if key is not None:
                return kex.agree(
                    X25519PrivateKey.from_private_bytes(key), self.adverts[other].mask_pk,
                    purpose=kex.MASK_PURPOSE, round_id=self.params.round_id, me=owner, peer=other,
                )  # fmt: skip
        return None

    def strip_pairwise(self, victim: int, partners: set[int]) -> np.ndarray | None:
        """The victim's masked input less every pairwise mask, or None if a seed is missing."""
        y = self.masked[victim].copy()
        for w in sorted(partners):
            pair = self.pair_seed(victim, w)
            if pair is None:
                return None
            add_keystream(y, pair, -pairwise_mask_sign(victim, w))
        return y


def _survivor_set_attack(r: ManualRound, victim: int) -> tuple[Coordinator, set[int]]:
    """Relay the victim only t-1 peers' shares, then declare exactly those peers dropped."""
    adv = Coordinator(r)
    adv.share_stage()
    neighbours = sorted(adv.graph[victim])
    partners = set(neighbours[: adv.t - 1])
    adv.masked_stage({victim: set(neighbours) - partners})
    everyone = set(range(len(r.clients)))
    survivors = sorted(everyone - partners)
    adv.sign_stage(dict.fromkeys(survivors, survivors))
    adv.unmask_stage({u: (survivors, sorted(partners)) for u in survivors})
    return adv, partners


# (n, k, t): the defaults (strict majority) and the README's 4 institutions at k=2, t=2,
# then the same graphs at the active bound.
WEAK = [(5, 4, 3), (4, 2, 2), (7, 6, 4)]
AT_BOUND = [(5, 4, 4), (7, 6, 5), (16, 8, 7)]


@pytest.mark.parametrize(("n", "k", "t"), WEAK)
def test_survivor_set_attack_recovers_the_input_from_a_client_without_the_view_check(
    n, k, t, monkeypatch
):
    """The attack as found: without the check the victim's encoded input comes out exactly."""
    monkeypatch.setattr(SecAggClient, "_check_view", lambda self, survivors, dropped: None)
    r = ManualRound(n=n, threshold=t, neighbours=k, active_bound=False)
    adv, partners = _survivor_set_attack(r, victim=0)
    recovered = adv.unmask_alone(0, partners)
    assert recovered is not None
    step = r.params.clip / (2 ** (r.params.bits - 1) - 1)  # stochastic rounding: one step
    np.testing.assert_allclose(r.params.codec.decode(recovered), r.inputs[0], atol=step)


@pytest.mark.parametrize(("n", "k", "t"), WEAK + AT_BOUND)
def test_survivor_set_attack_recovers_nothing(n, k, t):
    r = ManualRound(n=n, threshold=t, neighbours=k, active_bound=False)
    adv, partners = _survivor_set_attack(r, victim=0)
    # the victim saw the lie (or, at the bound, that too few of its neighbourhood remain)
    assert isinstance(adv.refusals[0], secagg.RefusedRequest | secagg.TooFewSurvivors)
    assert 0 not in adv.self_mask_shares  # nobody revealed the victim's self-mask share
    assert adv.unmask_alone(0, partners) is None


@pytest.mark.parametrize(("n", "k", "t"), [(5, 4, 3), (7, 6, 5)])
def test_inconsistent_survivor_sets_recover_nothing(n, k, t):
    """Fork: tell some clients the victim survived and others that it dropped."""
    r = ManualRound(n=n, threshold=t, neighbours=k, active_bound=False)
    adv = Coordinator(r)
    adv.share_stage()
    adv.masked_stage()
    victim, everyone = 0, list(range(n))
    others = everyone[1:]
    half = others[: len(others) // 2]
    with_victim, without = everyone, others
    views = {u: with_victim for u in [victim, *half]} | {u: without for u in others[len(half) :]}
    adv.sign_stage(views)
    adv.unmask_stage(
        {u: (with_victim, []) for u in [victim, *half]}
        | {u: (without, [victim]) for u in others[len(half) :]}
    )
    assert adv.refusals  # at least one side lacked the signatures it needs
    assert adv.unmask_alone(victim, set(adv.graph[victim])) is None
    # and the victim's own secrets are never both rebuildable
    both = (
        len(adv.self_mask_shares.get(victim, {})) >= t
        and len(adv.mask_key_shares.get(victim, {})) >= t
    )
    assert not both


SPLITS = [
    # (n, k, t, active_bound, shown the victim alive; the rest are shown it dropped)
    (5, 4, 4, True, [0]),  # every other client reveals its seed with the victim, and s_0
    (5, 4, 4, True, [0, 1, 2]),
    (5, 4, 3, False, [0, 1, 2]),  # below the bound: b_0 comes out, the seeds of 3, 4 do not
    (7, 6, 5, True, [0, 1]),
]


@pytest.mark.parametrize(("n", "k", "t", "bound", "alive_to"), SPLITS)
def test_split_view_with_seed_reveal_recovers_nothing(n, k, t, bound, alive_to):
    """Fork with seeds: clients shown the victim dropped reveal their seed with it (and their
    share of s_0); the others are shown it alive and asked for b_0. The adversary then tries
    every seed, key and self-mask it obtained on the victim's masked input."""
    r = ManualRound(n=n, threshold=t, neighbours=k, d=16, active_bound=bound)
    encoded = _encoded(r)
    adv = Coordinator(r)
    adv.share_stage()
    adv.masked_stage()
    victim, everyone = 0, list(range(n))
    without = everyone[1:]
    dropped_to = [u for u in everyone if u not in alive_to]
    adv.sign_stage(dict.fromkeys(alive_to, everyone) | dict.fromkeys(dropped_to, without))
    adv.unmask_stage(
        dict.fromkeys(alive_to, (everyone, [])) | dict.fromkeys(dropped_to, (without, [victim]))
    )
    # as before: each side whose set lacks t signatures refuses, and at least one side does
    short = [side for side in (alive_to, dropped_to) if len(side) < t]
    assert short and set(adv.refusals) == {u for side in short for u in side}
    assert all(isinstance(e, secagg.TooFewSurvivors) for e in adv.refusals.values())
    revealed = {u for (u, peer) in adv.pair_seeds if peer == victim}
    signed = len(dropped_to) >= t
    assert revealed == (set(dropped_to) if signed else set())  # seeds only under a signed set
    assert adv.unmask_alone(victim, set(adv.graph[victim])) is None
    # everything it has, applied: still not the victim's input
    y = adv.masked[victim].copy()
    for w in sorted(adv.graph[victim]):
        pair = adv.pair_seed(victim, w)
        if pair is not None:
            add_keystream(y, pair, -pairwise_mask_sign(victim, w))
    b_seed = adv._secret(adv.self_mask_shares, victim)
    if b_seed is not None:
        add_keystream(y, b_seed, -1)
    assert not np.array_equal(y, encoded[victim])
    # never both every pairwise seed of the victim and its self-mask
    all_pairs = all(adv.pair_seed(victim, w) is not None for w in adv.graph[victim])
    assert not (all_pairs and b_seed is not None)


def test_request_for_both_shares_of_one_client_recovers_nothing():
    r = ManualRound(n=5, threshold=4)
    adv = Coordinator(r)
    adv.share_stage()
    adv.masked_stage()
    everyone = list(range(5))
    adv.sign_stage(dict.fromkeys(everyone, everyone))
    adv.unmask_stage(dict.fromkeys(everyone, (everyone, [0])))
    assert all(isinstance(e, secagg.RefusedRequest) for e in adv.refusals.values())
    assert len(adv.refusals) == 5
    assert adv.unmask_alone(0, set(adv.graph[0])) is None


def test_replayed_round_recovers_nothing():
    """An earlier round's request and signatures unlock nothing in the current round."""
    everyone = list(range(5))
    old = Coordinator(ManualRound(n=5, threshold=4, round_id=3))
    old.share_stage()
    old.masked_stage()
    old.sign_stage(dict.fromkeys(everyone, everyone))
    stale = old.signatures[frozenset(everyone)]
    adv = Coordinator(ManualRound(n=5, threshold=4, round_id=4))
    adv.share_stage()
    adv.masked_stage()
    adv.sign_stage(dict.fromkeys([1, 2, 3], everyone))  # 3 fresh signatures, t = 4
    replay = UnmaskRequest(round_id=3, survivors=everyone, dropped=[], signatures=stale)
    for u in everyone:
        with pytest.raises(secagg.WrongRound):
            adv.r.clients[u].handle(replay)
    # The old round's signatures of 0 and 4, relabelled for this round, complete the quorum.
    fresh = adv.signatures[frozenset(everyone)]
    relabelled = [
        SurvivorSignature(round_id=4, client_id=s.client_id, signature=s.signature)
        for s in stale
        if s.client_id in (0, 4)
    ]
    adv.signatures[frozenset(everyone)] = fresh + relabelled
    adv.unmask_stage({u: (everyone, []) for u in [1, 2, 3]})
    assert {type(e) for e in adv.refusals.values()} == {secagg.BadSignature}
    assert adv.self_mask_shares == {} and adv.mask_key_shares == {}


@pytest.mark.parametrize(
    ("n", "k", "t", "check", "field"),
    [
        (5, 4, 3, True, "threshold"),
        (4, 2, 2, True, "threshold"),
        (5, 4, 4, False, "check_survivors"),
    ],
)
def test_weakened_round_settings_are_refused_so_nothing_is_revealed(n, k, t, check, field):
    """Clients with the active bound (the default) refuse weak parameters before any key."""
    from secagg.messages import RoundParams

    params = RoundParams(
        round_id=1, client_ids=list(range(n)), threshold=t, neighbours=k,
        graph_seed=bytes(32), vector_length=4, check_survivors=check,
    )  # fmt: skip
    r = ManualRound(n=n, threshold=max(t, 2 * (k + 1) // 3 + 1), neighbours=k)
    with pytest.raises(secagg.ConfigError, match=field):
        SecAggClient(params, 0, np.zeros(4), r.keys[0], r.identities)


def test_honest_round_at_the_bound_still_sums_exactly_with_a_dropout():
    r = ManualRound(n=7, threshold=5, d=16)
    r.advertise()
    r.respond()
    live = [0, 1, 2, 3, 4, 5]
    r.respond(live)  # client 6 drops before masking
    r.respond(live)
    r.respond(live)
    assert r.server.stage is None
    total = r.params.codec.decode(r.server.result)
    np.testing.assert_allclose(total, sum(r.inputs[i] for i in live), atol=1e-3)


# ---------------------------------------------------------------------------- institutions


def _finish(r: ManualRound, live: list[int]) -> np.ndarray:
    r.advance()
    for _ in range(4):
        r.respond(live)
    assert r.server.stage is None
    return r.params.codec.decode(r.server.result)


@pytest.mark.parametrize(
    ("attack", "error"),
    [
        ("low_order", secagg.MalformedMessage),
        ("copied_key", secagg.DuplicateMessage),
        ("bad_signature", secagg.BadSignature),
    ],
)
def test_one_malicious_institution_among_five_is_left_out_and_the_others_sum(attack, error):
    r = ManualRound(n=5, threshold=4, d=16)
    bad, live = 4, [0, 1, 2, 3]
    adverts = {i: r.clients[i].advertise() for i in live}
    for i in live:
        r.send(i, adverts[i])
    own = r.clients[bad].advertise()
    mask_pk = {"low_order": bytes(32), "copied_key": adverts[0].mask_pk}.get(attack, own.mask_pk)
    payload = kex.advertisement_payload(own.round_id, bad, own.enc_pk, mask_pk)
    signature = bytes(64) if attack == "bad_signature" else r.keys[bad].sign(payload)
    forged = AdvertiseKeys(
        round_id=own.round_id, client_id=bad, enc_pk=own.enc_pk, mask_pk=mask_pk,
        signature=signature,
    )  # fmt: skip
    with pytest.raises(error):
        r.send(bad, forged)
    total = _finish(r, live)
    assert r.server.included == live
    np.testing.assert_allclose(total, sum(r.inputs[i] for i in live), atol=1e-3)


def _shifted(blob: bytes) -> bytes:
    share = shamir.decode_share(blob)
    return shamir.encode_share(shamir.Share(share.x, (share.y + 1) % shamir.P))


def _unmask_with_one_liar(n: int, t: int, liar: int) -> ManualRound:
    """An honest round in which ``liar`` shifts every share it reveals at unmasking."""
    r = ManualRound(n=n, threshold=t, d=16)
    r.advertise()
    for _ in range(3):
        r.respond()
    for i in range(n):
        reply = r.clients[i].handle(r.outgoing[i])
        if i == liar:
            reply = type(reply)(
                round_id=reply.round_id, client_id=i,
                self_mask_shares={o: _shifted(b) for o, b in reply.self_mask_shares.items()},
                mask_key_shares={o: _shifted(b) for o, b in reply.mask_key_shares.items()},
            )  # fmt: skip
        r.send(i, reply)
    return r


def test_wrong_unmask_shares_are_corrected_and_their_sender_named():
    """7 holders, t = 5: one wrong share per secret is within the correction radius."""
    r = _unmask_with_one_liar(7, 5, liar=3)
    r.advance()
    assert r.server.wrong_shares == {3}
    total = r.params.codec.decode(r.server.result)
    np.testing.assert_allclose(total, sum(r.inputs), atol=1e-3)


def test_wrong_unmask_shares_beyond_correction_release_no_sum():
    """5 holders, t = 4: one wrong share is detected but cannot be corrected."""
    r = _unmask_with_one_liar(5, 4, liar=2)
    with pytest.raises(secagg.InconsistentShares):
        r.advance()
    assert r.server.result is None and r.server.stage is None


def test_sparse_round_needs_signatures_from_more_than_two_thirds_of_the_round():
    """On a sparse graph t signatures are local; the survivor set needs a round-wide quorum."""
    r = ManualRound(n=12, threshold=4, neighbours=4, d=8)  # t = 4 > 2 * 5 / 3; quorum 9
    r.advertise()
    r.respond()
    r.respond()
    with pytest.raises(secagg.TooFewSurvivors, match="9 signatures"):
        r.respond(list(range(8)))  # only 8 sign
    assert r.server.result is None


@pytest.mark.parametrize(("holders", "t"), [(2, 2), (3, 3), (4, 3), (5, 4), (6, 5), (9, 7)])
def test_active_threshold_is_the_smallest_t_above_two_thirds(holders, t):
    from secagg.graph import active_threshold

    assert active_threshold(holders) == t
    assert 3 * t > 2 * holders >= 3 * (t - 1)  # two t-sets overlap in more than a third


def test_survivor_quorum_is_t_on_the_complete_graph_and_two_thirds_of_the_round_otherwise():
    from secagg.graph import survivor_quorum

    assert survivor_quorum(7, 6, 5) == 5
    assert survivor_quorum(30, 8, 7) == 21


# ------------------------------------------------------------- invalid shares and accusations

BAD_SHARES = ["garbage", "short", "wrong_header", "wrong_x"]
# (n, k, t, active_bound). At five institutions and the active bound (t = 4) only three valid
# holders of the accused's mask key remain, so its masks are cancelled with the survivors'
# revealed seeds; at t = 3 and at seven holders (t = 5) its key could be rebuilt too.
FIVE_WEAK, FIVE_AT_BOUND, SEVEN_AT_BOUND = (5, 4, 3, False), (5, 4, 4, True), (7, 6, 5, True)


def _bad_share(r: ManualRound, bad: int, victim: int, blob: bytes, attack: str) -> bytes:
    """What malicious ``bad`` sends ``victim`` instead of ``blob`` (its honest ciphertext)."""
    from secagg.client import _SHARE_HEADER

    if attack == "garbage":
        return bytes(b ^ 0x5A for b in blob)
    rid = r.params.round_id
    key = r.clients[bad]._share_key(victim)  # bad's own channel key: it can encrypt anything
    plain = kex.decrypt_share(key, blob, round_id=rid, sender=bad, recipient=victim)
    header, body = plain[: _SHARE_HEADER.size], plain[_SHARE_HEADER.size :]
    half = shamir.SHARE_BYTES
    if attack == "short":
        plain = plain[:-1]
    elif attack == "wrong_header":
        plain = _SHARE_HEADER.pack(bad, (victim + 1) % len(r.clients)) + body
    elif attack == "wrong_x":
        b_share = shamir.decode_share(body[:half])
        other = shamir.encode_share(shamir.Share(b_share.x + 1, b_share.y))
        plain = header + other + body[half:]
    elif attack == "shifted":  # a valid share off the polynomial: the victim cannot tell
        plain = header + _shifted(body[:half]) + body[half:]
    return kex.encrypt_share(key, plain, round_id=rid, sender=bad, recipient=victim)


def _share_stage_with(
    r: ManualRound, bad: int, victim: int, attack: str, also: tuple[int, ...] = ()
) -> None:
    """Advertise, then every client shares keys; ``bad`` corrupts its share for ``victim``
    (and for the clients in ``also``)."""
    r.advertise()
    victims = {victim, *also}
    for i, client in enumerate(r.clients):
        reply = client.handle(decode(encode(r.outgoing[i])))
        if i == bad:
            shares = [
                type(s)(peer=s.peer, ciphertext=_bad_share(r, bad, s.peer, s.ciphertext, attack))
                if s.peer in victims else s
                for s in reply.shares
            ]  # fmt: skip
            reply = ShareKeys(round_id=reply.round_id, client_id=bad, shares=shares)
        r.send(i, reply)
    r.advance()


def _encoded(r: ManualRound) -> dict[int, np.ndarray]:
    """Each client's encoded input, copied before it is masked (for exact ring sums)."""
    return {i: c._encoded.copy() for i, c in enumerate(r.clients)}


def _exact_sum(r: ManualRound, encoded: dict[int, np.ndarray], who: list[int]) -> np.ndarray:
    total = np.zeros(r.params.vector_length, dtype=r.params.codec.dtype)
    for i in who:
        total += encoded[i]
    return total


def _revealed(r: ManualRound, owner: int, field: str) -> int:
    """How many shares of ``owner``'s secret the server obtained at unmasking."""
    return sum(owner in getattr(msg, field) for msg in r.server.unmasking.values())


@pytest.mark.parametrize("attack", BAD_SHARES)
@pytest.mark.parametrize(("n", "k", "t", "bound"), [FIVE_WEAK, FIVE_AT_BOUND, SEVEN_AT_BOUND])
def test_one_institution_sending_an_invalid_share_is_excluded_and_the_others_sum(
    n, k, t, bound, attack, caplog
):
    r = ManualRound(n=n, threshold=t, neighbours=k, d=16, active_bound=bound)
    bad, victim = n - 1, 0
    live = list(range(n - 1))
    encoded = _encoded(r)
    _share_stage_with(r, bad, victim, attack)
    with caplog.at_level(logging.WARNING):
        for i in range(n):
            reply = r.clients[i].handle(decode(encode(r.outgoing[i])))
            assert isinstance(reply, MaskedInput)
            assert reply.accused == ([bad] if i == victim else [])
            r.send(i, reply)  # the malicious one sends its masked input too
        r.advance()
    assert f"accuses client {bad}" in caplog.text  # victim and server both name the sender
    assert not r.clients[victim].aborted
    assert r.server.masked == live and r.server.dropped == [bad]
    for _ in range(2):
        r.respond(live)
    assert r.server.stage is None and r.server.included == live
    # exactly the other institutions' encoded inputs, in the ring
    np.testing.assert_array_equal(r.server.result, _exact_sum(r, encoded, live))
    # (2) every survivor revealed its seed with the accused, the victim no share of its mask
    # key (it holds no valid one), and nobody a share of its self-mask
    assert all(_seed_peers(msg) == [bad] for msg in r.server.unmasking.values())
    assert _revealed(r, bad, "mask_key_shares") == n - 2
    assert bad not in r.server.unmasking[victim].mask_key_shares
    assert _revealed(r, bad, "self_mask_shares") == 0


def _seed_peers(msg: UnmaskShares) -> list[int]:
    return [item.peer for item in msg.mask_seeds]


def test_one_malicious_institution_among_five_at_the_active_bound_leaves_the_four_exact_sum():
    """Issue 12: five institutions, complete graph, t = 4 (the active bound), institution 4
    sends client 0 garbage instead of its share. Only 3 valid holders of s_4 remain, fewer than
    t, so s_4 stays hidden; the four survivors' seeds with 4 cancel its masks instead."""
    r = ManualRound(n=5, threshold=4, d=16)
    bad, victim, live = 4, 0, [0, 1, 2, 3]
    encoded = _encoded(r)
    _share_stage_with(r, bad, victim, "garbage")
    r.respond()  # every client, the malicious one included, sends its masked input
    assert r.server.masked == live and r.server.dropped == [bad]
    assert r.server.accused == {bad: {victim}}
    r.respond(live)
    r.respond(live)
    assert r.server.stage is None and r.server.included == live
    np.testing.assert_array_equal(r.server.result, _exact_sum(r, encoded, live))
    assert _revealed(r, bad, "mask_key_shares") == 3 < r.params.threshold  # s_4 not rebuildable
    assert _revealed(r, bad, "self_mask_shares") == 0
    seeds = {u: msg.mask_seeds[0].seed for u, msg in r.server.unmasking.items()}
    assert seeds[victim] == r.clients[victim]._pair_seed(bad) == r.clients[bad]._pair_seed(victim)


def test_invalid_shares_to_two_victims_of_seven_are_excluded_and_the_others_sum():
    """Before seed reveal, j victims needed k + 1 - 1 - j >= t valid holders: 7 - 3 < 5 here."""
    r = ManualRound(n=7, threshold=5, d=16)
    bad, live = 6, [0, 1, 2, 3, 4, 5]
    encoded = _encoded(r)
    _share_stage_with(r, bad, 0, "garbage", also=(1,))
    r.respond()
    assert r.server.dropped == [bad] and r.server.accused == {bad: {0, 1}}
    r.respond(live)
    r.respond(live)
    np.testing.assert_array_equal(r.server.result, _exact_sum(r, encoded, live))


def test_a_survivor_lost_at_unmasking_without_t_shares_of_the_accused_key_releases_no_sum(caplog):
    """7 institutions, t = 5; 6 sends invalid shares to 0 and 1, so 2..5 hold s_6 validly.
    Survivor 5 masked with 6 and is lost during unmasking: its seed with 6 never comes, and
    the 3 shares of s_6 that arrive are fewer than t, so u5's mask with 6 cannot be removed."""
    r = ManualRound(n=7, threshold=5, d=16)
    bad, lost = 6, 5
    _share_stage_with(r, bad, 0, "garbage", also=(1,))
    r.respond()
    r.respond([0, 1, 2, 3, 4, 5])
    assert r.server.masked == [0, 1, 2, 3, 4, 5]
    refused = pytest.raises(secagg.TooFewSurvivors, match=r"survivors \[5\] revealed no seed")
    with caplog.at_level(logging.WARNING, logger="secagg.server"), refused:
        r.respond([0, 1, 2, 3, 4])  # 5 unmask messages: t of them, but not 5's
    assert lost not in r.server.unmasking and _revealed(r, bad, "mask_key_shares") == 3
    assert r.server.result is None and r.server.stage is None
    assert isinstance(r.server.error, secagg.TooFewSurvivors)
    assert "no sum is released" in caplog.text


def test_a_survivor_lost_at_unmasking_is_covered_by_t_shares_of_a_dropped_key():
    """The share path still works beside seeds: 6 drops before masking, survivor 5 is lost at
    unmasking; 0..4 reveal their seeds with 6, and 5's mask with 6 comes from s_6 (5 shares)."""
    r = ManualRound(n=7, threshold=5, d=16)
    live, answering = [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4]
    encoded = _encoded(r)
    r.advertise()
    r.respond()
    r.respond(live)  # 6 sends no masked input
    r.respond(live)
    r.respond(answering)
    assert r.server.stage is None and r.server.included == live
    np.testing.assert_array_equal(r.server.result, _exact_sum(r, encoded, live))
    assert all(_seed_peers(r.server.unmasking[u]) == [6] for u in answering)


@pytest.mark.parametrize(("n", "k", "t", "bound"), [FIVE_WEAK, SEVEN_AT_BOUND])
def test_a_shifted_share_is_not_detectable_by_the_victim_and_is_corrected_at_unmasking(
    n, k, t, bound
):
    """A validly encrypted share off the polynomial passes every check the victim can make
    (there is no verifiable secret sharing); robust reconstruction corrects it instead. It
    names the holder that revealed it, here the honest victim: a share error cannot be
    attributed to its dealer without VSS."""
    r = ManualRound(n=n, threshold=t, neighbours=k, d=16, active_bound=bound)
    bad, victim = n - 1, 0
    encoded = _encoded(r)
    _share_stage_with(r, bad, victim, "shifted")
    for _ in range(3):
        r.respond()
    assert r.server.stage is None and r.server.included == list(range(n))
    np.testing.assert_array_equal(r.server.result, _exact_sum(r, encoded, list(range(n))))
    assert r.server.wrong_shares == {victim}


def test_the_victim_refuses_a_survivor_set_that_keeps_the_accused():
    r = ManualRound(n=5, threshold=3, d=8, active_bound=False)
    _share_stage_with(r, 4, 0, "garbage")
    assert r.clients[0].handle(r.outgoing[0]).accused == [4]
    request = SurvivorSetRequest(round_id=r.params.round_id, survivors=list(range(5)))
    with pytest.raises(secagg.RefusedRequest, match="accused"):
        r.clients[0].handle(request)


def _masked_inputs(r: ManualRound) -> dict[int, MaskedInput]:
    """Every client's honest masked input (not yet sent)."""
    return {i: r.clients[i].handle(decode(encode(r.outgoing[i]))) for i in range(len(r.clients))}


def _accusing(msg: MaskedInput, accused: list[int]) -> MaskedInput:
    return MaskedInput(
        round_id=msg.round_id, client_id=msg.client_id, vector=msg.vector, accused=accused
    )


def test_a_false_accusation_excludes_an_honest_party_but_never_reveals_its_input():
    """Malicious 0 accuses honest 4, whose share was valid: 4 is left out (availability), and
    the server gets 4's mask key but none of its self-mask, so 4's masked input, which the
    server holds, stays hidden behind PRG(b_4)."""
    r = ManualRound(n=5, threshold=3, d=16, active_bound=False)
    accuser, honest, live = 0, 4, [0, 1, 2, 3]
    encoded = _encoded(r)
    r.advertise()
    r.respond()
    replies = _masked_inputs(r)
    assert all(reply.accused == [] for reply in replies.values())
    kept = np.frombuffer(replies[honest].vector, dtype=r.params.codec.dtype).copy()
    for i, reply in replies.items():
        r.send(i, _accusing(reply, [honest]) if i == accuser else reply)
    r.advance()
    assert r.server.dropped == [honest]
    for _ in range(2):
        r.respond(live)
    assert r.server.included == live
    np.testing.assert_array_equal(r.server.result, _exact_sum(r, encoded, live))
    assert _revealed(r, honest, "self_mask_shares") == 0
    # Everything the server received: 4's masked input and its mask key remove every pairwise
    # mask, but the self-mask is left, so what remains is not 4's encoded input.
    mask_key = shamir.combine(
        [shamir.decode_share(msg.mask_key_shares[honest]) for msg in r.server.unmasking.values()],
        r.params.threshold,
    )
    y = kept.copy()
    for w in sorted(r.server._graph[honest]):
        pair = kex.agree(
            X25519PrivateKey.from_private_bytes(mask_key), r.server.advertised[w].mask_pk,
            purpose=kex.MASK_PURPOSE, round_id=r.params.round_id, me=honest, peer=w,
        )  # fmt: skip
        add_keystream(y, pair, -pairwise_mask_sign(honest, w))
    assert not np.array_equal(y, encoded[honest])
    add_keystream(y, r.clients[honest]._self_seed, -1)  # only b_4, which 4 alone holds whole
    np.testing.assert_array_equal(y, encoded[honest])


def test_accusations_that_leave_fewer_than_threshold_release_no_sum():
    r = ManualRound(n=5, threshold=3, d=8, active_bound=False)
    r.advertise()
    r.respond()
    replies = _masked_inputs(r)
    for i, reply in replies.items():
        r.send(i, _accusing(reply, [2, 3, 4]) if i == 0 else reply)
    with pytest.raises(secagg.TooFewSurvivors, match="accused"):
        r.advance()
    assert r.server.result is None and r.server.stage is None
    assert isinstance(r.server.error, secagg.TooFewSurvivors)


@pytest.mark.parametrize(
    ("accused", "match"),
    [([9], "sent it no share"), ([0], "itself"), ([1, 1], "repeated"),
     ([1, 2, 3, 4, 1], "neighbours")],
)  # fmt: skip
def test_malformed_accusations_are_refused_and_the_server_keeps_serving(accused, match, caplog):
    r = ManualRound(n=5, threshold=3, d=8, active_bound=False)
    encoded = _encoded(r)
    r.advertise()
    r.respond()
    replies = _masked_inputs(r)
    refused = pytest.raises(secagg.InvalidAccusation, match=match)
    with caplog.at_level(logging.WARNING, logger="secagg.server"), refused:
        r.send(0, _accusing(replies[0], accused))
    assert "refused masked input" in caplog.text
    for i, reply in replies.items():  # the honest message from 0 is still accepted
        r.send(i, reply)
    r.advance()
    r.respond()
    r.respond()
    assert r.server.included == list(range(5))
    np.testing.assert_array_equal(r.server.result, _exact_sum(r, encoded, list(range(5))))


def test_an_oversize_accusation_is_refused_on_the_wire():
    from secagg.messages import MAX_ACCUSED

    msg = MaskedInput(round_id=1, client_id=0, vector=memoryview(bytes(8)),
                      accused=[1] * (MAX_ACCUSED + 1))  # fmt: skip
    with pytest.raises(secagg.MalformedMessage):
        decode(encode(msg))


def test_an_accusation_of_a_non_neighbour_is_refused():
    r = ManualRound(n=7, threshold=3, neighbours=2, d=8, active_bound=False)
    stranger = next(v for v in range(7) if v not in r.server._graph[0] and v != 0)
    r.advertise()
    r.respond()
    reply = r.clients[0].handle(decode(encode(r.outgoing[0])))
    with pytest.raises(secagg.InvalidAccusation, match="sent it no share"):
        r.send(0, _accusing(reply, [stranger]))


# ------------------------------------------------------------------------------- revealed seeds


def _round_at_unmask_with_an_accused() -> tuple[ManualRound, dict[int, np.ndarray], dict]:
    """n = 5, t = 4: 4 sent 0 garbage and is dropped; every survivor's unmask reply, unsent."""
    r = ManualRound(n=5, threshold=4, d=8)
    encoded = _encoded(r)
    _share_stage_with(r, 4, 0, "garbage")
    r.respond()
    r.respond([0, 1, 2, 3])
    replies = {u: r.clients[u].handle(decode(encode(r.outgoing[u]))) for u in range(4)}
    return r, encoded, replies


def _with_seeds(msg: UnmaskShares, seeds: list[RevealedSeed]) -> UnmaskShares:
    return UnmaskShares(
        round_id=msg.round_id, client_id=msg.client_id, self_mask_shares=msg.self_mask_shares,
        mask_key_shares=msg.mask_key_shares, mask_seeds=seeds,
    )  # fmt: skip


def _wire_with_seeds(msg: UnmaskShares, seeds: list[dict]) -> bytes:
    """``msg`` on the wire with raw ``mask_seeds`` entries (which the constructor would refuse)."""
    raw = msgspec.msgpack.decode(encode(msg))
    raw["mask_seeds"] = seeds
    return msgspec.msgpack.encode(raw)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda s: [{"peer": 4, "seed": s[:31]}], "mask_seeds"),  # wrong length
        (lambda s: [{"peer": 4, "seed": s + b"x"}], "mask_seeds"),
        (lambda s: [{"peer": 4, "seed": s}, {"peer": 4, "seed": s}], "two seeds"),
        (lambda s: [{"peer": 4, "seed": s}] * (MAX_SEEDS + 1), "mask_seeds"),
        (lambda s: [{"peer": 4, "seed": s, "extra": 1}], "mask_seeds"),
    ],
)
def test_malformed_seed_reveals_are_refused_on_the_wire(mutate, match):
    r, encoded, replies = _round_at_unmask_with_an_accused()
    seed = replies[1].mask_seeds[0].seed
    with pytest.raises(secagg.MalformedMessage, match=match):
        decode(_wire_with_seeds(replies[1], mutate(seed)))
    for u, reply in replies.items():  # the round goes on with the honest messages
        r.send(u, reply)
    r.advance()
    np.testing.assert_array_equal(r.server.result, _exact_sum(r, encoded, [0, 1, 2, 3]))


@pytest.mark.parametrize(
    ("peers", "match"),
    [([2], "not its dropped neighbours"), ([4, 3], "not its dropped neighbours"),
     ([1], "not its dropped neighbours"), ([99], "not its dropped neighbours")],
)  # fmt: skip
def test_seeds_for_parties_not_dropped_are_refused_and_the_server_keeps_serving(
    peers, match, caplog
):
    """A seed with a survivor would be half of that survivor's live pairwise mask: the server
    takes seeds only for the sender's neighbours in the dropped set."""
    r, encoded, replies = _round_at_unmask_with_an_accused()
    seeds = [RevealedSeed(peer=p, seed=bytes(32)) for p in peers]
    refused = pytest.raises(secagg.MalformedMessage, match=match)
    with caplog.at_level(logging.WARNING, logger="secagg.server"), refused:
        r.send(1, _with_seeds(replies[1], seeds))
    assert "refused unmask message" in caplog.text
    assert r.server.expected == {0, 1, 2, 3}  # nothing was accepted from 1
    for u, reply in replies.items():
        r.send(u, reply)
    r.advance()
    assert r.server.stage is None and r.server.included == [0, 1, 2, 3]
    np.testing.assert_array_equal(r.server.result, _exact_sum(r, encoded, [0, 1, 2, 3]))


def test_a_duplicate_seed_is_refused_by_the_message_itself():
    with pytest.raises(secagg.MalformedMessage, match="two seeds"):
        UnmaskShares(
            round_id=1, client_id=0, self_mask_shares={}, mask_key_shares={},
            mask_seeds=[RevealedSeed(peer=4, seed=bytes(32))] * 2,
        )  # fmt: skip


def test_honest_clients_reveal_seeds_only_with_dropped_neighbours():
    """No dropout: nothing to reveal. One dropout: each survivor's seed with it, nothing else."""
    r = ManualRound(n=9, threshold=5, neighbours=6, d=8)  # sparse: not every client meets 8
    live = list(range(8))
    encoded = _encoded(r)
    r.advertise()
    r.respond()
    r.respond(live)
    assert r.server.dropped == [8]
    r.respond(live)
    r.respond(live)
    for u, msg in r.server.unmasking.items():
        assert _seed_peers(msg) == sorted(r.server._graph[u] & {8})
    assert {u for u, msg in r.server.unmasking.items() if msg.mask_seeds} == r.server._graph[8]
    np.testing.assert_array_equal(r.server.result, _exact_sum(r, encoded, live))
