"""The privacy plan as the console shows it (``sealmoe plan``, and ``sealmoe run`` at start)."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from clients.contract.config import FederationConfig
from clients.runtime.plan import CANNOT_LEARN
from clients.runtime.plan import SLOW
from clients.runtime.plan import InstitutionPlan


def plan_table(config: FederationConfig, plans: list[InstitutionPlan]) -> Table:
    """One row per institution, fitting 80 columns."""
    enforcing = config.privacy.accountant.upper()
    table = Table(
        title=f"privacy plan: {plans[0].steps} DP-SGD steps each, {enforcing} enforces",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("institution", no_wrap=True)
    for column in ("records", "rate q", "sigma", "eps PLD\n(budget)", "eps\nRDP", "noise/\nsignal"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("plan", no_wrap=True)
    for p in plans:
        verdict = p.verdict()
        style = {"can learn": "green", "slow": "yellow"}.get(verdict, "red")
        table.add_row(
            p.name, f"{p.records:,}", f"{p.sample_rate:.3g}", f"{p.noise_multiplier:.3g}",
            f"{p.epsilon_pld:.3g} ({p.budget_epsilon:g})", f"{p.epsilon_rdp:.3g}",
            f"{p.noise_to_signal:.3g}", Text(verdict, style=style),
        )  # fmt: skip
    return table


def print_plan(console: Console, config: FederationConfig, plans: list[InstitutionPlan]) -> int:
    """Print the plan, its meaning and suggestions; 1 if some institution cannot learn."""
    console.print(plan_table(config, plans))
    console.print(
        f"{plans[0].trainable_parameters:,} trainable parameters. noise/signal: the expected "
        "norm of the DP noise over the largest signal of the gradient averaged over the whole "
        f"plan; above {SLOW:g} learning is slow, above {CANNOT_LEARN:g} it is not expected "
        "(a rule of thumb from measured runs, see clients/runtime/plan.py).",
        highlight=False,
        markup=False,
    )
    stuck = [p for p in plans if p.verdict() != "can learn"]
    for p in stuck:
        console.print(Text(f"{p.name}: {p.verdict()}; to lower noise/signal:", style="yellow"))
        for suggestion in p.suggestions():
            console.print(f"  - {suggestion}", highlight=False, markup=False)
    return 1 if any(p.verdict() == "cannot learn" for p in plans) else 0
