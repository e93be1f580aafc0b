"""Live training dashboard: naive RLOO vs DVP vs DVP + IS, trained side by side, curves updating every step.

What it is (notebook ``06_live_training``): three :class:`~workbench.trainer.RLOOTrainer` arms that share
model, task, seeds and rollout engine and differ only in how they treat mismatch —

==========  =======================================================  =============================
arm         what it trains on                                        preset (``experiments.ARMS``)
==========  =======================================================  =============================
naive       full vocabulary, no correction (what TRL's RLOO does)    ``naive``
DVP         min-p safe vocabulary V_S at ρ on both sides, no IS      ``dvp``
DVP + IS    safe vocabulary + the IS correction from the dropdown    ``dvp_mis`` (token MIS)
==========  =======================================================  =============================

— and a plotly ``FigureWidget`` (:func:`workbench.viz.figures.training_figure`) whose traces are updated
in place after every step of every arm (ARENA's pattern: the callback only touches traces, inside
``fig.batch_update()``).

How it runs: **Run** starts a background thread that calls ``RLOOTrainer.step()`` round-robin over the
arms (so the three curves advance together and the kernel stays free to receive the **Stop** click);
**Stop** sets an event the loop checks between steps (and calls ``trainer.stop()``), so no step is
half-applied. Run again continues the same trainers when the controls are unchanged, and starts
fresh arms when the perturbation, ρ or IS mode changed (or after **Reset**).
:meth:`LiveTrainingDashboard.run_headless` runs the same loop in the calling thread: that is what a
headless notebook run (nbmake, CI) executes without anyone clicking.

The dashboard is given its arms (the preset table, :data:`workbench.experiments.ARMS`) and, optionally, the
function that judges them (:func:`workbench.experiments.classify`): the notebook composes the two layers.

>>> from workbench.experiments import ARMS
>>> from workbench.trainer import RLOOConfig
>>> base = RLOOConfig(model=None, task="probe", vocab_size=64, k=2, prompts_per_step=2)
>>> cfgs = dashboard_configs(base, ARMS, perturbation="gaussian:0.3", rho=1e-4, is_mode="seq_mis")
>>> [(name, c.rho, c.is_mode, c.perturbation) for name, c in cfgs.items()]
[('naive', None, 'none', 'gaussian:0.3'), ('DVP', 0.0001, 'none', 'gaussian:0.3'), ('DVP + seq_mis', 0.0001, 'seq_mis', 'gaussian:0.3')]
"""

from __future__ import annotations

import dataclasses
import html
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

from workbench.dvp import DEFAULT_RHO, validate_rho
from workbench.importance import IS_MODES
from workbench.trainer import RLOOConfig, RLOOTrainer
from workbench.viz.figures import set_run_names, training_figure, update_training_figure

__all__ = [
    "DASHBOARD_ARMS",
    "DASHBOARD_PANELS",
    "PERTURBATION_CHOICES",
    "LiveTrainingDashboard",
    "arm_label",
    "dashboard_configs",
]

#: Panels of the live figure: (metric key, title, log-scale y). Every key is emitted by ``RLOOTrainer.step``.
DASHBOARD_PANELS: tuple[tuple[str, str, bool], ...] = (
    ("reward/mean", "sampled reward", False),
    ("mismatch/k3", "k3 mismatch", True),
    ("optim/grad_norm", "grad norm (pre-clip)", True),
    ("dvp/one_minus_z_mean", "1 − Z (pruned mass)", True),
    ("is/token_ess", "ESS of π/μ", False),
    ("is/frac_tokens_kept", "tokens kept", False),
)

#: The arms, as preset names in :data:`workbench.experiments.ARMS` (their order is the legend order).
DASHBOARD_ARMS: tuple[str, ...] = ("naive", "dvp", "dvp_mis")

