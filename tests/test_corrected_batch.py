"""rloo.corrected_batch: the one corrected-batch step, against a naive reference, and the three callers.

The trainer (``RLOOTrainer``), the TRL trainer (``DVPGRPOTrainer``) and the verl loss (``dvp_policy_loss``)
all build their batch with :func:`workbench.rloo.corrected_batch`; the last test feeds the three the same batch
— with boundary tokens present — and checks they report the same metrics and the same loss.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from workbench import dvp, metrics
from workbench.importance import ISConfig, importance_weights
from workbench.rloo import corrected_batch, grpo_advantages, policy_loss, rloo_advantages


def _batch(seed: int = 0, b: int = 8, t: int = 6):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(t)[None, :] < torch.randint(1, t + 1, (b, 1), generator=g)  # (B, T)
    lt = -torch.rand(b, t, generator=g) * 3
    li = lt + 0.3 * torch.randn(b, t, generator=g)
    boundary = (torch.rand(b, t, generator=g) < 0.15) & mask
    lt = torch.where(boundary, -dvp.MASK_MARGIN - 0.7, lt)  # what DVP gives a pruned token
    rewards = torch.rand(b, generator=g)
    return lt, li, mask, boundary, rewards


def test_boundary_suffix_drops_the_rest_of_each_sequence_from_its_first_boundary_token() -> None:
    lt, li, mask, boundary, rewards = _batch()
    cfg = ISConfig("token_mis", veto=None)
    kw = dict(is_config=cfg, boundary=boundary, rewards=rewards, k=4)
    token = corrected_batch(lt, li, mask, **kw)
    suffix = corrected_batch(lt, li, mask, drop_boundary_suffix=True, **kw)
    b = (boundary & mask).tolist()
    assert any(any(row) for row in b), "the test batch must hold boundary tokens"
    for i, row in enumerate(b):
        first = row.index(True) if any(row) else len(row)
        # Before the first boundary token: the per-token decision; from it on: nothing.
        assert suffix.keep[i, :first].tolist() == token.keep[i, :first].tolist()
        assert not suffix.keep[i, first:].any()
        # A sequence left with no token is rejected (and leaves its group's baseline).
        assert bool(suffix.seq_keep[i]) == bool(token.seq_keep[i] and suffix.keep[i].any())
    # The suffix only removes tokens, and removes some here.
    assert bool((suffix.keep <= token.keep).all()) and int(suffix.keep.sum()) < int(token.keep.sum())
    # Without drop_boundary it is a no-op: nothing is dropped for being a boundary token.
    off = corrected_batch(lt, li, mask, drop_boundary=False, drop_boundary_suffix=True, **kw)
    assert torch.equal(off.keep, corrected_batch(lt, li, mask, drop_boundary=False, **kw).keep)


@pytest.mark.parametrize("advantage", ["rloo", "grpo"])
@pytest.mark.parametrize("drop", [True, False])
def test_matches_the_step_written_out(advantage: str, drop: bool) -> None:
    lt, li, mask, boundary, rewards = _batch()
    cfg = ISConfig("token_tis", hi=3.0, veto=None)
    got = corrected_batch(
        lt,
        li,
        mask,
        is_config=cfg,
        boundary=boundary,
        drop_boundary=drop,
        rewards=rewards,
        k=4,
        advantage=advantage,
    )
    res = importance_weights(lt, li, mask, "token_tis", hi=3.0, veto=None)
    keep = res.keep & ~boundary if drop else res.keep
    seq_keep = res.seq_keep & keep.any(-1)
    adv_fn = rloo_advantages if advantage == "rloo" else grpo_advantages
    assert torch.equal(got.keep, keep) and torch.equal(got.seq_keep, seq_keep)
    torch.testing.assert_close(got.advantages, adv_fn(rewards, 4, valid=seq_keep))
    torch.testing.assert_close(got.weights, torch.where(keep, res.weights, 0.0))
    agree = mask & ~boundary
    expect = {
        **res.stats,
        **metrics.mismatch_metrics(lt, li, agree),
        **metrics.sampled_tail_delta(lt, li, agree),
    }
    expect["dvp/boundary_tokens"] = float(boundary.sum())
    assert got.metrics.keys() == expect.keys()
    for key, value in expect.items():
        assert got.metrics[key] == pytest.approx(value, nan_ok=True), key
    # boundary tokens would swamp k3: with them in, it is of the order of MASK_MARGIN
    assert metrics.mismatch_metrics(lt, li, mask)["mismatch/k3"] > 100 > got.metrics["mismatch/k3"]
    logp = lt.clone().requires_grad_(True)
    loss, _ = got.loss(logp)
    ref, _ = policy_loss(logp, got.advantages, keep, res.weights)
    torch.testing.assert_close(loss, ref)


def test_unscorable_rewards_leave_the_baseline_and_rows_select_this_process() -> None:
    lt, li, mask, _, rewards = _batch(seed=1)
    rewards[1] = math.nan
    got = corrected_batch(
        lt,
        li,
        mask,
        is_config=ISConfig("none"),
        rewards=torch.cat([rewards, rewards]),
        k=4,
        gather=lambda keep: torch.cat([keep, keep]),
        rows=slice(8, 16),
    )
    valid = torch.ones(8, dtype=torch.bool)
    valid[1] = False
    full = rloo_advantages(
        torch.nan_to_num(torch.cat([rewards, rewards])), 4, valid=torch.cat([valid, valid])
    )
    torch.testing.assert_close(got.advantages, full[8:])
    assert got.advantages[1] == 0.0


def test_given_advantages_and_upstream_weights() -> None:
    """verl's decoupled path: advantages and IS weights come from upstream; no IS or mismatch metric here."""
    lt, _, mask, boundary, _ = _batch(seed=2)
    adv = torch.linspace(-1, 1, 8)
    w = torch.rand(8, 6)
    got = corrected_batch(
        lt, None, mask, is_config=ISConfig("none"), boundary=boundary, advantages=adv, is_weights=w
    )
    assert torch.equal(got.keep, mask & ~boundary)
    torch.testing.assert_close(got.weights, torch.where(mask & ~boundary, w, 0.0))
    assert got.advantages is adv
    assert got.metrics == {"dvp/boundary_tokens": float(boundary.sum())}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of rewards"),
        ({"rewards": torch.zeros(8), "advantages": torch.zeros(8)}, "exactly one"),
        ({"rewards": torch.zeros(8)}, "need k"),
        ({"rewards": torch.zeros(8), "k": 4, "advantage": "gae"}, "advantage='gae'"),
        ({"advantages": torch.zeros(8), "is_weights": torch.ones(8, 6)}, "is_weights"),
        ({"advantages": torch.zeros(8), "boundary": torch.zeros(8, 6)}, "bool tensor"),
    ],
)
def test_errors_say_what_to_pass(kwargs: dict, match: str) -> None:
    lt, li, mask, _, _ = _batch()
    with pytest.raises(ValueError, match=match):
        corrected_batch(lt, li, mask, is_config=ISConfig("none"), **kwargs)


