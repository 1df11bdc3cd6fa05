"""``sealmoe plan``: the privacy plan before any training, as the institutions calibrate it."""

from __future__ import annotations

import pytest

from clients.contract.config import load_config
from clients.runtime.plan import CANNOT_LEARN
from clients.runtime.plan import privacy_plan
from coordinator.app.cli import main
from coordinator.app.wiring import make_institution
from tests.test_federation import write_config


def set_fields(path, **replacements):
    text = path.read_text()
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(text)
    return path


@pytest.mark.parametrize("strategy", ["fedavg", "fedamole"])
def test_the_plan_is_what_each_institution_calibrates(tmp_path, strategy):
    path = set_fields(write_config(tmp_path), **{'strategy = "fedavg"': f'strategy = "{strategy}"'})
    config = load_config(path)
    plans = privacy_plan(config)
    assert [p.name for p in plans] == config.institution_names
    for plan in plans:
        institution = make_institution(config, plan.name)
        assert plan.noise_multiplier == institution.dp.noise_multiplier
        assert plan.records == institution.data["train"].shape[0]
        assert plan.sample_rate == institution.sample_rate
        assert plan.epsilon_pld <= plan.budget_epsilon * (1 + 1e-9)
        assert plan.epsilon_rdp > plan.epsilon_pld  # the looser bound, for the same noise
        assert plan.trainable_parameters == sum(
            p.numel() for p in institution.model.parameters() if p.requires_grad
        )


def test_a_plan_that_can_learn_exits_0(tmp_path, capsys):
    assert main(["plan", str(write_config(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "can learn" in out and "to lower noise/signal" not in out


def test_a_plan_that_cannot_learn_exits_1_with_suggestions(tmp_path, capsys):
    path = set_fields(
        write_config(tmp_path), **{"rank = 4": "rank = 64", "batch_size = 8": "batch_size = 1"}
    )
    plans = privacy_plan(load_config(path))
    assert all(p.noise_to_signal > CANNOT_LEARN for p in plans)
    assert main(["plan", str(path)]) == 1
    out = capsys.readouterr().out
    assert "cannot learn" in out and "larger logical batch" in out and "more records" in out
