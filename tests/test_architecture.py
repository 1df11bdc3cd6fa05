"""The import rules of the README's "Architecture" section, checked on every import statement.

Every ``import`` and ``from ... import`` in the five packages counts, also those inside
functions (lazy imports still make a dependency). A rule names, for a package or sub-package,
the project packages it may import; its own package is always allowed.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("secagg", "privacy", "audit", "clients", "coordinator")

# Most specific prefix first: the first rule whose prefix a module starts with applies.
RULES: list[tuple[str, tuple[str, ...]]] = [
    ("secagg", ()),
    ("privacy", ()),
    ("audit", ("secagg", "privacy")),
    ("clients.contract", ("secagg", "privacy")),
    ("clients.models", ("secagg", "privacy", "clients.contract")),
    ("clients.data", ("secagg", "privacy", "clients.contract")),
    ("clients.training", ("secagg", "privacy", "clients.contract", "clients.models")),
    (
        "clients.strategies",
        (
            "secagg",
            "privacy",
            "clients.contract",
            "clients.models",
            "clients.data",
            "clients.training",
        ),
    ),
    ("clients.runtime", ("secagg", "privacy", "clients")),
    ("clients", ("secagg", "privacy")),
    ("coordinator.strategies", ("secagg", "privacy", "clients", "audit.context")),
    ("coordinator.app", ("secagg", "privacy", "clients", "audit", "coordinator")),
    # the core (service, transport, store, simulation, facts): never the application layer
    ("coordinator", ("secagg", "privacy", "clients", "audit", "coordinator.strategies")),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _project_imports(path: Path) -> set[str]:
    """Every project module ``path`` imports (absolute names), lazy imports included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            submodules = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [node.module] + [m for m in submodules if _is_module(m)]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def _rule_for(module: str) -> tuple[str, tuple[str, ...]]:
    for prefix, allowed in RULES:
        if module == prefix or module.startswith(prefix + "."):
            return prefix, allowed
    raise AssertionError(f"no rule covers {module}")


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _own(name: str, home: str) -> bool:
    """Whether ``name`` is in the module's own package, outside the sub-packages that have
    rules of their own (``coordinator.service`` may not import ``coordinator.app``)."""
    nested = (p for p, _ in RULES if p.startswith(home + "."))
    return _within(name, home) and not any(_within(name, p) for p in nested)


def violations() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = _module_name(path)
            home, allowed = _rule_for(module)
            for name in sorted(_project_imports(path)):
                if _own(name, home) or any(_within(name, a) for a in allowed):
                    continue
                # ``from pkg import submodule`` names the package itself too: judge the submodule
                if any(_within(other, name + ".") for other in _project_imports(path)):
                    continue
                found.append(f"{module} imports {name} (allowed: {home}, {', '.join(allowed)})")
    return found


def test_every_import_follows_the_architecture_rules():
    assert violations() == []


def test_the_rule_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a contract module that imports the runtime is reported."""
    fake_root = tmp_path
    for package in PACKAGES:
        (fake_root / package).mkdir()
        (fake_root / package / "__init__.py").write_text("")
    (fake_root / "clients" / "contract").mkdir()
    (fake_root / "clients" / "contract" / "__init__.py").write_text("")
    (fake_root / "clients" / "contract" / "bad.py").write_text(
        "def f():\n    from clients.runtime.institution import Institution\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake_root)
    assert violations() == [
        "clients.contract.bad imports clients.runtime.institution "
        "(allowed: clients.contract, secagg, privacy)"
    ]


@pytest.mark.parametrize(
    "modules",
    [
        # the contract: what `sealmoe keys` and `check-config` read
        "clients.contract.config, clients.contract.keys, clients.contract.messages, "
        "clients.contract.layout, clients.contract.extras, clients.contract.framing",
        # the command's entry point (`sealmoe --help`) and the ledger that `audit verify` reads
        "coordinator.app.cli, audit, audit.verify, privacy",
    ],
)
def test_light_commands_start_without_torch(modules):
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
