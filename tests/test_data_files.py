"""Bring your own data: institutions' local files (JSON Lines, CSV, Parquet, plain text) read
through ``datasets``, one record -> at most one padded example, padding masked out of the loss,
errors that name the file, line and field, and a federation that trains on such files."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from clients.contract.config import ConfigFileError
from clients.contract.config import load_config
from clients.contract.config import missing_data_files
from clients.contract.records import PAD_ID
from clients.data.files import DataFileError
from clients.data.files import read_records
from clients.data.records import encode_records
from clients.data.records import seeded_split
from clients.data.sources import institution_data
from clients.models.build import ByteTokenizer
from clients.models.loaders import tiny_dense_model
from clients.models.moe_lora import MoELoRAConfig
from clients.models.moe_lora import attach
from clients.training.trainer import evaluate
from clients.training.trainer import per_sample_loss
from coordinator.app.cli import main
from coordinator.simulation import simulate
from privacy import assert_per_sample_gradients
from privacy.errors import UserError
from tests import adapter_fixtures

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny.toml"
NOTES = [f"Patient {i} reports mild symptoms; follow-up in {i % 7 + 1} weeks." for i in range(40)]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def write_csv(path: Path, texts: list[str], field: str = "text") -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", field])
        writer.writerows([i, t] for i, t in enumerate(texts))
    return path


def write_parquet(path: Path, texts: list[str | None], field: str = "text") -> Path:
    pq.write_table(pa.table({field: texts, "id": list(range(len(texts)))}), path)
    return path


# --- reading -----------------------------------------------------------------------------------


def test_every_format_reads_one_record_per_row(tmp_path):
    texts = ["first note, with a comma", 'second "quoted" note', "third note — ünïcode"]
    jsonl = write_jsonl(tmp_path / "a.jsonl", texts, field="note")
    csv_file = write_csv(tmp_path / "a.csv", texts, field="note")
    parquet = write_parquet(tmp_path / "a.parquet", texts, field="note")
    text = tmp_path / "a.txt"
    text.write_text("\n".join([texts[0], "", texts[1], "   ", texts[2]]) + "\n")
    assert read_records(jsonl, "jsonl", "note") == texts
    assert read_records(csv_file, "csv", "note") == texts
    assert read_records(parquet, "parquet", "note") == texts
    assert read_records(text, "text") == texts  # blank lines are no records


def test_bad_files_name_the_file_line_and_field(tmp_path):
    with pytest.raises(DataFileError, match=r"nope\.jsonl: no such file") as missing:
        read_records(tmp_path / "nope.jsonl", "jsonl")
    assert isinstance(missing.value, UserError)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataFileError, match=r"empty\.csv: the file is empty"):
        read_records(empty, "csv")
    notes = write_jsonl(tmp_path / "notes.jsonl", NOTES[:3], field="body")
    with pytest.raises(DataFileError, match=r"notes\.jsonl, field 'text': no such field.*'body'"):
        read_records(notes, "jsonl", "text")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": "cut off\n')
    with pytest.raises(DataFileError, match=r"broken\.jsonl, line 3: cannot read it as jsonl"):
        read_records(broken, "jsonl")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"good line\nna\xefve line\n")
    with pytest.raises(DataFileError, match=r"latin\.txt, line 2: .*not UTF-8"):
        read_records(latin, "text")
    blank = write_csv(tmp_path / "blank.csv", ["one", "two", "", "four"])
    with pytest.raises(DataFileError, match=r"blank\.csv, line 4, field 'text': .*missing"):
        read_records(blank, "csv")
    nulls = tmp_path / "nulls.jsonl"
    nulls.write_text('{"text": "a note"}\n\n{"text": null}\n')
    with pytest.raises(DataFileError, match=r"nulls\.jsonl, line 3, field 'text': .*missing"):
        read_records(nulls, "jsonl")
    holes = write_parquet(tmp_path / "holes.parquet", ["a note", None])
    with pytest.raises(DataFileError, match=r"holes\.parquet, field 'text': row 2: .*missing"):
        read_records(holes, "parquet")


# --- records to examples -----------------------------------------------------------------------


def test_a_record_yields_at_most_one_truncated_padded_example():
    tok = ByteTokenizer()
    records = ["a" * 50, "short", "x", "hi"]
    rows = encode_records(records, tok, block_len=8)
    # the 50-byte record is truncated (not split), "x" has no next-token target and is skipped
    assert rows.shape == (3, 8)
    assert rows[0].tolist() == tok("a" * 8)["input_ids"]
    assert rows[1].tolist() == tok("short")["input_ids"] + [PAD_ID] * 3
    assert rows[2].tolist() == tok("hi")["input_ids"] + [PAD_ID] * 6
    assert encode_records(records, tok, block_len=8, max_records=2).shape == (2, 8)
    with pytest.raises(ValueError, match="two or more tokens"):
        encode_records(["x", "y"], tok, block_len=8)


def test_seeded_split_is_a_reproducible_partition():
    items = list(range(100))
    parts = seeded_split(items, (0.8, 0.1, 0.1), seed=3)
    assert [len(p) for p in parts] == [80, 10, 10]
    assert sorted(i for part in parts for i in part) == items
    assert all(p == sorted(p) for p in parts)
    assert seeded_split(items, (0.8, 0.1, 0.1), seed=3) == parts
    assert seeded_split(items, (0.8, 0.1, 0.1), seed=4) != parts


def moe_model(coef: float) -> torch.nn.Module:
    model = attach(tiny_dense_model(), MoELoRAConfig(rank=4, load_balance_coef=coef))
    return adapter_fixtures.exercised(model, scale=0.05)


def test_padding_is_masked_out_of_the_loss_and_the_metrics():
    model = moe_model(coef=0.0)
    ids = adapter_fixtures.token_ids(3, length=12)
    lengths = [12, 7, 3]
    padded = ids.clone()
    for row, n in enumerate(lengths):
        padded[row, n:] = PAD_ID
    with torch.no_grad():
        batch_loss = per_sample_loss(model, padded)
        for row, n in enumerate(lengths):
            alone = per_sample_loss(model, ids[row : row + 1, :n])
            assert batch_loss[row] == pytest.approx(float(alone[0]), rel=1e-5)
    metrics = evaluate(model, padded, device="cpu")
    assert metrics.tokens == sum(n - 1 for n in lengths)
    whole = [evaluate(model, ids[r : r + 1, :n], device="cpu") for r, n in enumerate(lengths)]
    assert metrics.loss == pytest.approx(
        sum(m.loss * m.tokens for m in whole) / metrics.tokens, rel=1e-5
    )
    assert metrics.accuracy == pytest.approx(
        sum(m.accuracy * m.tokens for m in whole) / metrics.tokens, rel=1e-5
    )


def test_per_sample_gradients_of_padded_records_match_brute_force():
    ids = adapter_fixtures.token_ids(3, length=10)
    ids[1, 4:] = PAD_ID
    ids[2, 2:] = PAD_ID
    report = assert_per_sample_gradients(moe_model(coef=0.01), ids, per_sample_loss)
    assert max(p.max_rel_error for p in report.parameters) < 1e-4


# --- config ------------------------------------------------------------------------------------


def files_config(tmp_path: Path, data: dict[str, dict], max_blocks: str = "{}") -> Path:
    """examples/tiny.toml with ``[data] source = "files"`` and each institution's own ``data``."""
    text = re.sub(
        r"^\[data\]\n.*?\n\n",
        f'[data]\nsource = "files"\nblock_len = 32\nmax_blocks = {max_blocks}\n\n',
        TINY.read_text(),
        flags=re.DOTALL | re.MULTILINE,
    )
    for name, own in data.items():
        inline = ", ".join(f"{k} = {json.dumps(v)}" for k, v in own.items())
        text = text.replace(f'name = "{name}"\n', f'name = "{name}"\ndata = {{ {inline} }}\n')
    path = tmp_path / "fed.toml"
    path.write_text(text)
    return path


