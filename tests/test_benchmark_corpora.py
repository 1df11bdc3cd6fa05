"""The strategy experiment's corpora (benchmarks/corpora.py): record rules, groff and gettext
reading, heterogeneity measures and n-gram baselines scored on the language model's positions."""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import corpora
from benchmarks.corpora import MAX_RECORD_CHARS
from benchmarks.corpora import MIN_RECORD_BYTES
from benchmarks.corpora import code_blocks
from benchmarks.corpora import groff_paragraphs
from benchmarks.corpora import js_divergence_matrix
from benchmarks.corpora import keep_record
from benchmarks.corpora import mo_messages
from benchmarks.corpora import ngram_record_losses
from benchmarks.corpora import own_vs_pooled_gain
from benchmarks.corpora import write_institutions
from clients.contract.records import PAD_ID
from clients.data.records import encode_records
from clients.models.build import ByteTokenizer

P = PAD_ID


def test_js_divergence_zero_for_identical_symmetric_and_at_most_one_bit():
    records = {
        "a": ["hello world, hello there"],
        "a2": ["hello world, hello there"],
        "b": ["def f(x):\n    return x + 1"],
        "c": ["0123456789"],
        "d": ["abcdefghij"],
    }
    js = js_divergence_matrix(records)
    assert js["a", "a2"] == pytest.approx(0.0, abs=1e-12)
    for x in records:
        for y in records:
            assert js[x, y] == pytest.approx(js[y, x])
            assert 0.0 <= js[x, y] <= 1.0 + 1e-12
    assert js["c", "d"] == pytest.approx(1.0)  # no byte in common: the maximum


def test_own_model_beats_pooled_on_different_data():
    train = {"code": ["x = f(y)\n" * 20] * 5, "prose": ["the cat sat on the mat. " * 8] * 5}
    test = {"code": ["z = g(x)\n" * 10], "prose": ["the mat sat on the cat. " * 4]}
    gains = own_vs_pooled_gain(train, test)
    assert set(gains) == {"code", "prose"}
    assert all(g > 0 for g in gains.values())


def test_ngram_scores_exactly_the_language_models_positions():
    train = torch.tensor([[1, 2, 1, 2, P]])
    test = torch.tensor([[1, 2, P, P], [2, 1, 2, P]])
    # training pairs (1,2) (2,1) (1,2): targets 2, 1, 2; add-one unigram over 256 bytes
    u1, u2 = 2 / 259, 3 / 259
    p2_after_1 = (2 + 256 * u2) / (2 + 256)
    p1_after_2 = (1 + 256 * u1) / (1 + 256)

    uni = ngram_record_losses(train, test, "unigram")
    assert uni.n_scored.tolist() == [1, 2]
    np.testing.assert_allclose(uni.loss_sum, [-math.log(u2), -math.log(u1) - math.log(u2)])
    assert uni.n_correct.tolist() == [1, 1]  # always byte 2, the majority

    majority = ngram_record_losses(train, test, "majority")
    assert majority.n_correct.tolist() == [1, 1]
    np.testing.assert_allclose(majority.loss_sum, uni.loss_sum)

    bi = ngram_record_losses(train, test, "bigram")
    assert bi.n_scored.tolist() == [1, 2]
    np.testing.assert_allclose(
        bi.loss_sum,
        [-math.log(p2_after_1), -math.log(p1_after_2) - math.log(p2_after_1)],
    )
    assert bi.n_correct.tolist() == [1, 2]
    assert bi.loss_sum.dtype == np.float64 and bi.n_scored.dtype == np.int64


def test_bigram_beats_unigram_on_structured_text():
    tokenizer = ByteTokenizer()
    train = encode_records(["abcdefgh" * 8] * 10, tokenizer, 64)
    test = encode_records(["cdefghab" * 4, "efghabcd" * 6], tokenizer, 64)
    uni = ngram_record_losses(train, test, "unigram")
    bi = ngram_record_losses(train, test, "bigram")
    assert uni.n_scored.tolist() == bi.n_scored.tolist() == [31, 47]
    assert bi.loss_sum.sum() < 0.5 * uni.loss_sum.sum()
    assert bi.n_correct.sum() > uni.n_correct.sum()


def test_unknown_ngram_order_is_refused():
    with pytest.raises(ValueError, match="unknown order"):
        ngram_record_losses(torch.tensor([[1, 2]]), torch.tensor([[1, 2]]), "trigram")


def test_groff_keeps_prose_and_drops_requests_and_escapes():
    source = "\n".join(
        [
            '.\\" a comment',
            '.TH FOO 1 "2024" "foo 1.0"',
            ".SH NAME",
            "foo \\- do things",
            ".SH DESCRIPTION",
            ".B foo",
            "prints \\fIfiles\\fR \\(em quickly,",
            "\\s-1twice\\s0 if asked.",
            ".de XX",
            "macro body text",
            "..",
            ".PP",
            "Zweiter Absatz f\\(:ur \\(Bqdich\\(lq und \\[u00E9]t\\('e.",
            ".TS",
            "tab;",
            "a b.",
            ".TE",
            "'br",
            "Last.",
        ]
    )
    assert groff_paragraphs(source) == [
        "foo - do things",
        "foo prints files \u2014 quickly, twice if asked.",
        "Zweiter Absatz f\u00fcr \u201edich\u201c und \u00e9t\u00e9.",
        "Last.",
    ]


