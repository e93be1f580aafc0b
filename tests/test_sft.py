"""Tests of the SFT warm start: config validation, hashing and caching, the fast loss against the plain
one, learning on a short run, the CLI entry point, and the shipped policies."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from workbench import models, sft, tasks

# A config small enough to train in well under a second (vocab 128, width 32).
TINY_MODEL = models.TinyModelConfig(vocab_size=128, hidden_size=32, num_layers=1, intermediate_size=64)
TINY = sft.SFTConfig(
    task="addition", task_kwargs={"digits": 1}, model=TINY_MODEL, steps=8, warmup_steps=2, lr=1e-2
)

# The shipped policies must be competent starts for RL with room to improve: sampled accuracy (T = 1)
# in this band, and a fresh seeded evaluation within SHIPPED_TOLERANCE of the recorded one (≈ 3 standard
# errors of a 128-sample mean, plus the 256-sample error of the recorded value).
SHIPPED_BAND = (0.3, 0.95)
SHIPPED_TOLERANCE = 0.15
SHIPPED_MAX_BYTES = 3_500_000


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Evaluate on one intra-op thread, as sft does (two spin-wait on a loaded 2-core machine)."""
    with sft.torch_threads(1):
        yield


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache directory (``$WORKBENCH_CACHE``) for this test."""
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- config ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field_name"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": True}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"lr": 1.5}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"min_lr_frac": 1.5}, "min_lr_frac"),
        ({"schedule": "linear"}, "schedule"),
        ({"decay_frac": 2.0}, "decay_frac"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"seed": -1}, "seed"),
        ({"task": "nope"}, "task"),
        ({"task_kwargs": {"digits": 99}}, "digits"),
        ({"task_kwargs": {"bogus": 1}}, "bogus"),
        ({"task_kwargs": {"digits": object()}}, "task_kwargs"),
        ({"model": {"hidden_size": 64}}, "model"),
    ],
)
def test_config_rejects_bad_values(overrides: dict, field_name: str) -> None:
    with pytest.raises(ValueError, match=field_name):
        dataclasses.replace(TINY, **overrides)


def test_config_roundtrip_and_unknown_keys() -> None:
    assert sft.SFTConfig.from_dict(json.loads(json.dumps(TINY.to_dict()))) == TINY
    with pytest.raises(ValueError, match="unknown SFTConfig field"):
        sft.SFTConfig.from_dict({**TINY.to_dict(), "stpes": 3})


def test_digest_tracks_every_change(monkeypatch: pytest.MonkeyPatch) -> None:
    same = sft.SFTConfig.from_dict(TINY.to_dict())
    assert same.digest() == TINY.digest()
    variants = [
        dataclasses.replace(TINY, steps=9),
        dataclasses.replace(TINY, seed=1),
        dataclasses.replace(TINY, label_smoothing=0.1),
        dataclasses.replace(TINY, task_kwargs={"digits": 2}),
        dataclasses.replace(TINY, model=dataclasses.replace(TINY_MODEL, seed=1)),
    ]
    digests = {TINY.digest(), *(v.digest() for v in variants)}
    assert len(digests) == 1 + len(variants)
    # A new training code version invalidates every cached digest.
    monkeypatch.setattr(sft, "SFT_CODE_VERSION", sft.SFT_CODE_VERSION + 1)
    assert TINY.digest() not in digests


def test_presets_are_the_documented_recipes() -> None:
    assert {"add2", "multiadd", "multiadd_smooth"} <= set(sft.PRESETS)
    add2, multi = sft.PRESETS["add2"].make_task(), sft.PRESETS["multiadd"].make_task()
    assert add2 == tasks.AdditionTask(digits=2)
    assert multi == tasks.MultiAddTask(n_problems=2, digits=2)
    assert sft.PRESETS["multiadd_smooth"].label_smoothing > 0
    for cfg in sft.PRESETS.values():
        assert cfg.model.vocab_size == 4096  # the unused tail is part of the research
        assert sft.preset_name(cfg) in sft.PRESETS


# --- batches and loss ----------------------------------------------------------------------------------


def test_sft_batch_masks_prompt_and_padding() -> None:
    tok = models.build_tokenizer(128)
    task = tasks.MultiAddTask(n_problems=1, digits=2)
    problems = [tasks.Problem("5+7=", "12"), tasks.Problem("45+37=", "82")]
    ids, labels = sft.sft_batch(task, tok, problems)
    assert ids.shape == labels.shape
    for row_ids, row_labels, p in zip(ids.tolist(), labels.tolist(), problems):
        full = task.sft_text(p)
        n = len(full) + 1  # + eos
        assert tok.decode(row_ids[: n - 1]) == full and row_ids[n - 1] == tok.eos_token_id
        assert all(t == tok.pad_token_id for t in row_ids[n:])
        assert row_labels[: len(p.prompt)] == [sft.IGNORE_INDEX] * len(p.prompt)
        assert row_labels[len(p.prompt) : n] == row_ids[len(p.prompt) : n]
        assert all(t == sft.IGNORE_INDEX for t in row_labels[n:])


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_sft_loss_matches_reference(label_smoothing: float) -> None:
    """The fast loss (lm_head on labelled positions only) equals the full-logits one, value and grads."""
    model = models.build_tiny_model(dataclasses.replace(TINY_MODEL, num_layers=2)).train()
    tok = models.build_tokenizer(TINY_MODEL.vocab_size)
    task = tasks.MultiAddTask(n_problems=1, digits=2)
    ids, labels = sft.sft_batch(task, tok, task.sample(6, random.Random(0)))  # ragged lengths: padding
    fast = sft.sft_loss(model, ids, labels, label_smoothing=label_smoothing)
    fast_grads = torch.autograd.grad(fast, list(model.parameters()))
    ref = sft.sft_loss_reference(model, ids, labels, label_smoothing=label_smoothing)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(fast, ref)
    for g_fast, g_ref in zip(fast_grads, ref_grads):
        torch.testing.assert_close(g_fast, g_ref, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("schedule", sft.SCHEDULES)
def test_lr_schedule_warms_up_then_decays(schedule: str) -> None:
    cfg = dataclasses.replace(TINY, steps=110, warmup_steps=10, min_lr_frac=0.1, schedule=schedule)
    f = [sft.lr_factor(s, cfg) for s in range(111)]
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert max(f) == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(f[10:]))  # monotone decay after the warm-up
    assert f[110] == pytest.approx(0.1)
    if schedule == "wsd":  # holds the peak for the first 1 - decay_frac of the post-warm-up steps
        held = [x for x in f[10:] if x == 1.0]
        assert len(held) == 1 + int(100 * (1 - cfg.decay_frac))
    # A warm-up longer than the run only ramps up (CLI --steps overrides stay valid).
    short = dataclasses.replace(sft.PRESETS["add2"], steps=3, schedule=schedule)
    w = short.warmup_steps
    assert [sft.lr_factor(s, short) for s in range(3)] == pytest.approx([1 / w, 2 / w, 3 / w])


# --- training ------------------------------------------------------------------------------------------


def test_short_run_learns_and_is_deterministic() -> None:
    cfg = dataclasses.replace(TINY, steps=60, warmup_steps=5)
    seen: list[tuple[int, float]] = []
    model, tok, losses = sft.train_sft(cfg, progress=False, callback=lambda s, x: seen.append((s, x)))
    assert len(losses) == 60 and [s for s, _ in seen] == list(range(60))
    assert all(math.isfinite(x) for x in losses)
    start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert start > math.log(TINY_MODEL.vocab_size) * 0.8  # near-uniform at init
    assert end < 0.6 * start, (start, end)
    assert not model.training and len(tok) == TINY_MODEL.vocab_size
    assert all(p.dtype == torch.float32 for p in model.parameters())
    _, _, again = sft.train_sft(cfg, progress=False)
    assert again == losses  # same config, same run


def test_training_uses_the_requested_threads_and_restores_them() -> None:
    torch.set_num_threads(2)  # restored to 1, then to the session's count, by the one_thread fixture
    seen: list[int] = []
    sft.train_sft(TINY, progress=False, callback=lambda s, x: seen.append(torch.get_num_threads()), threads=1)
    assert set(seen) == {1} and torch.get_num_threads() == 2
    sft.train_sft(
        TINY, progress=False, callback=lambda s, x: seen.append(torch.get_num_threads()), threads=None
    )
    assert set(seen[TINY.steps :]) == {2}
    with pytest.raises(ValueError, match="threads=0"):
        sft.train_sft(TINY, progress=False, threads=0)
    assert torch.get_num_threads() == 2


def test_cache_hits_on_second_call(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = sft.sft_policy(TINY, progress=False)
    assert first == cache / "sft" / TINY.digest()
    meta = models.policy_metadata(first)
    assert meta["digest"] == TINY.digest() and meta["config"] == TINY.to_dict()
    assert len(meta["loss_curve"]) >= 1 and 0.0 <= meta["sampled_accuracy"] <= 1.0
    assert meta["torch_threads"] == sft.DEFAULT_THREADS

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("train_sft was called although the policy is cached")

    monkeypatch.setattr(sft, "train_sft", no_training)
    assert sft.sft_policy(TINY, progress=False) == first  # served from the cache
    other = dataclasses.replace(TINY, seed=1)
    with pytest.raises(AssertionError, match="cached"):  # a different recipe is not
        sft.sft_policy(other, progress=False)
    with pytest.raises(AssertionError, match="cached"):  # nor is a forced remake
        sft.sft_policy(TINY, progress=False, force=True)
    model, tok = models.load_policy(first)
    assert len(tok) == TINY_MODEL.vocab_size and model.config.hidden_size == TINY_MODEL.hidden_size


def test_out_dir_with_another_recipe_is_retrained(tmp_path: Path) -> None:
    out = tmp_path / "pol"
    sft.sft_policy(TINY, out_dir=out, progress=False)
    other = dataclasses.replace(TINY, steps=9)
    sft.sft_policy(other, out_dir=out, progress=False)
    assert models.policy_metadata(out)["digest"] == other.digest()


def test_cli_sft_writes_a_policy(tmp_path: Path, cache: Path) -> None:
    from workbench.cli import main

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY.to_dict()))
    assert main(["sft", "--config", str(config), "--out", str(tmp_path / "out")]) == 0
    meta = models.policy_metadata(tmp_path / "out" / "tiny")
    assert meta["digest"] == TINY.digest()
    # A preset with the step count overridden (a smoke run of the real recipe).
    assert main(["sft", "--preset", "add2", "--steps", "2", "--out", str(tmp_path / "out")]) == 0
    meta = models.policy_metadata(tmp_path / "out" / "add2")
    assert meta["config"]["steps"] == 2 and meta["config"]["task_kwargs"] == {"digits": 2}
    assert meta["preset"] is None  # no longer the shipped recipe
    assert main(["sft", "--preset", "nope"]) == 2


def test_tail_stats_agree_with_dvp() -> None:
    dvp = pytest.importorskip("workbench.dvp")
    model, tok, _ = sft.train_sft(dataclasses.replace(TINY, steps=30), progress=False)
    task = TINY.make_task()
    stats = sft.tail_stats(model, tok, task, n=16, log_rho=-3.0)
    ids, labels = sft.sft_batch(task, tok, task.sample(16, random.Random(sft.EVAL_SEED)))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1][labels[:, 1:] != sft.IGNORE_INDEX]  # (N, V)
    size = dvp.safe_set_size(logits, math.exp(-3.0)).float().mean().item()
    assert stats["tail/safe_size_mean"] == pytest.approx(size)
    vocab = TINY_MODEL.vocab_size
    assert stats["tail/frac_below_rho"] == pytest.approx(1 - size / vocab)
    assert (
        0 <= stats["tail/unused_gap_min"] <= stats["tail/unused_gap_p01"] <= stats["tail/unused_gap_median"]
    )
    assert 0 < stats["tail/unused_mass_mean"] < 1


# --- shipped policies ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(sft.PRESETS))
def test_shipped_policy_is_current_and_competent(name: str) -> None:
    path = models.pretrained_policy(name)
    meta = models.policy_metadata(path)
    cfg = sft.PRESETS[name]
    assert meta["digest"] == cfg.digest(), f"remake it: {sft.REMAKE_COMMAND.format(name=name)}"
    assert meta["remake"] == sft.REMAKE_COMMAND.format(name=name)
    assert sum(f.stat().st_size for f in path.iterdir()) < SHIPPED_MAX_BYTES
    model, tok = models.load_policy(path)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert len(tok) == cfg.model.vocab_size
    recorded = meta["sampled_accuracy"]
    assert SHIPPED_BAND[0] <= recorded <= SHIPPED_BAND[1]
    fresh = sft.sampled_accuracy(model, tok, cfg.make_task(), n=128, seed=1)
    assert abs(fresh - recorded) <= SHIPPED_TOLERANCE, (fresh, recorded)


def test_preset_policy_uses_the_current_shipped_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sft, "train_sft", None)  # calling it would fail
    for name in sft.PRESETS:
        assert sft.preset_policy(name) == models.pretrained_policy(name)
    with pytest.raises(ValueError, match="not a preset"):
        sft.preset_policy("nope")


def test_greedy_accuracy_matches_a_plain_argmax_loop() -> None:
    model, tok = models.load_policy(models.pretrained_policy("add2"))
    task = sft.PRESETS["add2"].make_task()
    problems = task.sample(32, random.Random(5))
    total = 0.0
    with torch.no_grad():
        for p in problems:
            ids = models.encode_prompt(tok, p.prompt)
            out: list[int] = []
            for _ in range(task.max_new_tokens):
                nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                out.append(nxt)
            total += task.reward(p, tok.decode(out))
    assert sft.greedy_accuracy(model, tok, task, n=32, seed=5) == pytest.approx(total / 32)
    assert total / 32 > 0.3  # and the shipped policy is competent


def test_sampled_accuracy_is_seeded() -> None:
    model, tok = models.load_policy(models.pretrained_policy("add2"))
    task = sft.PRESETS["add2"].make_task()
    a = sft.sampled_accuracy(model, tok, task, n=64, seed=3)
    assert sft.sampled_accuracy(model, tok, task, n=64, seed=3) == a
    with pytest.raises(ValueError, match="n=0"):
        sft.sampled_accuracy(model, tok, task, n=0)
