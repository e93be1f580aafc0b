"""Parity settings against the peers' own code on the same batch (lessons/switching.md, ../shared/PARITY.md).

With the parity settings — :data:`workbench.importance.PEER_PRESETS`, :data:`workbench.rloo.PEER_LOSS`,
``verl_metrics`` — the workbench's weights, advantages, loss (value and gradient) and ``rollout_corr/…``
metrics equal verl 0.9.1's and TRL 1.16's. The peers' functions are called, never re-implemented: verl's
``rollout_corr_helper`` / ``core_algos``; TRL's vLLM correction is the block of
``GRPOTrainer._generate_and_score_completions`` that computes it (run from TRL's source on our tensors, so a
change in TRL fails here), and TRL's loss is ``GRPOTrainer._compute_loss`` on a stand-in trainer. Each peer's
tests skip, with the reason, when it is not installed. Every row of the switching guide names a test here
(or in test_integrations_verl.py) that exercises its setting.
"""

from __future__ import annotations

import collections
import inspect
import math
import textwrap
import types

import numpy as np
import pytest
import torch

from workbench import metrics
from workbench.importance import PEER_PRESETS, ISConfig, importance_weights
from workbench.rloo import PEER_LOSS, corrected_batch, policy_loss

VERL_REASON = "verl is not installed; `make test` installs verl 0.9.1 (see the Makefile)"
TRL_REASON = "TRL is not installed: pip install -e '.[bench]'"
K = 4


