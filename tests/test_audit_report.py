"""The privacy report: every required field in report.json, and an HTML page whose plots a real
headless browser (Debian's chromium) renders visibly, offline."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from matplotlib.image import imread

from audit import Ledger
from audit import ledger_path
from audit.context import context_bytes
from audit.render import COLOURS
from audit.report import REQUIRED_FIELDS
from clients.contract.config import load_config
from clients.contract.keys import generate_keys
from clients.contract.keys import load_institution_keys
from coordinator.app.cli import main
from coordinator.facts import audit_facts
from coordinator.store import RunStore
from privacy import ROUTING_STATISTICS
from privacy import DPTrainingFacts
from privacy import Release

ROOT = Path(__file__).resolve().parent.parent


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of the shared run directory that one test may alter."""
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory as a federation leaves it: context, ledgers, heads, an empirical audit."""
    logging.getLogger("absl").setLevel(logging.ERROR)
    folder = tmp_path_factory.mktemp("report")
    text = (ROOT / "examples" / "tiny.toml").read_text()
    text = text.replace('run_dir = "runs/tiny"', f'run_dir = "{folder / "run"}"')
    text = text.replace('keys_dir = "keys/tiny"', f'keys_dir = "{folder / "keys"}"')
    (folder / "federation.toml").write_text(text)
    config = load_config(folder / "federation.toml")
    generate_keys(config.keys_dir, config.institution_names, ckks=config.aggregation.ckks.params())
    store = RunStore(config.run_dir)
    store.write_context(context_bytes(audit_facts(config)))
    for name in config.institution_names:
        budget = config.budget(name)
        ledger = Ledger(
            ledger_path(config.run_dir, name), institution=name,
            identity=load_institution_keys(config.keys_dir, name).identity,
            budget_epsilon=budget.target_epsilon, delta=budget.target_delta,
            accountant=config.privacy.accountant,
        )  # fmt: skip
        facts = DPTrainingFacts(1.2, 0.125, 3, 1.0, budget.target_delta)
        for r in (1, 2, 3) if name == "histories" else (1,):  # fewer: pricing takes 0.4 s each
            rid = r << 16
            ledger.charge([
                facts.release(r, rid),
                Release(r, rid, ROUTING_STATISTICS, dp_accounting.GaussianDpEvent(10.0)),
            ])  # fmt: skip
        store.save_head(ledger.head())
    assert main(["audit", "report", str(config.run_dir)]) == 0
    empirical = ["audit", "empirical", str(config.run_dir), "--institution", "histories",
                 "--canaries", "200"]  # fmt: skip
    assert main(empirical) == 0  # adds its result to the report
    return config.run_dir


def test_report_json_holds_every_required_field(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    for field in REQUIRED_FIELDS:
        assert report[field], field
    assert "one record of the institution's dataset" in report["unit_of_privacy"]
    assert "at most 32 tokens" in report["unit_of_privacy"]
    assert "add or remove one record" in report["neighbouring_relation"]
    trust = report["trust_model"]
    assert trust["secagg_threshold"] == 3 and trust["secagg_share_holders"] == 3
    assert "shared-key" in trust["ckks_key_custody"]
    assert "sum" in trust["coordinator_sees"]
    assert {r["what"].split(" ")[0] for r in report["releases"]} >= {"adapter", "routing"}
    assert all(r["to_whom"] for r in report["releases"])
    assert report["accountant"]["enforcing"] == "pld"
    assert report["accountant"]["reported"] == ["rdp", "pld"]
    assert report["software"]["dp-accounting"] and report["software"]["python"]
    assert report["dp_sgd"]["max_grad_norm"] == 1.0
    histories = next(i for i in report["institutions"] if i["name"] == "histories")
    assert histories["budget"] == {"epsilon": 4.0, "delta": 1e-5}
    assert histories["verification"]["status"] == "verified"
    assert "coordinator's signed head" in histories["verification"]["detail"]
    assert [r["round"] for r in histories["rounds"]] == [1, 2, 3]
    enforcing = report["accountant"]["enforcing"]
    cumulative = [r["epsilon_cumulative"][enforcing] for r in histories["rounds"]]
    assert cumulative == sorted(cumulative) and cumulative[-1] == histories["spent"][enforcing]
    assert histories["remaining_epsilon"] == pytest.approx(4.0 - cumulative[-1])
    assert histories["rounds"][0]["epsilon_round"]["pld"] < histories["rounds"][0][
        "epsilon_round"]["rdp"]  # fmt: skip
    assert histories["dp_sgd"]["noise_multiplier"] == 1.2
    (audit,) = report["empirical_audit"]  # next to the accountant's bound for the same training
    assert (audit["noise_multiplier"], audit["steps"], audit["canaries"]) == (1.2, 9, 200)
    assert 0 <= audit["epsilon_lower_bound"] < audit["epsilon_upper_bound"]
    assert "Empirical privacy audit" in (run_dir / "report.html").read_text()
    markdown = (run_dir / "report.md").read_text()
    assert "## Trust model" in markdown and "report-plots/epsilon-histories.png" in markdown


def test_report_says_the_example_weights_are_public_and_gives_them(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    weights = report["example_weights"]
    assert weights["kind"].startswith("public, declared in the federation config")
    assert weights["values"] == {"comedies": 1.0, "tragedies": 1.0, "histories": 1.0}
    markdown = (run_dir / "report.md").read_text()
    assert "## Example weights" in markdown
    assert "public, declared in the federation config" in markdown
    assert (
        "weight of histories" in markdown
        and "Example weights" in (run_dir / "report.html").read_text()
    )


def test_a_context_without_declared_weights_is_not_reported_as_public(run_dir, tmp_path):
    copy = copy_of(run_dir, tmp_path)
    context = json.loads((copy / "audit-context.json").read_text())
    for inst in context["institutions"]:
        del inst["weight"]  # as written before weights were declared in the config
    (copy / "audit-context.json").write_text(json.dumps(context))
    assert main(["audit", "report", str(copy)]) == 0
    weights = json.loads((copy / "report.json").read_text())["example_weights"]
    assert weights["kind"].startswith("not stated") and weights["values"] == {}


def test_the_html_report_renders_offline_in_chromium_with_visible_plots(run_dir, tmp_path):
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is missing: `make install` installs it (apt-get)"
    page = (run_dir / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # no network assets
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--disable-dev-shm-usage", "--window-size=1280,7000",
             f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    url = (run_dir / "report.html").as_uri()
    dom = subprocess.run(
        [*flags, "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    rendered = re.findall(r'id="plot-([^"]+)"[^>]*data-rendered="([^"]+)"', dom) or [
        (m[1], m[0]) for m in re.findall(r'data-rendered="([^"]+)"[^>]*id="plot-([^"]+)"', dom)
    ]
    names = {name for name, _ in rendered}
    assert names == {"remaining", "epsilon-comedies", "epsilon-tragedies", "epsilon-histories"}
    for _, size in rendered:
        width, height = (int(v) for v in size.split("x"))
        assert width >= 600 and height >= 200  # laid out at their CSS size, not broken images
    assert '<p class="warn">' not in dom  # the page's own check found no broken plot
    shot = tmp_path / "report.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True
    )
    pixels = imread(shot)[..., :3]
    for colour in ("rdp", "pld", "budget"):  # pld is drawn only in the per-institution plots
        rgb = np.array([int(COLOURS[colour][i : i + 2], 16) / 255 for i in (1, 3, 5)])
        close = np.abs(pixels - rgb).max(axis=-1) < 0.06
        assert close.sum() > 2000, f"the {colour} curve is not visible in the screenshot"
    shutil.copy(shot, run_dir / "screenshot.png")


def test_report_says_what_the_coordinator_sees_under_ckks_expert_updates(run_dir, tmp_path):
    copy = copy_of(run_dir, tmp_path)
    context = json.loads((copy / "audit-context.json").read_text())
    assert context["expert_updates"] == "mask"
    before = json.loads((copy / "report.json").read_text())
    context["expert_updates"] = "ckks"
    (copy / "audit-context.json").write_text(json.dumps(context))
    assert main(["audit", "report", str(copy)]) == 0
    after = json.loads((copy / "report.json").read_text())
    assert "masked adapter updates" in before["trust_model"]["coordinator_sees"]
    assert "global adapters only as ciphertexts" in after["trust_model"]["coordinator_sees"]
    update = next(r for r in after["releases"] if r["what"].startswith("adapter"))
    assert update["to_whom"].startswith("encrypted (CKKS)")


# ------------------------------------------------------------------ what a regulator reads


def _report_texts(run_dir: Path) -> dict[str, str]:
    return {n: (run_dir / n).read_text() for n in ("report.html", "report.json", "report.md")}


def test_report_opens_with_a_plain_summary_and_says_epsilons_compose(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    summary = " ".join(report["summary"])
    assert "differentially private with respect to any single record" in summary
    assert "one record, not one person" in summary
    assert "histories: ε = " in summary and "of a budget of 4" in summary
    assert "not added up" in report["accountant"]["composition"]
    html_page = (run_dir / "report.html").read_text()
    assert html_page.index("id='summary'") < html_page.index("<h2>Budgets</h2>")
    for text in _report_texts(run_dir).values():
        assert "compose" in text and ("not add" in text or "not added" in text)


def test_report_names_dataset_sizes_model_commit_and_every_library(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    histories = next(i for i in report["institutions"] if i["name"] == "histories")
    # q = 0.125 in the ledger, B = 8 in tiny.toml: N = B / q, already public; no new release
    assert report["dp_sgd"]["batch_size"] == 8
    assert histories["dataset"]["training_records"] == 64
    assert "not a new release" in histories["dataset"]["how"]
    assert histories["dataset"]["declared_cap"] == 1024
    for package in ("torch", "transformers", "peft", "opacus", "tenseal", "cryptography",
                    "pyzmq", "dp-accounting", "msgspec", "python"):  # fmt: skip
        assert report["software"][package], package
    provenance = report["provenance"]
    assert provenance["base_model"] == "'tiny-dense'"
    assert "built-in random model" in provenance["base_model_note"]
    commit = provenance["sealmoe_git_commit"]
    assert commit == "not a git checkout" or re.match(r"^[0-9a-f]{40}", commit)
    markdown = (run_dir / "report.md").read_text()
    assert "## Datasets" in markdown and "64 training records" in markdown
    assert "## Base model and source" in markdown and "transformers" in markdown
    audit = report["empirical_audit"][0]["audits"]
    assert "DP-SGD mechanism alone" in audit and "does not audit this run's model" in audit
    assert "DP-SGD mechanism only" in (run_dir / "report.html").read_text()


def test_report_shows_only_relative_paths_and_rounded_numbers(run_dir):
    absolute = str(run_dir.resolve())
    for name, text in _report_texts(run_dir).items():
        assert absolute not in text and str(run_dir.parent) not in text, name
    report = json.loads((run_dir / "report.json").read_text())
    assert report["run_dir"] == run_dir.name
    ledgers = {i["ledger"] for i in report["institutions"]}
    assert "institutions/histories/ledger.jsonl" in ledgers
    markdown = (run_dir / "report.md").read_text()
    assert not re.search(r"\d\.\d{6,}", markdown)  # no long floats in what a reader sees


def test_report_carries_the_base_model_hash_recorded_at_run_start(tmp_path, run_dir):
    from audit.context import ModelFacts
    from clients.models.locate import weights_sha256
    from coordinator.facts import base_model_facts

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    config = load_config(run_dir.parent / "federation.toml")
    model = type(config.model)(name=str(folder))
    import msgspec

    facts = base_model_facts(msgspec.structs.replace(config, model=model))
    assert facts.sha256 == weights_sha256(folder) and len(facts.sha256) == 64
    copy = copy_of(run_dir, tmp_path)
    context = json.loads((copy / "audit-context.json").read_text())
    context["base_model"] = msgspec.to_builtins(ModelFacts(name="my-model", sha256=facts.sha256))
    (copy / "audit-context.json").write_text(json.dumps(context))
    assert main(["audit", "report", str(copy)]) == 0
    for text in _report_texts(copy).values():
        assert facts.sha256 in text


# ------------------------------------------------------------------ the report's signature


def test_an_untampered_signed_report_verifies(run_dir, capsys):
    assert (run_dir / "report.html.sig").exists()
    assert main(["audit", "verify", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "OK: 3 ledgers verify" in out and "report.html" in out


def test_a_report_changed_by_one_byte_fails_verify(run_dir, tmp_path, capsys):
    copy = copy_of(run_dir, tmp_path)
    page = bytearray((copy / "report.html").read_bytes())
    at = page.index(b"Summary")
    page[at] ^= 0x01
    (copy / "report.html").write_bytes(bytes(page))
    assert main(["audit", "verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "report.html" in err and "changed after it was signed" in err


def test_a_report_signed_by_another_key_or_unsigned_fails_verify(run_dir, tmp_path, capsys):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from audit.signature import sign_file
    from audit.signature import signature_path

    copy = copy_of(run_dir, tmp_path)
    sign_file(copy / "report.html", Ed25519PrivateKey.generate())
    assert main(["audit", "verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "report.html" in err and "not the coordinator's" in err
    signature_path(copy / "report.html").unlink()
    assert main(["audit", "verify", str(copy)]) == 1
    assert "report.html.sig is missing" in capsys.readouterr().err


def test_a_report_written_without_the_coordinator_key_is_unsigned(run_dir, tmp_path, capsys):
    copy = copy_of(run_dir, tmp_path)
    keys = run_dir.parent / "keys"
    roster = tmp_path / "roster.toml"  # the roster alone, as a privacy officer's host holds it
    shutil.copy(keys / "roster.toml", roster)
    assert main(["audit", "report", str(copy), "--roster", str(roster)]) == 0
    assert "NOT signed" in capsys.readouterr().out
    assert not (copy / "report.html.sig").exists()  # the old signature went with the old page
    assert main(["audit", "verify", str(copy), "--roster", str(roster)]) == 1


def test_audit_verify_of_a_run_directory_does_not_import_torch(run_dir):
    code = (
        "import sys; from coordinator.app.cli import main; "
        f"rc = main(['audit', 'verify', {str(run_dir)!r}]); print(rc, 'torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "0 False"


def test_a_deleted_ledger_with_heads_on_file_is_a_failed_verification(run_dir, tmp_path, capsys):
    copy = copy_of(run_dir, tmp_path)
    ledger_path(copy, "comedies").unlink()  # its head is on file: it released something
    assert main(["audit", "report", str(copy)]) == 0
    report = json.loads((copy / "report.json").read_text())
    comedies = next(i for i in report["institutions"] if i["name"] == "comedies")
    assert comedies["verification"]["status"] == "FAILED"
    detail = comedies["verification"]["detail"]
    assert detail.startswith("failed verification: the ledger") and "was deleted" in detail
    assert "released nothing" not in json.dumps(comedies)
    assert comedies["remaining_epsilon"] is None and comedies["spent"] == {}  # unknown
    assert "failed verification" in (copy / "report.md").read_text()
    # every other institution still verifies against its heads
    others = [i for i in report["institutions"] if i["name"] != "comedies"]
    assert {i["verification"]["status"] for i in others} == {"verified"}
    # and `audit verify` of the whole run directory exits 1, naming it
    roster = Path(json.loads((copy / "audit-context.json").read_text())["roster"])
    verify = ["audit", "verify", "--run-dir", str(copy), "--roster", str(roster)]
    assert main(verify) == 1
    err = capsys.readouterr().err
    assert "comedies: the ledger is missing" in err and "1 of 3 ledgers do not verify" in err
