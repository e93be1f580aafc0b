"""Real logits for the explorers: sample a policy with a rollout engine and score it with the trainer.

:func:`sample_policy` draws responses with a :class:`~workbench.engines.TorchEngine` (or vLLM) and scores
them with the trainer's forward (:func:`trainer_logits`, the position-id convention of
:class:`~workbench.trainer.RLOOTrainer`); the result is a :class:`~workbench.analysis.PolicySample` that the
measurements of :mod:`workbench.analysis` and the figures of :mod:`workbench.viz.explore` take as data.
:func:`precision_logits` scores the same sequences with a copy whose weights are rounded, as an engine
holds them.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Mapping
from typing import Any

import torch

from workbench import dvp
from workbench.analysis import PolicySample

__all__ = ["precision_logits", "sample_policy", "trainer_logits"]


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check_dtype_name(name: str, value: str) -> torch.dtype:
    if value not in _DTYPES:
        raise ValueError(f"{name}={value!r} must be one of {tuple(_DTYPES)}")
    return _DTYPES[value]


@torch.no_grad()
def trainer_logits(model: torch.nn.Module, rollout: Any) -> torch.Tensor:
    """The trainer's logits for each response position: ``(N, T, V)`` fp32.

    Same convention as :class:`~workbench.trainer.RLOOTrainer`: one full forward over ``rollout.sequences``
    with position ids ``cumsum(attention_mask) − 1``, logits shifted by one (position ``P − 1 + t`` predicts
    response token ``t``). An fp32 engine reproduces these log-probs to ~1e-6.

    Args:
        model: the trainer's causal LM.
        rollout: a :class:`~workbench.engines.Rollout`.

    Returns:
        ``(N, T, V)`` float32 logits.
    """
    from workbench.engines import position_ids

    attn = rollout.attention_mask
    out = model(input_ids=rollout.sequences, attention_mask=attn, position_ids=position_ids(attn))
    p = rollout.prompt_len
    return out.logits[:, p - 1 : -1].float()  # (N, T, V)


@torch.no_grad()
def precision_logits(model: torch.nn.Module, rollout: Any, dtype: str) -> torch.Tensor:
    """Logits of a copy of ``model`` whose *weights* are rounded to ``dtype``, as an engine holds them.

    Args:
        model: the trainer's model (not modified).
        rollout: the sequences to score.
        dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"``.

    Returns:
        ``(N, T, V)`` float32 logits of the rounded copy (full forward, no KV cache).
    """
    target = _check_dtype_name("dtype", dtype)
    clone = copy.deepcopy(model).to(target).eval()
    return trainer_logits(clone, rollout)


def sample_policy(
    model: torch.nn.Module,
    tokenizer: Any,
    task: str = "addition",
    *,
    task_kwargs: Mapping[str, Any] | None = None,
    num_prompts: int = 16,
    n: int = 4,
    max_tokens: int | None = None,
    engine: str = "torch",
    engine_dtype: str = "fp32",
    perturbation: str | None = None,
    rho: float | None = None,
    temperature: float = 1.0,
    seed: int = 0,
) -> PolicySample:
    """Sample responses with a rollout engine and score them with the trainer.

    Args:
        model: the trainer's policy (fp32); the engine rounds its own copy to ``engine_dtype``.
        tokenizer: the policy's tokenizer (eos/pad ids).
        task: task name (``workbench.tasks.TASKS``) that supplies the prompts.
        task_kwargs: keyword arguments of the task.
        num_prompts: distinct prompts (drawn with ``random.Random(seed)``).
        n: samples per prompt.
        max_tokens: response budget (default: the task's ``max_new_tokens``).
        engine: ``"torch"`` (:class:`~workbench.engines.TorchEngine`, emulated) or ``"vllm"`` (real vLLM,
            started on a saved copy of ``model``: ~15 s), built by :func:`workbench.engines.make_engine`.
        engine_dtype: engine weight precision.
        perturbation: engine logit perturbation spec (``"gaussian:0.3"``, …) or ``None``.
        rho: min-p threshold of the engine (``None``: full vocabulary).
        temperature: sampling temperature (the trainer's log-probs use the same).
        seed: seeds prompts, sampling and perturbation noise.

    Returns:
        A :class:`PolicySample`.
    """
    from workbench import engines, models, tasks

    _check_dtype_name("engine_dtype", engine_dtype)
    the_task = tasks.make_task(task, **dict(task_kwargs or {}))
    problems = the_task.sample(num_prompts, random.Random(seed))
    prompts = [models.encode_prompt(tokenizer, p.prompt) for p in problems]
    sampler = engines.make_engine(
        engine, model, tokenizer, dtype=engine_dtype, perturbation=engines.make_perturbation(perturbation)
    )
    rollout = sampler.generate(
        prompts,
        n=n,
        max_tokens=max_tokens or the_task.max_new_tokens,
        rho=rho,
        temperature=temperature,
        seed=seed,
    )
    logits = trainer_logits(model, rollout) / temperature  # (N, T, V)
    logp_train = dvp.token_logprobs(logits, rollout.tokens)  # (N, T) full-vocabulary log π
    return PolicySample(
        rollout=rollout,
        logits=logits,
        logp_train=logp_train,
        logp_infer=rollout.logprobs,
        mask=rollout.mask,
        config={
            "task": task,
            "engine": engine,
            "engine_dtype": engine_dtype,
            "perturbation": perturbation,
            "rho": rho,
            "temperature": temperature,
            "seed": seed,
            "num_prompts": num_prompts,
            "n": n,
        },
    )