def _batch(seed: int, b: int = 24, t: int = 9, noise: float = 0.3, empty_rows: tuple[int, ...] = ()) -> dict:
    """[B, T] trainer / engine log-probs, right-padded responses (some rows may be empty), rewards, K per prompt."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b, 1), generator=g)
    lengths[list(empty_rows)] = 0
    mask = torch.arange(t)[None, :] < lengths  # (B, T)
    old = -torch.rand(b, t, generator=g) * 3  # (B, T) trainer log-probs (verl: old_log_prob)
    rollout = old + noise * torch.randn(b, t, generator=g)  # (B, T) engine log-probs
    logp = (old + 0.15 * torch.randn(b, t, generator=g)).requires_grad_(True)  # a later PPO epoch
    rewards = torch.randint(0, 2, (b,), generator=g).float()
    return {"mask": mask, "old": old, "rollout": rollout, "logp": logp, "rewards": rewards}


# ---------------------------------------------------------------------------------------- options, no peer
def test_dual_clip_caps_the_loss_of_a_negative_advantage_token() -> None:
    """PARITY 5: one token with log-ratio 25 and A = −1: plain PPO loses e^20 (the clamp), dual clip c·|A| = 3."""
    logp = torch.tensor([[25.0]], requires_grad=True)
    args = dict(loss_type="ppo_clip", logp_old=torch.zeros(1, 1))
    plain, _ = policy_loss(logp, torch.tensor([-1.0]), torch.ones(1, 1, dtype=torch.bool), **args)
    capped, _ = policy_loss(
        logp, torch.tensor([-1.0]), torch.ones(1, 1, dtype=torch.bool), dual_clip=3.0, **args
    )
    assert plain.item() == pytest.approx(math.exp(20)) and capped.item() == 3.0
    (grad,) = torch.autograd.grad(capped, logp)
    assert grad.item() == 0.0  # the cap is flat
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logp, torch.tensor([-1.0]), torch.ones(1, 1, dtype=torch.bool), dual_clip=3.0)  # pg


def test_aggregations_and_normalisers_written_out() -> None:
    d = _batch(1, b=6, t=5, empty_rows=(2,))
    keep = d["mask"].clone()
    keep[0, 0] = False  # a token out of the loss but in the valid normaliser
    norm = d["mask"]
    adv = torch.linspace(-1, 1, 6)
    per_tok = torch.where(keep, -adv[:, None] * d["logp"], 0.0)  # pg, weights 1
    n_seq_norm = (norm.sum(-1) > 0).sum()
    want = {
        "token_mean": per_tok.sum() / norm.sum(),
        "token_sum": per_tok.sum(),
        "seq_mean": (per_tok.sum(-1) / norm.sum(-1).clamp_min(1)).sum() / n_seq_norm,
        "seq_mean_token_sum": per_tok.sum(-1).sum() / n_seq_norm,
    }
    for agg, ref in want.items():
        got, _ = policy_loss(d["logp"], adv, keep, agg=agg, norm_mask=norm)
        torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError, match="norm_mask"):
        policy_loss(d["logp"], adv, d["mask"], norm_mask=keep)  # a kept token outside the normaliser


def test_trl_lower_clip_and_open_lower_window() -> None:
    """PARITY 7: tis modes take a lower clip, token_mis / seq_mis take lo=0 (no lower side)."""
    lt = torch.log(torch.tensor([[0.5, 0.01, 0.9]]))
    li = torch.log(torch.tensor([[0.1, 0.5, 0.9]]))  # r = 5, 0.02, 1
    mask = torch.ones(1, 3, dtype=torch.bool)
    w = importance_weights(lt, li, mask, "token_tis", lo=0.5, hi=3.0, veto=None).weights
    torch.testing.assert_close(w, torch.tensor([[3.0, 0.5, 1.0]]))
    open_below = importance_weights(lt, li, mask, "token_mis", lo=0.0, hi=3.0, veto=None)
    torch.testing.assert_close(open_below.weights, torch.tensor([[0.0, 0.02, 1.0]]))
    assert open_below.zeroed.tolist() == [[True, False, False]]
    with pytest.raises(ValueError, match="lower clip"):
        ISConfig("token_tis", lo=1.5)
    with pytest.raises(ValueError):
        ISConfig("geo_mask", lo=0.0)  # only the TRL mask modes have an open lower side


def test_ppl_ratio_in_both_definitions() -> None:
    """PARITY 3: geometric (ours) vs arithmetic (verl) mean of the per-sequence perplexity ratios."""
    lt = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    li = torch.tensor([[math.log(4.0), 0.0], [0.0, 0.0]])  # row 0: mean Δ = ln 2 → ppl ratio 2; row 1: 1
    m = metrics.mismatch_metrics(lt, li, torch.ones(2, 2, dtype=torch.bool))
    assert m["mismatch/ppl_ratio"] == pytest.approx(math.sqrt(2.0))  # exp(mean(ln 2, 0))
    assert m["mismatch/ppl_ratio_arith"] == pytest.approx(1.5)  # mean(2, 1)


def test_rejected_samples_in_the_baseline_on_request() -> None:
    """PARITY 10: rejected_in_baseline=True gives every sample verl's advantage; its tokens stay out."""
    d = _batch(2, b=8)
    cfg = ISConfig("seq_mis", lo=0.8, hi=1.25, veto=None)
    ours = corrected_batch(d["old"], d["rollout"], d["mask"], is_config=cfg, rewards=d["rewards"], k=K)
    verlish = corrected_batch(
        d["old"], d["rollout"], d["mask"], is_config=cfg, rewards=d["rewards"], k=K, rejected_in_baseline=True
    )
    assert not bool(ours.seq_keep.all())  # some sequence is rejected
    r = d["rewards"].view(-1, K)
    loo = (r * K / (K - 1) - r.mean(1, keepdim=True) * K / (K - 1)).view(-1)  # RLOO over the whole group
    torch.testing.assert_close(verlish.advantages, loo)
    assert torch.equal(verlish.keep, ours.keep)


def test_presets_are_the_peer_configs() -> None:
    assert ISConfig.from_trl() == PEER_PRESETS["trl-1.16-sequence_mask"]
    assert PEER_PRESETS["trl-1.16-sequence_mask"].bounds == (0.0, 3.0)
    assert all(c.veto is None for c in PEER_PRESETS.values())
    with pytest.raises(ValueError, match="clip_max"):
        ISConfig.from_trl("token_mask", clip_max=None)


# ------------------------------------------------------------------------------------------------- verl
def _verl(name: str):
    return pytest.importorskip(name, reason=VERL_REASON)


VERL_CONFIGS = [
    ISConfig("none", veto=None),
    PEER_PRESETS["verl-0.9.1-RolloutCorrectionConfig"],
    ISConfig("token_tis", hi=2.0, veto=None, trust_region=0.3),
    ISConfig("token_mis", lo=0.5, hi=2.0, veto=None),
    ISConfig("seq_mis", lo=0.5, hi=2.0, veto=None, trust_region=0.2, trust_region_div="k2"),
    ISConfig("geo_mask", lo=0.9, hi=1.1, veto=None, trust_region=0.3),
]


