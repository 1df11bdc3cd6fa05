"""The privacy report as files: ``report.json``, ``report.html`` and ``report.md``.

The HTML is one self-contained file (plots are PNGs embedded as data URIs, styles inline, no
network asset) so it opens offline; a few lines of script mark each plot with its rendered size
and print a warning in the page if one fails to decode. The Markdown links the same plots,
written beside it under ``report-plots/``. Every number shown is in ``report.json``.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PLOTS_DIR = "report-plots"
COLOURS = {"rdp": "#d62728", "pld": "#1f77b4", "budget": "#2ca02c"}
"""Fixed colours, so a reader (and the rendering test) can tell the curves apart."""


def _num(value: float | None, digits: int = 4) -> str:
    return "unbounded" if value is None else f"{value:.{digits}g}"


def _value(value: Any) -> str:
    """A table cell: floats rounded to 4 significant digits (report.json keeps them exact)."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_value(v) for v in value)
    return str(value)


def _png(figure: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def epsilon_plot(institution: dict[str, Any], accountant: str) -> bytes:
    """Cumulative epsilon after each charged round (RDP and PLD) against the budget."""
    figure, ax = plt.subplots(figsize=(6.4, 3.6))
    rounds = institution["rounds"]
    x = list(range(len(rounds) + 1))
    labels = ["start"] + [f"r{r['round']}" + (f"·{r['attempt']}" if r["attempt"] else "")
                          for r in rounds]  # fmt: skip
    for name in ("rdp", "pld"):
        ys = [0.0] + [r["epsilon_cumulative"][name] for r in rounds]
        style = "-" if name == accountant else "--"
        enforcing = " (enforced)" if name == accountant else ""
        ax.plot(x, ys, style, marker="o", color=COLOURS[name], linewidth=2.5,
                label=f"{name.upper()}{enforcing}")  # fmt: skip
    budget = institution["budget"]["epsilon"]
    ax.axhline(budget, color=COLOURS["budget"], linewidth=2.5, label=f"budget ε = {budget:g}")
    ax.set_xticks(x, labels)
    ax.set_xlabel("after round (·attempt)")
    ax.set_ylabel(f"cumulative ε at δ = {institution['budget']['delta']:g}")
    ax.set_ylim(0, budget * 1.15)
    ax.set_title(f"{institution['name']}: privacy spent over rounds")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    figure.tight_layout()
    return _png(figure)


def remaining_plot(report: dict[str, Any]) -> bytes:
    """Spent and remaining budget per institution (enforcing accountant)."""
    accountant = report["accountant"]["enforcing"]
    institutions = report["institutions"]
    names = [i["name"] for i in institutions]
    spent = [min(i["spent"].get(accountant) or i["budget"]["epsilon"], i["budget"]["epsilon"])
             for i in institutions]  # fmt: skip
    remaining = [i["remaining_epsilon"] or 0.0 for i in institutions]
    figure, ax = plt.subplots(figsize=(6.4, 0.6 * len(names) + 1.6))
    ax.barh(names, spent, color=COLOURS["rdp" if accountant == "rdp" else "pld"], label="spent")
    ax.barh(names, remaining, left=spent, color=COLOURS["budget"], label="remaining")
    ax.set_xlabel(f"ε ({accountant.upper()}) of each institution's budget")
    ax.set_title("budget spent and remaining")
    ax.legend(loc="lower right")
    figure.tight_layout()
    return _png(figure)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _sections(report: dict[str, Any]) -> list[tuple[str, list[tuple[str, str]] | None, Any]]:
    """(title, key/value rows or None, tables) shared by HTML and Markdown."""
    trust = report["trust_model"]
    acc = report["accountant"]
    dp = report["dp_sgd"]
    routed = any(r["what"].startswith("routing") for r in report["releases"])
    return [
        ("Unit of privacy", [("unit of privacy", report["unit_of_privacy"]),
                             ("neighbouring relation", report["neighbouring_relation"])], None),
        ("Trust model", [(k.replace("_", " "), _value(v)) for k, v in trust.items()], None),
        ("Accountant", [(k.replace("_", " "), _value(v)) for k, v in acc.items()], None),
        ("DP-SGD", [(k.replace("_", " "), _value(v)) for k, v in dp.items()]
         + ([("routing noise multiplier",
              _value(report["routing_statistics"]["noise_multiplier"]))] if routed else []),
         None),
        ("Datasets", _dataset_rows(report), None),
        ("Base model and source", [(k.replace("_", " "), _value(v))
                                   for k, v in report.get("provenance", {}).items()], None),
        ("Example weights", [("example weights", report["example_weights"]["kind"])]
         + [(f"weight of {name}", f"{w:g}")
            for name, w in report["example_weights"]["values"].items()], None),
        ("Software", [(k, v) for k, v in report["software"].items()], None),
    ]  # fmt: skip


def _dataset_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """Each institution's number of training records as the public record already states it."""
    rows = []
    for inst in report["institutions"]:
        data = inst.get("dataset") or {}
        if not data:
            continue
        records = data["training_records"]
        size = f"{records:,} training records" if records is not None else "not stated"
        rows.append((inst["name"], f"{size}: {data['how']}; {data['cap_note']}"))
    return rows


def _release_rows(report: dict[str, Any]) -> list[list[str]]:
    return [[r["what"], r["mechanism"], r["to_whom"]] for r in report["releases"]]


def _summary_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for i in report["institutions"]:
        rows.append([
            i["name"], f"{i['budget']['epsilon']:g}", f"{i['budget']['delta']:g}",
            _num(i["spent"].get("rdp")), _num(i["spent"].get("pld")),
            _num(i["remaining_epsilon"]), str(i["refusals"]),
            f"{i['verification']['status']}: {i['verification']['detail']}",
        ])  # fmt: skip
    return rows


SUMMARY_HEADER = ["institution", "budget ε", "δ", "spent ε (RDP)", "spent ε (PLD)",
                  "remaining ε", "refusals", "ledger"]  # fmt: skip
ROUND_HEADER = ["round", "attempt", "released", "ε this round (RDP)", "ε this round (PLD)",
                "cumulative ε (RDP)", "cumulative ε (PLD)"]  # fmt: skip
ENTRY_HEADER = ["#", "kind", "round", "what", "cumulative ε (RDP)", "cumulative ε (PLD)",
                "reason"]  # fmt: skip
EMPIRICAL_HEADER = ["what it audits", "canaries", "guesses", "correct", "confidence",
                    "empirical ε lower bound", "accountant ε upper bound"]  # fmt: skip


COMPOSITION = (
    "ε this round: the round's releases alone. Cumulative ε: all releases so far composed by "
    "the accountant, which is less than the sum of the rounds' ε (they compose, not add)."
)


def _round_rows(inst: dict[str, Any]) -> list[list[str]]:
    return [[str(r["round"]), str(r["attempt"]), ", ".join(r["released"]),
             _num(r["epsilon_round"]["rdp"]), _num(r["epsilon_round"]["pld"]),
             _num(r["epsilon_cumulative"]["rdp"]), _num(r["epsilon_cumulative"]["pld"])]
            for r in inst["rounds"]]  # fmt: skip


def _entry_rows(inst: dict[str, Any]) -> list[list[str]]:
    return [[str(e["seq"]), e["kind"], str(e["round"]), e["what"], _num(e["epsilon"]["rdp"]),
             _num(e["epsilon"]["pld"]), e["reason"] or ""] for e in inst["entries"]]  # fmt: skip


def _empirical_rows(report: dict[str, Any]) -> list[list[str]]:
    return [[a.get("audits", a["label"]), str(a["canaries"]), str(a["guesses"]), str(a["correct"]),
             f"{a['confidence']:g}", _num(a["epsilon_lower_bound"]),
             _num(a["epsilon_upper_bound"])] for a in report["empirical_audit"]]  # fmt: skip


def _params(inst: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [(f"DP-SGD {k.replace('_', ' ')}", _value(v)) for k, v in inst["dp_sgd"].items()]
    for label, key in (
        ("routing", "routing"),
        ("scores", "scores"),
        ("keys", "keys"),
        ("expert choice", "choice"),
        ("validation signal", "validation"),
    ):
        rows += [(f"{label} {k.replace('_', ' ')}", _value(v))
                 for k, v in inst.get(key, {}).items()]  # fmt: skip
    return rows


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #eee; }
img.plot { display: block; width: 640px; height: auto; margin: 0.5em 0; }
.warn { color: #b00; font-weight: bold; }
"""
SELF_CHECK = """
window.addEventListener("load", function () {
  document.querySelectorAll("img.plot").forEach(function (img) {
    var box = img.getBoundingClientRect();
    var ok = img.complete && img.naturalWidth > 0;
    img.dataset.rendered = ok ? Math.round(box.width) + "x" + Math.round(box.height) : "failed";
    if (!ok) {
      var warn = document.createElement("p");
      warn.className = "warn";
      warn.textContent = "This plot did not render; its numbers are in the tables below.";
      img.after(warn);
    }
  });
});
"""


def _kv_html(rows: list[tuple[str, str]]) -> str:
    return _table(["item", "value"], [[k, v] for k, v in rows])


def render_html(report: dict[str, Any], plots: dict[str, bytes]) -> str:
    """The whole report as one offline HTML page."""

    def img(key: str, alt: str) -> str:
        data = base64.b64encode(plots[key]).decode()
        return f'<img class="plot" id="plot-{html.escape(key)}" alt="{html.escape(alt)}" ' \
               f'src="data:image/png;base64,{data}">'  # fmt: skip

    fed = report["federation"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(report['title'])}</title><style>{STYLE}</style>",
        f"<script>{SELF_CHECK}</script></head><body>",
        f"<h1>{html.escape(report['title'])}</h1>",
        "<section id='summary'><h2>Summary</h2>",
        *(f"<p>{html.escape(p)}</p>" for p in report.get("summary", [])),
        "</section>",
        f"<p>Generated {html.escape(report['generated_at'])} from the run directory "
        f"{html.escape(report['run_dir'])}; {fed['rounds']} rounds planned "
        f"(+{fed['spare_rounds']} spare), {fed['institutions']} institutions. Paths below are "
        "relative to the run directory.</p>",
        "<h2>Budgets</h2>", img("remaining", "spent and remaining budget per institution"),
        _table(SUMMARY_HEADER, _summary_rows(report)),
        "<h2>What is released, and to whom</h2>",
        _table(["release", "mechanism", "to whom"], _release_rows(report)),
    ]  # fmt: skip
    for title, rows, _ in _sections(report):
        parts += [f"<h2>{html.escape(title)}</h2>", _kv_html(rows or [])]
    if report["empirical_audit"]:
        parts += ["<h2>Empirical privacy audit (DP-SGD mechanism only)</h2>",
                  "<p>A lower bound on ε measured with canaries (Steinke, Nasr and Jagielski "
                  "2023, one training run), next to the accountant's upper bound for the same "
                  "training. It audits only what its first column says.</p>",
                  _table(EMPIRICAL_HEADER, _empirical_rows(report))]  # fmt: skip
    for inst in report["institutions"]:
        name, check = inst["name"], inst["verification"]
        parts += [
            f"<h2>Institution {html.escape(name)}</h2>",
            f"<p>Ledger {html.escape(inst['ledger'])}: <b>{html.escape(check['status'])}</b>"
            f" ({html.escape(check['detail'])}).</p>",
            img(f"epsilon-{name}", f"cumulative epsilon of {name} against its budget"),
            "<h3>Per round</h3>", f"<p>{html.escape(COMPOSITION)}</p>",
            _table(ROUND_HEADER, _round_rows(inst)),
            "<h3>Mechanism parameters</h3>", _kv_html(_params(inst)),
            "<h3>Ledger entries</h3>", _table(ENTRY_HEADER, _entry_rows(inst)),
        ]  # fmt: skip
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown, linking the plots under ``report-plots/``."""
    lines = [f"# {report['title']}", "", "## Summary", ""]
    for paragraph in report.get("summary", []):
        lines += [paragraph, ""]
    lines += [f"Generated {report['generated_at']} from the run directory {report['run_dir']} "
              "(paths are relative to it).", "",
             "## Budgets", "", f"![budgets]({PLOTS_DIR}/remaining.png)", "",
             _md_table(SUMMARY_HEADER, _summary_rows(report)), "",
             "## What is released, and to whom", "",
             _md_table(["release", "mechanism", "to whom"], _release_rows(report)), ""]  # fmt: skip
    for title, rows, _ in _sections(report):
        lines += [
            f"## {title}",
            "",
            _md_table(["item", "value"], [list(r) for r in rows or []]),
            "",
        ]
    if report["empirical_audit"]:
        lines += ["## Empirical privacy audit (DP-SGD mechanism only)", "",
                  _md_table(EMPIRICAL_HEADER, _empirical_rows(report)), ""]  # fmt: skip
    for inst in report["institutions"]:
        name = inst["name"]
        lines += [f"## Institution {name}", "",
                  f"Ledger `{inst['ledger']}`: **{inst['verification']['status']}** "
                  f"({inst['verification']['detail']}).", "",
                  f"![epsilon of {name}]({PLOTS_DIR}/epsilon-{name}.png)", "",
                  "### Per round", "", COMPOSITION, "",
                  _md_table(ROUND_HEADER, _round_rows(inst)), "",
                  "### Mechanism parameters", "",
                  _md_table(["item", "value"], [list(r) for r in _params(inst)]), "",
                  "### Ledger entries", "",
                  _md_table(ENTRY_HEADER, _entry_rows(inst)), ""]  # fmt: skip
    return "\n".join(lines)


def write_report(run_dir: str | Path, report: dict[str, Any]) -> list[Path]:
    """Write report.json, report.html, report.md and the plots into ``run_dir``."""
    run_dir = Path(run_dir)
    accountant = report["accountant"]["enforcing"]
    plots = {"remaining": remaining_plot(report)}
    for inst in report["institutions"]:
        plots[f"epsilon-{inst['name']}"] = epsilon_plot(inst, accountant)
    folder = run_dir / PLOTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for key, data in plots.items():
        (folder / f"{key}.png").write_bytes(data)
    out = {
        "report.json": json.dumps(report, indent=1, sort_keys=True, allow_nan=False) + "\n",
        "report.html": render_html(report, plots),
        "report.md": render_markdown(report),
    }
    for name, text in out.items():
        (run_dir / name).write_text(text, encoding="utf-8")
    return [run_dir / name for name in out]