#: Perturbation menu: label → spec of ``RLOOConfig.perturbation`` (``"none"``: only the
#: engine's weight precision differs). Each entry is one way a real inference engine drifts from the trainer.
PERTURBATION_CHOICES: dict[str, str] = {
    "none (engine weight dtype only)": "none",
    "Gaussian logit noise σ=0.3": "gaussian:0.3",
    "Gaussian logit noise σ=1.0": "gaussian:1.0",
    "logits rounded to bf16": "round:bf16",
    "logits rounded to fp8 (e4m3)": "round:fp8_e4m3",
    "4-bit KV cache": "kvquant:4",
    "tail inflation ×2": "tail:2.0",
    "tail inflation ×4": "tail:4.0",
    "probability floor e^-13.5 (just outside the e^-13 safe set)": "floor:13.5",
    "probability floor e^-12 (inside the e^-13 safe set)": "floor:12",
}

Row = dict[str, float]
Presets = Mapping[str, Mapping[str, Any]]
"""Arm presets by name → the ``RLOOConfig`` fields each sets (:data:`workbench.experiments.ARMS`)."""
Judge = Callable[[Sequence[Row], "Sequence[Row] | None"], Any]
"""``(rows, reference rows or None) -> verdict`` with ``.label``, ``.reasons`` and ``.judged``
(:func:`workbench.experiments.classify`)."""


def arm_label(arm: str, is_mode: str = "token_mis") -> str:
    """Legend label of a dashboard arm: ``naive``, ``DVP``, ``DVP + <is_mode>``.

    >>> arm_label("naive"), arm_label("dvp"), arm_label("dvp_mis", "geo_mask")
    ('naive', 'DVP', 'DVP + geo_mask')
    """
    if arm == "naive":
        return "naive"
    if arm == "dvp":
        return "DVP"
    if arm == "dvp_mis":
        return f"DVP + {is_mode}"
    return arm


def dashboard_configs(
    base: RLOOConfig,
    presets: Presets,
    *,
    perturbation: str | None,
    rho: float,
    is_mode: str = "token_mis",
    arms: Sequence[str] = DASHBOARD_ARMS,
) -> dict[str, RLOOConfig]:
    """The configs of the dashboard's arms for one setting of the controls.

    Each arm is ``base`` with its preset from ``presets`` applied, then the
    controls: every arm gets ``perturbation``; arms that prune (preset ρ not None) get ``rho``; the
    ``dvp_mis`` arm gets ``is_mode`` (bounds ``None``: the mode's defaults, veto from the preset).

    Args:
        base: shared settings (model, task, batch, lr, engine dtype, seed, ...).
        presets: arm presets by name (:data:`workbench.experiments.ARMS`).
        perturbation: engine perturbation spec (``None`` or ``"none"`` for none).
        rho: ρ of the pruning arms, in (0, 1].
        is_mode: correction of the ``dvp_mis`` arm, one of :data:`workbench.importance.IS_MODES`.
        arms: preset names to include (default naive, dvp, dvp_mis).

    Returns:
        ``{legend label: RLOOConfig}`` in ``arms`` order.

    Raises:
        ValueError: unknown arm, ρ outside (0, 1], unknown IS mode or malformed perturbation.
    """
    validate_rho(rho, "rho")
    if rho is None:
        raise ValueError("rho=None: the DVP arms need a ρ in (0, 1]; the naive arm already trains unpruned")
    if is_mode not in IS_MODES:
        raise ValueError(f"is_mode={is_mode!r} is not one of {IS_MODES}; pick one from the dropdown")
    unknown = [a for a in arms if a not in presets]
    if unknown or not arms:
        raise ValueError(f"arms={list(arms)!r}: each must be one of {sorted(presets)} (and at least one)")
    if perturbation is not None and perturbation.strip().lower() in ("", "none"):
        perturbation = None  # RLOOConfig checks any other spec and raises with the allowed forms
    out: dict[str, RLOOConfig] = {}
    for arm in arms:
        fields: dict[str, Any] = {**presets[arm], "perturbation": perturbation}
        if fields.get("rho") is not None:
            fields["rho"] = float(rho)
        if arm == "dvp_mis":
            fields.update(is_mode=is_mode, is_lo=None, is_hi=None)
        out[arm_label(arm, is_mode)] = dataclasses.replace(base, **fields)
    return out