def _verl_keys(cfg: ISConfig) -> dict:
    from workbench.integrations.verl import rollout_correction_for

    return {k: v for k, v in rollout_correction_for(cfg).items() if k != "bypass_mode"}


@pytest.mark.parametrize("cfg", VERL_CONFIGS, ids=lambda c: c.mode)
def test_verl_metric_names_equal_verls_own_on_a_batch_with_empty_rows(cfg: ISConfig) -> None:
    """PARITY 3, 4, 6: every rollout_corr/… key we emit is one verl emits, with verl's value (empty rows, arithmetic
    PPL ratio, ESS with IcePop zeros); and we emit every key verl does for these settings."""
    rc = _verl("verl.trainer.ppo.rollout_corr_helper")
    d = _batch(3, empty_rows=(2, 7, 11))
    _, _, theirs = rc.compute_rollout_correction_and_rejection_mask(
        d["old"], d["rollout"], d["mask"].float(), **_verl_keys(cfg)
    )
    b = corrected_batch(
        d["old"], d["rollout"], d["mask"], is_config=cfg, rewards=d["rewards"], k=K, verl_metrics=True
    )
    ours = {k: v for k, v in b.metrics.items() if k.startswith("rollout_corr/")}
    assert set(ours) == set(theirs)
    assert set(ours) <= set(metrics.VERL_METRIC_DOCS)
    for key, value in ours.items():
        assert value == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key
    # the definitions differ from ours exactly where PARITY.md says (empty rows are in this batch)
    assert ours["rollout_corr/ppl_ratio"] != pytest.approx(b.metrics["mismatch/ppl_ratio_arith"], rel=1e-4)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "token-sum", "seq-mean-token-sum"])
