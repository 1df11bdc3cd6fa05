"""The federation config: one TOML file, validated on load into immutable msgspec Structs.

Every party reads the same file: the coordinator, each institution and ``sealmoe run``. Field
types and ranges are checked by msgspec (unknown fields are refused, so a typo is an error rather
than a silently ignored setting); rules that span fields (secure-aggregation threshold vs the
number of institutions, unique institution names, ...) are checked afterwards. Any problem raises
:class:`ConfigFileError`, whose message names the file, the field (``$.privacy.target_epsilon``)
and what to change.

Relative paths (``federation.run_dir``, ``coordinator.keys_dir``) are resolved against the
directory of the config file, so a command gives the same result from any working directory.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Annotated
from typing import Any
from typing import ClassVar
from typing import Literal
from typing import get_args

import msgspec

from privacy.errors import UserError
from secagg import ConfigError
from secagg import FixedPointCodec
from secagg import RoundParams
from secagg.ckks import CkksParams
from secagg.graph import active_threshold
from secagg.messages import DEFAULT_MAX_MESSAGE_BYTES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

if TYPE_CHECKING:
    from privacy import DPConfig


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""Federation and institution names: they become directory names, so no slashes or spaces."""


ADDRESS_PATTERN = r"^(tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):[0-9]{1,5}|ipc://\S+)$"
"""A ZeroMQ endpoint: ``tcp://HOST:PORT`` (IPv6 in brackets) or ``ipc://PATH``."""


Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]


Address = Annotated[str, msgspec.Meta(pattern=ADDRESS_PATTERN)]


PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


Epsilon = Annotated[float, msgspec.Meta(gt=0.0, le=100.0)]
"""A privacy budget's epsilon: beyond 100 the bound e^epsilon says nothing (and a typo such as
1e9 would otherwise pass silently)."""


Delta = Annotated[float, msgspec.Meta(gt=0.0, lt=0.01)]
"""A privacy budget's delta: the probability that the epsilon bound fails. It must be far below
1 / records (check-config warns when it is not); 0.01 or more protects no dataset."""


Device = Literal["auto", "cpu", "cuda"]


ModelDtype = Literal["float32", "bfloat16", "float16"]


AccountantName = Literal["rdp", "pld"]


Protection = Literal["mask", "ckks"]


StrategyName = Literal["fedavg", "fedalign", "fedmoe", "fedamole", "ddome"]


ConsistencyName = Literal["js", "expert_kl"]


Fraction = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]


MoEMode = Literal["auto", "dense", "native"]


DataSource = Literal["shakespeare", "files"]


DataFormat = Literal["jsonl", "json", "csv", "parquet", "text"]


DATA_SUFFIXES: dict[str, str] = {
    ".jsonl": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
}
"""File suffix -> ``format`` when ``[institutions.data] format`` is omitted."""


SPLIT_NAMES: tuple[str, str, str] = ("train", "validation", "test")


_CHOICES: dict[str, tuple[Any, ...]] = {
    "device": get_args(Device),
    "dtype": get_args(ModelDtype),
    "accountant": get_args(AccountantName),
    "expert_updates": get_args(Protection),
    "routing_statistics": get_args(Protection),
    "strategy": get_args(StrategyName),
    "consistency": get_args(ConsistencyName),
    "mode": get_args(MoEMode),
    "source": get_args(DataSource),
    "format": get_args(DataFormat),
    "modulus_bits": (32, 64),
}


MIN_WEIGHT_RATIO = 1 / 1024
"""The smallest institution weight allowed, relative to the largest (it must stay well above
the mask quantisation step after being scaled to the largest)."""


_WILDCARD_HOSTS = ("*", "0.0.0.0", "[::]")  # noqa: S104 - names a bind address, binds nothing


