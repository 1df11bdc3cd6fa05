"""Federation config: the examples load, and every kind of bad field is named in the error."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

from clients.contract.config import ConfigFileError
from clients.contract.config import FederationConfig
from clients.contract.config import load_config
from clients.contract.config import parse_config
from clients.models.build import moe_lora_config

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def raw() -> dict:
    """A valid config document (the tiny example) to break one field at a time."""
    return tomllib.loads((EXAMPLES / "tiny.toml").read_text())


def error_of(doc: dict) -> ConfigFileError:
    with pytest.raises(ConfigFileError) as info:
        parse_config(doc, "/somewhere/fed.toml")
    return info.value


def test_tiny_example_loads():
    config = load_config(EXAMPLES / "tiny.toml")
    assert isinstance(config, FederationConfig)
    assert config.federation.rounds == 2
    assert config.model.name == "tiny-dense"
    assert config.institution_names == ["comedies", "tragedies", "histories"]
    assert config.secagg.resolved(3) == (3, 2)
    # paths are anchored at the config file, not the working directory
    assert config.run_dir == (EXAMPLES / "runs" / "tiny").resolve()
    assert config.keys_dir == (EXAMPLES / "keys" / "tiny").resolve()
    assert config.connect_address("comedies") == config.coordinator.bind
    assert config.budget("histories").target_epsilon == 4.0
    assert config.budget("comedies").target_epsilon == config.privacy.target_epsilon


def test_shakespeare_example_loads():
    config = load_config(EXAMPLES / "shakespeare.toml")
    assert config.model.name == "smollm2"
    assert len(config.institutions) == 4
    assert (config.model.moe.num_experts, config.model.moe.top_k) == (4, 2)
    assert config.federation.rounds == 3
    assert config.aggregation.expert_updates == "mask"
    assert config.aggregation.routing_statistics == "ckks"
    assert config.data.max_blocks.as_dict() == {"train": 4096, "validation": 32, "test": 64}
    assert config.privacy.routing_sample_rate == 0.02
    assert config.aggregation.ckks.params().slot_count == 4096


def test_config_is_immutable():
    config = load_config(EXAMPLES / "tiny.toml")
    with pytest.raises(AttributeError):
        config.federation.rounds = 5  # type: ignore[misc]


def test_defaults_fill_omitted_sections():
    doc = {"federation": {"name": "x"}, "institutions": [{"name": "a"}, {"name": "b"}]}
    config = parse_config(doc, "/tmp/fed.toml")
    assert config.aggregation.expert_updates == "mask"
    assert config.aggregation.routing_statistics == "ckks"
    assert config.secagg.resolved(2) == (2, 1)
    assert config.run_dir == Path("/tmp/runs/x")


@pytest.mark.parametrize(
    ("section", "key", "value", "field", "words"),
    [
        ("privacy", "target_epsilon", -1.0, "$.privacy.target_epsilon", "> 0.0"),
        ("privacy", "target_epsilon", "eight", "$.privacy.target_epsilon", "got `str`"),
        ("privacy", "target_delta", 1.5, "$.privacy.target_delta", "< 0.01"),
        ("privacy", "target_delta", 0.5, "$.privacy.target_delta", "< 0.01"),
        ("privacy", "target_epsilon", 1e9, "$.privacy.target_epsilon", "<= 100.0"),
        ("privacy", "accountant", "moments", "$.privacy.accountant", "'rdp', 'pld'"),
        ("federation", "rounds", 0, "$.federation.rounds", ">= 1"),
        ("training", "device", "tpu", "$.training.device", "'auto', 'cpu', 'cuda'"),
        ("model", "dtype", "int8", "$.model.dtype", "'float32', 'bfloat16'"),
        ("training", "batch_size", 2.5, "$.training.batch_size", "Expected `int`"),
        ("coordinator", "bind", "localhost:5555", "$.coordinator.bind", "match"),
        ("aggregation", "expert_updates", "plain", "$.aggregation.expert_updates", "'mask'"),
        ("secagg", "modulus_bits", 48, "$.secagg.modulus_bits", "32, 64"),
    ],
)
def test_bad_value_names_the_field(raw, section, key, value, field, words):
    raw[section][key] = value
    err = error_of(raw)
    assert err.field == field
    assert field in str(err) and words in str(err)
    assert "/somewhere/fed.toml" in str(err)


def test_unknown_field_is_refused(raw):
    raw["privacy"]["target_epsilom"] = 3.0
    err = error_of(raw)
    assert err.field == "$.privacy"
    assert "target_epsilom" in str(err)


def test_unknown_section_is_refused(raw):
    raw["privacyy"] = {}
    assert "privacyy" in str(error_of(raw))


def test_missing_required_field(raw):
    del raw["federation"]["name"]
    err = error_of(raw)
    assert err.field == "$.federation" and "name" in str(err)


def test_bad_institution_entry_names_its_index(raw):
    raw["institutions"][1]["name"] = "bad name/with slash"
    assert error_of(raw).field == "$.institutions[1].name"
    raw = copy.deepcopy(raw)
    raw["institutions"][1] = {
        "name": "ok",
        "privacy": {"target_epsilon": 0.0, "target_delta": 1e-5},
    }
    assert error_of(raw).field == "$.institutions[1].privacy.target_epsilon"


def test_duplicate_institution(raw):
    raw["institutions"][2]["name"] = "comedies"
    err = error_of(raw)
    assert err.field == "$.institutions[2].name"
    assert "duplicate" in str(err) and "$.institutions[0]" in str(err)


def test_too_few_institutions(raw):
    raw["institutions"] = raw["institutions"][:1]
    assert error_of(raw).field == "$.institutions"


@pytest.mark.parametrize("threshold", [1, 2, 4])
def test_threshold_outside_the_active_bound_of_holders(raw, threshold):
    raw["secagg"]["threshold"] = threshold  # 3 institutions, complete graph: holders = 3
    err = error_of(raw)
    assert err.field == "$.secagg.threshold"
    assert "[3, 3]" in str(err) and "2/3" in str(err)


def test_survivor_check_off_is_refused(raw):
    raw["secagg"]["check_survivors"] = False
    assert error_of(raw).field == "$.secagg.check_survivors"


@pytest.mark.parametrize(("value", "ok"), [(2, False), (3, True), (4, False)])
def test_min_participants_lies_between_the_threshold_and_the_institutions(raw, value, ok):
    raw["secagg"]["min_participants"] = value  # 3 institutions, threshold 3
    if ok:
        assert parse_config(raw, "/x/fed.toml").secagg.minimum_participants(3) == value
        return
    err = error_of(raw)
    assert err.field == "$.secagg.min_participants" and "[3, 3]" in str(err)


def test_min_participants_defaults_to_the_threshold_of_a_round_with_everybody(raw):
    assert parse_config(raw, "/x/fed.toml").secagg.minimum_participants(3) == 3
    raw["institutions"] = [{"name": f"i{j}"} for j in range(10)]
    raw["secagg"] = {"neighbours": 4}
    assert parse_config(raw, "/x/fed.toml").secagg.minimum_participants(10) == 4
    raw["secagg"] = {}
    assert parse_config(raw, "/x/fed.toml").secagg.minimum_participants(10) == 7
    raw["secagg"] = {"min_participants": 0}
    assert error_of(raw).field == "$.secagg.min_participants"


def test_institution_weights_are_public_and_relative(raw):
    config = parse_config(raw, "/x/fed.toml")
    assert [config.public_weight(n) for n in config.institution_names] == [1.0, 1.0, 1.0]
    raw["institutions"][0]["weight"] = 4.0
    raw["institutions"][2]["weight"] = 0.5
    config = parse_config(raw, "/x/fed.toml")
    assert [config.public_weight(n) for n in config.institution_names] == [1.0, 0.25, 0.125]
    assert config.smallest_public_weight() == 0.125


@pytest.mark.parametrize(("weight", "match"), [(0.0, ">"), (-1.0, ">"), (1e-4, "1/1024")])
def test_bad_institution_weight_is_named(raw, weight, match):
    raw["institutions"][1]["weight"] = weight
    err = error_of(raw)
    assert err.field == "$.institutions[1].weight" and match in str(err)


def test_too_many_neighbours(raw):
    raw["secagg"]["neighbours"] = 3
    err = error_of(raw)
    assert err.field == "$.secagg.neighbours" and "at most 2" in str(err)


def test_sparse_graph_threshold_follows_neighbours(raw):
    raw["institutions"] = [{"name": f"i{j}"} for j in range(10)]
    raw["secagg"] = {"neighbours": 4}
    config = parse_config(raw, "/x/fed.toml")
    assert config.secagg.resolved(10) == (4, 4)  # more than 2/3 of the 5 share holders
    params = config.secagg.round_params(7, list(range(10)), bytes(32), 5)
    assert (params.threshold, params.neighbours, params.round_id) == (4, 4, 7)


def test_overflowing_quantisation_is_refused(raw):
    raw["secagg"]["bits"] = 31  # 3 clients * 2^31 >= 2^32
    err = error_of(raw)
    assert err.field == "$.secagg.bits" and "overflow" in str(err)
    raw["secagg"]["modulus_bits"] = 64
    assert parse_config(raw, "/x/fed.toml").secagg.bits == 31


def test_top_k_above_experts(raw):
    raw["model"]["moe"]["top_k"] = 5
    assert error_of(raw).field == "$.model.moe.top_k"


def test_bad_split(raw):
    raw["data"]["split"] = [0.5, 0.3, 0.3]
    assert error_of(raw).field == "$.data.split"


def test_insecure_ckks_params(raw):
    raw["aggregation"]["ckks"] = {"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": [60, 60]}
    err = error_of(raw)
    assert err.field == "$.aggregation.ckks" and "security" in str(err)


def test_ckks_expert_updates_need_a_spare_level(raw):
    raw["aggregation"]["expert_updates"] = "ckks"
    raw["aggregation"]["ckks"] = {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 60]}
    err = error_of(raw)
    assert err.field == "$.aggregation.ckks.coeff_mod_bit_sizes" and "three or more" in str(err)
    raw["aggregation"]["expert_updates"] = "mask"  # masked updates only add: two primes do
    config = parse_config(raw, "/somewhere/fed.toml")
    assert config.aggregation.ckks.params().coeff_mod_bit_sizes == (60, 60)


def test_wildcard_bind_needs_connect(raw):
    raw["coordinator"]["bind"] = "tcp://0.0.0.0:5555"
    err = error_of(raw)
    assert err.field == "$.institutions[0].connect"
    for inst in raw["institutions"]:
        inst["connect"] = "tcp://coordinator.example:5555"
    config = parse_config(raw, "/x/fed.toml")
    assert config.connect_address("tragedies") == "tcp://coordinator.example:5555"


def test_port_out_of_range(raw):
    raw["coordinator"]["bind"] = "tcp://127.0.0.1:70000"
    assert error_of(raw).field == "$.coordinator.bind"


def test_file_errors(tmp_path):
    with pytest.raises(ConfigFileError, match="no such file"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[federation\nname = 1\n")
    with pytest.raises(ConfigFileError, match="not valid TOML") as info:
        load_config(broken)
    assert str(broken) in str(info.value)


def test_unknown_institution_lookup():
    config = load_config(EXAMPLES / "tiny.toml")
    with pytest.raises(KeyError, match="comedies"):
        config.budget("nobody")


def test_conversions_to_runtime_configs():
    config = load_config(EXAMPLES / "shakespeare.toml")
    lora = moe_lora_config(config.model.moe)
    assert (lora.num_experts, lora.top_k, lora.rank) == (4, 2, 4)
    assert lora.target_modules == ("q_proj", "v_proj")
    assert lora.layers == (-4, -3, -2, -1)
    dp = config.dp_config("romances")
    assert (dp.target_epsilon, dp.target_delta, dp.accountant) == (8.0, 1e-5, "pld")
    assert dp.noise_multiplier is None
