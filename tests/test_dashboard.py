"""The live-training dashboard: arm configs, the round-robin loop, Run/Stop/Reset, the live figure.

Most tests drive the dashboard with a fake trainer (instant, scripted metrics, a shared call log) so
the control logic is checked exactly; one test runs the real :class:`RLOOTrainer` on the probe task to
check that every plotted key is really emitted and documented.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import plotly.graph_objects as go
import pytest

from workbench.dvp import DEFAULT_RHO
from workbench.experiments.collapse import DEFAULT_CRITERION, classify
from workbench.experiments.presets import ARMS
from workbench.trainer import RLOOConfig, all_metric_docs
from workbench.viz.dashboard import (
    DASHBOARD_PANELS,
    PERTURBATION_CHOICES,
    LiveTrainingDashboard,
    configs_html,
    dashboard_configs,
)
from workbench.viz.figures import TRAINING_PANELS, set_run_names, training_figure

BASE = RLOOConfig(model=None, task="probe", vocab_size=64, k=2, prompts_per_step=2, lr=1e-3)


class FakeTrainer:
    """Scripted stand-in for RLOOTrainer: instant steps, metrics that encode (arm, step)."""

    def __init__(self, config: RLOOConfig, log: list[tuple[int, int]], *, gate: threading.Event | None = None,
                 fail_at: int | None = None, delay: float = 0.0) -> None:  # fmt: skip
        self.config = config
        self.log = log
        self.gate = gate
        self.fail_at = fail_at
        self.delay = delay
        self.steps = 0
        self.stopped = False
        self.arm = -1 if config.rho is None else (0 if config.is_mode == "none" else 1)

    def step(self) -> dict[str, float]:
        if self.gate is not None:
            assert self.gate.wait(5.0), "test gate never opened"
        time.sleep(self.delay)
        self.steps += 1
        if self.fail_at is not None and self.steps == self.fail_at:
            raise RuntimeError("engine exploded")
        self.log.append((self.arm, self.steps))
        return {
            "step": float(self.steps),
            "reward/mean": 0.1 * self.steps,
            "mismatch/k3": 1e-3 * (self.arm + 2),
            "optim/grad_norm": 1.0,
            "dvp/one_minus_z_mean": 0.0 if self.config.rho is None else 1e-6,
            "is/token_ess": 0.9,
            "is/frac_tokens_kept": 1.0,
        }

    def stop(self) -> None:
        self.stopped = True


def make_dash(log: list[tuple[int, int]], **kw: Any) -> tuple[LiveTrainingDashboard, list[FakeTrainer]]:
    built: list[FakeTrainer] = []
    trainer_kw = {k: kw.pop(k) for k in ("gate", "fail_at", "delay") if k in kw}

    def factory(cfg: RLOOConfig) -> FakeTrainer:
        t = FakeTrainer(cfg, log, **trainer_kw)
        built.append(t)
        return t

    return LiveTrainingDashboard(BASE, ARMS, verdict=classify, make_trainer=factory, **kw), built


# ---------------------------------------------------------------------------------------------- configs


def test_dashboard_configs_arms_differ_only_in_the_correction() -> None:
    cfgs = dashboard_configs(BASE, ARMS, perturbation="tail:4.0", rho=1e-6, is_mode="seq_tis")
    assert list(cfgs) == ["naive", "DVP", "DVP + seq_tis"]
    naive, dvp, mis = cfgs.values()
    assert (naive.rho, naive.is_mode, naive.veto) == (None, "none", None)
    assert (dvp.rho, dvp.is_mode) == (1e-6, "none")
    assert (mis.rho, mis.is_mode, mis.veto) == (1e-6, "seq_tis", ARMS["dvp_mis"]["veto"])
    assert {c.perturbation for c in cfgs.values()} == {"tail:4.0"}
    # Everything else is the shared base: same model, task, seed, batch, lr, engine dtype.
    differing = {k for c in cfgs.values() for k in c.diff(BASE)}
    assert differing <= {"rho", "is_mode", "is_lo", "is_hi", "veto", "perturbation"}


def test_dashboard_configs_none_perturbation_and_bad_input() -> None:
    cfgs = dashboard_configs(BASE, ARMS, perturbation="none", rho=DEFAULT_RHO)
    assert all(c.perturbation is None for c in cfgs.values())
    with pytest.raises(ValueError, match="rho"):
        dashboard_configs(BASE, ARMS, perturbation=None, rho=2.0)
    with pytest.raises(ValueError, match="rho=None"):
        dashboard_configs(BASE, ARMS, perturbation=None, rho=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="is_mode='tis'"):
        dashboard_configs(BASE, ARMS, perturbation=None, rho=1e-4, is_mode="tis")
    with pytest.raises(ValueError, match="arms"):
        dashboard_configs(BASE, ARMS, perturbation=None, rho=1e-4, arms=["naive", "bogus"])
    with pytest.raises(ValueError, match="perturbation"):
        dashboard_configs(BASE, ARMS, perturbation="wobble:3", rho=1e-4)


def test_every_menu_perturbation_is_a_valid_spec() -> None:
    for spec in PERTURBATION_CHOICES.values():
        dashboard_configs(BASE, ARMS, perturbation=spec, rho=1e-4)


def test_configs_html_lists_only_differing_fields() -> None:
    text = configs_html(dashboard_configs(BASE, ARMS, perturbation="round:bf16", rho=1e-4))
    assert "<td>rho</td>" in text and "<td>perturbation</td>" in text and "<td>task</td>" in text
    assert "<td>clip_eps</td>" not in text and "<td>temperature</td>" not in text


# ---------------------------------------------------------------------------------------------- the loop


def test_run_headless_round_robin_and_live_figure() -> None:
    log: list[tuple[int, int]] = []
    dash, built = make_dash(log, steps=3, perturbation="round:bf16", rho=1e-4, is_mode="geo_mask")
    hist = dash.run_headless()
    # One step of every arm per round, in legend order, for 3 rounds.
    assert log == [(a, s) for s in (1, 2, 3) for a in (-1, 0, 1)]
    assert list(hist) == ["naive", "DVP", "DVP + geo_mask"] and all(len(h) == 3 for h in hist.values())
    assert [t.config.rho for t in built] == [None, 1e-4, 1e-4]
    # The widget figure holds every step of every arm, panel by panel, under the arm's name.
    n_panels = len(DASHBOARD_PANELS)
    assert len(dash.figure.data) == 3 * n_panels
    for i, label in enumerate(hist):
        for j, (key, _, _) in enumerate(DASHBOARD_PANELS):
            trace = dash.figure.data[i * n_panels + j]
            assert trace.name == label
            assert list(trace.x) == [1.0, 2.0, 3.0]
            assert list(trace.y) == pytest.approx([m[key] for m in hist[label]])
    # The static figure shows the same data and is a plain figure (survives nbconvert).
    static = dash.static_figure()
    assert type(static) is go.Figure and list(static.data[0].y) == list(dash.figure.data[0].y)
    assert "done: 3 steps per arm" in dash.status.value


def test_run_continues_when_controls_unchanged_and_restarts_when_changed() -> None:
    log: list[tuple[int, int]] = []
    dash, built = make_dash(log, steps=2)
    dash.run_headless()
    dash.run_headless(1)
    assert len(built) == 3 and all(t.steps == 3 for t in built)  # same trainers, continued
    assert all(len(h) == 3 for h in dash.histories.values())
    dash.is_mode_w.value = "seq_mis"
    dash.run_headless(1)
    assert len(built) == 6 and [t.steps for t in built[3:]] == [1, 1, 1]  # fresh arms
    assert list(dash.histories) == ["naive", "DVP", "DVP + seq_mis"]
    assert [t.name for t in dash.figure.data[:: len(DASHBOARD_PANELS)]] == list(dash.histories)
    assert all(len(h) == 1 for h in dash.histories.values())
    dash.reset()
    assert dash.histories == {} and all(len(t.x) == 0 for t in dash.figure.data)
    dash.run_headless(1)
    assert len(built) == 9


def test_run_button_trains_in_background_and_stop_ends_after_current_step() -> None:
    log: list[tuple[int, int]] = []
    gate = threading.Event()
    dash, built = make_dash(log, steps=1000, gate=gate, delay=0.002)
    dash.run_button.click()  # the real on_click wiring
    assert dash.running and dash.run_button.disabled and not dash.stop_button.disabled
    gate.set()
    deadline = time.monotonic() + 5
    while len(log) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    dash.stop_button.click()
    assert dash.join(5.0), "the training thread did not stop"
    assert dash.error is None
    n = len(log)
    assert 10 <= n < 3000 and all(t.stopped for t in built)
    time.sleep(0.05)
    assert len(log) == n  # nothing ran after Stop
    assert not dash.run_button.disabled and dash.stop_button.disabled
    assert "stopped" in dash.status.value
    # The figure caught up with every step that ran.
    assert sum(len(dash.figure.data[i * len(DASHBOARD_PANELS)].x) for i in range(3)) == n


def test_run_headless_refuses_while_background_thread_runs() -> None:
    gate = threading.Event()
    dash, _ = make_dash([], steps=5, gate=gate)
    dash.start()
    try:
        with pytest.raises(RuntimeError, match="Stop"):
            dash.run_headless(1)
    finally:
        dash.stop()
        gate.set()
        assert dash.join(5.0)


def test_errors_surface_in_headless_and_background_runs() -> None:
    dash, _ = make_dash([], steps=3, fail_at=2)
    with pytest.raises(RuntimeError, match="engine exploded"):
        dash.run_headless()
    assert "engine exploded" in dash.status.value and not dash.run_button.disabled
    dash2, _ = make_dash([], steps=3, fail_at=2)
    dash2.start()
    assert dash2.join(5.0)
    assert isinstance(dash2.error, RuntimeError) and "error: RuntimeError" in dash2.status.value


def test_verdicts_use_the_collapse_criterion_against_the_last_arm() -> None:
    dash, _ = make_dash([], steps=4)
    assert dash.verdicts() == {}  # no arms built yet
    dash.run_headless()
    # Four steps are too few to judge: no verdict, and the status line says so and why.
    assert {v.label for v in dash.verdicts().values()} == {"too short"}
    assert (
        "<b>too short</b>" in dash.status.value
        and "4 steps: the criterion judges runs of >= 20" in dash.status.value
    )
    dash.run_headless(DEFAULT_CRITERION.min_steps - 4)  # the same arms, continued
    verdicts = dash.verdicts()
    assert list(verdicts) == list(dash.histories)
    # Fake rewards rise 0.1 per step for every arm: nobody collapses, nobody trails the reference.
    assert {v.label for v in verdicts.values()} == {"stable"}
    assert math.isnan(verdicts["DVP + token_mis"].reference_final)
    assert verdicts["naive"].reference_final == pytest.approx(verdicts["DVP + token_mis"].final)


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="steps=0"):
        LiveTrainingDashboard(BASE, ARMS, steps=0)
    with pytest.raises(ValueError, match="rho"):
        LiveTrainingDashboard(BASE, ARMS, rho=0.0)


def test_set_run_names_checks_the_run_count() -> None:
    fig = training_figure({"a": [], "b": []}, TRAINING_PANELS)
    with pytest.raises(ValueError, match="names has 3 entries"):
        set_run_names(fig, ["x", "y", "z"], TRAINING_PANELS)


# ---------------------------------------------------------------------------------------------- real trainer


def test_plotted_keys_are_emitted_and_documented_by_the_real_trainer() -> None:
    docs = all_metric_docs()
    for key, _, _ in (*DASHBOARD_PANELS, *TRAINING_PANELS):
        assert key in docs, f"panel key {key!r} is not a documented metric"
    dash = LiveTrainingDashboard(BASE, ARMS, perturbation="gaussian:0.3", steps=2)
    hist = dash.run_headless()
    for label, rows in hist.items():
        assert len(rows) == 2
        for key, _, _ in DASHBOARD_PANELS:
            assert all(math.isfinite(r[key]) for r in rows), (label, key)
    # The pruning arms report the pruned mass; the naive arm trains on the full vocabulary.
    assert all(r["dvp/one_minus_z_mean"] == 0.0 for r in hist["naive"])
    assert len(dash.figure.data[0].x) == 2