def configs_html(configs: Mapping[str, RLOOConfig], base: RLOOConfig | None = None) -> str:
    """An HTML table of the fields where any config differs from ``base`` (default: the defaults).

    Shows what the arms share and where they differ, without the 30 fields nobody changed.

    >>> a = RLOOConfig(model=None, rho=None); b = RLOOConfig(model=None)
    >>> "<td>rho</td>" in configs_html({"a": a, "b": b}) and "lr" not in configs_html({"a": a, "b": b})
    True
    """
    ref = (base or RLOOConfig()).to_dict()
    rows = [c.to_dict() for c in configs.values()]
    keys = [k for k in ref if any(r[k] != ref[k] for r in rows)]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in configs)
    body = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(repr(ref[k]))}</td>"
        + "".join(f"<td>{html.escape(_short(r[k]))}</td>" for r in rows)
        + "</tr>"
        for k in keys
    )
    return f"<table style='font-size:12px'><tr><th>field</th><th>default</th>{head}</tr>{body}</table>"


def _short(value: Any) -> str:
    if isinstance(value, float) and value > 0 and (value < 1e-3 or value > 1e4):
        if math.isclose(math.log(value), round(math.log(value)), abs_tol=1e-9):
            return f"e^{round(math.log(value))}"
        return f"{value:.1e}"
    return repr(value)


