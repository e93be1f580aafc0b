"""The RLOO trainer: config validation, learning on probe/synthetic tasks, determinism, resume, run dirs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from workbench.trainer import NAN_WHEN_EMPTY, RLOOConfig, RLOOTrainer, all_metric_docs, read_metrics

# A fresh 64-id model on the probe bandit: learnable from scratch in a few seconds.
PROBE = dict(
    model=None,
    vocab_size=64,
    task="probe",
    task_kwargs={"target": "7", "digit_credit": 0.3},
    k=4,
    prompts_per_step=8,
    lr=3e-3,
    engine_dtype="fp32",
    seed=0,
)


def _strip_perf(rows: list[dict[str, float]]) -> list[dict[str, float | None]]:
    """Drop timing keys and turn nan (an empty selection, e.g. no tail draw) into None so rows compare equal."""
    return [
        {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in r.items()
            if not k.startswith("perf/")
        }
        for r in rows
    ]


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("k", 1, "k >= 2"),
        ("rho", 1.5, "rho"),
        ("rho", 0.0, "rho"),
        ("lr", 0.0, "0 < lr < 1"),
        ("temperature", -1.0, "temperature"),
        ("is_mode", "bogus", "bogus"),
        ("ppo_epochs", 2, "ppo_clip"),
        ("engine", "tgi", "'torch' or 'vllm'"),
        ("engine_dtype", "fp8", "engine_dtype"),
        ("lr_schedule", "step", "lr_schedule"),
        ("perturbation", "wobble:3", "wobble"),
        ("device", "gpu", "a torch device string"),
    ],
)
def test_config_rejects_bad_values_with_a_fix(field: str, value: object, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        RLOOConfig(**{field: value})


def test_boundary_suffix_reaches_the_loss_on_the_same_rollout() -> None:
    # A floor 1 nat below the max inside a ρ = 0.3 (1.2 nats) safe set: the engine samples floored ids the trainer
    # prunes (boundary tokens). Same seed, same rollout; the suffix cut must drop the tokens after them as well.
    def step(suffix: bool) -> dict[str, float]:
        cfg = RLOOConfig(**{**PROBE, "rho": 0.3, "perturbation": "floor:1", "drop_boundary_suffix": suffix})
        return RLOOTrainer(cfg).step()

    token, suffix = step(False), step(True)
    assert token["dvp/boundary_tokens"] == suffix["dvp/boundary_tokens"] > 0
    assert suffix["loss/kept_tokens"] < token["loss/kept_tokens"]


def test_boundary_suffix_without_dropping_boundary_tokens_is_rejected() -> None:
    with pytest.raises(ValueError, match="drop_boundary_tokens=True"):
        RLOOConfig(drop_boundary_tokens=False, drop_boundary_suffix=True)


def test_config_json_roundtrip_and_diff(tmp_path) -> None:
    cfg = RLOOConfig(rho=None, is_mode="seq_mis", task_kwargs={"digits": 3})
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert RLOOConfig.from_json(path) == cfg
    assert set(cfg.diff()) == {"rho", "is_mode", "task_kwargs"}
    with pytest.raises(ValueError, match="unknown RLOOConfig keys"):
        RLOOConfig.from_dict({"rhoo": 0.1})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        RLOOConfig.from_json(tmp_path / "bad.json")


def test_probe_task_learns_the_known_optimum() -> None:
    trainer = RLOOTrainer(RLOOConfig(**PROBE))
    hist = trainer.train(40, progress=False)
    first = sum(m["reward/mean"] for m in hist[:5]) / 5
    last = sum(m["reward/mean"] for m in hist[-5:]) / 5
    assert last > first + 0.3, (first, last)
    # The target is now the policy's favourite first token.
    ids = torch.tensor([trainer.tokenizer.encode("?")])
    with torch.no_grad():
        logits = trainer.model(input_ids=ids).logits[0, -1]
    assert int(logits.argmax()) == trainer.tokenizer.convert_tokens_to_ids("7")


@pytest.mark.slow
def test_synthetic_addition_reward_rises_from_the_shipped_policy() -> None:
    cfg = RLOOConfig(
        model="add2", task="addition", k=4, prompts_per_step=16, lr=3e-5, engine_dtype="fp32", seed=1
    )
    hist = RLOOTrainer(cfg).train(30, progress=False)
    first = sum(m["reward/mean"] for m in hist[:5]) / 5
    last = sum(m["reward/mean"] for m in hist[-5:]) / 5
    assert last > first + 0.03, (first, last)


def test_same_seed_gives_same_metrics() -> None:
    a = RLOOTrainer(RLOOConfig(**PROBE)).train(3, progress=False)
    b = RLOOTrainer(RLOOConfig(**PROBE)).train(3, progress=False)
    assert _strip_perf(a) == _strip_perf(b)
    c = RLOOTrainer(RLOOConfig(**{**PROBE, "seed": 1})).train(3, progress=False)
    assert _strip_perf(a) != _strip_perf(c)


def test_resume_continues_the_same_trajectory(tmp_path) -> None:
    cfg = RLOOConfig(**{**PROBE, "engine_dtype": "bf16"})
    straight = RLOOTrainer(cfg, tmp_path / "a").train(6, progress=False)
    RLOOTrainer(cfg, tmp_path / "b").train(3, progress=False)
    resumed = RLOOTrainer(cfg, tmp_path / "b", resume=True)
    assert resumed.step_count == 3
    resumed.train(3, progress=False)
    assert _strip_perf(read_metrics(tmp_path / "b")) == _strip_perf(straight)


def test_run_directory_is_complete_and_consistent(tmp_path) -> None:
    run = tmp_path / "run"
    trainer = RLOOTrainer(RLOOConfig(**{**PROBE, "checkpoint_every": 2}), run)
    trainer.train(3, progress=False)
    assert RLOOConfig.from_json(run / "config.json") == trainer.config
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == "step-000003"
    assert {p.name for p in (run / "checkpoints" / latest).iterdir()} >= {
        "config.json",
        "model.safetensors",
        "trainer_state.pt",
        "step.json",
    }
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    # A second trainer refuses to overwrite the run, and resume refuses a changed config.
    with pytest.raises(ValueError, match="already holds a run"):
        RLOOTrainer(trainer.config, run)
    with pytest.raises(ValueError, match="config differs"):
        RLOOTrainer(RLOOConfig(**{**PROBE, "checkpoint_every": 2, "lr": 1e-3}), run, resume=True)


def test_resume_drops_metric_lines_written_after_the_checkpoint(tmp_path) -> None:
    run = tmp_path / "run"
    RLOOTrainer(RLOOConfig(**PROBE), run).train(2, progress=False)
    with open(run / "metrics.jsonl", "a") as f:  # a crash after logging step 3 but before its checkpoint
        f.write(json.dumps({"step": 3.0}) + "\n")
    trainer = RLOOTrainer(RLOOConfig(**PROBE), run, resume=True)
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    assert len(trainer.history) == 2


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path) -> None:
    run = tmp_path / "run"
    RLOOTrainer(RLOOConfig(**PROBE), run).train(1, progress=False)
    (run / "checkpoints" / "step-000001" / "trainer_state.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable"):
        RLOOTrainer(RLOOConfig(**PROBE), run, resume=True)


def test_callbacks_and_stop_end_training_early() -> None:
    trainer = RLOOTrainer(RLOOConfig(**PROBE))
    seen: list[float] = []

    def cb(tr: RLOOTrainer, m: dict[str, float]) -> bool:
        seen.append(m["step"])
        return m["step"] < 2

    assert len(trainer.train(10, [cb], progress=False)) == 2
    assert seen == [1, 2]
    trainer.train(10, [lambda tr, m: tr.stop()], progress=False)
    assert trainer.step_count == 3


def test_emitted_metric_keys_are_exactly_the_documented_ones() -> None:
    for extra in ({}, {"rho": None, "is_mode": "seq_mis"}, {"loss_type": "ppo_clip", "ppo_epochs": 2}):
        m = RLOOTrainer(RLOOConfig(**{**PROBE, **extra})).step()
        assert set(m) == set(all_metric_docs()), set(m) ^ set(all_metric_docs())
        assert all(math.isfinite(v) for k, v in m.items() if k not in NAN_WHEN_EMPTY), m


def test_fp32_engine_matches_trainer_and_bf16_does_not() -> None:
    same = RLOOTrainer(RLOOConfig(**PROBE)).step()
    assert abs(same["mismatch/k1"]) < 1e-5 and same["mismatch/max_abs_delta"] < 1e-4
    low = RLOOTrainer(RLOOConfig(**{**PROBE, "engine_dtype": "bf16"})).step()
    assert low["mismatch/max_abs_delta"] > 1e-4


@pytest.mark.gpu
def test_steps_run_on_cuda_with_every_metric_and_the_engine_on_the_same_device() -> None:
    trainer = RLOOTrainer(RLOOConfig(**PROBE, device="cuda"))
    assert next(trainer.model.parameters()).is_cuda and trainer.engine.device.type == "cuda"
    for _ in range(2):
        m = trainer.step()
        assert set(m) == set(all_metric_docs())
        assert all(math.isfinite(v) for k, v in m.items() if k not in NAN_WHEN_EMPTY), m
        assert m["mismatch/max_abs_delta"] < 1e-3  # fp32 engine on the trainer's weights, after the sync


def test_all_rejected_batch_gives_zero_update_not_nan() -> None:
    # A mask window no ratio satisfies rejects every token: the step must be a no-op, not a crash.
    # Gaussian logit noise σ = 3 moves every ratio off 1 by far more than the 1e-6 window allows.
    cfg = RLOOConfig(
        **{
            **PROBE,
            "perturbation": "gaussian:3",
            "is_mode": "token_mis",
            "is_lo": 0.999999,
            "is_hi": 1.000001,
        }
    )
    trainer = RLOOTrainer(cfg)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    m = trainer.step()
    assert m["loss/all_rejected"] == 1.0 and m["optim/grad_norm"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_entropy_scaled_mask_reduces_to_the_fixed_safe_set_and_matches_a_reference() -> None:
    from workbench import dvp
    from workbench.dvp import entropy_scaled_safe_mask

    g = torch.Generator().manual_seed(0)
    z = 4 * torch.randn(6, 5, 40, generator=g)  # (B, T, V)
    keep0, lr0 = entropy_scaled_safe_mask(z, math.log(1e-3), 0.0)
    assert torch.equal(keep0, dvp.safe_mask(z, 1e-3)) and torch.allclose(
        lr0, torch.full_like(lr0, math.log(1e-3))
    )
    keep, lr = entropy_scaled_safe_mask(z, math.log(1e-3), 0.5)
    ent = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    torch.testing.assert_close(lr, math.log(1e-3) * (1 + 0.5 * ent))
    assert (keep | ~keep0).all()  # a deeper cut keeps everything the fixed one kept

    cfg = RLOOConfig(**{**PROBE, "rho": 1e-3, "rho_entropy_scale": 0.5})
    trainer = RLOOTrainer(cfg)
    tokens = torch.randint(0, 64, (3, 4), generator=g)
    logits = (3 * torch.randn(3, 4, 64, generator=g)).requires_grad_(True)
    stats, log_rho = trainer._token_stats(logits, tokens)
    assert log_rho is not None and (log_rho <= math.log(1e-3)).all()
    keep, _ = entropy_scaled_safe_mask(logits.detach(), math.log(1e-3), 0.5)
    ref = torch.log_softmax(logits.masked_fill(~keep, float("-inf")), -1).gather(-1, tokens[..., None])[
        ..., 0
    ]
    inside = keep.gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(stats.logp[inside], ref[inside])
    assert (stats.logp[~inside] < -100).all() and torch.equal(stats.safe_size, keep.sum(-1))
    stats.logp[inside].sum().backward()  # gradient flows only through the kept logits
    assert logits.grad is not None and (logits.grad[~keep] == 0).all()
    with pytest.raises(ValueError, match="rho_entropy_scale"):
        RLOOConfig(**{**PROBE, "rho": None, "rho_entropy_scale": 0.5})


@pytest.mark.parametrize(
    "extra",
    [{}, {"fused_head": False}, {"rho": 1e-3, "rho_entropy_scale": 0.5}, {"rho": None, "fused_head": False}],
    ids=["fused", "logits", "entropy-scaled", "rho-none"],
)
def test_later_ppo_epochs_see_the_log_probs_of_the_first(extra) -> None:
    """_policy_logp (PPO epochs > 0) is _policy_stats(...).logp to the bit, gradient included, on every path."""
    trainer = RLOOTrainer(RLOOConfig(**{**PROBE, **extra}))
    _, rollout = trainer._rollout()
    logps, grads = [], []
    for logp in (trainer._policy_stats(rollout)[0].logp, trainer._policy_logp(rollout)):
        trainer.model.zero_grad(set_to_none=True)
        (logp * rollout.mask).sum().backward()
        logps.append(logp.detach())
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]))
    assert torch.equal(logps[0], logps[1]) and torch.equal(grads[0], grads[1])


def test_adaptive_rho_run_and_clean_eval_are_reported() -> None:
    cfg = RLOOConfig(**{**PROBE, "rho": 1e-3, "rho_entropy_scale": 0.5, "eval_every": 2, "eval_prompts": 4})
    trainer = RLOOTrainer(cfg)
    hist = trainer.train(2, progress=False)
    assert all(h["dvp/log_rho_mean"] <= math.log(1e-3) for h in hist)  # the cut only ever goes deeper
    assert all(0.0 <= h["eval/reward"] <= 1.0 for h in hist)  # evaluated at step 1 and step 2
    assert trainer.evaluate() == trainer.evaluate()  # fixed prompts and seed: a deterministic measurement
    assert math.isnan(RLOOTrainer(RLOOConfig(**PROBE)).step()["eval/reward"])  # eval off by default


@pytest.mark.parametrize(
    "extra",
    [
        # A probability floor in a full-vocabulary engine makes it draw the trainer's tail: tail draws and
        # boundary tokens (the paper's ρ: one cut for both; ρ = 1e-2: a second cut) are really exercised.
        {"perturbation": "floor:5", "engine_rho": None},
        {"rho": None, "perturbation": "floor:5"},
        {
            "rho": 1e-2,
            "engine_rho": None,
            "perturbation": "floor:4",
            "temperature": 1.3,
            "loss_type": "ppo_clip",
            "ppo_epochs": 2,
        },
    ],
    ids=["add2-default-rho", "rho-none", "rho-1e-2-ppo"],
)
def test_fused_lm_head_path_gives_the_logits_paths_metrics_and_weights(extra) -> None:
    """RLOOConfig.fused_head: the same steps from hidden states + output layer as from materialised logits."""
    from workbench.models import fused_head_parts

    base = dict(model="add2", k=2, prompts_per_step=4, seed=3, **extra)
    fused = RLOOTrainer(RLOOConfig(**base))
    plain = RLOOTrainer(RLOOConfig(**base, fused_head=False))
    assert fused_head_parts(fused.model) is not None and fused._head() is not None and plain._head() is None
    a, b = fused.train(2, progress=False), plain.train(2, progress=False)
    assert all(m["mismatch/tail_tokens"] > 0 for m in a)
    for ra, rb in zip(_strip_perf(a), _strip_perf(b), strict=True):
        assert set(ra) == set(rb)
        for key in ra:
            if ra[key] is None or rb[key] is None:
                assert ra[key] is rb[key], key
            else:
                assert math.isclose(ra[key], rb[key], rel_tol=1e-5, abs_tol=1e-5), (key, ra[key], rb[key])
    for (name, p), q in zip(fused.model.named_parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=name)
