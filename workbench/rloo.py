"""Leave-one-out advantages and the policy-gradient loss that combines DVP log-probs, IS weights and masks.

RLOO (THEORY.md, "RLOO"): with K samples per prompt, sample ``i``'s baseline is the mean reward of the *other*
samples of its prompt, ``A_i = R_i − mean_{j≠i} R_j = K/(K−1) (R_i − mean R)``. The baseline does not depend on
sample ``i``, so the estimator stays unbiased.

Rejected samples. When importance sampling masks or vetoes a sequence (``ISResult.seq_keep`` False), that
sample contributes no gradient — and it must not be part of anyone's baseline either: its reward was earned
by a sequence the correction has declared untrustworthy, and keeping it in the baseline shifts every other
advantage of the group. verl computes the RLOO baseline over the whole group before rejection sampling
touches the mask, so rejected samples still move their neighbours' advantages; here they are excluded
(``valid=False``) and get advantage 0. A group left with fewer than two valid samples has no leave-one-out
baseline and gets 0 everywhere.

The corrected batch (one function for the trainer, the TRL trainer and the verl loss):
:func:`corrected_batch` turns (trainer log-probs, engine log-probs, masks, rewards) into everything a step
needs, always in this order::

    IS weights, keep mask      importance.ISConfig.apply(logp_train, logp_infer, mask)   (veto, trust region)
    boundary tokens dropped    keep &= ~boundary   (sampled tokens outside the trainer's safe set)
    advantages                 rloo/grpo_advantages(rewards, k, valid = sequences still kept)
    loss inputs                weights, keep, advantages, logp_old  →  policy_loss
    metrics                    is/…, mismatch/… on valid tokens *that are not boundary tokens*, dvp/boundary_tokens

Boundary tokens stay out of the mismatch metrics: under DVP their trainer log-prob is the pruned placeholder
(≈ −MASK_MARGIN), an artefact that would swamp k1/k3; they are counted in ``dvp/boundary_tokens`` instead.

The loss (one function, every variant a keyword)::

    pg:        L = −Σ_{kept t} w_t · A · log π(y_t)                         / normaliser
    ppo_clip:  L = −Σ_{kept t} w_t · min(ρ_t A, clip(ρ_t, 1−ε, 1+ε) A)     / normaliser,  ρ_t = e^{log π − log π_old}

with ``w`` the detached IS weights (1 when None), ``A`` the sequence's advantage broadcast over its tokens, and
the normaliser the number of kept tokens (``token_mean``) or, for ``seq_mean``, the mean over kept sequences of
each sequence's token mean (also verl's ``token_sum`` and ``seq_mean_token_sum``). Two choices reproduce the
peers (:data:`PEER_LOSS`, lessons/switching.md): ``norm_mask`` — tokens a mask window zeroed stay in the
normaliser, as in verl's IcePop and TRL's ``*_mask`` modes (default: they leave it, the loss is then the mean over
the tokens that carry a gradient) — and ``dual_clip`` — verl's cap ``c·|A|`` on a negative-advantage token's loss
(default off: TRL has none, and the plain clip is the PPO the paper's ablations use). ``log π`` is whatever the caller computed — with DVP, ``workbench.dvp.token_logprobs``
(``log π^mp``), whose gradient only flows through the safe set.

Example:
    >>> import torch
    >>> rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), k=2)
    tensor([ 1., -1., -1.,  1.])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from workbench import metrics
from workbench.importance import ISConfig

__all__ = [
    "BATCH_METRIC_DOCS",
    "LOSS_METRIC_DOCS",
    "PEER_LOSS",
    "CorrectedBatch",
    "corrected_batch",
    "grpo_advantages",
    "policy_loss",
    "rloo_advantages",
]

LOSS_AGGS = ("token_mean", "seq_mean", "token_sum", "seq_mean_token_sum")
"""Loss aggregations; verl's ``loss_agg_mode`` names: token-mean, seq-mean-token-mean, token-sum,
seq-mean-token-sum."""
LOSS_NORMS = ("kept", "valid")
"""Which tokens the normaliser counts: ``kept`` (default: tokens in the loss) or ``valid`` (also the tokens a
``token_mis`` / ``seq_mis`` window zeroed — verl's IcePop and TRL's ``*_mask`` modes; ``ISResult.zeroed``)."""
LOSS_TYPES = ("pg", "ppo_clip")
_PPO_LOG_RATIO_CLAMP = 20.0  # clamp log π − log π_old before exp, as for IS ratios (THEORY)

LOSS_METRIC_DOCS: dict[str, str] = {
    "loss/pg": "value of the policy loss (pg or ppo_clip surrogate, after aggregation); 0 for an all-rejected batch",
    "loss/kept_tokens": "number of tokens in the loss (mask=True)",
    "loss/kept_seqs": "number of sequences with at least one kept token",
    "loss/all_rejected": "1.0 when no token is kept (the loss is an exact zero that still backpropagates), else 0.0",
    "loss/weight_mean": "mean IS weight over kept tokens (1 when no weights are given; 0 when nothing is kept)",
    "loss/adv_abs_mean": "mean |advantage| over kept sequences",
    "loss/clipfrac": "ppo_clip only: fraction of kept tokens where the clipped surrogate is active (its gradient is 0)",
    "loss/ratio_mean": "ppo_clip only: mean of ρ = π/π_old over kept tokens",
    "loss/approx_kl": "ppo_clip only: k3 estimate of KL(π_old‖π), mean of (ρ − 1) − log ρ over kept tokens",
}

ADVANTAGES = ("rloo", "grpo")

PEER_LOSS: dict[str, dict[str, object]] = {
    # verl 0.9.1 actor defaults: PPO clip 0.2, clip_ratio_c 3.0, loss_agg_mode token-mean; IcePop zeros and
    # the rejected samples' rewards stay (response_mask keeps them; RLOO/GRPO see the whole group)
    "verl-0.9.1": {
        "loss_type": "ppo_clip",
        "clip_eps": 0.2,
        "dual_clip": 3.0,
        "agg": "token_mean",
        "loss_norm": "valid",
        "rejected_in_baseline": True,
    },
    # TRL 1.16 GRPOConfig defaults: loss_type "dapo" (token sum over the generation batch's tokens), epsilon 0.2,
    # delta None (no dual clip); the IS ratio multiplies the loss, the completion mask is unchanged
    "trl-1.16": {
        "loss_type": "ppo_clip",
        "clip_eps": 0.2,
        "dual_clip": None,
        "agg": "token_mean",
        "loss_norm": "valid",
        "rejected_in_baseline": True,
    },
}
"""Loss settings (:class:`workbench.trainer.RLOOConfig` fields) that reproduce a peer's loss; the IS weights that
go with them are :data:`workbench.importance.PEER_PRESETS`. The advantage estimator stays the user's choice in
both peers (verl ``adv_estimator``, TRL's GRPO vs RLOO trainer)."""
BATCH_METRIC_DOCS: dict[str, str] = {
    "dvp/boundary_tokens": "sampled tokens outside the trainer's safe set at the training ρ (dropped from the "
    "loss when drop_boundary_tokens, and left out of every mismatch/* metric: their masked log-prob is a "
    "placeholder); TRL: mean over processes of each one's generation batch",
}
"""Keys :func:`corrected_batch` adds beside ``is/…`` and ``mismatch/…``."""


# ------------------------------------------------------------------------------------------- advantages
def _check_groups(
    rewards: torch.Tensor, k: int, valid: torch.Tensor | None, fn: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``rewards [N]``, ``k`` and ``valid [N]``; return float rewards and a bool valid mask."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(
            f"{fn}: k={k!r} must be an int ≥ 2 (samples per prompt); a leave-one-out baseline needs at least 2."
        )
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        shape = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(
            f"{fn}: rewards must be a 1-D tensor [N] (k consecutive samples per prompt), got {shape}; "
            "flatten it with rewards.reshape(-1)."
        )
    n = rewards.shape[0]
    if n % k != 0:
        raise ValueError(
            f"{fn}: len(rewards)={n} is not divisible by k={k}; pass k consecutive samples for every prompt."
        )
    r = rewards if rewards.is_floating_point() else rewards.float()
    if not bool(torch.isfinite(r).all()):
        bad = (~torch.isfinite(r)).nonzero().flatten().tolist()[:5]
        raise ValueError(
            f"{fn}: rewards must be finite, got non-finite values at indices {bad}; rewards live in [0, R_max]."
        )
    if valid is None:
        v = torch.ones(n, dtype=torch.bool, device=r.device)
    else:
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or valid.shape != rewards.shape:
            got = (
                (valid.dtype, tuple(valid.shape)) if isinstance(valid, torch.Tensor) else type(valid).__name__
            )
            raise ValueError(
                f"{fn}: valid must be a bool tensor of shape {tuple(rewards.shape)} (e.g. ISResult.seq_keep), got {got}."
            )
        v = valid
    return r, v


def rloo_advantages(rewards: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Leave-one-out advantages ``A_i = R_i − mean_{j≠i, valid} R_j`` per group of ``k`` consecutive samples.

    Args:
        rewards: ``[N]`` rewards, ``N = num_prompts · k``, samples of one prompt consecutive.
        k: samples per prompt (≥ 2).
        valid: ``[N]`` bool, False for samples rejected by IS masking / veto (``ISResult.seq_keep``). Invalid
            samples are left out of every baseline and get advantage 0; a group with fewer than two valid
            samples gets 0. None = all valid.

    Returns:
        ``[N]`` advantages (float dtype of ``rewards``; float32 for integer rewards).

    Raises:
        ValueError: ``k < 2``, ``rewards`` not 1-D, ``N`` not divisible by ``k``, non-finite rewards, or a
            ``valid`` that is not a bool tensor of the same shape.

    >>> r = torch.tensor([1.0, 0.0, 0.5, 3.0])
    >>> [round(a, 4) for a in rloo_advantages(r, k=4).tolist()]   # e.g. A_0 = 1 − (0 + 0.5 + 3)/3
    [-0.1667, -1.5, -0.8333, 2.5]
    >>> rloo_advantages(r, k=4, valid=torch.tensor([True, True, True, False])).tolist()  # 3.0 was rejected
    [0.75, -0.75, 0.0, 0.0]
    """
    r, v = _check_groups(rewards, k, valid, "rloo_advantages")
    groups = r.shape[0] // k
    rg = r.view(groups, k)  # (G, k)
    vg = v.view(groups, k)  # (G, k)
    rv = torch.where(vg, rg, 0.0)  # (G, k) rewards of valid samples, 0 elsewhere
    total = rv.sum(1, keepdim=True)  # (G, 1)
    n_valid = vg.sum(1, keepdim=True)  # (G, 1)
    baseline = (total - rv) / (n_valid - 1).clamp_min(1)  # (G, k) mean of the other valid samples
    adv = torch.where(vg & (n_valid >= 2), rg - baseline, 0.0)  # (G, k)
    return adv.reshape(-1)


def grpo_advantages(
    rewards: torch.Tensor,
    k: int,
    valid: torch.Tensor | None = None,
    *,
    scale: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-normalised advantages ``(R_i − mean) / (std + eps)`` over the valid samples of each group (GRPO).

    ``std`` is the unbiased sample standard deviation (as in TRL and verl). With ``scale=False`` this is
    ``R_i − mean``, which equals the RLOO advantage times ``(n−1)/n`` (``n`` valid samples in the group).
    Invalid samples and groups with fewer than two valid samples get 0, as in :func:`rloo_advantages`.

    Args:
        rewards: ``[N]`` rewards, ``k`` consecutive samples per prompt.
        k: samples per prompt (≥ 2).
        valid: ``[N]`` bool or None (all valid).
        scale: divide by the group's standard deviation.
        eps: added to the std (a group with equal rewards gets advantage 0, not NaN).

    Returns:
        ``[N]`` advantages.

    >>> [round(a, 4) for a in grpo_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), k=2).tolist()]
    [0.7071, -0.7071, 0.0, 0.0]
    """
    r, v = _check_groups(rewards, k, valid, "grpo_advantages")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"grpo_advantages: eps={eps!r} must be a finite number > 0 (typical 1e-6 … 1e-4).")
    groups = r.shape[0] // k
    rg = r.view(groups, k)  # (G, k)
    vg = v.view(groups, k)  # (G, k)
    n_valid = vg.sum(1, keepdim=True)  # (G, 1)
    mean = torch.where(vg, rg, 0.0).sum(1, keepdim=True) / n_valid.clamp_min(1)  # (G, 1)
    centred = torch.where(vg, rg - mean, 0.0)  # (G, k)
    adv = centred
    if scale:
        var = (centred * centred).sum(1, keepdim=True) / (n_valid - 1).clamp_min(1)  # (G, 1) unbiased
        adv = centred / (var.sqrt() + eps)
    adv = torch.where(vg & (n_valid >= 2), adv, 0.0)
    return adv.reshape(-1)


# ------------------------------------------------------------------------------------------------- loss
def _check_loss_inputs(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor | None,
    agg: str,
    loss_type: str,
    logp_old: torch.Tensor | None,
    clip_eps: float,
    dual_clip: float | None = None,
    norm_mask: torch.Tensor | None = None,
) -> None:
    if not isinstance(logp, torch.Tensor) or logp.dim() != 2 or not logp.is_floating_point():
        got = (tuple(logp.shape), logp.dtype) if isinstance(logp, torch.Tensor) else type(logp).__name__
        raise ValueError(f"policy_loss: logp must be a floating [B, T] tensor of token log-probs, got {got}.")
    b, t = logp.shape
    if not isinstance(advantages, torch.Tensor) or advantages.shape != (b,):
        got = tuple(advantages.shape) if isinstance(advantages, torch.Tensor) else type(advantages).__name__
        raise ValueError(
            f"policy_loss: advantages must have shape [B]=({b},) (one per sequence), got {got}; "
            "per-token advantages are not supported."
        )
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != logp.shape:
        got = (tuple(mask.shape), mask.dtype) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"policy_loss: mask must be a bool tensor of shape {(b, t)} (e.g. ISResult.keep), got {got}; use mask.bool()."
        )
    if weights is not None and (not isinstance(weights, torch.Tensor) or weights.shape != logp.shape):
        got = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise ValueError(
            f"policy_loss: weights must have shape {(b, t)} (ISResult.weights) or be None, got {got}."
        )
    if agg not in LOSS_AGGS:
        raise ValueError(f"policy_loss: agg={agg!r} must be one of {LOSS_AGGS}.")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"policy_loss: loss_type={loss_type!r} must be one of {LOSS_TYPES}.")
    if loss_type == "ppo_clip":
        if logp_old is None or not isinstance(logp_old, torch.Tensor) or logp_old.shape != logp.shape:
            got = None if logp_old is None else getattr(logp_old, "shape", type(logp_old).__name__)
            raise ValueError(
                f"policy_loss: loss_type='ppo_clip' needs logp_old of shape {(b, t)} (log-probs of the policy that "
                f"the ratio is taken against, e.g. the rollout's), got {got}."
            )
        if isinstance(clip_eps, bool) or not isinstance(clip_eps, (int, float)) or not 0.0 < clip_eps < 1.0:
            raise ValueError(f"policy_loss: clip_eps={clip_eps!r} must be in (0, 1) (PPO default 0.2).")
    elif logp_old is not None and (not isinstance(logp_old, torch.Tensor) or logp_old.shape != logp.shape):
        raise ValueError(
            f"policy_loss: logp_old must have shape {(b, t)} or be None, got {getattr(logp_old, 'shape', logp_old)!r}."
        )
    if dual_clip is not None:
        ok = isinstance(dual_clip, (int, float)) and not isinstance(dual_clip, bool)
        if not ok or not math.isfinite(dual_clip) or dual_clip <= 1.0 or loss_type != "ppo_clip":
            raise ValueError(
                f"policy_loss: dual_clip={dual_clip!r} must be a finite number > 1 with loss_type='ppo_clip' "
                "(verl's clip_ratio_c, default 3.0), or None for no dual clip."
            )
    if norm_mask is not None:
        ok = isinstance(norm_mask, torch.Tensor) and norm_mask.dtype == torch.bool
        if not ok or norm_mask.shape != logp.shape or bool((mask & ~norm_mask).any()):
            raise ValueError(
                "policy_loss: norm_mask must be a bool tensor of logp's shape that contains every kept (mask=True) "
                "token — e.g. keep | ISResult.zeroed — or None to normalise by the kept tokens."
            )
    # one device sync for all value checks on the positions that reach the loss
    checks = [~torch.isfinite(advantages).all(), ~torch.isfinite(logp.detach()[mask]).all()]
    if weights is not None:
        wk = weights.detach()[mask]
        checks.append(~(torch.isfinite(wk) & (wk >= 0)).all())
    if loss_type == "ppo_clip" and logp_old is not None:
        checks.append(~torch.isfinite(logp_old.detach()[mask]).all())
    flags = torch.stack(checks).tolist()
    names = [
        "advantages must be finite",
        "logp must be finite at kept (mask=True) positions",
        "weights must be finite and ≥ 0 at kept positions",
        "logp_old must be finite at kept positions",
    ]
    if weights is None:
        names.remove("weights must be finite and ≥ 0 at kept positions")
    bad = [n for n, f in zip(names, flags, strict=False) if f]
    if bad:
        raise ValueError(
            f"policy_loss: {'; '.join(bad)} — fix them upstream or set mask=False at those positions."
        )


