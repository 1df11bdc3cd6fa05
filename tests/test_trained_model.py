"""The trained model in the institution's hands: kept, loaded back, exported to PEFT, and a
PEFT LoRA adapter as every expert's start."""

from __future__ import annotations

import json

import msgspec
import pytest
import torch
from peft import LoraConfig
from peft import PeftModel
from peft import get_peft_model

from clients.contract.config import load_config
from clients.models.build import build_model_with
from clients.models.moe_lora import adapter_state
from clients.models.peft_bridge import PeftBridgeError
from clients.models.peft_bridge import init_from_peft
from clients.runtime.trained_model import ADAPTER_CARD
from clients.runtime.trained_model import MODEL_DIR
from clients.runtime.trained_model import TrainedModelError
from clients.runtime.trained_model import export_model
from clients.runtime.trained_model import from_pretrained
from clients.runtime.trained_model import generate
from clients.runtime.trained_model import keep_trained_model
from clients.runtime.trained_model import personal_parts
from clients.strategies.fedavg import moe_lora_initial_state
from clients.strategies.registry import client_half
from coordinator.app.cli import main
from tests.adapter_fixtures import exercised
from tests.test_federation import write_config


def tiny_config(tmp_path, **moe):
    """examples/tiny.toml with ``[model.moe]`` fields replaced."""
    config = load_config(write_config(tmp_path))
    section = msgspec.structs.replace(config.model.moe, **moe)
    return msgspec.structs.replace(config, model=msgspec.structs.replace(config.model, moe=section))


def logits(model, ids=None):
    ids = torch.tensor([[3, 17, 101, 42, 7]]) if ids is None else ids
    with torch.no_grad():
        return model(input_ids=ids).logits


def trained(config):
    """The config's model with every adapter weight moved off its start (as after training)."""
    model, _ = client_half(config).build_model(config)
    return exercised(model, scale=0.05)


def test_a_kept_model_loads_back_with_the_same_outputs_on_its_own_or_a_given_base(tmp_path):
    config = tiny_config(tmp_path)
    model = trained(config)
    kept = keep_trained_model(
        tmp_path / "model",
        config,
        "comedies",
        adapter_state(model),
        {"held": torch.ones(3).numpy()},
    )
    card = json.loads((kept / ADAPTER_CARD).read_text())
    assert card["base_model"]["name"] == "tiny-dense" and card["institution"] == "comedies"
    loaded, tokenizer = from_pretrained(kept)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    base, _ = build_model_with(config, lambda m: None)
    onto, none = from_pretrained(kept, base_model=base)
    assert onto is base and none is None
    torch.testing.assert_close(logits(onto), logits(model), rtol=0, atol=0)
    assert personal_parts(kept)["held"].tolist() == [1.0, 1.0, 1.0]
    assert isinstance(generate(kept, "To be", max_new_tokens=5), str)
    assert tokenizer is not None


def test_from_pretrained_refuses_a_directory_that_is_not_a_kept_model(tmp_path):
    with pytest.raises(TrainedModelError, match="no such file"):
        from_pretrained(tmp_path)
    (tmp_path / ADAPTER_CARD).write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(TrainedModelError, match="not a sealmoe-adapters card"):
        from_pretrained(tmp_path)


def test_a_plain_lora_run_exports_in_peft_format_that_peft_loads_to_the_same_outputs(tmp_path):
    config = tiny_config(tmp_path, num_experts=1, top_k=1)
    model = trained(config)
    kept = keep_trained_model(tmp_path / "model", config, "comedies", adapter_state(model), {})
    out, kind = export_model(kept, tmp_path / "export")
    assert kind == "peft"
    base, _ = build_model_with(config, lambda m: None)
    peft_model = PeftModel.from_pretrained(base, str(out))
    torch.testing.assert_close(logits(peft_model), logits(model), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(
        logits(peft_model), logits(build_model_with(config, lambda m: None)[0])
    )


def test_a_moe_run_exports_in_sealmoe_format(tmp_path):
    config = tiny_config(tmp_path)
    model = trained(config)
    kept = keep_trained_model(tmp_path / "model", config, "comedies", adapter_state(model), {})
    out, kind = export_model(kept, tmp_path / "export")
    assert kind == "sealmoe-adapters"
    torch.testing.assert_close(logits(from_pretrained(out)[0]), logits(model), rtol=0, atol=0)


def peft_adapter(config, directory, rank: int):
    """A PEFT LoRA adapter with random (non-zero) weights on the config's base model."""
    base, _ = build_model_with(config, lambda m: None)
    lora = LoraConfig(r=rank, lora_alpha=8.0, target_modules=list(config.model.moe.target_modules),
                      init_lora_weights=False, task_type="CAUSAL_LM")  # fmt: skip
    peft_model = get_peft_model(base, lora)
    peft_model.save_pretrained(str(directory))
    return peft_model


def test_a_peft_lora_adapter_starts_every_expert_with_peft_s_outputs(tmp_path):
    config = tiny_config(tmp_path, num_experts=4, top_k=2, rank=4, alpha=16.0)
    peft_model = peft_adapter(config, tmp_path / "peft", rank=4)
    config = msgspec.structs.replace(
        config, model=msgspec.structs.replace(config.model, init_adapter=str(tmp_path / "peft"))
    )
    initial = moe_lora_initial_state(config)
    model, _ = client_half(config).build_model(config)
    exercised(model, (p for n, p in model.named_parameters() if "router" in n))  # any routing
    client_half(config).load_adapters(
        model,
        {n: t for n, t in initial.adapters.items() if "router" not in n}
        | {n: t for n, t in adapter_state(model).items() if "router" in n},
    )
    torch.testing.assert_close(logits(model), logits(peft_model), rtol=1e-5, atol=1e-5)
    base, _ = build_model_with(config, lambda m: None)
    assert not torch.allclose(logits(peft_model), logits(base), atol=1e-4)  # a real adapter


def test_a_peft_adapter_of_another_rank_is_refused_naming_the_rank(tmp_path):
    config = tiny_config(tmp_path, rank=4)
    peft_adapter(config, tmp_path / "peft", rank=2)
    model, _ = client_half(config).build_model(config)
    with pytest.raises(PeftBridgeError, match=r"rank 2 differs from \[model.moe\].rank=4"):
        init_from_peft(model, tmp_path / "peft", config.model)


def test_export_and_generate_commands(tmp_path, capsys):
    config = tiny_config(tmp_path)
    kept = config.run_dir / "institutions" / "comedies" / MODEL_DIR
    keep_trained_model(kept, config, "comedies", adapter_state(trained(config)), {})
    out = tmp_path / "export"
    assert (
        main(["export", str(config.run_dir), "--institution", "comedies", "--out", str(out)]) == 0
    )
    assert "sealmoe-adapters format" in capsys.readouterr().out
    assert main(["generate", str(out), "--prompt", "To be", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("To be")
    assert main(["export", str(config.run_dir), "--institution", "nobody", "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
