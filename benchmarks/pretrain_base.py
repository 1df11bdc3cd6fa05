"""A compact byte-level base model, pretrained once on public text that no institution holds.

The strategy experiment (``benchmarks/strategies.py``) needs a base that already models text,
so that adapters have something to specialise, and one small enough that a whole grid of
federated DP runs fits on a CPU. This recipe trains a 4-layer Llama (hidden 128, 0.8 M
parameters, one token per UTF-8 byte) on :func:`benchmarks.corpora.pretraining_text` and saves
it as an ordinary Hugging Face model folder (``config.json``, safetensors weights and a byte
tokenizer), which ``[model] name = "<folder>"`` loads like any local model. The folder is
cached: a second call with the same recipe and corpus returns it without training.

    python benchmarks/pretrain_base.py            # builds benchmarks/cache/byte-llama
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from corpora import CorpusSourceError  # noqa: E402
from corpora import pretraining_text  # noqa: E402  (a sibling: opacus installs a package "benchmarks")

BASE_DIR = ROOT / "benchmarks" / "cache" / "byte-llama"
ARCHITECTURE = {
    "vocab_size": 256,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}
"""A Llama small enough for a CPU grid of federated DP runs (0.8 M parameters)."""
RECIPE = {
    "architecture": ARCHITECTURE,
    "corpus_bytes": 6_000_000,
    "sequence_len": 128,
    "batch_size": 32,
    "steps": 1200,
    "lr": 3e-3,
    "warmup_steps": 60,
    "weight_decay": 0.01,
    "held_out_fraction": 0.01,
    "seed": 0,
}
"""Everything that decides the weights; its hash names the cached model."""
RECIPE_FILE = "pretraining.json"


def byte_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """A Hugging Face tokenizer whose ids are the text's UTF-8 bytes (the same ids as
    :class:`clients.models.build.ByteTokenizer`), so it saves and loads with the model."""
    from tokenizers import Tokenizer
    from tokenizers import decoders
    from tokenizers import models
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in _byte_level_chars().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def _byte_level_chars() -> dict[int, str]:
    """The character ``tokenizers``' ByteLevel pre-tokenizer writes for each byte: printable
    Latin-1 bytes stand for themselves, the others for code points from 256 on, in order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + shifted)
            shifted += 1
    return chars


def recipe_digest(corpus: bytes) -> str:
    """SHA-256 of the recipe and the corpus: the cached model is reused only for both."""
    digest = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode())
    digest.update(hashlib.sha256(corpus).digest())
    return digest.hexdigest()


def ensure_base(path: Path = BASE_DIR, threads: int | None = None) -> Path:
    """The pretrained base folder at ``path``, trained first unless a model of the same recipe
    and corpus is already there (or, where the corpus's sources are not installed, of the same
    recipe: a folder copied from a machine that built it)."""
    marker = path / RECIPE_FILE
    try:
        corpus = pretraining_text(RECIPE["corpus_bytes"]).encode("utf-8")
    except CorpusSourceError:
        if not marker.is_file() or json.loads(marker.read_text()).get("recipe") != RECIPE:
            raise
        print(f"the pretraining sources are not installed here; using {path} as built before")
        return path
    digest = recipe_digest(corpus)
    if marker.is_file() and json.loads(marker.read_text()).get("digest") == digest:
        return path
    if threads is not None:
        torch.set_num_threads(threads)
    pretrain(corpus, path, digest)
    return path


def pretrain(corpus: bytes, path: Path, digest: str) -> dict:
    """Train the recipe's model on ``corpus`` and save it, with its tokenizer and a record of
    the run (held-out loss in bits per byte before and after, seconds), to ``path``."""
    from transformers import AutoModelForCausalLM
    from transformers import LlamaConfig

    config = LlamaConfig(bos_token_id=None, eos_token_id=None, pad_token_id=None, **ARCHITECTURE)
    generator = torch.Generator().manual_seed(RECIPE["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RECIPE["seed"])
        model = AutoModelForCausalLM.from_config(config)
    data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()
    held = int(len(data) * RECIPE["held_out_fraction"])
    train, held_out = data[:-held], data[-held:]
    seq, batch = RECIPE["sequence_len"], RECIPE["batch_size"]
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"]
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, _warmup_cosine)
    before = held_out_bits_per_byte(model, held_out, seq)
    start = time.perf_counter()
    model.train()
    for step in range(RECIPE["steps"]):
        offsets = torch.randint(0, len(train) - seq - 1, (batch,), generator=generator)
        ids = torch.stack([train[o : o + seq] for o in offsets.tolist()])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        optimiser.zero_grad(set_to_none=True)
        if step % 200 == 0:
            print(f"pretraining step {step}: loss {loss.item() / math.log(2):.3f} bits/byte")
    seconds = time.perf_counter() - start
    after = held_out_bits_per_byte(model, held_out, seq)
    path.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(path, safe_serialization=True)
    byte_tokenizer().save_pretrained(path)
    record = {
        "digest": digest,
        "recipe": RECIPE,
        "parameters": sum(p.numel() for p in model.parameters()),
        "corpus_bytes": len(corpus),
        "held_out_bits_per_byte": {"before": round(before, 4), "after": round(after, 4)},
        "seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
    }
    (path / RECIPE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    print(f"pretrained in {seconds:.0f} s: held-out {before:.2f} -> {after:.2f} bits/byte")
    return record


def _warmup_cosine(step: int) -> float:
    warmup, total = RECIPE["warmup_steps"], RECIPE["steps"]
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def held_out_bits_per_byte(model: torch.nn.Module, data: torch.Tensor, seq: int) -> float:
    """Mean next-byte cross-entropy (bits) over consecutive windows of ``data``."""
    was_training = model.training
    model.eval()
    windows = data[: len(data) // seq * seq].reshape(-1, seq)
    total = 0.0
    for start in range(0, len(windows), 64):
        ids = windows[start : start + 64]
        total += model(input_ids=ids, labels=ids).loss.item() * len(ids)
    model.train(was_training)
    return total / len(windows) / math.log(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=BASE_DIR)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    path = ensure_base(args.out, args.threads)
    print(f"base model: {path}\n{(path / RECIPE_FILE).read_text()}")


if __name__ == "__main__":
    main()