# ------------------------------------------------------------------------- trainer = TRL = verl on one batch
VOCAB, K, RHO = 512, 4, 0.02
PROMPTS = ["12+34=", "56+78=", "90+12=", "34+56="]  # equal lengths: no padding, so positions agree


def odd_fraction(completion_ids: list[list[int]]) -> list[float]:
    return [sum(t % 2 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def test_trainer_trl_and_verl_agree_on_a_batch_with_boundary_tokens(tmp_path, monkeypatch) -> None:
    """One batch (a uniform 'engine', so many sampled tokens fall outside the trainer's safe set) through the
    three callers: identical is/…, mismatch/…, dvp/boundary_tokens and loss/… metrics, and the same loss.
    Before the corrected batch was shared, TRL and verl let boundary tokens into k1/k3 (k1 > 100 here)."""
    trl = pytest.importorskip("trl", reason="TRL is not installed: pip install -e '.[bench]'")
    datasets = pytest.importorskip("datasets")
    from workbench.integrations import verl as wv
    from workbench.integrations.trl import DVPGRPOConfig, DVPGRPOTrainer
    from workbench.models import TinyModelConfig, build_tiny_model, build_tokenizer
    from workbench.trainer import RLOOConfig, RLOOTrainer

    del trl
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    tokenizer = build_tokenizer(VOCAB)
    model = build_tiny_model(
        TinyModelConfig(
            vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, seed=0
        ),
        tokenizer,
    )
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(30.0)  # tied head: sharp logits, so ρ prunes
    g = torch.Generator().manual_seed(0)

    def uniform_rollout(prompts, trainer):
        prompt_ids, _, _ = trainer._tokenize_prompts(prompts)
        n = trainer.max_completion_length
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": torch.randint(3, VOCAB, (len(prompts), n), generator=g).tolist(),
            "logprobs": [[-math.log(VOCAB)] * n for _ in prompts],
        }

    is_kw = dict(is_mode="token_tis", is_hi=5.0)
    args = DVPGRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=len(PROMPTS) * K,
        num_generations=K,
        max_completion_length=6,
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        seed=0,
        dvp_rho=RHO,
        is_veto=1e-3,
        is_trust_region=60.0,
        **is_kw,
    )
    trl_trainer = DVPGRPOTrainer(
        model=copy.deepcopy(model),
        args=args,
        processing_class=tokenizer,
        rollout_func=uniform_rollout,
        reward_funcs=lambda completion_ids, **_: odd_fraction(completion_ids),
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
    )
    trl_trainer.model.train()
    inputs = trl_trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(K)])
    trl_loss = trl_trainer.compute_loss(trl_trainer.model, inputs)
    trl_metrics = {k: v[-1] for k, v in trl_trainer._metrics["train"].items()}
    assert bool(inputs["prompt_mask"].all())

    # the same batch as the workbench trainer sees it: a stub engine and task return TRL's rollout and rewards
    prompt_ids, tokens = inputs["prompt_ids"], inputs["completion_ids"]  # (N, P), (N, C)
    n, c = tokens.shape
    rollout = SimpleNamespace(
        sequences=torch.cat([prompt_ids, tokens], 1),
        attention_mask=torch.ones(n, prompt_ids.size(1) + c, dtype=torch.long),
        prompt_len=prompt_ids.size(1),
        tokens=tokens,
        logprobs=torch.full((n, c), -math.log(VOCAB)),
        mask=torch.ones(n, c, dtype=torch.bool),
        lengths=torch.full((n,), c),
        safe_size=None,
        prompt_index=torch.arange(n) // K,
    )
    rewards = iter(odd_fraction(tokens.tolist()))
    config = RLOOConfig(
        model=None,
        vocab_size=VOCAB,
        k=K,
        prompts_per_step=len(PROMPTS),
        rho=RHO,
        engine_dtype="fp32",
        veto=1e-3,
        trust_region=60.0,
        is_mode="token_tis",
        is_hi=5.0,
    )
    trainer = RLOOTrainer(config, model=copy.deepcopy(model), tokenizer=tokenizer)
    trainer.engine = SimpleNamespace(generate=lambda *a, **kw: rollout, sync_weights=lambda m: None)
    trainer.task = SimpleNamespace(
        sample=lambda count, rng: [SimpleNamespace(prompt=p) for p in PROMPTS][:count],
        reward=lambda problem, text: next(rewards),
        max_new_tokens=c,
    )
    ours = trainer.step()

    # verl: log-probs from the patched logprobs_from_logits, verl's token-broadcast advantages (the same values)
    with torch.no_grad():
        logits = model(input_ids=rollout.sequences).logits[:, prompt_ids.size(1) - 1 : -1]  # (N, C, V)
    logp = wv.dvp_logprobs_from_logits(RHO)(logits, tokens).requires_grad_(True)
    verl_loss, verl_metrics = wv.dvp_policy_loss(
        logp.detach(),
        logp,
        inputs["advantages"][:, None].expand(n, c),
        rollout.mask,
        "token-mean",
        {"clip_ratio": 0.2},
        rollout_log_probs=rollout.logprobs,
        settings=wv.VerlDVPConfig(
            rho=RHO,
            is_mode="token_tis",
            is_lo=None,
            is_hi=5.0,
            is_veto=1e-3,
            is_trust_region=60.0,
            loss_type="pg",
        ),
    )

    assert ours["dvp/boundary_tokens"] > 0 and ours["is/frac_trust_region"] > 0  # both rules are exercised
    swamped = metrics.mismatch_metrics(logp.detach(), rollout.logprobs, rollout.mask)["mismatch/k1"]
    assert swamped > 100 > abs(ours["mismatch/k1"])  # boundary tokens (log π ≈ −1000) stay out of k1/k3
    assert set(verl_metrics) <= set(ours) and set(verl_metrics) <= set(trl_metrics)
    for key, value in verl_metrics.items():
        assert ours[key] == pytest.approx(value, rel=1e-4, abs=1e-5, nan_ok=True), key
        assert trl_metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5, nan_ok=True), key
    assert float(trl_loss) == pytest.approx(ours["loss/pg"], rel=1e-4, abs=1e-6)
    assert float(verl_loss) == pytest.approx(ours["loss/pg"], rel=1e-4, abs=1e-6)
