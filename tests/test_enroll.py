"""Enrollment across hosts: signed cards, the roster from cards, CKKS shares sealed per party."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import msgspec
import pytest

from clients.contract.enroll import CardError
from clients.contract.enroll import SealedShare
from clients.contract.enroll import ShareError
from clients.contract.enroll import accept_ckks_share
from clients.contract.enroll import build_roster
from clients.contract.enroll import card_path
from clients.contract.enroll import create_ckks_shares
from clients.contract.enroll import enroll_institution
from clients.contract.enroll import open_share
from clients.contract.enroll import seal_share
from clients.contract.enroll import share_path
from clients.contract.keys import CKKS_SECRET_FILE
from clients.contract.keys import CURVE_SECRET_FILE
from clients.contract.keys import IDENTITY_FILE
from clients.contract.keys import ROSTER_FILE
from clients.contract.keys import institution_dir
from clients.contract.keys import load_ckks_key_holder
from clients.contract.keys import load_ckks_public_context
from clients.contract.keys import load_coordinator_keys
from clients.contract.keys import load_institution_keys
from clients.contract.keys import load_roster
from coordinator.app.cli import main

NAMES = ["alpha", "beta", "gamma"]


@pytest.fixture
def hosts(tmp_path: Path) -> dict[str, Path]:
    """One keys folder per host: each institution enrolls on its own, the coordinator
    builds the roster from the cards, the roster is copied back to every institution."""
    dirs = {name: tmp_path / name for name in [*NAMES, "coordinator"]}
    cards = [enroll_institution(dirs[name], name, NAMES) for name in NAMES]
    build_roster(dirs["coordinator"], NAMES, cards)
    for name in NAMES:
        shutil.copy(dirs["coordinator"] / ROSTER_FILE, dirs[name] / ROSTER_FILE)
    return dirs


def test_enrolled_layout_loads_and_matches_the_roster(hosts):
    roster = load_roster(hosts["coordinator"] / ROSTER_FILE)
    assert [e.name for e in roster.institutions] == NAMES
    assert load_coordinator_keys(hosts["coordinator"]).public_entry() == roster.coordinator
    for name in NAMES:
        own = load_institution_keys(hosts[name], name)
        assert own.public_entry() == roster.institution(name)
        for secret in (CURVE_SECRET_FILE, IDENTITY_FILE):
            assert (
                stat.S_IMODE((institution_dir(hosts[name], name) / secret).stat().st_mode) == 0o600
            )
    # no institution secret ever lands on the coordinator's host
    assert not (hosts["coordinator"] / "institutions").exists()


def test_tampered_card_is_refused(hosts, tmp_path):
    card = json.loads(card_path(hosts["beta"], "beta").read_text())
    card["keys"]["curve_public"] = load_institution_keys(
        hosts["gamma"], "gamma"
    ).curve_public.decode()
    forged = tmp_path / "forged.card.json"
    forged.write_text(json.dumps(card))
    cards = [card_path(hosts["alpha"], "alpha"), forged, card_path(hosts["gamma"], "gamma")]
    with pytest.raises(CardError, match="signature does not match"):
        build_roster(tmp_path / "other-coordinator", NAMES, cards)
    assert not (tmp_path / "other-coordinator" / ROSTER_FILE).exists()


def test_card_of_an_unknown_name_is_refused(hosts, tmp_path):
    mallory = enroll_institution(tmp_path / "mallory", "mallory", ["mallory"])
    cards = [card_path(hosts[n], n) for n in NAMES] + [mallory]
    with pytest.raises(CardError, match="not an institution of the config"):
        build_roster(tmp_path / "c2", NAMES, cards)
    with pytest.raises(CardError, match="no card for"):
        build_roster(tmp_path / "c3", NAMES, cards[:2])


def test_ckks_share_reaches_each_institution_and_only_it(hosts):
    shares = create_ckks_shares(hosts["alpha"], "alpha")
    assert sorted(p.name for p in shares) == ["ckks-share-beta.json", "ckks-share-gamma.json"]
    reference = load_ckks_key_holder(hosts["alpha"], "alpha").to_bytes()
    for name in ("beta", "gamma"):
        accept_ckks_share(hosts[name], name, share_path(hosts["alpha"], name))
        assert load_ckks_key_holder(hosts[name], name).to_bytes() == reference
        assert (
            stat.S_IMODE((institution_dir(hosts[name], name) / CKKS_SECRET_FILE).stat().st_mode)
            == 0o600
        )
    # the coordinator gets the public context only, and the loader finds it in its folder
    shutil.copy(hosts["alpha"] / "ckks.public", hosts["coordinator"] / "ckks.public")
    assert (
        load_ckks_public_context(hosts["coordinator"])
        == (hosts["alpha"] / "ckks.public").read_bytes()
    )
    assert reference not in (hosts["alpha"] / "ckks.public").read_bytes()


def test_accepting_a_new_ckks_key_over_another_needs_force(hosts):
    create_ckks_shares(hosts["alpha"], "alpha")
    accept_ckks_share(hosts["beta"], "beta", share_path(hosts["alpha"], "beta"))
    accept_ckks_share(hosts["beta"], "beta", share_path(hosts["alpha"], "beta"))  # same: fine
    first = load_ckks_key_holder(hosts["beta"], "beta").to_bytes()
    create_ckks_shares(hosts["alpha"], "alpha", force=True)  # a new key
    with pytest.raises(ShareError, match="--force"):
        accept_ckks_share(hosts["beta"], "beta", share_path(hosts["alpha"], "beta"))
    assert load_ckks_key_holder(hosts["beta"], "beta").to_bytes() == first
    accept_ckks_share(hosts["beta"], "beta", share_path(hosts["alpha"], "beta"), force=True)
    replaced = load_ckks_key_holder(hosts["beta"], "beta").to_bytes()
    assert replaced == load_ckks_key_holder(hosts["alpha"], "alpha").to_bytes() != first


def test_share_for_one_institution_opens_for_nobody_else(hosts):
    create_ckks_shares(hosts["alpha"], "alpha")
    share = msgspec.json.decode(share_path(hosts["alpha"], "beta").read_bytes(), type=SealedShare)
    roster = load_roster(hosts["coordinator"] / ROSTER_FILE)
    gamma = load_institution_keys(hosts["gamma"], "gamma")
    with pytest.raises(ShareError, match="sealed to 'beta'"):
        accept_ckks_share(hosts["gamma"], "gamma", share_path(hosts["alpha"], "beta"))
    # relabelled for gamma: the signature no longer matches
    relabelled = msgspec.structs.replace(share, recipient="gamma")
    with pytest.raises(ShareError, match="signature"):
        open_share(relabelled, gamma, roster)
    # the coordinator's keys posing as beta (same name, its own X25519 secret): the AEAD fails
    coordinator = load_coordinator_keys(hosts["coordinator"])
    posing = msgspec.structs.replace(coordinator, name="beta")
    with pytest.raises(ShareError, match="does not open"):
        open_share(share, posing, roster)
    assert not (institution_dir(hosts["gamma"], "gamma") / CKKS_SECRET_FILE).exists()


@pytest.mark.parametrize("field", ["ciphertext", "nonce", "ephemeral_public"])
def test_tampered_share_is_refused(hosts, tmp_path, field):
    create_ckks_shares(hosts["alpha"], "alpha")
    share = msgspec.json.decode(share_path(hosts["alpha"], "beta").read_bytes(), type=SealedShare)
    value = bytearray(getattr(share, field))
    value[0] ^= 1
    tampered = tmp_path / "tampered.json"
    tampered.write_bytes(
        msgspec.json.encode(msgspec.structs.replace(share, **{field: bytes(value)}))
    )
    with pytest.raises(ShareError, match="signature"):
        accept_ckks_share(hosts["beta"], "beta", tampered)
    assert not (institution_dir(hosts["beta"], "beta") / CKKS_SECRET_FILE).exists()


def test_share_signed_by_a_key_not_in_the_roster_is_refused(hosts, tmp_path):
    """An attacker (e.g. the coordinator) re-seals its own CKKS key to beta under alpha's name."""
    create_ckks_shares(hosts["alpha"], "alpha")
    impostor_dir = tmp_path / "impostor"
    enroll_institution(impostor_dir, "alpha", NAMES)
    impostor = load_institution_keys(impostor_dir, "alpha")

    roster = load_roster(hosts["beta"] / ROSTER_FILE)
    forged = seal_share(b"attacker's context", impostor, roster.institution("beta"))
    with pytest.raises(ShareError, match="signature is not 'alpha'"):
        open_share(forged, load_institution_keys(hosts["beta"], "beta"), roster)


