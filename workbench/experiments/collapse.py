"""The collapse criterion, in code: when does a run *collapse*, merely *degrade*, or stay *stable*?

The paper's failure mode (THEORY.md, "Metrics to log"): k3/k1 spike together with the gradient norm,
then the reward falls and stays down. A run that keeps learning, only slower than a mismatch-free
reference, has not collapsed — it has *degraded*. Both verdicts are decided here, from the per-step
metrics of a run (``metrics.jsonl`` rows), with thresholds fixed before looking at the headline runs:

=============  ===================================================================================
verdict        rule (``w`` = ``window`` steps; "start"/"final" = mean reward of the first/last ``w``)
=============  ===================================================================================
``collapse``   the reward falls and stays down — final ≤ start − ``drop`` **and** final ≤ peak −
               ``drop`` (peak = best rolling mean) — **and** the mismatch spikes: max k3 ≥
               ``spike`` × the early median k3, or max pre-clip grad norm ≥ ``spike`` × its early median
``degraded``   not a collapse, but the final reward trails a reference run on the same seed (the
               DVP + MIS or clean arm) by ≥ ``gap``
``stable``     neither
``too short``  the run has fewer than ``min_steps`` steps (20): no verdict. With a window of one or two
               steps a single noisy reward or grad-norm sample would decide it, so a short run is
               neither called stable nor collapsed
=============  ===================================================================================

>>> rewards = [0.5] * 10 + [0.6] * 10 + [0.2] * 10
>>> rows = [{"reward/mean": r, "mismatch/k3": 1e-3 if i < 20 else 1e-1, "optim/grad_norm": 1.0}
...         for i, r in enumerate(rewards)]
>>> classify(rows).label
'collapse'
>>> classify(rows[:20]).label
'stable'
>>> classify(rows[:4]).label, classify(rows[:4]).reasons
('too short', ('4 steps: the criterion judges runs of >= 20 steps (CollapseCriterion.min_steps)',))
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

__all__ = ["LABELS", "TOO_SHORT", "CollapseCriterion", "Verdict", "classify", "rolling_mean"]

TOO_SHORT = "too short"
"""The label of a run shorter than :attr:`CollapseCriterion.min_steps`: too short to judge."""
LABELS: tuple[str, ...] = ("collapse", "degraded", "stable", TOO_SHORT)
"""Every verdict label, in the order tables and counts list them."""

Row = Mapping[str, float]


def rolling_mean(xs: Sequence[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values (shorter at the start), ``nan`` values skipped.

    Args:
        xs: the series.
        window: window length, ``>= 1``.

    Returns:
        A list as long as ``xs``; entry ``i`` averages the finite values of ``xs[max(0, i-window+1) : i+1]``
        (``nan`` when there is none).

    >>> rolling_mean([1.0, 3.0, 5.0, float("nan")], 2)
    [1.0, 2.0, 4.0, 5.0]
    """
    if window < 1:
        raise ValueError(f"window={window} must be >= 1 (steps per rolling mean)")
    out = []
    for i in range(len(xs)):
        vals = [x for x in xs[max(0, i - window + 1) : i + 1] if math.isfinite(x)]
        out.append(sum(vals) / len(vals) if vals else math.nan)
    return out


def _series(rows: Sequence[Row], key: str) -> list[float]:
    return [float(r.get(key, math.nan)) for r in rows]


def _finite(xs: Sequence[float]) -> list[float]:
    return [x for x in xs if math.isfinite(x)]


