"""The package's layers and the arrows they may not draw (README, "Design"), checked on every import.

Each module of ``workbench/`` is parsed with :mod:`ast` (module-level imports and the lazy ones inside
functions alike) and every ``workbench.*`` import is checked against :data:`FORBIDDEN`: viz draws data it is
given and never runs an engine or an experiment; experiments never draw; engines never reach for the
trainer; the core (``dvp``, ``importance``, ``rloo``, ``metrics``) imports nothing above it; the
integrations never import the trainer; the run's config (``config.py``) is data and never imports the loop,
so the exercises can check a learner's :class:`~workbench.config.RLOOConfig` without the trainer. The CLI and
the notebooks are the only places the layers meet.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "workbench"

CORE = ("dvp", "importance", "rloo", "metrics")
ABOVE_CORE = frozenset(
    {"analysis", "cli", "config", "docs", "engines", "exercises", "experiments", "integrations", "models", "sft",
     "tasks", "theory", "trainer", "viz"}
)  # fmt: skip

#: ``layer: (layers it must not import, why)``. A layer is a module or package directly under ``workbench``.
FORBIDDEN: dict[str, tuple[frozenset[str], str]] = {
    **{core: (ABOVE_CORE, "the core is pure tensor functions: it imports nothing above it") for core in CORE},
    "analysis": (
        frozenset({"cli", "engines", "experiments", "integrations", "sft", "trainer", "viz"}),
        "analysis measures logits it is given with the core and theory; it runs nothing",
    ),
    "engines": (
        frozenset({"cli", "experiments", "integrations", "sft", "trainer", "viz"}),
        "engines never import the trainer (it talks to them through the protocol)",
    ),
    "trainer": (frozenset({"cli", "experiments", "viz"}), "the trainer is the loop; it never draws"),
    "integrations": (
        frozenset({"cli", "experiments", "sft", "trainer", "viz"}),
        "integrations call the core's corrected batch; they never import the trainer",
    ),
    "viz": (
        frozenset({"cli", "engines", "experiments"}),
        "viz draws the data it is given: it never runs an engine or an experiment (the CLI and notebooks compose)",
    ),
    "experiments": (
        frozenset({"cli", "viz"}),
        "experiments return data; viz draws it (the CLI and notebooks compose them)",
    ),
    "config": (
        frozenset({"cli", "experiments", "integrations", "sft", "trainer", "viz"}),
        "the config is data: it validates with the core (and the engines' perturbation parser), never the loop",
    ),
    "exercises": (
        frozenset({"cli", "engines", "experiments", "trainer", "viz"}),
        "checkers compare with the core (a config comes from workbench.config, not the trainer)",
    ),
}


def layer_of(module: str) -> str | None:
    """``workbench.viz.explore`` → ``"viz"``; ``None`` outside the package."""
    parts = module.split(".")
    return parts[1] if parts[0] == "workbench" and len(parts) > 1 else None


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """Every ``workbench.*`` module a parsed file imports, with its line (``from workbench import x`` → ``workbench.x``)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("workbench")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "workbench":
                found += [(node.lineno, f"workbench.{a.name}") for a in node.names]
            elif node.module.startswith("workbench."):
                found.append((node.lineno, node.module))
    return found


def violations(root: Path) -> list[str]:
    """``"path:line: a imports b — why"`` for every forbidden import under ``root`` (a ``workbench/`` tree)."""
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent)
        source_layer = layer_of(".".join(rel.with_suffix("").parts))
        forbidden, why = FORBIDDEN.get(source_layer or "", (frozenset(), ""))
        for line, target in imported_modules(ast.parse(path.read_text(encoding="utf-8"))):
            if layer_of(target) in forbidden:
                out.append(f"{rel}:{line}: {source_layer} imports {target} — {why}")
    return out


def test_no_layer_imports_one_it_may_not() -> None:
    found = violations(ROOT)
    assert not found, "forbidden imports between layers:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("path", "source", "caught"),
    [
        ("viz/fig.py", "def f():\n    from workbench.engines import make_engine\n", True),
        ("viz/fig.py", "from workbench import experiments\n", True),
        ("experiments/run.py", "import workbench.viz.figures\n", True),
        ("engines/e.py", "from workbench.trainer import RLOOConfig\n", True),
        ("dvp.py", "from workbench.theory import core\n", True),
        ("integrations/trl.py", "from workbench.trainer import RLOOTrainer\n", True),
        ("exercises/lessons.py", "def f():\n    from workbench.trainer import RLOOConfig\n", True),
        ("config.py", "from workbench.trainer import RLOOTrainer\n", True),
        ("rloo.py", "from workbench.config import RLOOConfig\n", True),
        ("exercises/lessons.py", "def f():\n    from workbench.config import RLOOConfig\n", False),
        ("config.py", "def f():\n    from workbench.engines import make_perturbation\n", False),
        (
            "viz/fig.py",
            "from workbench import dvp, metrics\nfrom workbench.analysis import rho_sweep\n",
            False,
        ),
        ("experiments/run.py", "from workbench.engines import make_engine\n", False),
        (
            "cli.py",
            "from workbench.viz import save_html\nfrom workbench.experiments import run_arms\n",
            False,
        ),
    ],
)
def test_the_check_catches_a_forbidden_arrow(tmp_path: Path, path: str, source: str, caught: bool) -> None:
    target = tmp_path / "workbench" / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(source, encoding="utf-8")
    assert bool(violations(tmp_path / "workbench")) is caught


# ---------------------------------------------------------------------------------------------- front doors

#: Where a notebook imports from: the package's front doors and the core modules the lessons teach by name.
FRONT_DOORS = frozenset(
    {"workbench", "workbench.analysis", "workbench.experiments", "workbench.viz", "workbench.exercises"}
    | {"workbench.theory"}
    | {f"workbench.{core}" for core in CORE}
)
NOTEBOOKS = sorted((ROOT.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebooks_import_through_the_front_doors(path: Path) -> None:
    import nbformat

    cells = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    code = "\n".join(
        line for cell in cells for line in cell.splitlines() if not line.lstrip().startswith(("%", "!"))
    )
    modules = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    behind = sorted(m for m in modules if m.split(".")[0] == "workbench" and m not in FRONT_DOORS)
    assert not behind, f"{path.name} imports {behind}; import from {sorted(FRONT_DOORS)} instead"


@pytest.mark.parametrize(
    "door",
    ["workbench", "workbench.analysis", "workbench.experiments", "workbench.viz", "workbench.exercises"],
)
def test_every_front_door_name_resolves(door: str) -> None:
    import importlib

    module = importlib.import_module(door)
    missing = [name for name in module.__all__ if getattr(module, name, None) is None]
    assert not missing, f"{door}.__all__ names {missing}, which it does not provide"
