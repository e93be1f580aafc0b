"""workbench.docs: the committed metrics glossary is the generated one, documented keys are exactly the emitted
ones, and the small notebook helpers (setup cell, skip list, output stripping) behave."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from workbench import docs
from workbench.trainer import RLOOConfig, RLOOTrainer, all_metric_docs

ROOT = Path(__file__).resolve().parents[1]
GLOSSARY = ROOT / "lessons" / "metrics.md"

# A fresh 64-id model on the probe bandit: one step takes well under a second.
PROBE = dict(model=None, vocab_size=64, task="probe", k=2, prompts_per_step=4, engine_dtype="bf16", seed=0)
# Configurations that together exercise every code path that emits metrics.
CONFIGS = (
    {},
    {"rho": None, "is_mode": "seq_mis", "veto": None},
    {"loss_type": "ppo_clip", "ppo_epochs": 2, "is_mode": "geo_mask", "advantage": "grpo"},
    {"perturbation": "gaussian:1.0", "is_mode": "token_tis"},
)


def test_committed_glossary_is_the_generated_one() -> None:
    assert GLOSSARY.is_file(), (
        "lessons/metrics.md is missing: python -m workbench.docs glossary lessons/metrics.md"
    )
    assert GLOSSARY.read_text(encoding="utf-8") == docs.metrics_glossary_markdown(), (
        "lessons/metrics.md is out of date; regenerate it: python -m workbench.docs glossary lessons/metrics.md"
    )


def test_glossary_has_one_row_per_documented_key() -> None:
    text = docs.metrics_glossary_markdown()
    rows = re.findall(r"^\| `([^`]+)` \|", text, flags=re.M)
    assert sorted(rows) == sorted(all_metric_docs())
    assert len(rows) == len(set(rows))


def test_every_key_is_namespaced_and_documented_once() -> None:
    prefixes = [p for p, _ in docs.GLOSSARY_SECTIONS]
    for key, meaning in all_metric_docs().items():
        assert any(key == p or (p.endswith("/") and key.startswith(p)) for p in prefixes), key
        assert len(meaning) > 15, f"{key}: say what it means and how it is estimated"
    seen: dict[str, str] = {}
    for symbol, (_, d) in docs.metric_doc_sources().items():
        for key in d:
            assert key not in seen, f"{key} is documented in both {seen[key]} and {symbol}"
            seen[key] = symbol


@pytest.fixture(scope="module")
def emitted() -> list[dict[str, float]]:
    return [RLOOTrainer(RLOOConfig(**{**PROBE, **extra})).step() for extra in CONFIGS]


def test_documented_and_emitted_keys_are_the_same_set(emitted: list[dict[str, float]]) -> None:
    documented = set(all_metric_docs())
    union = set().union(*emitted)
    assert union == documented, (
        f"emitted but undocumented: {sorted(union - documented)}; documented but never emitted: "
        f"{sorted(documented - union)}"
    )
    for m in emitted:
        assert set(m) <= documented
        assert all(isinstance(v, float) for v in m.values())


def test_write_metrics_glossary_is_atomic(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "metrics.md"
    docs.write_metrics_glossary(target)
    assert target.read_text(encoding="utf-8") == docs.metrics_glossary_markdown()
    assert [p.name for p in target.parent.iterdir()] == ["metrics.md"]  # no temp file left behind
    assert docs.main(["glossary", str(target)]) == 0
    assert docs.main(["nonsense"]) == 2


def test_colab_setup_cell_installs_only_when_missing() -> None:
    src = docs.colab_setup_source()
    assert f'REPO_URL = "{docs.REPO_URL}"' in src
    assert 'find_spec("workbench") is None' in src and '"pip", "install"' in src and "git+{REPO_URL}" in src
    compile(src, "<setup>", "exec")  # plain Python: no magics
    assert "enable_custom_widget_manager" in src  # widgets render in Colab
    assert docs.colab_setup_source("https://example.org/x/y").count("https://example.org/x/y") == 1
    with pytest.raises(ValueError, match="repo_url"):
        docs.colab_setup_source('https://x"; rm -rf /')


def test_skip_list_parser(tmp_path: Path) -> None:
    f = tmp_path / "SKIPPED.md"
    f.write_text(
        "# t\n\n| notebook | reason |\n|---|---|\n| `09_gpu.ipynb` | needs CUDA and vllm |\n| 10_x.ipynb | slow |\n"
    )
    assert docs.skipped_notebooks(f) == {"09_gpu.ipynb": "needs CUDA and vllm", "10_x.ipynb": "slow"}
    assert docs.notebook_skip_reason(tmp_path / "09_gpu.ipynb", f) == "needs CUDA and vllm"
    assert docs.notebook_skip_reason("00_tour.ipynb", f) is None
    f.write_text("| `a.ipynb` |  |\n")
    with pytest.raises(ValueError, match="without a reason"):
        docs.skipped_notebooks(f)
    f.write_text("| a.ipynb | x |\n| a.ipynb | y |\n")
    with pytest.raises(ValueError, match="twice"):
        docs.skipped_notebooks(f)
    with pytest.raises(ValueError, match="does not exist"):
        docs.skipped_notebooks(tmp_path / "nope.md")


def test_strip_outputs_cleans_a_notebook(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("1 + 1")
    cell.execution_count = 3
    cell.outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "2"}, execution_count=3)]
    nb.cells = [nbformat.v4.new_markdown_cell("# hi"), cell]
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    path = tmp_path / "x.ipynb"
    nbformat.write(nb, path)
    assert docs.strip_outputs(path) is True
    clean = nbformat.read(path, as_version=4)
    assert clean.cells[1].outputs == [] and clean.cells[1].execution_count is None
    assert "widgets" not in clean.metadata and clean.cells[1].source == "1 + 1"
    assert docs.strip_outputs(path) is False  # idempotent


def test_environment_summary_reports_versions_and_device() -> None:
    env = docs.environment_summary()
    for key in ("python", "torch", "transformers", "workbench", "device", "shipped policies"):
        assert env[key], key
    assert env["device"] == "cpu" or env["device"].startswith("cuda")


def test_metric_keys_named_in_lessons_00_to_05_exist() -> None:
    """A lesson that names a metric key the trainer does not emit sends the reader looking for nothing."""
    from workbench.exercises import EXERCISES

    documented = set(all_metric_docs())
    prefixes = tuple(p for p, _ in docs.GLOSSARY_SECTIONS if p.endswith("/"))
    for stem in EXERCISES:
        text = (ROOT / "lessons" / f"{stem}.md").read_text(encoding="utf-8")
        named = {k for k in re.findall(r"`([a-z_]+/[a-z0-9_]+)`", text) if k.startswith(prefixes)}
        assert named <= documented, f"lessons/{stem}.md names undocumented keys {sorted(named - documented)}"


def _resolves(dotted: str) -> bool:
    """Whether ``workbench.a.b.c`` names something: the longest importable module prefix, then attributes."""
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_workbench_symbols_named_in_lessons_and_readme_exist() -> None:
    """A lesson that names a moved or renamed symbol sends the reader looking for nothing."""
    files = [*sorted((ROOT / "lessons").glob("*.md")), ROOT / "README.md"]
    missing = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in files
        for name in sorted(
            set(re.findall(r"`(workbench(?:\.[A-Za-z_]\w*)+)", path.read_text(encoding="utf-8")))
        )
        if not _resolves(name)
    ]
    assert not missing, "named but not found:\n" + "\n".join(missing)