def institution_files(tmp_path: Path) -> dict[str, dict]:
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "comedies.jsonl", [f"comedy {n}" for n in NOTES])
    for split, part in zip(("train", "validation", "test"), (NOTES[:30], NOTES[30:35], NOTES[35:])):
        write_csv(folder / f"tragedies-{split}.csv", [f"tragedy {n}" for n in part], field="note")
    write_parquet(folder / "histories.parquet", [f"history {n}" for n in NOTES])
    return {
        "comedies": {"path": "data/comedies.jsonl"},
        "tragedies": {
            "train": "data/tragedies-train.csv",
            "validation": "data/tragedies-validation.csv",
            "test": "data/tragedies-test.csv",
            "text_field": "note",
        },
        "histories": {"path": "data/histories.parquet"},
    }


def test_files_config_reads_each_institutions_own_files(tmp_path):
    config = load_config(files_config(tmp_path, institution_files(tmp_path)))
    assert missing_data_files(config) == []
    tok = ByteTokenizer()
    comedies = institution_data(config, "comedies", tok)
    # one file split by seed 0.8/0.1/0.1: every record is one row of exactly one split
    assert [comedies[s].shape[0] for s in ("train", "validation", "test")] == [32, 4, 4]
    tragedies = institution_data(config, "tragedies", tok)
    assert [tragedies[s].shape[0] for s in ("train", "validation", "test")] == [30, 5, 5]
    first = bytes(t for t in tragedies["train"][0].tolist() if t != PAD_ID).decode()
    assert first == f"tragedy {NOTES[0]}"[:32]
    histories = institution_data(config, "histories", tok)
    assert torch.equal(histories["train"], institution_data(config, "histories", tok)["train"])