def policy_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    agg: str = "token_mean",
    loss_type: str = "pg",
    logp_old: torch.Tensor | None = None,
    clip_eps: float = 0.2,
    dual_clip: float | None = None,
    norm_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Policy-gradient loss from token log-probs, sequence advantages, detached IS weights and a keep mask.

    Args:
        logp: ``[B, T]`` log-probs of the sampled tokens under the policy being trained (differentiable;
            with DVP these are ``log π^mp``). Values where ``mask`` is False are ignored (may be NaN).
        advantages: ``[B]`` one advantage per sequence (treated as a constant).
        mask: ``[B, T]`` bool, True for tokens in the loss (``ISResult.keep``).
        weights: ``[B, T]`` IS weights (``ISResult.weights``) or None for 1; detached here, never differentiated.
        agg: ``"token_mean"`` (divide by the number of kept tokens in the batch), ``"seq_mean"`` (mean over
            kept sequences of each sequence's token mean), ``"token_sum"`` (no division) or
            ``"seq_mean_token_sum"`` (mean over kept sequences of each sequence's token sum) — verl's
            ``token-mean``, ``seq-mean-token-mean``, ``token-sum``, ``seq-mean-token-sum``.
        loss_type: ``"pg"`` (REINFORCE: ``−w·A·log π``) or ``"ppo_clip"`` (``−w·min(ρA, clip(ρ, 1±ε)A)``).
        logp_old: ``[B, T]`` reference log-probs for the PPO ratio (detached). Required by ``ppo_clip``;
            accepted and ignored by ``pg`` so a caller can always pass it.
        clip_eps: PPO clip range ε in (0, 1).
        dual_clip: ppo_clip only: verl's dual clip ``c > 1`` (``clip_ratio_c``, 3.0 in verl): a token with a
            negative advantage loses at most ``c·|A|`` (surrogate ``max(min(ρA, clip(ρ)A), c·A)`` for A < 0).
            None (default) keeps the plain PPO clip, as TRL does.
        norm_mask: ``[B, T]`` bool, the tokens the normaliser counts (⊇ ``mask``; the extra ones contribute 0 to
            the sum). None (default) counts the kept tokens; ``keep | ISResult.zeroed`` is verl's/TRL's rule.

    Returns:
        ``(loss, stats)``: a scalar loss (an exact 0 that still backpropagates zeros when no token is kept) and
        ``{"loss/…": float}`` documented in :data:`LOSS_METRIC_DOCS`.

    Raises:
        ValueError: wrong shapes/dtypes, unknown ``agg``/``loss_type``, missing ``logp_old`` for ppo_clip,
            ``clip_eps`` outside (0, 1), or non-finite values at kept positions.

    >>> logp = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.5]]))
    >>> mask = torch.tensor([[True, True], [True, False]])
    >>> loss, stats = policy_loss(logp, torch.tensor([1.0, -1.0]), mask)
    >>> round(loss.item(), 4)   # −(log .5 + log .25 − log .5) / 3 = log(4)/3
    0.4621
    >>> stats["loss/kept_tokens"], stats["loss/all_rejected"]
    (3.0, 0.0)
    """
    _check_loss_inputs(
        logp, advantages, mask, weights, agg, loss_type, logp_old, clip_eps, dual_clip, norm_mask
    )
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    adv = advantages.detach().to(logp.dtype)[:, None]  # (B, 1)
    lp = torch.where(mask, logp, zero)  # (B, T); NaN/inf on dropped positions never reach the graph
    w = torch.ones_like(lp) if weights is None else torch.where(mask, weights.detach().to(logp.dtype), zero)
    extra: list[torch.Tensor] = []
    if loss_type == "pg":
        per_tok = -(w * adv * lp)  # (B, T)
    else:
        assert logp_old is not None
        lp_old = torch.where(mask, logp_old.detach().to(logp.dtype), zero)  # (B, T)
        log_ratio = (lp - lp_old).clamp(-_PPO_LOG_RATIO_CLAMP, _PPO_LOG_RATIO_CLAMP)  # (B, T)
        ratio = log_ratio.exp()  # (B, T)
        surr = ratio * adv
        surr_clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
        objective = torch.minimum(surr, surr_clipped)  # (B, T)
        if dual_clip is not None:  # verl: a negative-advantage token loses at most c·|A|
            objective = torch.where(adv < 0, torch.maximum(objective, dual_clip * adv), objective)
        per_tok = -(w * objective)  # (B, T)
        with torch.no_grad():
            n = mask.sum().clamp_min(1)
            extra = [
                ((surr_clipped < surr) & mask).sum() / n,
                torch.where(mask, ratio, zero).sum() / n,
                torch.where(mask, (ratio - 1) - log_ratio, zero).sum() / n,
            ]
    per_tok = torch.where(mask, per_tok, zero)  # (B, T)

    tok_per_seq = mask.sum(-1)  # (B,)
    kept_seq = tok_per_seq > 0  # (B,)
    n_tok = mask.sum()
    n_seq = kept_seq.sum()
    norm = mask if norm_mask is None else norm_mask  # (B, T) the tokens the normaliser counts
    norm_per_seq = norm.sum(-1)  # (B,)
    if agg == "token_mean":
        loss = per_tok.sum() / norm.sum().clamp_min(1)
    elif agg == "token_sum":
        loss = per_tok.sum()
    else:
        seq_loss = per_tok.sum(-1)  # (B,) token sum per sequence (0 if none kept)
        if agg == "seq_mean":
            seq_loss = seq_loss / norm_per_seq.clamp_min(1)  # (B,) token mean per sequence
        loss = seq_loss.sum() / (norm_per_seq > 0).sum().clamp_min(1)

    with torch.no_grad():
        values = [
            loss.detach(),
            n_tok.to(logp.dtype),
            n_seq.to(logp.dtype),
            (n_tok == 0).to(logp.dtype),
            torch.where(mask, w, zero).sum() / n_tok.clamp_min(1),
            torch.where(kept_seq, advantages.detach().abs().to(logp.dtype), zero).sum() / n_seq.clamp_min(1),
            *extra,
        ]
        keys = list(LOSS_METRIC_DOCS)[: len(values)]
        stats = dict(zip(keys, torch.stack([v.to(torch.float64) for v in values]).tolist(), strict=True))
    return loss, stats


# ------------------------------------------------------------------------------------- corrected batch
@dataclass
class CorrectedBatch:
    """Output of :func:`corrected_batch`: the loss inputs of one batch and its metrics.

    Attributes:
        weights: ``[B, T]`` float32 IS weights, detached, 0 where ``keep`` is False.
        keep: ``[B, T]`` bool; the token is in the loss (valid, not masked/vetoed/rejected, not a dropped
            boundary token).
        seq_keep: ``[B]`` bool; the sequence still has a kept token (it sits in its group's baseline).
        advantages: ``[B]`` one advantage per sequence of this batch (0 for rejected sequences when computed
            from rewards).
        logp_old: ``[B, T]`` the detached trainer log-probs (the PPO ratio's reference).
        zeroed: ``[B, T]`` bool; tokens a ``token_mis`` / ``seq_mis`` window zeroed (``ISResult.zeroed``, boundary
            tokens out): the extra tokens of the ``valid`` normaliser.
        metrics: ``is/…`` (:data:`workbench.importance.IS_METRIC_DOCS`), ``mismatch/…``
            (:data:`workbench.metrics.MISMATCH_METRIC_DOCS`) and :data:`BATCH_METRIC_DOCS`.
    """

    weights: torch.Tensor
    keep: torch.Tensor
    seq_keep: torch.Tensor
    advantages: torch.Tensor
    logp_old: torch.Tensor
    metrics: dict[str, float]
    zeroed: torch.Tensor | None = None

    def loss(
        self,
        logp: torch.Tensor,
        *,
        agg: str = "token_mean",
        loss_type: str = "pg",
        clip_eps: float = 0.2,
        dual_clip: float | None = None,
        norm: str = "kept",
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """:func:`policy_loss` of the differentiable ``logp [B, T]`` on this batch's loss inputs.

        ``norm``: ``"kept"`` (the normaliser counts the tokens in the loss) or ``"valid"`` (it also counts the
        tokens a mask window zeroed: verl's IcePop, TRL's ``*_mask`` modes); see :data:`LOSS_NORMS`.
        """
        if norm not in LOSS_NORMS:
            raise ValueError(f"CorrectedBatch.loss: norm={norm!r} must be one of {LOSS_NORMS}.")
        norm_mask = None if norm == "kept" or self.zeroed is None else self.keep | self.zeroed
        return policy_loss(
            logp,
            self.advantages,
            self.keep,
            self.weights,
            agg=agg,
            loss_type=loss_type,
            logp_old=self.logp_old,
            clip_eps=clip_eps,
            dual_clip=dual_clip,
            norm_mask=norm_mask,
        )


def corrected_batch(
    logp_train: torch.Tensor,
    logp_infer: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    is_config: ISConfig,
    boundary: torch.Tensor | None = None,
    drop_boundary: bool = True,
    drop_boundary_suffix: bool = False,
    rewards: torch.Tensor | None = None,
    k: int | None = None,
    advantage: str = "rloo",
    scale: bool = True,
    advantages: torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rows: slice | None = None,
    rejected_in_baseline: bool = False,
    verl_metrics: bool = False,
) -> CorrectedBatch:
    """IS weights → boundary tokens dropped → advantages → loss inputs → metrics, for one batch.

    The one place the corrected batch is built: :class:`workbench.trainer.RLOOTrainer`, the TRL trainer
    (:mod:`workbench.integrations.trl`) and the verl loss (:mod:`workbench.integrations.verl`) call it, so
    the three give the same weights, advantages, loss and metrics on the same batch.

    Args:
        logp_train: ``[B, T]`` trainer log-probs of the sampled tokens (detached here; with DVP ``log π^mp``).
        logp_infer: ``[B, T]`` engine log-probs ``log μ`` of the same tokens, or None when the caller has none
            (verl's decoupled mode computes IS upstream and hands over ``is_weights``): then no IS runs and
            no ``is/…`` / ``mismatch/…`` metric is emitted.
        mask: ``[B, T]`` bool, valid response tokens.
        is_config: the IS correction (mode, bounds, veto, trust region).
        boundary: ``[B, T]`` bool, sampled tokens outside the trainer's safe set
            (:func:`workbench.metrics.boundary_tokens` from logits, or
            :func:`workbench.metrics.boundary_from_logprobs` from ``log π^mp``); None: none.
        drop_boundary: drop boundary tokens from the loss (they leave the mismatch metrics either way).
        drop_boundary_suffix: with ``drop_boundary``, also drop every token *after* a sequence's first boundary
            token: the text that follows a draw the trainer's policy cannot make is off its distribution.
        rewards: ``[N]`` rewards, ``k`` consecutive samples per prompt; NaN marks an unscorable sample (out of
            the baseline, advantage 0). ``N = B`` unless ``gather`` collects other processes' rows.
        k: samples per prompt (with ``rewards``).
        advantage: ``"rloo"`` (:func:`rloo_advantages`) or ``"grpo"`` (:func:`grpo_advantages`, std-scaled
            when ``scale``).
        scale: GRPO only: divide by the group's standard deviation.
        advantages: ``[B]`` advantages computed by the caller's own estimator (verl's), used as given;
            exclusive with ``rewards``.
        is_weights: ``[B, T]`` upstream IS weights, only with ``logp_infer=None`` (None: weights 1).
        gather: maps this batch's ``[B]`` sequence-keep mask to the ``[N]`` one of the whole generation batch
            (TRL across processes); None: identity.
        rows: this batch's rows within the ``[N]`` advantages (TRL's process slice); None: all.
        rejected_in_baseline: keep the rewards of rejected (masked, vetoed, trust-region) samples in their
            group's baseline, as verl and TRL do; their tokens stay out of the loss either way. Default False:
            the project's choice (module docstring, "Rejected samples").
        verl_metrics: also emit verl's ``rollout_corr/…`` metrics with verl's definitions
            (:func:`workbench.metrics.verl_rollout_corr_metrics`, keys in
            :data:`workbench.metrics.VERL_METRIC_DOCS`), on the same tokens as ``mismatch/…``.

    Returns:
        A :class:`CorrectedBatch`.

    Raises:
        ValueError: neither or both of ``rewards`` / ``advantages``, ``rewards`` without ``k``, an unknown
            ``advantage``, ``is_weights`` together with ``logp_infer``, or a ``boundary`` of the wrong shape;
            and the errors of :meth:`ISConfig.apply` and the advantage functions.

    >>> lp = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.5]]))
    >>> b = corrected_batch(lp, lp, torch.ones(2, 2, dtype=torch.bool), is_config=ISConfig("token_mis"),
    ...                     rewards=torch.tensor([1.0, 0.0]), k=2)
    >>> b.advantages.tolist(), b.metrics["mismatch/k3"], b.metrics["dvp/boundary_tokens"]
    ([1.0, -1.0], 0.0, 0.0)
    """
    if (rewards is None) == (advantages is None):
        raise ValueError(
            "corrected_batch: pass exactly one of rewards (advantages computed here, rejected samples out of "
            "the baseline) or advantages (the caller's own estimator, e.g. verl's)."
        )
    if rewards is not None and k is None:
        raise ValueError("corrected_batch: rewards need k, the number of samples per prompt.")
    if advantage not in ADVANTAGES:
        raise ValueError(f"corrected_batch: advantage={advantage!r} must be one of {ADVANTAGES}.")
    if is_weights is not None and logp_infer is not None:
        raise ValueError(
            "corrected_batch: is_weights are upstream IS weights for logp_infer=None; with engine log-probs "
            "the IS of is_config is applied here."
        )
    if boundary is None:
        boundary = torch.zeros_like(mask)
    elif boundary.shape != mask.shape or boundary.dtype != torch.bool:
        raise ValueError(
            f"corrected_batch: boundary must be a bool tensor of shape {tuple(mask.shape)}, got "
            f"{(boundary.dtype, tuple(boundary.shape))}."
        )
    logp_old = logp_train.detach()
    boundary = boundary & mask  # (B, T)

    # 1. IS weights and keep mask
    out: dict[str, float] = {}
    zeroed = torch.zeros_like(mask)
    if logp_infer is None:
        weights = (
            torch.ones_like(logp_old, dtype=torch.float32) if is_weights is None else is_weights.detach()
        )
        keep = mask
        seq_keep = torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
    else:
        res = is_config.apply(logp_old, logp_infer, mask)
        weights, keep, seq_keep = res.weights, res.keep, res.seq_keep
        if res.zeroed is not None:
            zeroed = res.zeroed
        out.update(res.stats)
    # 2. boundary tokens out of the loss
    if drop_boundary:
        dropped = boundary.cumsum(-1) > 0 if drop_boundary_suffix else boundary  # (B, T)
        keep = keep & ~dropped  # (B, T)
        zeroed = zeroed & ~dropped  # (B, T)
    seq_keep = seq_keep & keep.any(-1)  # (B,)
    weights = torch.where(keep, weights, 0.0)  # (B, T)

    # 3. advantages: rejected (and unscorable) samples leave the baseline
    if rewards is not None:
        assert k is not None
        in_baseline = torch.ones_like(seq_keep) if rejected_in_baseline else seq_keep  # (B,)
        valid = (in_baseline if gather is None else gather(in_baseline)) & ~torch.isnan(rewards)  # (N,)
        scores = torch.nan_to_num(rewards, nan=0.0)  # (N,)
        if advantage == "rloo":
            adv = rloo_advantages(scores, k, valid=valid)
        else:
            adv = grpo_advantages(scores, k, valid=valid, scale=scale)
        advantages = adv if rows is None else adv[rows]  # (B,)
    assert advantages is not None

    # 4. metrics: mismatch on the tokens both sides agree are in the safe set
    if logp_infer is not None:
        agree = mask & ~boundary  # (B, T)
        out.update(metrics.mismatch_metrics(logp_old, logp_infer, agree))
        out.update(metrics.sampled_tail_delta(logp_old, logp_infer, agree))
        if verl_metrics:
            out.update(metrics.verl_rollout_corr_metrics(logp_old, logp_infer, agree, is_config))
    out["dvp/boundary_tokens"] = float(boundary.sum())
    return CorrectedBatch(
        weights=weights,
        keep=keep,
        seq_keep=seq_keep,
        advantages=advantages,
        logp_old=logp_old,
        metrics=out,
        zeroed=zeroed,
    )
