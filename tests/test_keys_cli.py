"""Key material and the `sealmoe` command: generation, roster round trip, CURVE over loopback."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from clients.contract.keys import CURVE_SECRET_FILE
from clients.contract.keys import IDENTITY_FILE
from clients.contract.keys import ROSTER_FILE
from clients.contract.keys import KeyFileError
from clients.contract.keys import KeysExistError
from clients.contract.keys import RosterError
from clients.contract.keys import generate_keys
from clients.contract.keys import institution_dir
from clients.contract.keys import load_coordinator_keys
from clients.contract.keys import load_institution_keys
from clients.contract.keys import load_roster
from coordinator.app.cli import build_parser
from coordinator.app.cli import main

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["alpha", "beta", "gamma"]


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    generate_keys(tmp_path / "keys", NAMES)
    return tmp_path / "keys"


def test_roster_round_trips_and_matches_secret_files(keys_dir):
    roster = load_roster(keys_dir / ROSTER_FILE)
    assert [e.name for e in roster.institutions] == NAMES
    for name in NAMES:
        own = load_institution_keys(keys_dir, name)
        assert own.public_entry() == roster.institution(name)
        assert roster.by_curve_key(own.curve_public).name == name
        message = b"advertise keys"
        roster.institution(name).identity_key.verify(own.identity.sign(message), message)
    assert load_coordinator_keys(keys_dir).public_entry() == roster.coordinator
    assert roster.by_curve_key(zmq.curve_keypair()[0]) is None
    assert len({e.curve_public for e in roster.institutions}) == len(NAMES)


def test_private_files_are_0600(keys_dir):
    if os.name != "posix":
        pytest.fail("file modes are only meaningful on POSIX")
    for folder in [keys_dir / "coordinator"] + [institution_dir(keys_dir, n) for n in NAMES]:
        for secret in (CURVE_SECRET_FILE, IDENTITY_FILE):
            assert stat.S_IMODE((folder / secret).stat().st_mode) == 0o600
    assert not [p for p in keys_dir.rglob(".*") if p.is_file()]  # no temp files left


def test_refuses_to_overwrite_unless_forced(keys_dir):
    before = (keys_dir / ROSTER_FILE).read_text()
    with pytest.raises(KeysExistError, match="force"):
        generate_keys(keys_dir, NAMES)
    assert (keys_dir / ROSTER_FILE).read_text() == before
    roster = generate_keys(keys_dir, NAMES, force=True)
    assert load_roster(keys_dir / ROSTER_FILE) == roster
    assert (keys_dir / ROSTER_FILE).read_text() != before


def test_loader_refuses_world_readable_secret(keys_dir):
    secret = institution_dir(keys_dir, "beta") / CURVE_SECRET_FILE
    secret.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_institution_keys(keys_dir, "beta")


def test_loader_refuses_mismatched_key_pair(keys_dir):
    a, b = (institution_dir(keys_dir, n) / CURVE_SECRET_FILE for n in ("alpha", "beta"))
    text = a.read_text().replace(
        load_institution_keys(keys_dir, "alpha").curve_public.decode(),
        load_institution_keys(keys_dir, "beta").curve_public.decode(),
    )
    a.write_text(text)
    with pytest.raises(KeyFileError, match="does not belong"):
        load_institution_keys(keys_dir, "alpha")
    assert b.exists()


@pytest.mark.parametrize("names", [["a", "a"], ["ok", "no/slash"], ["coordinator", "b"]])
def test_bad_institution_names(tmp_path, names):
    with pytest.raises(KeyFileError):
        generate_keys(tmp_path, names)
    assert not (tmp_path / ROSTER_FILE).exists()


def test_roster_errors_name_the_entry(keys_dir):
    path = keys_dir / ROSTER_FILE
    text = path.read_text()
    beta = load_roster(path).institution("beta")
    path.write_text(text.replace(beta.identity_public, "zz" * 32))
    with pytest.raises(RosterError, match=r"\$\.institutions\[1\].*'beta'"):
        load_roster(path)
    gamma = load_roster_text(text).institution("gamma")
    path.write_text(text.replace(gamma.curve_public, beta.curve_public))
    with pytest.raises(RosterError, match=r"institutions\[2\] \('gamma'\)\.curve_public repeats"):
        load_roster(path)
    path.write_text(text + "\nextra = 1\n")
    with pytest.raises(RosterError, match="extra"):
        load_roster(path)
    with pytest.raises(RosterError, match="sealmoe keys"):
        load_roster(keys_dir / "nope.toml")
    with pytest.raises(RosterError, match="not in the roster"):
        load_roster_text(text).institution("delta")


def load_roster_text(text: str):
    import msgspec

    from clients.contract.keys import Roster

    return msgspec.convert(tomllib_loads(text), Roster)


def tomllib_loads(text: str) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    return tomllib.loads(text)


def test_curve_keys_work_over_loopback(keys_dir):
    server_keys = load_coordinator_keys(keys_dir)
    client_keys = load_institution_keys(keys_dir, "alpha")
    ctx = zmq.Context()
    try:
        server = ctx.socket(zmq.ROUTER)
        server.curve_server = True
        server.curve_secretkey = server_keys.curve_secret
        server.curve_publickey = server_keys.curve_public
        server.linger = 0
        port = server.bind_to_random_port("tcp://127.0.0.1")
        client = ctx.socket(zmq.DEALER)
        client.curve_secretkey = client_keys.curve_secret
        client.curve_publickey = client_keys.curve_public
        client.curve_serverkey = load_roster(
            keys_dir / ROSTER_FILE
        ).coordinator.curve_public.encode()
        client.linger = 0
        client.connect(f"tcp://127.0.0.1:{port}")
        client.send(b"hello")
        assert server.poll(10_000), "no CURVE message arrived"
        identity, payload = server.recv_multipart()
        assert payload == b"hello"
        server.send_multipart([identity, b"welcome"])
        assert client.poll(10_000)
        assert client.recv() == b"welcome"
        # A client that expects another server key never completes the handshake.
        stranger = ctx.socket(zmq.DEALER)
        stranger.curve_secretkey = client_keys.curve_secret
        stranger.curve_publickey = client_keys.curve_public
        stranger.curve_serverkey = load_institution_keys(keys_dir, "beta").curve_public
        stranger.linger = 0
        stranger.connect(f"tcp://127.0.0.1:{port}")
        stranger.send(b"let me in")
        assert not server.poll(500)
    finally:
        ctx.destroy(linger=0)


# ----------------------------------------------------------------------------------- the CLI


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "fed.toml"
    shutil.copy(ROOT / "examples" / "tiny.toml", path)
    return path


def test_cli_help_via_subprocess():
    out = subprocess.run(
        [sys.executable, "-m", "coordinator.app.cli", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "keys" in out and "check-config" in out


def test_cli_subcommand_help(capsys):
    assert main(["keys", "--help"]) == 0
    assert "--force" in capsys.readouterr().out


def test_cli_keys_creates_files(config_file, capsys):
    assert main(["keys", "--config", str(config_file)]) == 0
    keys_dir = config_file.parent / "keys" / "tiny"
    roster = load_roster(keys_dir / ROSTER_FILE)
    assert [e.name for e in roster.institutions] == ["comedies", "tragedies", "histories"]
    assert str(keys_dir) in capsys.readouterr().out
    # a second run refuses, one line, exit 2; --force replaces
    assert main(["keys", "--config", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert "already exist" in err and "Traceback" not in err and err.count("\n") == 1
    assert main(["keys", "--config", str(config_file), "--force"]) == 0
    assert load_roster(keys_dir / ROSTER_FILE) != roster


def test_cli_check_config(config_file, capsys):
    assert main(["check-config", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert "comedies" in out and "t=3 of 3" in out and "OK" in out


def test_check_config_warns_when_delta_is_not_below_one_over_the_records(config_file, capsys):
    text = config_file.read_text().replace("train = 1024", "train = 1000")
    config_file.write_text(text.replace("target_delta = 1e-5\n", "target_delta = 0.005\n", 1))
    assert main(["check-config", str(config_file)]) == 0  # a warning, not a refusal
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert out.count("warning:") == 2  # comedies and tragedies; histories keeps its own 1e-5
    assert "institution 'comedies': delta = 0.005" in out and "1/records = 1/1000" in out
    assert "institution 'histories'" not in out
    assert "OK:" in out


def test_check_config_does_not_warn_for_a_small_delta(config_file, capsys):
    assert main(["check-config", str(config_file)]) == 0  # delta 1e-5, at most 1024 records
    assert "warning" not in capsys.readouterr().out


def test_cli_bad_config_exits_2_with_the_field(config_file, capsys):
    config_file.write_text(config_file.read_text().replace("rounds = 2", "rounds = -2"))
    assert main(["check-config", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert "$.federation.rounds" in err and str(config_file) in err
    assert "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize("strategy", ["fedamole", "ddome"])
def test_ckks_updates_with_fedamole_or_ddome_are_refused_naming_the_field(
    config_file, capsys, strategy
):
    text = config_file.read_text().replace('strategy = "fedavg"', f'strategy = "{strategy}"', 1)
    config_file.write_text(re.sub(r'(?m)^expert_updates = "\w+"', 'expert_updates = "ckks"', text))
    assert main(["check-config", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert "$.aggregation.expert_updates" in err and strategy in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_cli_usage_error_exits_2(capsys):
    assert main([]) == 2
    assert main(["keys"]) == 2  # the config is required
    assert "no federation config given" in capsys.readouterr().err


def test_every_config_command_takes_the_config_positionally_or_as_an_option(
    config_file, tmp_path, capsys
):
    config = config_file
    assert main(["check-config", str(config)]) == 0
    assert main(["check-config", "--config", str(config)]) == 0
    assert main(["keys", str(config)]) == 0
    assert main(["check-config", str(config), "--config", str(tmp_path / "other.toml")]) == 2
    assert "two different configs" in capsys.readouterr().err


def test_an_unknown_institution_is_a_user_error_naming_the_option(config_file, capsys):
    assert main(["client", str(config_file), "--institution", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "--institution: no institution 'nosuch'" in err and "comedies" in err


def test_version_names_the_package(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("sealmoe ")


def test_cli_error_via_subprocess(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "coordinator.app.cli", "check-config", str(tmp_path / "none.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "no such file" in proc.stderr and "Traceback" not in proc.stderr


def test_institutions_share_a_ckks_key_the_coordinator_lacks(tmp_path):
    import numpy as np

    from clients.contract.keys import load_ckks_key_holder
    from clients.contract.keys import load_ckks_public_context
    from secagg.ckks import CkksAggregator

    keys_dir = tmp_path / "keys"
    generate_keys(keys_dir, ["a", "b"])
    a, b = load_ckks_key_holder(keys_dir, "a"), load_ckks_key_holder(keys_dir, "b")
    aggregator = CkksAggregator(load_ckks_public_context(keys_dir))
    aggregator.add(a.encrypt([np.full(3, 0.25)]))
    aggregator.add(b.encrypt([np.full(3, 0.5)]))
    np.testing.assert_allclose(b.decrypt(aggregator.sum())[0], np.full(3, 0.75), atol=1e-6)
    secret = institution_dir(keys_dir, "a") / "ckks.secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_coordinator_without_keys_is_a_one_line_user_error(tmp_path, capsys):
    config = tmp_path / "federation.toml"
    text = (ROOT / "examples" / "tiny.toml").read_text()
    config.write_text(text.replace('keys_dir = "keys/tiny"', f'keys_dir = "{tmp_path / "none"}"'))
    assert main(["coordinator", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "sealmoe keys" in err and "Traceback" not in err


def test_check_config_refuses_a_model_no_party_could_load(config_file, tmp_path, capsys):
    text = config_file.read_text()
    assert 'name = "tiny-dense"' in text
    config_file.write_text(text.replace('name = "tiny-dense"', 'name = "smolm2"'))
    assert main(["check-config", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert "$.model.name" in err and "not a built-in model" in err
    (tmp_path / "weightless").mkdir()
    (tmp_path / "weightless" / "config.json").write_text("{}")
    config_file.write_text(text.replace('name = "tiny-dense"', 'name = "weightless"'))
    assert main(["check-config", str(config_file)]) == 2  # the folder, relative to the config
    assert "lacks model.safetensors" in capsys.readouterr().err