class ConfigFileError(UserError, ValueError):
    """A federation config that cannot be used; ``field`` is the offending path, if one."""

    def __init__(self, path: str | Path, message: str, field: str | None = None) -> None:
        self.path = str(path)
        self.field = field
        where = f"{field}: " if field else ""
        super().__init__(f"{self.path}: {where}{message}")


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Common base: immutable, unknown fields are an error."""


class FederationSection(_Section):
    """[federation]: what this federation is called and how long it runs.

    - ``name``: identifies the run (letters, digits, ``_.-``); used in paths and reports.
    - ``rounds``: number of federated rounds (>= 1).
    - ``seed``: public seed for data partition, institution selection and model init; never
      used for masks or keys (those always come from the OS CSPRNG).
    - ``run_dir``: where checkpoints, the round journal and metrics go; default
      ``runs/<name>`` beside the config file.
    """

    name: Name
    rounds: PositiveInt = 3
    seed: Annotated[int, msgspec.Meta(ge=0)] = 0
    run_dir: str | None = None


class CoordinatorSection(_Section):
    """[coordinator]: the ZeroMQ server.

    - ``bind``: endpoint the coordinator's ROUTER socket binds (``tcp://HOST:PORT``).
    - ``stage_timeout_s``: seconds the coordinator waits for the institutions at each stage
      of a round before it treats the missing ones as dropped.
    - ``training_timeout_s``: the same for the stage that includes local training (from the
      round start, or FedAMoLE's assignment, to the first SecAgg+ message); default: the stage
      timeout. An institution cannot answer while it trains, so a dead one is only noticed
      when this runs out.
    - ``max_message_bytes``: the upper limit (and override) of the receive caps. Each side
      sizes its cap per peer from the round layout and the CKKS parameters before the first
      round (``clients.contract.caps``: the largest message it expects from the other side,
      times 1.25 plus 1 MiB) and never goes above this value; lower it to force a smaller cap.
      Each peer may have 4 frames of up to twice the cap waiting in a receive queue. A larger
      frame is refused with a log line naming its sender (over twice the cap, libzmq drops the
      connection unread); the process keeps serving.
    - ``keys_dir``: where ``sealmoe keys`` writes the key pairs and the roster.
    """

    bind: Address = "tcp://127.0.0.1:5555"
    stage_timeout_s: Annotated[float, msgspec.Meta(gt=0.0)] = 120.0
    training_timeout_s: Annotated[float, msgspec.Meta(gt=0.0)] | None = None
    max_message_bytes: Annotated[int, msgspec.Meta(ge=1 << 16, le=1 << 31)] = (
        DEFAULT_MAX_MESSAGE_BYTES
    )
    keys_dir: str = "keys"


class MoESection(_Section):
    """[model.moe]: the Mixture-of-LoRA-Experts adapters (see ``clients.models.moe_lora``).

    - ``num_experts``, ``top_k``: experts per adapted layer and experts each token uses
      (dense bases; a native MoE base brings its own).
    - ``rank``, ``alpha``: LoRA rank r and scale numerator (scale = alpha / r).
    - ``target_modules``: names of the linear layers that get adapters (dense bases).
    - ``layers``: indices of the decoder layers whose target modules get adapters (negative
      ones count from the last, e.g. [-4, -3, -2, -1]); omit for every layer. Fewer trainable
      parameters mean less DP noise per parameter, and backward passes stop at the lowest one.
    - ``shared_expert``: add an always-on LoRA expert beside the routed ones.
    - ``load_balance_coef``: weight of the router's load-balance loss.
    - ``mode``: "auto" (native when the base is a supported MoE), "dense" or "native".
    """

    num_experts: PositiveInt = 4
    top_k: PositiveInt = 2
    rank: PositiveInt = 8
    alpha: Annotated[float, msgspec.Meta(gt=0.0)] = 16.0
    target_modules: Annotated[
        tuple[Annotated[str, msgspec.Meta(min_length=1)], ...], msgspec.Meta(min_length=1)
    ] = ("q_proj", "v_proj", "up_proj", "down_proj")
    layers: Annotated[tuple[int, ...], msgspec.Meta(min_length=1)] | None = None
    shared_expert: bool = False
    load_balance_coef: Annotated[float, msgspec.Meta(ge=0.0)] = 0.01
    mode: MoEMode = "auto"


class ModelSection(_Section):
    """[model]: the base language model and its adapters.

    - ``name``: "smollm2" (offline SmolLM2-135M-Instruct), "tiny-dense" (2-layer random Llama
      for tests), "tiny-moe-mixtral" (2-layer random Mixtral), or any causal LM: a folder
      (relative to this file) with ``config.json``, safetensors weights and its tokenizer, or a
      Hugging Face id already in the local cache (nothing is downloaded).
    - ``revision``: the cached revision of a Hugging Face id (default: the cached main).
    - ``dtype``: the base model's weights in memory; the adapters train in it too.
    - ``init_adapter``: a PEFT LoRA adapter folder (relative to this file) that starts every
      MoE-LoRA expert (its rank must be ``moe.rank``); omit for LoRA's usual start (B = 0).
    - ``moe``: the adapters, see :class:`MoESection`.
    """

    name: Annotated[str, msgspec.Meta(min_length=1)] = "tiny-dense"
    revision: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    dtype: ModelDtype = "float32"
    init_adapter: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    moe: MoESection = msgspec.field(default_factory=MoESection)


class MaxBlocks(_Section):
    """[data.max_blocks]: cap on training examples (one per record) per split; omit a split to
    use all of it."""

    train: PositiveInt | None = None
    validation: PositiveInt | None = None
    test: PositiveInt | None = None

    def as_dict(self) -> dict[str, int]:
        """The caps that are set, by split name."""
        return {k: v for k, v in msgspec.structs.asdict(self).items() if v is not None}


class DataSection(_Section):
    """[data]: the institutions' private data.

    The unit of privacy is one record: a record yields at most one example, its first
    ``block_len`` tokens (longer records are truncated, shorter ones padded and the padding
    masked out of loss and metrics; records under two tokens yield none).

    - ``source``: "shakespeare" (built in: the plays split into non-IID institutions by genre
      and role, one speech is one record; institution i of ``[[institutions]]`` gets part i)
      or "files" (every institution reads its own local files, see :class:`InstitutionData`).
    - ``block_len``: tokens per example.
    - ``max_blocks``: per-split cap on examples, see :class:`MaxBlocks`.
    - ``max_chars_per_institution``: Shakespeare only: cap on each institution's text before
      tokenising (small experiments); omit for all of it.
    - ``split``: train/validation/test fractions (sum to 1) of every role's speeches, or of the
      records of an institution that names one ``path``.
    - ``seed``: seed of the partition and of seeded splits (public).
    """

    source: DataSource = "shakespeare"
    block_len: Annotated[int, msgspec.Meta(ge=2)] = 64
    max_blocks: MaxBlocks = msgspec.field(default_factory=MaxBlocks)
    max_chars_per_institution: PositiveInt | None = None
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: Annotated[int, msgspec.Meta(ge=0)] = 0


FilePath = Annotated[str, msgspec.Meta(min_length=1)]


class InstitutionData(_Section):
    """[institutions.data]: one institution's own local files (``[data] source = "files"``).

    Either ``path`` (one file, split into train/validation/test by ``[data] split`` with
    ``[data] seed``) or all three of ``train``, ``validation`` and ``test``. Paths are relative
    to the config file. Each row (a JSON Lines line, a CSV row, a Parquet row, a non-blank
    line of a text file) is one record.

    - ``format``: "jsonl", "json" (JSON Lines too), "csv", "parquet" or "text"; omit to infer
      it from the suffix (.jsonl, .json, .csv, .parquet, .txt).
    - ``text_field``: the column holding the text (ignored for "text").
    """

    path: FilePath | None = None
    train: FilePath | None = None
    validation: FilePath | None = None
    test: FilePath | None = None
    format: DataFormat | None = None
    text_field: Annotated[str, msgspec.Meta(min_length=1)] = "text"

    def files(self) -> dict[str, str]:
        """Split -> file, or ``{"all": path}`` for one file that is split by seed."""
        if self.path is not None:
            return {"all": self.path}
        return {"train": self.train, "validation": self.validation, "test": self.test}  # type: ignore[dict-item]

    def format_of(self, path: str) -> str | None:
        """The file format: ``format`` if given, else from the suffix (None: unknown)."""
        return self.format or DATA_SUFFIXES.get(Path(path).suffix.lower())


class TrainingSection(_Section):
    """[training]: local training at each institution in each round.

    - ``local_steps``: optimiser steps per round; ``batch_size``: expected blocks per step
      (with DP-SGD the Poisson sampling rate is batch_size / number of training records).
    - ``physical_batch_size``: blocks computed at once; a larger logical batch is split and its
      clipped gradients added up into one step (memory, not privacy; omit: all at once).
    - ``lr``: Adam learning rate; ``device``: "auto" (CUDA when available), "cpu" or "cuda".
    """

    local_steps: PositiveInt = 4
    batch_size: PositiveInt = 8
    physical_batch_size: PositiveInt | None = None
    lr: Annotated[float, msgspec.Meta(gt=0.0)] = 1e-3
    device: Device = "auto"

    @property
    def torch_device(self) -> str | None:
        """The device torch should use; None: CUDA when available."""
        return None if self.device == "auto" else self.device


class PrivacyBudget(_Section):
    """[institutions.privacy]: one institution's own (epsilon, delta) budget for the whole run."""

    target_epsilon: Epsilon
    target_delta: Delta


class PrivacySection(_Section):
    """[privacy]: sample-level DP-SGD at every institution.

    - ``target_epsilon``, ``target_delta``: the default budget of an institution for all
      rounds together (an institution may override it in its own entry).
    - ``max_grad_norm``: per-example clipping bound C.
    - ``accountant``: "pld" (the default: the tighter bound) or "rdp"; it calibrates the noise
      and enforces the budget (every ledger entry records both).
    - ``routing_noise_multiplier``: the Gaussian noise on each round's routing statistics, in
      units of their L2 sensitivity to one record (``clients.training.routing_release``).
    - ``routing_sample_rate``: each round's routing statistics are computed on a Poisson sample
      of the training records, each record in with this probability (1: all of them). Below 1
      the release is cheaper to compute (one forward pass per sampled record) and to the
      budget (amplification by subsampling).
    - ``spare_rounds``: extra rounds' worth of releases the DP-SGD noise is calibrated for. A
      round retried after a coordinator crash is a new release; with 0 the planned rounds
      spend the whole budget and any retry is refused. Each spare round costs more noise.
    """

    target_epsilon: Epsilon = 8.0
    target_delta: Delta = 1e-5
    max_grad_norm: Annotated[float, msgspec.Meta(gt=0.0)] = 1.0
    accountant: AccountantName = "pld"
    routing_noise_multiplier: Annotated[float, msgspec.Meta(gt=0.0)] = 10.0
    routing_sample_rate: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    spare_rounds: Annotated[int, msgspec.Meta(ge=0)] = 1


class SecAggSection(_Section):
    """[secagg]: pairwise-mask secure aggregation (SecAgg+), see ``secagg.RoundParams``.

    - ``threshold``: t, shares needed to rebuild a client's secrets; a round survives as long
      as t institutions reach unmasking. Must exceed 2/3 of the k + 1 share holders (the
      bound against an active coordinator, docs/security.md). Omit for the smallest safe
      value, floor(2 (k + 1) / 3) + 1.
    - ``neighbours``: k, degree of the SecAgg+ graph; omit for n - 1 (classic SecAgg).
    - ``clip``, ``bits``, ``modulus_bits``: values are clipped to [-clip, clip], quantised to
      signed ``bits``-bit integers and summed in Z_2^modulus_bits (32 or 64).
    - ``check_survivors``: the signed-survivor-set stage (defends against a lying coordinator);
      must stay on: institutions refuse rounds without it.
    - ``min_participants``: the fewest institutions a round may invite; the coordinator starts
      no round with fewer and institutions decline one that names fewer (a small round makes
      each input a large part of the sum). At least the threshold of a round with every
      institution, at most the number of institutions; omit for that threshold.

    Institutions hold every round to these settings (and to ``[aggregation]``'s channels):
    a RoundStart that differs is declined (``clients.runtime.pinned``).
    """

    threshold: PositiveInt | None = None
    neighbours: PositiveInt | None = None
    clip: Annotated[float, msgspec.Meta(gt=0.0)] = 1.0
    bits: Annotated[int, msgspec.Meta(ge=2, le=63)] = 16
    modulus_bits: Literal[32, 64] = 32
    check_survivors: bool = True
    min_participants: PositiveInt | None = None

    def minimum_participants(self, n_institutions: int) -> int:
        """The fewest institutions a round may invite (``min_participants`` or its default,
        the threshold of a round with all ``n_institutions``)."""
        if self.min_participants is not None:
            return self.min_participants
        return self.resolved(n_institutions)[0]

    def resolved(self, n_clients: int) -> tuple[int, int]:
        """(threshold, neighbours) for a round of ``n_clients``, defaults filled in."""
        k = n_clients - 1 if self.neighbours is None else self.neighbours
        t = active_threshold(k + 1) if self.threshold is None else self.threshold
        return t, k

    def round_params(
        self, round_id: int, client_ids: list[int], graph_seed: bytes, vector_length: int
    ) -> RoundParams:
        """The public parameters of one masked round (raises ``secagg.ConfigError`` if unusable)."""
        threshold, neighbours = self.resolved(len(client_ids))
        return RoundParams(
            round_id=round_id,
            client_ids=client_ids,
            threshold=threshold,
            neighbours=neighbours,
            graph_seed=graph_seed,
            vector_length=vector_length,
            clip=self.clip,
            bits=self.bits,
            modulus_bits=self.modulus_bits,
            check_survivors=self.check_survivors,
        )


class CkksSection(_Section):
    """[aggregation.ckks]: CKKS (TenSEAL) parameters, see ``secagg.ckks.CkksParams``."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40, 60)
    global_scale_bits: int = 40

    def params(self) -> CkksParams:
        """The validated :class:`secagg.ckks.CkksParams`."""
        return CkksParams(
            poly_modulus_degree=self.poly_modulus_degree,
            coeff_mod_bit_sizes=self.coeff_mod_bit_sizes,
            global_scale_bits=self.global_scale_bits,
        )


Problem = tuple[str, str]
"""A rule a config breaks: (the field, relative to its section; what is wrong and what to do)."""


class StrategySection(_Section):
    """Base of the ``[aggregation.<strategy>]`` sections: what the config must know about a
    strategy without importing it (its rules between fields, and what it releases)."""

    releases_routing: ClassVar[bool] = True
    """Whether the strategy releases per-token routing statistics (not with its own adapters)."""
    ckks_updates: ClassVar[bool] = True
    """Whether its coordinator can move the adapters without reading the update sums."""
    moe_lora_adapters: ClassVar[bool] = True
    """Whether it trains ``[model.moe]``'s MoE-LoRA adapters (False: its own adapter family)."""

    def problems(self, config: FederationConfig) -> list[Problem]:
        """The cross-field rules this section breaks in ``config`` (none by default)."""
        return []


class _MinCountSection(StrategySection):
    """A per-expert strategy: an expert moves only when ``min_count`` institutions updated it."""

    min_count: PositiveInt = 2

    def problems(self, config: FederationConfig) -> list[Problem]:
        n = len(config.institutions)
        if self.min_count <= n:
            return []
        return [
            (
                "min_count",
                f"min_count={self.min_count} exceeds the {n} institutions: no expert could ever "
                f"be updated; choose min_count <= {n}",
            )
        ]


class FedAvgSection(StrategySection):
    """[aggregation.fedavg]: FedAvg has no parameters of its own."""


class FedAlignSection(_MinCountSection):
    """[aggregation.fedalign]: FedAlign-MoE's parameters (see ``clients.strategies.fedalign``).

    - ``consistency``: per-expert routing-consistency score of each expert's routing share,
      "js" (1 - Jensen-Shannon divergence) or "expert_kl" (exp(-KL / temperature)).
    - ``temperature``: of "expert_kl".
    - ``regularization``: weight of the KL(p_i || p_global) term on the local routers, both mean
      softmax probabilities (0: off).
    - ``beta``: alignment threshold tau = mean - beta * std of last round's scores.
    - ``min_scorers``: scores needed before the threshold applies.
    - ``min_count``: institutions an expert's update must come from.
    - ``smoothing``: uniform mass mixed into routing distributions (keeps divergences finite).
    """

    consistency: ConsistencyName = "js"
    temperature: Annotated[float, msgspec.Meta(gt=0.0)] = 1.0
    regularization: Annotated[float, msgspec.Meta(ge=0.0)] = 0.01
    beta: Annotated[float, msgspec.Meta(ge=0.0)] = 1.0
    min_scorers: PositiveInt = 2
    smoothing: Annotated[float, msgspec.Meta(gt=0.0, lt=1.0)] = 1e-3


class FedMoESection(_MinCountSection):
    """[aggregation.fedmoe]: FedMoE's parameters (see ``clients.strategies.fedmoe``).

    - ``memory_fraction``: each institution's sub-MoE may hold at most this fraction of the
      adapter parameters of the full MoE (held experts plus the router and shared entries).
    - ``memory_fractions``: per-institution overrides of ``memory_fraction`` (name -> fraction).
    - ``warmup_rounds``: rounds of full-MoE training before the first sub-MoE search.
    - ``recommend_weight``: weight of the global routing distribution each revision adds to the
      pattern an institution searches its sub-MoE on (a stalled institution's recommendation).
    - ``min_count``: holders an expert needs to be updated (>= 2: never from one institution).
    - ``search_steps``: bisection steps of the coverage search.
    - ``validation_records``: m, the public number of validation blocks the signal averages over.
    - ``loss_cap``: L_max, each block's validation loss is clipped to [0, L_max].
    - ``validation_noise_multiplier``: sigma of the signal's Gaussian noise (std sigma L_max / m).
    - ``tolerance``: the noised validation loss must drop by more than this, else it stalled.
    """

    memory_fraction: Fraction = 0.5
    memory_fractions: dict[str, Fraction] = msgspec.field(default_factory=dict)
    warmup_rounds: Annotated[int, msgspec.Meta(ge=0)] = 1
    recommend_weight: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.25
    min_count: Annotated[int, msgspec.Meta(ge=2)] = 2
    search_steps: PositiveInt = 30
    validation_records: PositiveInt = 64
    loss_cap: Annotated[float, msgspec.Meta(gt=0.0, le=1e3)] = 6.0
    validation_noise_multiplier: Annotated[float, msgspec.Meta(gt=0.0, le=1e4)] = 4.0
    tolerance: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0

    def problems(self, config: FederationConfig) -> list[Problem]:
        names = {inst.name for inst in config.institutions}
        unknown = sorted(set(self.memory_fractions) - names)
        extra: list[Problem] = (
            [("memory_fractions", f"{unknown} are not institutions of [[institutions]]")]
            if unknown
            else []
        )
        return super().problems(config) + extra

    def fraction_of(self, institution: str) -> float:
        """The memory budget fraction of ``institution`` (its override, else the default)."""
        return self.memory_fractions.get(institution, self.memory_fraction)


class FedAMoLESection(StrategySection):
    """[aggregation.fedamole]: FedAMoLE's parameters (see ``clients.strategies.fedamole``). The
    adapter's shape (domain experts, top_k, rank, alpha, target modules, load-balance weight) is
    ``[model.moe]``'s.

    - ``clients_per_expert``: institutions each domain expert is assigned to per round.
    - ``min_experts``, ``max_experts``: experts each institution holds per module (at most
      ``num_experts``; the assignment must be feasible: ``num_experts * clients_per_expert``
      slots).
    - ``affinity_blocks``: validation blocks an institution embeds for its scores and keys.
    - ``embedding_clip``, ``key_clip``: per-block L2 clips of the token-projection embedding
      and of the expert keys (they bound the sensitivities).
    - ``score_noise_multiplier``, ``key_noise_multiplier``: Gaussian noise on the released
      data embedding (the coordinator scores it against the keys) and on the expert keys, in
      units of their sensitivity. The default, 10, is
      ``[privacy].routing_noise_multiplier``'s: at 1 two releases a
      round spend more than a budget of 8 within a few rounds.
    - ``delta_bound``: updates are clipped to +-delta_bound before the secure sum.
    - ``public_seed``: draws the public round-0 assignment.
    """

    clients_per_expert: PositiveInt = 2
    min_experts: PositiveInt = 2
    max_experts: PositiveInt = 8
    affinity_blocks: PositiveInt = 16
    embedding_clip: Annotated[float, msgspec.Meta(gt=0.0)] = 1.0
    key_clip: Annotated[float, msgspec.Meta(gt=0.0)] = 1.0
    score_noise_multiplier: Annotated[float, msgspec.Meta(gt=0.0)] = 10.0
    key_noise_multiplier: Annotated[float, msgspec.Meta(gt=0.0)] = 10.0
    delta_bound: Annotated[float, msgspec.Meta(gt=0.0)] = 0.1
    public_seed: Annotated[int, msgspec.Meta(ge=0)] = 0

    releases_routing: ClassVar[bool] = False
    ckks_updates: ClassVar[bool] = False
    moe_lora_adapters: ClassVar[bool] = False

    def problems(self, config: FederationConfig) -> list[Problem]:
        """Every expert to exactly clients_per_expert institutions, each holding min..max
        experts and at least top_k of them (else it could not route)."""
        f, moe, n = self, config.model.moe, len(config.institutions)
        slots, cap = moe.num_experts * f.clients_per_expert, min(f.max_experts, moe.num_experts)
        problems = [
            (
                f.clients_per_expert > n,
                "clients_per_expert",
                f"clients_per_expert={f.clients_per_expert} exceeds the {n} institutions",
            ),
            (
                f.min_experts < moe.top_k,
                "min_experts",
                f"min_experts={f.min_experts} is below [model.moe] top_k={moe.top_k}: an "
                "institution could not route",
            ),
            (
                f.min_experts > cap,
                "min_experts",
                f"min_experts={f.min_experts} exceeds max_experts={f.max_experts} or the "
                f"{moe.num_experts} experts",
            ),
            (
                slots < n * f.min_experts,
                "min_experts",
                f"{moe.num_experts} experts x clients_per_expert={f.clients_per_expert} = {slots} "
                f"slots cannot give each of {n} institutions min_experts={f.min_experts}",
            ),
            (
                slots > n * cap,
                "max_experts",
                f"{slots} slots do not fit {n} institutions holding at most {cap} experts "
                f"(max_experts={f.max_experts}, num_experts={moe.num_experts})",
            ),
            (
                config.data.max_blocks.validation is not None
                and config.data.max_blocks.validation < f.affinity_blocks,
                "affinity_blocks",
                f"affinity_blocks={f.affinity_blocks} exceeds the "
                f"{config.data.max_blocks.validation} validation blocks of [data.max_blocks] the "
                "scores and keys are computed on",
            ),
        ]
        return [(field, message) for failed, field, message in problems if failed]


class DDOMESection(_MinCountSection):
    """[aggregation.ddome]: DDOME's parameters (see ``clients.strategies.ddome``). The experts'
    shape (number, top_k = experts each institution trains, rank, alpha, target modules) is
    ``[model.moe]``'s.

    - ``gate_hidden``: hidden width of the gating MLP.
    - ``delta_bound``: updates are clipped to +-delta_bound before the secure sum.
    - ``min_count``: institutions that must train an expert in a round for it to move (>= 2:
      an expert's update is never one institution's alone).
    - ``choice_noise_multiplier``: Gaussian noise multiplier of the released sum of gate
      probabilities each institution picks its experts from (L2 sensitivity 1).
    - ``anchors``: the first ``anchors`` institutions are anchor clients, institution i
      anchored to expert i (the paper needs about 30-50 % anchors for a stable gate).
    - ``anchor_coef``: weight of an anchor's gate loss towards its expert.
    """

    gate_hidden: PositiveInt = 64
    delta_bound: Annotated[float, msgspec.Meta(gt=0.0)] = 0.1
    min_count: Annotated[int, msgspec.Meta(ge=2)] = 2
    choice_noise_multiplier: Annotated[float, msgspec.Meta(gt=0.0)] = 4.0
    anchors: Annotated[int, msgspec.Meta(ge=0)] = 0
    anchor_coef: Annotated[float, msgspec.Meta(ge=0.0)] = 1.0

    releases_routing: ClassVar[bool] = False
    ckks_updates: ClassVar[bool] = False
    moe_lora_adapters: ClassVar[bool] = False

    def problems(self, config: FederationConfig) -> list[Problem]:
        """Besides ``min_count``: institution i anchors expert i, so the anchors must exist."""
        n, experts = len(config.institutions), config.model.moe.num_experts
        found = super().problems(config)
        if self.anchors > min(n, experts):
            found.append(
                (
                    "anchors",
                    f"anchors={self.anchors}: institution i anchors expert i, so at most "
                    f"min({n} institutions, {experts} experts) = {min(n, experts)}",
                )
            )
        return found


class AggregationSection(_Section):
    """[aggregation]: how updates are combined and protected on the way.

    - ``strategy``: "fedavg" (adapter deltas weighted by the institutions' public weights, both
      inside the secure sum), "fedalign" (FedAlign-MoE, see ``fedalign``) or "fedmoe" (FedMoE, see
      ``fedmoe``), "fedamole" (FedAMoLE, see ``fedamole``) or "ddome" (DDOME, see ``ddome``).
      FedAMoLE and DDOME bring their own adapters (``[model.moe]`` gives their shape) and
      release no routing statistics (``routing_statistics`` is ignored); their updates travel
      masked.
    - ``expert_updates``, ``routing_statistics``: "mask" (SecAgg+, exact, default for updates)
      or "ckks" (homomorphic encryption under a key the institutions share; the coordinator only
      adds ciphertexts). With expert updates under CKKS the coordinator never sees the global
      adapters either: it keeps them encrypted and scales each encrypted sum by the public
      ``1 / sum(w)``, which needs one spare level (three or more coefficient primes).
    - ``ckks``: CKKS parameters, used by whichever payload picks "ckks".
    - ``fedalign``, ``fedmoe``, ``fedamole``, ``ddome``: the parameters of those strategies
      (ignored by the others).
    """

    strategy: StrategyName = "fedavg"
    expert_updates: Protection = "mask"
    routing_statistics: Protection = "ckks"
    ckks: CkksSection = msgspec.field(default_factory=CkksSection)
    fedavg: FedAvgSection = msgspec.field(default_factory=FedAvgSection)
    fedalign: FedAlignSection = msgspec.field(default_factory=FedAlignSection)
    fedmoe: FedMoESection = msgspec.field(default_factory=FedMoESection)
    fedamole: FedAMoLESection = msgspec.field(default_factory=FedAMoLESection)
    ddome: DDOMESection = msgspec.field(default_factory=DDOMESection)

    @property
    def section(self) -> StrategySection:
        """The configured strategy's section."""
        return getattr(self, self.strategy)


class InstitutionEntry(_Section):
    """[[institutions]]: one member of the federation.

    - ``name``: unique; names its key files and its row in the roster.
    - ``connect``: endpoint it dials; default: the coordinator's ``bind`` address.
    - ``privacy``: its own budget, overriding ``[privacy]``'s (optional).
    - ``data``: its own local files when ``[data] source = "files"``, see
      :class:`InstitutionData`.
    - ``weight``: its public weight in every average (default 1.0: all equal). It is declared
      here, the same every round, and depends on no data, so the weight that travels inside
      the secure sum reveals nothing (an institution's dataset size never leaves it). Only
      ratios matter; the smallest must be at least 1/1024 of the largest.
    """

    name: Name
    connect: Address | None = None
    privacy: PrivacyBudget | None = None
    data: InstitutionData | None = None
    weight: Annotated[float, msgspec.Meta(gt=0.0, le=1e6)] = 1.0


class FederationConfig(_Section):
    """The whole federation; build it with :func:`load_config`."""

    federation: FederationSection
    institutions: Annotated[list[InstitutionEntry], msgspec.Meta(min_length=2)]
    coordinator: CoordinatorSection = msgspec.field(default_factory=CoordinatorSection)
    model: ModelSection = msgspec.field(default_factory=ModelSection)
    data: DataSection = msgspec.field(default_factory=DataSection)
    training: TrainingSection = msgspec.field(default_factory=TrainingSection)
    privacy: PrivacySection = msgspec.field(default_factory=PrivacySection)
    secagg: SecAggSection = msgspec.field(default_factory=SecAggSection)
    aggregation: AggregationSection = msgspec.field(default_factory=AggregationSection)

    @property
    def institution_names(self) -> list[str]:
        """Names in config order (institution i gets data part i)."""
        return [inst.name for inst in self.institutions]

    def institution(self, name: str) -> InstitutionEntry:
        """The entry called ``name``; KeyError names the known ones otherwise."""
        for inst in self.institutions:
            if inst.name == name:
                return inst
        raise KeyError(f"no institution {name!r} in the config; known: {self.institution_names}")

    def connect_address(self, name: str) -> str:
        """Endpoint institution ``name`` dials."""
        return self.institution(name).connect or self.coordinator.bind

    def budget(self, name: str) -> PrivacyBudget:
        """Institution ``name``'s (epsilon, delta) budget: its override, else ``[privacy]``'s."""
        own = self.institution(name).privacy
        if own is not None:
            return own
        return PrivacyBudget(
            target_epsilon=self.privacy.target_epsilon, target_delta=self.privacy.target_delta
        )

    def public_weight(self, name: str) -> float:
        """Institution ``name``'s public weight in (0, 1]: its declared ``weight`` over the
        largest one (what it submits, and multiplies its update by, every round)."""
        return self.institution(name).weight / max(inst.weight for inst in self.institutions)

    def smallest_public_weight(self) -> float:
        """The smallest :meth:`public_weight` of any institution (a weight sum below half of it
        means nobody contributed)."""
        return min(inst.weight for inst in self.institutions) / max(
            inst.weight for inst in self.institutions
        )

    def dp_config(self, name: str) -> DPConfig:
        """Institution ``name``'s uncalibrated :class:`privacy.DPConfig` (imports torch)."""
        from privacy import DPConfig  # lazy: keeps torch out of the CLI

        budget = self.budget(name)
        return DPConfig(
            target_epsilon=budget.target_epsilon,
            target_delta=budget.target_delta,
            max_grad_norm=self.privacy.max_grad_norm,
            accountant=self.privacy.accountant,
        )

    @property
    def keys_dir(self) -> Path:
        """The key directory (absolute after :func:`load_config`)."""
        return Path(self.coordinator.keys_dir)

    @property
    def run_dir(self) -> Path:
        """The run directory (absolute after :func:`load_config`)."""
        return Path(self.federation.run_dir or Path("runs") / self.federation.name)


def load_config(path: str | Path) -> FederationConfig:
    """Read, validate and resolve the TOML federation config at ``path``.

    Raises :class:`ConfigFileError` for a missing file, bad TOML, a wrong field or a rule
    between fields that does not hold; the message names the field and what to change.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigFileError(path, "no such file; pass the path of a federation TOML") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(path, f"cannot read the file ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(path, f"not valid TOML: {exc}") from None
    return parse_config(raw, path)


def parse_config(raw: dict[str, Any], path: str | Path = "<config>") -> FederationConfig:
    """Validate an already-parsed TOML document (``path`` only labels errors and anchors paths)."""
    try:
        config = msgspec.convert(raw, FederationConfig)
    except msgspec.ValidationError as exc:
        message, field = _split_validation_error(str(exc))
        raise ConfigFileError(path, f"{message}; fix this field and try again", field) from None
    _check_rules(config, path)
    return _resolve_paths(config, Path(path).parent)


def _split_validation_error(text: str) -> tuple[str, str | None]:
    """msgspec's "Expected ... - at `$.a.b`" as (message with hints, "$.a.b")."""
    match = re.fullmatch(r"(.*) - at `(\$[^`]*)`", text, flags=re.DOTALL)
    if match is None:
        return text, None
    message, field = match.group(1), match.group(2)
    if message.startswith("Object missing required field"):
        return message, field
    leaf = re.sub(r"\[\d+\]$", "", field).rsplit(".", 1)[-1]
    if leaf in _CHOICES:
        message += f" (choose one of {', '.join(repr(c) for c in _CHOICES[leaf])})"
    return message, field


def _check_rules(config: FederationConfig, path: str | Path) -> None:
    """Rules that span fields; each failure names the field to change."""
    seen: dict[str, int] = {}
    for i, inst in enumerate(config.institutions):
        if inst.name in seen:
            raise ConfigFileError(
                path,
                f"duplicate institution name {inst.name!r} (also $.institutions[{seen[inst.name]}]"
                "); give every institution its own name",
                f"$.institutions[{i}].name",
            )
        seen[inst.name] = i
    addresses = [("$.coordinator.bind", config.coordinator.bind)] + [
        (f"$.institutions[{i}].connect", inst.connect)
        for i, inst in enumerate(config.institutions)
        if inst.connect is not None
    ]
    for field, address in addresses:
        port = address.rsplit(":", 1)[-1]
        if address.startswith("tcp://") and not 1 <= int(port) <= 65535:
            raise ConfigFileError(path, f"port {port} is outside 1..65535", field)
    host = config.coordinator.bind.removeprefix("tcp://").rsplit(":", 1)[0]
    if host in _WILDCARD_HOSTS:
        for i, inst in enumerate(config.institutions):
            if inst.connect is None:
                raise ConfigFileError(
                    path,
                    f"the coordinator binds the wildcard host {host!r}, so institution "
                    f'{inst.name!r} cannot dial it: set connect = "tcp://HOST:PORT"',
                    f"$.institutions[{i}].connect",
                )
    moe = config.model.moe
    if moe.top_k > moe.num_experts:
        raise ConfigFileError(
            path,
            f"top_k={moe.top_k} exceeds num_experts={moe.num_experts}; lower top_k",
            "$.model.moe.top_k",
        )
    if config.model.init_adapter is not None and (
        not config.aggregation.section.moe_lora_adapters or moe.mode == "native"
    ):
        raise ConfigFileError(
            path,
            f"a PEFT LoRA adapter can start only dense MoE-LoRA experts, not strategy "
            f"{config.aggregation.strategy!r} with mode {moe.mode!r}; remove init_adapter",
            "$.model.init_adapter",
        )
    split = config.data.split
    if any(f <= 0 for f in split) or abs(sum(split) - 1.0) > 1e-9:
        raise ConfigFileError(
            path,
            f"split must be three positive fractions summing to 1, got {split}",
            "$.data.split",
        )
    weights = [inst.weight for inst in config.institutions]
    if min(weights) < max(weights) * MIN_WEIGHT_RATIO:
        i = weights.index(min(weights))
        raise ConfigFileError(
            path,
            f"weight={weights[i]:g} is below 1/{round(1 / MIN_WEIGHT_RATIO)} of the largest "
            f"({max(weights):g}): it would vanish in the masks' quantisation; raise it",
            f"$.institutions[{i}].weight",
        )
    _check_data(config, path)
    _check_secagg(config, path)
    _check_strategy(config, path)
    try:
        ckks = config.aggregation.ckks.params()
    except ConfigError as exc:
        raise ConfigFileError(path, str(exc), "$.aggregation.ckks") from None
    if config.aggregation.expert_updates == "ckks" and len(ckks.coeff_mod_bit_sizes) < 3:
        raise ConfigFileError(
            path,
            f"expert_updates = 'ckks' needs a level for the coordinator's plaintext scaling, "
            f"but coeff_mod_bit_sizes {list(ckks.coeff_mod_bit_sizes)} has none to spare; use "
            "three or more primes, e.g. the default [60, 40, 40, 60]",
            "$.aggregation.ckks.coeff_mod_bit_sizes",
        )


def _check_data(config: FederationConfig, path: str | Path) -> None:
    """What can be said about the institutions' data files without reading them."""
    files = config.data.source == "files"
    for i, inst in enumerate(config.institutions):
        field = f"$.institutions[{i}].data"
        data = inst.data
        if data is None:
            if files:
                raise ConfigFileError(
                    path,
                    f'[data] source = "files" but institution {inst.name!r} names no files: '
                    'add data = { path = "FILE" } (or train, validation and test)',
                    field,
                )
            continue
        if not files:
            raise ConfigFileError(
                path,
                f"institution {inst.name!r} names data files but [data] source = "
                f'{config.data.source!r}; set source = "files" or remove its data',
                field,
            )
        per_split = (data.train, data.validation, data.test)
        if data.path is not None and any(p is not None for p in per_split):
            raise ConfigFileError(
                path, "give either path (split by seed) or train/validation/test, not both", field
            )
        if data.path is None and any(p is None for p in per_split):
            missing = [s for s, p in zip(SPLIT_NAMES, per_split, strict=True) if p is None]
            raise ConfigFileError(
                path,
                f"missing {', '.join(missing)}: give path (one file, split by [data] split) "
                "or all of train, validation and test",
                field,
            )
        for split, file in data.files().items():
            if data.format_of(file) is None:
                key = "path" if split == "all" else split
                raise ConfigFileError(
                    path,
                    f"cannot tell the format of {file!r} from its suffix; set format to one of "
                    f"{', '.join(repr(c) for c in get_args(DataFormat))}",
                    f"{field}.{key}",
                )


def missing_data_files(config: FederationConfig) -> list[tuple[str, str]]:
    """(field, file) for every configured data file that does not exist (paths as resolved by
    :func:`load_config`); ``check-config`` reports them."""
    out = []
    for i, inst in enumerate(config.institutions):
        if inst.data is None:
            continue
        for split, file in inst.data.files().items():
            if not Path(file).is_file():
                key = "path" if split == "all" else split
                out.append((f"$.institutions[{i}].data.{key}", file))
    return out


def delta_warnings(config: FederationConfig) -> list[str]:
    """One line per institution whose delta is not below 1 / records, for as many records as
    the config lets it train on (``[data.max_blocks] train``): a delta that large lets a
    mechanism publish one record outright. A warning, not a refusal; without a cap the config
    says nothing about the records (``sealmoe plan`` counts them)."""
    cap = config.data.max_blocks.train
    if cap is None:
        return []
    warnings = []
    for name in config.institution_names:
        delta = config.budget(name).target_delta
        if delta * cap >= 1:
            where = "its own [institutions.privacy]" if any(
                i.name == name and i.privacy is not None for i in config.institutions
            ) else "[privacy]"  # fmt: skip
            warnings.append(
                f"institution {name!r}: delta = {delta:g} ({where} target_delta) is not below "
                f"1/records = 1/{cap} for the {cap} training records [data.max_blocks] train "
                "allows it; a mechanism that publishes one record outright meets such a delta. "
                f"Choose delta well below 1/{cap}, e.g. "
                f"{10 ** math.floor(math.log10(0.01 / cap)):g}"
            )
    return warnings


def _check_strategy(config: FederationConfig, path: str | Path) -> None:
    """The configured strategy's own rules between fields, and whether it can run with the
    expert updates under CKKS."""
    name, section = config.aggregation.strategy, config.aggregation.section
    if not section.ckks_updates and config.aggregation.expert_updates == "ckks":
        raise ConfigFileError(
            path,
            f"expert_updates = 'ckks' does not work with strategy = {name!r}: its coordinator "
            "moves each expert by a ratio of masked sums it must read; set expert_updates = "
            "'mask'",
            "$.aggregation.expert_updates",
        )
    for field, message in section.problems(config):
        raise ConfigFileError(path, message, f"$.aggregation.{name}.{field}")


def _check_secagg(config: FederationConfig, path: str | Path) -> None:
    """Validate the masking settings by building the RoundParams of a round with everybody."""
    n = len(config.institutions)
    sec = config.secagg
    threshold, neighbours = sec.resolved(n)
    if neighbours > n - 1:
        raise ConfigFileError(
            path,
            f"neighbours={neighbours} but there are only {n} institutions: at most {n - 1}",
            "$.secagg.neighbours",
        )
    holders = neighbours + 1
    if not active_threshold(holders) <= threshold <= holders:
        raise ConfigFileError(
            path,
            f"threshold={threshold} must exceed 2/3 of the {holders} share holders (an "
            f"institution and its {neighbours} neighbours), the bound against an active "
            f"coordinator: choose threshold in [{active_threshold(holders)}, {holders}]",
            "$.secagg.threshold",
        )
    if not sec.check_survivors:
        raise ConfigFileError(
            path,
            "check_survivors = false lets a coordinator show institutions different survivor "
            "sets and unmask one update; institutions refuse such rounds: set it to true",
            "$.secagg.check_survivors",
        )
    if sec.min_participants is not None and not threshold <= sec.min_participants <= n:
        raise ConfigFileError(
            path,
            f"min_participants={sec.min_participants} must be at least the threshold "
            f"({threshold}) and at most the {n} institutions: choose it in [{threshold}, {n}]",
            "$.secagg.min_participants",
        )
    try:
        FixedPointCodec(sec.clip, sec.bits, sec.modulus_bits, max_clients=n)
    except ConfigError as exc:
        raise ConfigFileError(path, str(exc), "$.secagg.bits") from None
    try:
        sec.round_params(0, list(range(n)), bytes(32), 1)
    except ConfigError as exc:
        raise ConfigFileError(path, str(exc), "$.secagg") from None


def _resolve_paths(config: FederationConfig, base: Path) -> FederationConfig:
    """Make run_dir, keys_dir, a local model folder, the initial adapter and the institutions'
    data files absolute, relative to the config file's directory."""
    run_dir = base / (config.federation.run_dir or Path("runs") / config.federation.name)
    keys_dir = base / config.coordinator.keys_dir
    model = config.model
    model_dir = base / Path(model.name).expanduser()
    if model_dir.is_dir():  # a local model folder; else a built-in name or a hub id
        model = msgspec.structs.replace(model, name=str(model_dir.resolve()))
    if model.init_adapter is not None:
        init = (base / Path(model.init_adapter).expanduser()).resolve()
        model = msgspec.structs.replace(model, init_adapter=str(init))
    institutions = [
        inst
        if inst.data is None
        else msgspec.structs.replace(inst, data=_resolve_data(inst.data, base))
        for inst in config.institutions
    ]
    config = msgspec.structs.replace(config, model=model, institutions=institutions)
    return msgspec.structs.replace(
        config,
        federation=msgspec.structs.replace(config.federation, run_dir=str(run_dir.resolve())),
        coordinator=msgspec.structs.replace(config.coordinator, keys_dir=str(keys_dir.resolve())),
    )


def _resolve_data(data: InstitutionData, base: Path) -> InstitutionData:
    """``data`` with every file path absolute (relative ones against ``base``)."""
    fields = ("path", "train", "validation", "test")
    return msgspec.structs.replace(
        data,
        **{
            f: str((base / Path(getattr(data, f)).expanduser()).resolve())
            for f in fields
            if getattr(data, f) is not None
        },
    )