def test_cli_enrollment_sequence_and_a_bad_card_is_a_user_error(tmp_path, capsys):
    """`sealmoe enroll`, `roster`, `ckks-share`, `ckks-accept` as the README runs them."""
    config_text = "\n".join(
        ["[federation]", 'name = "t"', "[coordinator]", 'keys_dir = "keys"']
        + [f'[[institutions]]\nname = "{n}"' for n in NAMES]
    )
    dirs = {p: tmp_path / p for p in [*NAMES, "coordinator"]}
    for folder in dirs.values():
        folder.mkdir()
        (folder / "f.toml").write_text(config_text + "\n")
    for name in NAMES:
        assert main(["enroll", str(dirs[name] / "f.toml"), "--institution", name]) == 0
    cards = [str(card_path(dirs[n] / "keys", n)) for n in NAMES]
    forged = tmp_path / "forged.card.json"
    card = json.loads(Path(cards[1]).read_text())
    card["signature"] = card["signature"][:-2] + ("00" if card["signature"][-2:] != "00" else "11")
    forged.write_text(json.dumps(card))
    coordinator_config = str(dirs["coordinator"] / "f.toml")
    assert main(["roster", coordinator_config, cards[0], str(forged), cards[2]]) == 2
    assert "signature does not match" in capsys.readouterr().err
    assert main(["roster", coordinator_config, *cards]) == 0
    for name in NAMES:
        shutil.copy(dirs["coordinator"] / "keys" / ROSTER_FILE, dirs[name] / "keys")
    assert main(["ckks-share", str(dirs["alpha"] / "f.toml"), "--institution", "alpha"]) == 0
    share = share_path(dirs["alpha"] / "keys", "beta")
    assert main(["ckks-accept", str(dirs["gamma"] / "f.toml"), "--institution", "gamma",
                 "--share", str(share)]) == 2  # fmt: skip
    assert "sealed to 'beta'" in capsys.readouterr().err
    assert main(["ckks-accept", str(dirs["beta"] / "f.toml"), "--institution", "beta",
                 "--share", str(share)]) == 0  # fmt: skip
    assert (
        load_ckks_key_holder(dirs["beta"] / "keys", "beta").to_bytes()
        == load_ckks_key_holder(dirs["alpha"] / "keys", "alpha").to_bytes()
    )