class LiveTrainingDashboard:
    """Train the dashboard's arms side by side, with controls and live plotly curves.

    Args:
        base: shared settings of every arm (see :func:`dashboard_configs`).
        presets: arm presets by name (:data:`workbench.experiments.ARMS`).
        verdict: judges each arm's rows against the last arm's (:func:`workbench.experiments.classify`);
            ``None``: no verdicts.
        perturbation: initial engine perturbation spec: one of the specs in :data:`PERTURBATION_CHOICES`
            or any other spec ``RLOOConfig.perturbation`` accepts (added to the menu).
        rho: initial ρ of the pruning arms.
        is_mode: initial IS correction of the ``dvp_mis`` arm.
        steps: steps per arm that one Run click (or :meth:`run_headless` without argument) trains.
        arms: preset names of the arms.
        panels: ``(metric key, title, log_y)`` triples of the figure.
        make_trainer: builds a trainer from a config (tests pass a fake; default :class:`RLOOTrainer`).
        redraw_every_s: minimum seconds between two figure updates. The figure is redrawn after a step
            only when this much time has passed since the last redraw (and always when the loop ends):
            with the real trainer a step takes longer, so every step is drawn; with very fast steps the
            browser would otherwise queue redraws faster than it can paint and stop responding.

    The widget is :attr:`widget` (also shown when the object is the last expression of a cell); the
    metrics of every step are in :attr:`histories` (``{label: [metrics dict, …]}``).
    """

    def __init__(
        self,
        base: RLOOConfig,
        presets: Presets,
        *,
        verdict: Judge | None = None,
        perturbation: str | None = "tail:4.0",
        rho: float = DEFAULT_RHO,
        is_mode: str = "token_mis",
        steps: int = 50,
        arms: Sequence[str] = DASHBOARD_ARMS,
        panels: Sequence[tuple[str, str, bool]] = DASHBOARD_PANELS,
        make_trainer: Callable[[RLOOConfig], Any] = RLOOTrainer,
        redraw_every_s: float = 0.5,
    ) -> None:
        import ipywidgets as w

        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1 (steps per arm per Run click)")
        perturbation = "none" if perturbation is None else perturbation
        self.base = base
        self.presets = presets
        self.judge = verdict
        self.arms = tuple(arms)
        self.panels = tuple(panels)
        self._make_trainer = make_trainer
        if not redraw_every_s >= 0:
            raise ValueError(
                f"redraw_every_s={redraw_every_s} must be >= 0 seconds (0 redraws after every step)"
            )
        self.redraw_every_s = float(redraw_every_s)
        dashboard_configs(base, presets, perturbation=perturbation, rho=rho, is_mode=is_mode, arms=self.arms)

        options = [(label, spec) for label, spec in PERTURBATION_CHOICES.items()]
        if perturbation not in PERTURBATION_CHOICES.values():
            options.append((str(perturbation), perturbation))
        self.perturbation_w = w.Dropdown(
            options=options,
            value=perturbation,
            description="perturbation",
            style={"description_width": "90px"},
        )
        self.rho_w = w.FloatLogSlider(
            value=rho, base=10, min=-16, max=-1, step=0.25, description="ρ (DVP arms)",
            readout_format=".1e", style={"description_width": "90px"}, continuous_update=False,
        )  # fmt: skip
        self.is_mode_w = w.Dropdown(
            options=list(IS_MODES), value=is_mode, description="IS mode", style={"description_width": "90px"}
        )
        self.steps_w = w.BoundedIntText(
            value=steps, min=1, max=100_000, description="steps", style={"description_width": "90px"}
        )
        self.run_button = w.Button(description="Run", button_style="success", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.reset_button = w.Button(description="Reset", icon="refresh")
        self.status = w.HTML(value="<i>ready: press Run</i>")
        self.config_view = w.HTML()
        self.run_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        self.reset_button.on_click(lambda _: self.reset())

        self.trainers: dict[str, Any] = {}
        self.histories: dict[str, list[Row]] = {}
        self.error: BaseException | None = None
        self._configs: dict[str, RLOOConfig] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one training loop at a time
        labels = list(self.configs())
        self.figure = training_figure({name: [] for name in labels}, self.panels, widget=True)
        self.figure.update_layout(width=1000, margin={"l": 50, "r": 20, "t": 50, "b": 40})
        self.figure.update_annotations(font_size=13)  # the panel titles
        self.config_view.value = configs_html(self.configs())
        self.widget = w.VBox(
            [
                w.HBox([self.perturbation_w, self.rho_w]),
                w.HBox([self.is_mode_w, self.steps_w]),
                w.HBox([self.run_button, self.stop_button, self.reset_button]),
                self.status,
                self.figure,
                w.Accordion(children=[self.config_view], titles=("configs of the arms",)),
            ]
        )

    # ------------------------------------------------------------------ state
    def configs(self) -> dict[str, RLOOConfig]:
        """The arms' configs for the current control values."""
        return dashboard_configs(
            self.base,
            self.presets,
            perturbation=self.perturbation_w.value,
            rho=float(self.rho_w.value),
            is_mode=self.is_mode_w.value,
            arms=self.arms,
        )

    @property
    def running(self) -> bool:
        """Whether the background training thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def reset(self) -> None:
        """Drop the trainers and curves; the next Run builds fresh arms from the controls."""
        if self.running:
            self.stop()
            self.join()
        self.trainers, self.histories, self._configs = {}, {}, {}
        self._redraw(rename=True)
        self.status.value = "<i>reset: press Run</i>"

    def _ensure_trainers(self) -> None:
        configs = self.configs()
        if configs == self._configs and self.trainers:
            return
        self.status.value = "<i>building the arms (model, engine) …</i>"
        self.trainers, self.histories, self._configs = {}, {}, configs
        for label, cfg in configs.items():
            trainer = self._make_trainer(cfg)
            self.trainers[label] = trainer
            self.histories[label] = []
        self.config_view.value = configs_html(configs)
        self._redraw(rename=True)

    def _redraw(self, rename: bool = False) -> None:
        labels = list(self._configs or self.configs())
        if rename:
            set_run_names(self.figure, labels, self.panels)
        runs = {label: self.histories.get(label, []) for label in labels}
        update_training_figure(self.figure, runs, self.panels)

    # ------------------------------------------------------------------ the loop
    def _loop(self, steps: int) -> None:
        """``steps`` rounds of one ``step()`` per arm, redrawing as steps land; stops on the event."""
        with self._lock:
            self.error = None
            try:
                self._ensure_trainers()
                t0 = last_draw = time.perf_counter()
                for r in range(steps):
                    for label, trainer in self.trainers.items():
                        if self._stop.is_set():
                            self.status.value = self._status_html(f"stopped after round {r}", t0)
                            return
                        self.histories[label].append(trainer.step())
                        if time.perf_counter() - last_draw >= self.redraw_every_s:
                            self._redraw()
                            self.status.value = self._status_html(f"round {r + 1}/{steps}", t0)
                            last_draw = time.perf_counter()
                self.status.value = (
                    self._status_html(f"done: {steps} steps per arm", t0) + self._verdict_html()
                )
            except Exception as err:  # shown in the widget; a thread's traceback would vanish
                self.error = err
                self.status.value = (
                    f"<b style='color:#d62728'>error: {html.escape(type(err).__name__)}: "
                    f"{html.escape(str(err))}</b>"
                )
                raise
            finally:
                self._redraw()  # whatever the throttle skipped
                self.run_button.disabled, self.stop_button.disabled = False, True

    def _status_html(self, head: str, t0: float) -> str:
        parts = []
        for label, hist in self.histories.items():
            if hist:
                last = hist[-1]
                parts.append(
                    f"{html.escape(label)}: reward {last.get('reward/mean', math.nan):.2f}, "
                    f"k3 {last.get('mismatch/k3', math.nan):.1e}"
                )
        return f"<b>{head}</b> ({time.perf_counter() - t0:.1f} s) · " + " · ".join(parts)

    def verdicts(self) -> dict[str, Any]:
        """The verdict on each arm so far (``{}`` before the arms are built, or without a ``verdict``).

        Each arm is judged by the dashboard's ``verdict`` function (the collapse criterion,
        :func:`workbench.experiments.classify`) against the last arm (DVP + IS) as the reference run on the
        same seed; the reference itself is judged alone. An arm with fewer than
        ``CollapseCriterion.min_steps`` steps is ``"too short"``: no verdict.
        """
        labels = list(self.histories)
        if not labels or self.judge is None:
            return {}
        ref = self.histories[labels[-1]]
        return {
            label: self.judge(hist, None if label == labels[-1] else ref)
            for label, hist in self.histories.items()
        }

    def _verdict_html(self) -> str:
        verdicts = self.verdicts()
        if not verdicts:
            return ""
        parts = [f"{html.escape(label)}: <b>{v.label}</b>" for label, v in verdicts.items()]
        short = [v.reasons[0] for v in verdicts.values() if not v.judged]  # says why, once
        return "<br>verdicts (collapse criterion): " + " · ".join(parts + short[:1])

    def run_headless(self, steps: int | None = None) -> dict[str, list[Row]]:
        """Train ``steps`` (default: the steps box) rounds in the calling thread; returns :attr:`histories`.

        The same loop as the Run button, so a headless notebook run exercises exactly what a click does.
        """
        n = int(self.steps_w.value if steps is None else steps)
        if n < 1:
            raise ValueError(f"steps={n} must be >= 1")
        if self.running:
            raise RuntimeError("training is running in the background; press Stop (or call .stop()) first")
        self._stop.clear()
        self._loop(n)
        return self.histories

    def start(self, steps: int | None = None) -> None:
        """Start (or continue) training in a background thread — what the Run button does."""
        if self.running:
            return
        n = int(self.steps_w.value if steps is None else steps)
        if n < 1:
            raise ValueError(f"steps={n} must be >= 1")
        self._stop.clear()
        self.run_button.disabled, self.stop_button.disabled = True, False
        self._thread = threading.Thread(target=self._thread_main, args=(n,), daemon=True, name="dashboard")
        self._thread.start()

    def _thread_main(self, steps: int) -> None:
        try:
            self._loop(steps)
        except Exception:
            pass  # already stored in self.error and shown in the status line

    def stop(self) -> None:
        """Ask the loop to stop after the current step (the Stop button); also flags each trainer."""
        self._stop.set()
        for trainer in self.trainers.values():
            if hasattr(trainer, "stop"):
                trainer.stop()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the background thread; returns True when it has finished."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    # ------------------------------------------------------------------ output
    def static_figure(self, title: str = "") -> go.Figure:
        """A plain (non-widget) figure of the curves so far: survives a headless run and nbconvert."""
        labels = list(self._configs or self.configs())
        runs = {label: self.histories.get(label, []) for label in labels}
        return training_figure(runs, self.panels, title=title)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)
