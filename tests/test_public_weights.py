"""Example weights leak nothing: each institution's weight is public, declared in the federation
config, the same every round, and independent of its data.

Before, the weight was min(n, cap) / cap of the institution's n training records, inside the sum
un-noised and uncharged: two rounds' sums gave an institution's exact count. Here two federations
that differ only in how much data the institution has get the same weight from it.
"""

from __future__ import annotations

import pytest

from clients.contract.config import FederationConfig
from clients.contract.config import load_config
from clients.contract.keys import generate_keys
from clients.contract.layout import WEIGHT
from clients.contract.messages import round_id
from coordinator.app.wiring import make_institution
from tests.test_runtime import NAMES
from tests.test_runtime import TOML


def federation(folder, *, train_blocks: int, strategy: str) -> FederationConfig:
    """The runtime tests' federation with ``train_blocks`` training records per institution and
    declared weights 3 : 1 : 1 : 1."""
    folder.mkdir(parents=True, exist_ok=True)
    generate_keys(folder / "keys", NAMES)
    text = TOML.format(rounds=1, seed=0, bind="tcp://127.0.0.1:5599")
    text = text.replace("max_blocks = { train = 32,", f"max_blocks = {{ train = {train_blocks},")
    text = text.replace("[aggregation]\n", f'[aggregation]\nstrategy = "{strategy}"\n')
    text = text.replace('name = "comedies"\n', 'name = "comedies"\nweight = 3.0\n')
    path = folder / "federation.toml"
    path.write_text(text)
    return load_config(path)


@pytest.mark.parametrize("strategy", ["fedavg", "ddome"])
def test_the_submitted_weight_is_the_declared_one_whatever_the_data_size(tmp_path, strategy):
    weights, sizes = {}, {}
    for train_blocks in (8, 32):
        config = federation(tmp_path / str(train_blocks), train_blocks=train_blocks,
                            strategy=strategy)  # fmt: skip
        assert config.public_weight("comedies") == 1.0
        assert config.public_weight("tragedies") == pytest.approx(1 / 3)
        inst = make_institution(config, "tragedies")
        sizes[train_blocks] = len(inst.data["train"])
        local = inst.learner.train(inst.learner.local_state(), inst.dp, 1, round_id(1, 0))
        weights[train_blocks] = local.submission.values[WEIGHT]
    assert sizes[8] == 8 and sizes[32] == 32  # the data differ four-fold ...
    assert weights[8].tolist() == weights[32].tolist() == [pytest.approx(1 / 3)]  # ... w does not