@dataclass(frozen=True)
class Verdict:
    """What :func:`classify` decided about one run, with the numbers behind it."""

    label: str
    """One of :data:`LABELS`: ``"collapse"``, ``"degraded"``, ``"stable"`` or ``"too short"`` (no verdict)."""
    start: float
    """Mean reward over the first ``window`` steps."""
    peak: float
    """Best rolling-mean reward."""
    final: float
    """Mean reward over the last ``window`` steps."""
    reference_final: float
    """Final reward of the reference run (``nan`` without one)."""
    k3_spike: float
    """Max k3 / early median k3 (``nan`` when k3 is missing)."""
    grad_spike: float
    """Max pre-clip grad norm / its early median."""
    reasons: tuple[str, ...]
    """Human-readable list of the rules that fired."""

    @property
    def judged(self) -> bool:
        """Whether the run was long enough to judge (every label but ``"too short"``)."""
        return self.label != TOO_SHORT

    @property
    def collapsed(self) -> bool:
        """True for a collapse."""
        return self.label == "collapse"

    @property
    def degraded(self) -> bool:
        """True for a degradation (not a collapse)."""
        return self.label == "degraded"

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict."""
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        return d


@dataclass(frozen=True)
class CollapseCriterion:
    """Thresholds of the collapse / degradation verdict (see the module docstring for the rules).

    The defaults were fixed before the headline runs were made (lessons/LOG.md, 2026-11-22) and are
    not tuned to them.
    """

    window: int = 10
    """Steps in the start, final and rolling windows (short runs use a quarter of their length)."""
    drop: float = 0.10
    """Absolute reward fall (reward is in [0, 1]) that counts as "fell and stayed down"."""
    spike: float = 5.0
    """A metric spikes when its max reaches this multiple of its median over the first window."""
    gap: float = 0.10
    """Final-reward shortfall against the reference run that counts as a degradation."""
    min_steps: int = 20
    """Runs with fewer steps are ``"too short"``: no verdict. At 20 steps each window (a quarter of the
    run) averages 5 rewards and the spike rule's baseline is a median of 5 samples."""
    reward_key: str = "reward/mean"
    """Which reward series is judged: ``reward/mean`` (what the rollout engine sampled) or
    ``eval/reward`` (the policy under a clean engine, measured every ``eval_every`` steps)."""

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window={self.window} must be >= 1 steps, e.g. 10")
        for name, value in (("drop", self.drop), ("gap", self.gap)):
            if not 0 < value <= 1:
                raise ValueError(
                    f"{name}={value} must be in (0, 1] (an absolute reward difference), e.g. 0.1"
                )
        if not self.spike > 1:
            raise ValueError(f"spike={self.spike} must be > 1 (a multiple of the early median), e.g. 5")
        if self.min_steps < 2:
            raise ValueError(
                f"min_steps={self.min_steps} must be >= 2 (the verdict compares a run's start with its end), "
                "e.g. 20"
            )

    def classify(self, rows: Sequence[Row], reference: Sequence[Row] | None = None) -> Verdict:
        """Verdict on one run's metric rows, optionally against a reference run on the same seed.

        Args:
            rows: per-step metric dicts with ``reward/mean`` (and, for the spike rule, ``mismatch/k3``
                and ``optim/grad_norm``), in step order.
            reference: the reference run's rows (e.g. DVP + MIS on the same seed), or ``None``.

        Returns:
            A :class:`Verdict`; its label is ``"too short"`` when ``rows`` has fewer than ``min_steps``
            steps (the numbers are still filled in, ``nan`` where there are none).
        """
        w = max(1, min(self.window, len(rows) // 4))
        reward = _series(rows, self.reward_key)
        start = statistics.fmean(_finite(reward[:w]) or [math.nan])
        final = statistics.fmean(_finite(reward[-w:]) or [math.nan])
        peak = max(_finite(rolling_mean(reward, w)) or [math.nan])

        def spike(key: str) -> float:
            xs = _series(rows, key)
            early, every = _finite(xs[:w]), _finite(xs)
            if not early or not every:
                return math.nan
            base = statistics.median(early)
            return max(every) / base if base > 0 else math.inf if max(every) > 0 else 1.0

        k3_spike, grad_spike = spike("mismatch/k3"), spike("optim/grad_norm")
        reasons = []
        fell = final <= start - self.drop and final <= peak - self.drop
        if fell:
            reasons.append(
                f"reward fell and stayed down: start {start:.3f}, peak {peak:.3f}, final {final:.3f}"
            )
        spiked = [
            f"{name} spiked ×{value:.1f}"
            for name, value in (("k3", k3_spike), ("grad norm", grad_spike))
            if value >= self.spike  # nan (metric missing) compares False, inf True
        ]
        reasons.extend(spiked)
        ref_final = math.nan
        if reference is not None and len(reference) >= 2:
            ref_reward = _series(reference, self.reward_key)
            ref_final = statistics.fmean(_finite(ref_reward[-w:]) or [math.nan])
        if len(rows) < self.min_steps:
            label = TOO_SHORT
            reasons = [
                f"{len(rows)} steps: the criterion judges runs of >= {self.min_steps} steps "
                "(CollapseCriterion.min_steps)"
            ]
        elif fell and spiked:
            label = "collapse"
        elif math.isfinite(ref_final) and ref_final - final >= self.gap:
            label = "degraded"
            reasons.append(f"final reward {final:.3f} trails the reference's {ref_final:.3f} by ≥ {self.gap}")
        else:
            label = "stable"
        return Verdict(label, start, peak, final, ref_final, k3_spike, grad_spike, tuple(reasons))


DEFAULT_CRITERION = CollapseCriterion()


def classify(rows: Sequence[Row], reference: Sequence[Row] | None = None) -> Verdict:
    """:meth:`CollapseCriterion.classify` with the default thresholds."""
    return DEFAULT_CRITERION.classify(rows, reference)