@pytest.mark.parametrize("cfg", VERL_CONFIGS[1:], ids=lambda c: c.mode)
def test_verl_preset_loss_equals_verls_vanilla_ppo_with_dual_clip(cfg: ISConfig, agg: str) -> None:
    """PARITY 2, 5, 10: verl's rollout correction → verl's RLOO advantages → verl's vanilla PPO loss (dual clip
    c = 3) equals corrected_batch + loss with PEER_LOSS["verl-0.9.1"], values and gradients."""
    rc = _verl("verl.trainer.ppo.rollout_corr_helper")
    core = _verl("verl.trainer.ppo.core_algos")
    omegaconf = _verl("omegaconf")
    from workbench.integrations.verl import VERL_AGG

    d = _batch(4, noise=0.4)
    mask_f = d["mask"].float()
    weights, verl_mask, _ = rc.compute_rollout_correction_and_rejection_mask(
        d["old"], d["rollout"], mask_f, **_verl_keys(cfg)
    )
    token_rewards = torch.zeros_like(mask_f)
    token_rewards[:, 0] = d["rewards"]  # verl sums token-level rewards into the score
    index = np.repeat(np.arange(len(d["rewards"]) // K), K)
    adv, _ = core.compute_rloo_outcome_advantage(token_rewards, verl_mask, index)
    conf = omegaconf.OmegaConf.create(
        {
            "clip_ratio": 0.2,
            "clip_ratio_low": 0.2,
            "clip_ratio_high": 0.2,
            "clip_ratio_c": 3.0,
            "global_batch_info": {},
        }
    )
    theirs, _ = core.compute_policy_loss_vanilla(
        old_log_prob=d["old"],
        log_prob=d["logp"],
        advantages=adv,
        response_mask=verl_mask,
        loss_agg_mode=agg,
        config=conf,
        rollout_is_weights=None if weights is None else weights.batch["rollout_is_weights"],
    )

    peer = PEER_LOSS["verl-0.9.1"]
    b = corrected_batch(
        d["old"],
        d["rollout"],
        d["mask"],
        is_config=cfg,
        rewards=d["rewards"],
        k=K,
        rejected_in_baseline=bool(peer["rejected_in_baseline"]),
    )
    ours, _ = b.loss(
        d["logp"],
        agg=VERL_AGG[agg],
        loss_type=str(peer["loss_type"]),
        clip_eps=float(peer["clip_eps"]),  # type: ignore[arg-type]
        dual_clip=peer["dual_clip"],  # type: ignore[arg-type]
        norm=str(peer["loss_norm"]),
    )
    torch.testing.assert_close(ours, theirs)
    (g,) = torch.autograd.grad(ours, d["logp"])
    (g_ref,) = torch.autograd.grad(theirs, d["logp"])
    torch.testing.assert_close(g, g_ref)
    assert bool((adv[:, 0] != 0).any())


# -------------------------------------------------------------------------------------------------- TRL
def _trl_grpo():
    pytest.importorskip("trl", reason=TRL_REASON)
    from trl.trainer import grpo_trainer

    return grpo_trainer


def _trl_vllm_is_ratio(
    mode: str, clip_max: float | None, clip_min: float | None, old: torch.Tensor, sampling: torch.Tensor, mask
) -> torch.Tensor:
    """TRL 1.16's vLLM importance-sampling correction, run from TRL's own source on these tensors."""
    mod = _trl_grpo()
    src = inspect.getsource(mod.GRPOTrainer._generate_and_score_completions)
    start = src.index("            # Compute the importance sampling ratio when using vLLM")
    end = src.index("            # Compute the per-token log probabilities for the reference model")
    block = textwrap.dedent(src[start:end])
    assert "vllm_importance_sampling_ratio" in block, "TRL moved its vLLM correction: update this test"
    trainer = types.SimpleNamespace(
        use_vllm=True,
        vllm_importance_sampling_correction=True,
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_max=clip_max,
        vllm_importance_sampling_clip_min=clip_min,
    )
    scope = {
        "self": trainer,
        "torch": torch,
        "math": math,
        "completion_mask": mask.float(),
        "tool_mask": None,
        "old_per_token_logps": old,
        "sampling_per_token_logps": sampling,
    }
    exec(compile(block, "trl.GRPOTrainer._generate_and_score_completions", "exec"), scope)  # TRL's code
    return scope["vllm_importance_sampling_ratio"]


class _Accelerator:
    num_processes = 1

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x

    gather_for_metrics = gather


def _trl_loss(loss_type: str, logp, old, adv, mask, is_ratio, max_len: int) -> torch.Tensor:
    """TRL 1.16's ``GRPOTrainer._compute_loss`` on a stand-in trainer whose forward returns ``logp``."""
    mod = _trl_grpo()
    b, t = logp.shape
    trainer = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=0.0,
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=0.2,
        args=types.SimpleNamespace(delta=None, steps_per_generation=1),
        use_vllm=True,
        vllm_importance_sampling_correction=True,
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        accelerator=_Accelerator(),
        max_completion_length=max_len,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
    )
    inputs = {
        "prompt_ids": torch.zeros(b, 1, dtype=torch.long),
        "prompt_mask": torch.ones(b, 1, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": old,
        "importance_sampling_ratio": is_ratio,
        "num_items_in_batch": mask.sum(),
    }
    return mod.GRPOTrainer._compute_loss(trainer, None, inputs)


TRL_MODES = ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


@pytest.mark.parametrize("clip_min", [None, 0.5])
@pytest.mark.parametrize("mode", TRL_MODES)
def test_trl_presets_give_trls_vllm_correction_weights(mode: str, clip_min: float | None) -> None:
    """PARITY 1, 7: ISConfig.from_trl (PEER_PRESETS for TRL's defaults) weights = TRL's ratio on the valid tokens."""
    d = _batch(5, noise=0.5)
    theirs = _trl_vllm_is_ratio(mode, 3.0, clip_min, d["old"], d["rollout"], d["mask"])
    cfg = ISConfig.from_trl(mode, clip_max=3.0, clip_min=clip_min)
    if clip_min is None:
        assert cfg == PEER_PRESETS[f"trl-1.16-{mode}"]
    res = cfg.apply(d["old"], d["rollout"], d["mask"])
    want = (theirs * torch.ones_like(d["old"]))[d["mask"]]  # sequence modes: (B, 1) broadcast
    torch.testing.assert_close(res.weights[d["mask"]], want, rtol=1e-6, atol=3e-9)
    zeroed_by_trl = d["mask"] & (theirs * torch.ones_like(d["old"]) == 0)
    if mode.endswith("mask"):
        assert torch.equal(res.zeroed, zeroed_by_trl) and bool(zeroed_by_trl.any())


@pytest.mark.parametrize(
    ("loss_type", "agg"),
    [("dapo", "token_mean"), ("bnpo", "token_mean"), ("grpo", "seq_mean"), ("dr_grpo", "token_sum")],
)
@pytest.mark.parametrize("mode", TRL_MODES)
def test_trl_preset_loss_equals_trls_compute_loss(mode: str, loss_type: str, agg: str) -> None:
    """PARITY 2: TRL's loss with its vLLM correction = corrected_batch + loss with PEER_LOSS["trl-1.16"]
    (masked tokens stay in the normaliser), values and gradients; dr_grpo is token_sum / (B · max length)."""
    d = _batch(6, noise=0.5)
    adv = torch.randn(d["mask"].shape[0], generator=torch.Generator().manual_seed(0))
    ratio = _trl_vllm_is_ratio(mode, 3.0, None, d["old"], d["rollout"], d["mask"])
    max_len = d["mask"].shape[1]
    theirs = _trl_loss(loss_type, d["logp"], d["old"], adv, d["mask"], ratio, max_len)

    peer = PEER_LOSS["trl-1.16"]
    b = corrected_batch(
        d["old"], d["rollout"], d["mask"], is_config=PEER_PRESETS[f"trl-1.16-{mode}"], advantages=adv
    )
    ours, _ = b.loss(
        d["logp"],
        agg=agg,
        loss_type=str(peer["loss_type"]),
        clip_eps=float(peer["clip_eps"]),  # type: ignore[arg-type]
        dual_clip=peer["dual_clip"],  # type: ignore[arg-type]
        norm=str(peer["loss_norm"]),
    )
    if loss_type == "dr_grpo":
        ours = ours / (d["mask"].shape[0] * max_len)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    (g,) = torch.autograd.grad(ours, d["logp"])
    (g_ref,) = torch.autograd.grad(theirs, d["logp"])
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------ the trainer
PROBE = dict(model=None, vocab_size=64, task="probe", task_kwargs={"target": "7"}, k=4, prompts_per_step=4)


@pytest.mark.parametrize("preset", list(PEER_PRESETS))
def test_rloo_config_reproducing_runs_a_step_with_the_peer_settings(preset: str) -> None:
    """RLOOConfig.reproducing threads every parity setting through a real step; verl presets log rollout_corr/…."""
    from workbench.trainer import RLOOConfig, RLOOTrainer, all_metric_docs

    cfg = RLOOConfig.reproducing(preset, **PROBE, perturbation="gaussian:0.3")
    assert cfg.rho is None and cfg.veto is None and cfg.loss_norm == "valid" and cfg.rejected_in_baseline
    assert cfg.dual_clip == (3.0 if preset.startswith("verl") else None)
    m = RLOOTrainer(cfg).step()
    verl_keys = {k for k in m if k.startswith("rollout_corr/")}
    assert set(m) - verl_keys == set(all_metric_docs())
    assert verl_keys <= set(metrics.VERL_METRIC_DOCS) and bool(verl_keys) == preset.startswith("verl")
    assert math.isfinite(m["loss/pg"])


def test_half_precision_logprobs_equal_trls_on_upcast_logits() -> None:
    """PARITY 9: the workbench returns fp32 log-probs from bf16 logits; TRL's selective_log_softmax gives the same
    numbers when handed the logits upcast to fp32 (in bf16 it rounds them to bf16)."""
    pytest.importorskip("trl", reason=TRL_REASON)
    from trl.trainer.utils import selective_log_softmax

    from workbench import dvp

    g = torch.Generator().manual_seed(7)
    logits = (3 * torch.randn(4, 6, 50, generator=g)).to(torch.bfloat16)
    ids = torch.randint(0, 50, (4, 6), generator=g)
    ours = dvp.token_logprobs(logits, ids, None)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, selective_log_softmax(logits.float(), ids), rtol=0, atol=2e-6)
    assert selective_log_softmax(logits, ids).dtype == torch.bfloat16