def test_config_rules_for_files_name_the_field(tmp_path):
    files = institution_files(tmp_path)
    bad = dict(files, histories={"path": "data/histories.tsv"})
    with pytest.raises(ConfigFileError, match=r"institutions\[2\]\.data\.path: cannot tell"):
        load_config(files_config(tmp_path, bad))
    bad = dict(files, histories={"path": "data/h.jsonl", "test": "data/h.jsonl"})
    with pytest.raises(ConfigFileError, match=r"institutions\[2\]\.data: give either path"):
        load_config(files_config(tmp_path, bad))
    bad = dict(files, histories={"train": "data/h.jsonl"})
    with pytest.raises(ConfigFileError, match=r"institutions\[2\]\.data: missing validation, test"):
        load_config(files_config(tmp_path, bad))
    bad = dict(files, histories={"path": "data/none.jsonl"})
    config = load_config(files_config(tmp_path, bad))
    assert missing_data_files(config) == [
        ("$.institutions[2].data.path", str((tmp_path / "data/none.jsonl").resolve()))
    ]
    path = tmp_path / "nodata.toml"
    path.write_text(TINY.read_text().replace('source = "shakespeare"', 'source = "files"'))
    with pytest.raises(ConfigFileError, match=r"institutions\[0\]\.data: .*names no files"):
        load_config(path)


def test_check_config_reports_a_missing_data_file(tmp_path, capsys):
    files = institution_files(tmp_path)
    assert main(["check-config", str(files_config(tmp_path, files))]) == 0
    assert "OK" in capsys.readouterr().out
    missing = dict(files, histories={"path": "data/gone.parquet"})
    assert main(["check-config", str(files_config(tmp_path, missing))]) == 2
    err = capsys.readouterr().err
    assert "$.institutions[2].data.path" in err and "gone.parquet" in err
    assert "Traceback" not in err


# --- a federation on files ---------------------------------------------------------------------


def test_a_federation_trains_on_institutions_own_files(tmp_path):
    config = load_config(
        files_config(tmp_path, institution_files(tmp_path), max_blocks="{ train = 24 }")
    )
    result = simulate(config, "fedavg")
    assert set(result.final) == set(config.institution_names)
    for name in config.institution_names:
        assert 0 < result.epsilon[name] <= config.budget(name).target_epsilon
        assert result.final[name].tokens == result.initial[name].tokens > 0
        assert result.final[name].loss != result.initial[name].loss