def test_mo_catalogue_gives_translations_without_header(tmp_path: Path):
    entries = [
        (b"", b"Content-Type: text/plain; charset=UTF-8\n"),
        (b"File", b"Fichero  de\ndatos"),
    ]
    keys = b"".join(k + b"\0" for k, _ in entries)
    values = b"".join(v + b"\0" for _, v in entries)
    n, header = len(entries), 28
    keys_at = header + 16 * n
    values_at = keys_at + len(keys)
    table = b""
    offset = keys_at
    for key, _ in entries:
        table += struct.pack("<2I", len(key), offset)
        offset += len(key) + 1
    offset = values_at
    for _, value in entries:
        table += struct.pack("<2I", len(value), offset)
        offset += len(value) + 1
    originals, translations = table[: 8 * n], table[8 * n :]
    path = tmp_path / "x.mo"
    path.write_bytes(
        struct.pack("<7I", 0x950412DE, 0, n, header, header + 8 * n, 0, 0)
        + originals
        + translations
        + keys
        + values
    )
    assert mo_messages(path) == ["Fichero de datos"]


def test_record_size_bounds_and_code_indentation():
    assert keep_record("x" * (MIN_RECORD_BYTES - 1)) is None
    assert keep_record("\u00e9" * (MIN_RECORD_BYTES // 2)) is not None  # bytes, not characters
    assert keep_record("y" * 2000) == "y" * MAX_RECORD_CHARS
    source = "import os\n\n\ndef f():  \n    return 1\n   \nclass A:\n\tpass\n"
    assert code_blocks(source) == ["import os", "def f():\n    return 1", "class A:\n\tpass"]


def test_python_institution_records_respect_bounds():
    if not corpora.STDLIB.is_dir():
        pytest.skip(f"{corpora.STDLIB} missing: Debian's libpython3.11-stdlib is not installed")
    records = corpora.institution_records("python")
    assert 2000 <= len(records) <= corpora.MAX_RECORDS
    assert len(set(records)) == len(records)
    for record in records:
        assert len(record.encode("utf-8")) >= MIN_RECORD_BYTES
        assert len(record) <= MAX_RECORD_CHARS


def test_write_institutions_skips_unchanged_files(tmp_path: Path, monkeypatch):
    content = {"text": ["first record " * 5]}
    monkeypatch.setattr(corpora, "institution_records", lambda name: [*content["text"], name * 9])
    paths = write_institutions(tmp_path)
    assert set(paths) == {*corpora.TRAINING_INSTITUTIONS, corpora.UNSEEN_INSTITUTION}
    path = paths["drama"]
    os.utime(path, ns=(0, 0))  # a rewrite would move the modification time
    write_institutions(tmp_path)
    assert path.stat().st_mtime_ns == 0
    content["text"] = ["another record " * 5]
    write_institutions(tmp_path)
    assert path.stat().st_mtime_ns > 0
    assert corpora.read_institution(path) == ["another record " * 5, "drama" * 9]


def test_pretraining_text_is_bounded_mixed_and_shares_no_record():
    try:
        text = corpora.pretraining_text(max_bytes=60_000)
        held = {
            r
            for name in (*corpora.TRAINING_INSTITUTIONS, corpora.UNSEEN_INSTITUTION)
            for r in corpora.institution_records(name)
        }
    except corpora.CorpusSourceError as exc:
        pytest.skip(f"a corpus source is not installed: {exc}")
    assert 50_000 < len(text.encode("utf-8")) <= 60_000
    records = [r for r in text.split("\n\n") if r]
    assert not held & set(records)
    assert any("def " in r or "import " in r for r in records[:10])  # Python early on
    assert any("#define" in r or "struct " in r for r in records[:10])  # and C headers


def test_a_cache_built_elsewhere_stands_in_for_missing_sources_only_when_intact(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(corpora, "institution_records", lambda name: [f"{name} record " * 8])
    paths = write_institutions(tmp_path)

    def missing(name):
        raise corpora.CorpusSourceError(f"{name}: install its package")

    monkeypatch.setattr(corpora, "institution_records", missing)
    assert write_institutions(tmp_path) == paths  # intact copies are used as they are
    tampered = paths[corpora.TRAINING_INSTITUTIONS[0]]
    tampered.write_text(tampered.read_text().replace("record", "r3cord"))
    with pytest.raises(corpora.CorpusSourceError, match="install its package"):
        write_institutions(tmp_path)
