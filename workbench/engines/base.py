"""What every rollout engine returns (:class:`Rollout`) and the protocol the trainer talks to.

Conventions shared by all engines and the trainer (so their log-probs are comparable token by token):

- ``n`` samples per prompt, ordered consecutively: rows ``i*n … i*n+n−1`` belong to prompt ``i``
  (``Rollout.prompt_index``), which is what RLOO's leave-one-out baseline expects.
- Prompts of different lengths are **left-padded** with the pad id to ``P = max prompt length``;
  ``attention_mask`` is 0 on the padding.
- Position ids are ``cumsum(attention_mask) − 1`` clamped at 0 (:func:`position_ids`): every prompt
  starts at position 0 whatever its padding. The trainer runs its forward on ``Rollout.sequences``
  with the same rule, so an fp32 engine reproduces the trainer's log-probs to ~1e-6.
- A response stops at eos: the eos token is kept and counted (``mask`` True), every later slot holds
  the pad id with ``mask`` False and log-prob 0.
- ``logprobs`` are the log-probs of the distribution the engine actually sampled from: temperature,
  then perturbation, then the min-p mask, renormalised (vLLM's ``processed_logprobs``).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = [
    "Rollout",
    "RolloutEngine",
    "check_generate_args",
    "left_pad",
    "position_ids",
]


@dataclass
class Rollout:
    """A batch of sampled responses and the engine's log-probs of them (``N = num_prompts × n``)."""

    sequences: torch.Tensor
    """``(N, P+T)`` long: left-padded prompt, then the response (pad after eos)."""
    attention_mask: torch.Tensor
    """``(N, P+T)`` long: 1 on real prompt tokens and valid response tokens (eos included), else 0."""
    prompt_len: int
    """``P``: the padded prompt width; responses start at column ``P`` of ``sequences``."""
    tokens: torch.Tensor
    """``(N, T)`` long: the responses (``sequences[:, P:]``)."""
    logprobs: torch.Tensor
    """``(N, T)`` float32: log μ^mp(token) of the processed distribution sampled from; 0 where masked."""
    mask: torch.Tensor
    """``(N, T)`` bool: valid response tokens (up to and including eos)."""
    lengths: torch.Tensor
    """``(N,)`` long: valid response tokens per row (``mask.sum(1)``)."""
    safe_size: torch.Tensor | None
    """``(N, T)`` long: |V_S| of the engine's min-p safe set at each step (0 where masked); ``None``
    when the engine did not prune (ρ = None) or cannot report it (vLLM)."""
    prompt_index: torch.Tensor
    """``(N,)`` long: which prompt each row answers (``n`` consecutive rows per prompt)."""

    def __post_init__(self) -> None:
        n, t = self.tokens.shape if self.tokens.dim() == 2 else (-1, -1)
        if n < 0:
            raise ValueError(f"Rollout.tokens must be 2-D (N, T), got shape {tuple(self.tokens.shape)}")
        expected = {
            "sequences": (n, self.prompt_len + t),
            "attention_mask": (n, self.prompt_len + t),
            "logprobs": (n, t),
            "mask": (n, t),
            "lengths": (n,),
            "prompt_index": (n,),
        }
        if self.safe_size is not None:
            expected["safe_size"] = (n, t)
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(
                    f"Rollout.{name} has shape {got} but tokens {tuple(self.tokens.shape)} and "
                    f"prompt_len={self.prompt_len} need {shape}"
                )
        if self.mask.dtype != torch.bool:
            raise ValueError(f"Rollout.mask must be a bool tensor, got {self.mask.dtype}")

    @property
    def num_samples(self) -> int:
        """``N``, the number of responses."""
        return int(self.tokens.shape[0])

    def to(self, device: torch.device | str) -> Rollout:
        """A copy with every tensor on ``device``."""
        moved = {
            f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
            for f in fields(self)
        }
        return Rollout(**moved)


@runtime_checkable
class RolloutEngine(Protocol):
    """Anything that samples responses for the trainer (TorchEngine, VLLMEngine, a test double)."""

    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        max_tokens: int,
        rho: float | None,
        temperature: float,
        seed: int,
    ) -> Rollout:
        """Sample ``n`` responses per prompt with min-p ``rho`` (None: no pruning); see :class:`Rollout`."""
        ...

    def sync_weights(self, model: Any) -> None:
        """Copy the trainer's current weights into the engine (rounded to the engine's precision)."""
        ...


def check_generate_args(
    prompts: Sequence[Sequence[int]],
    n: int,
    max_tokens: int,
    temperature: float,
    seed: int,
    vocab_size: int | None = None,
) -> None:
    """Validate ``generate``'s arguments with messages that say what to change (ValueError).

    >>> check_generate_args([[1, 2], [3]], n=2, max_tokens=4, temperature=1.0, seed=0)
    >>> check_generate_args([[]], n=1, max_tokens=4, temperature=1.0, seed=0)
    Traceback (most recent call last):
    ...
    ValueError: prompts[0] is empty; every prompt needs at least one token id (e.g. a bos id)
    """
    if not isinstance(prompts, Sequence) or isinstance(prompts, (str, bytes)) or len(prompts) == 0:
        raise ValueError(f"prompts must be a non-empty list of token-id lists, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
            raise ValueError(
                f"prompts[{i}] must be a list of token ids, got {type(p).__name__}; tokenize it first"
            )
        if len(p) == 0:
            raise ValueError(
                f"prompts[{i}] is empty; every prompt needs at least one token id (e.g. a bos id)"
            )
        hi = vocab_size if vocab_size is not None else float("inf")
        bad = [t for t in p if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < hi]
        if bad:
            limit = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise ValueError(f"prompts[{i}] holds token ids {bad[:3]} outside {limit} (integers expected)")
    for name, value in (("n", n), ("max_tokens", max_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    ok = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not ok or not temperature > 0 or temperature == float("inf"):
        raise ValueError(
            f"temperature={temperature!r} must be a finite number > 0 (1.0 = the model's own policy)"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer")


def left_pad(
    prompts: Sequence[Sequence[int]], pad_token_id: int, n: int = 1, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad prompts into a batch, each repeated ``n`` times consecutively.

    Args:
        prompts: token-id lists of any lengths ≥ 1.
        pad_token_id: id written into the padding.
        n: copies of each prompt (samples per prompt).
        device: where the tensors live.

    Returns:
        ``input_ids (N, P)`` long, ``attention_mask (N, P)`` long, ``prompt_index (N,)`` long, with
        ``N = len(prompts) * n`` and ``P`` the longest prompt.

    >>> ids, mask, idx = left_pad([[5, 6, 7], [8]], pad_token_id=0, n=2)
    >>> ids.tolist(), mask.tolist(), idx.tolist()
    ([[5, 6, 7], [5, 6, 7], [0, 0, 8], [0, 0, 8]], [[1, 1, 1], [1, 1, 1], [0, 0, 1], [0, 0, 1]], [0, 0, 1, 1])
    """
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)  # (B, P)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, P)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    index = torch.arange(len(prompts)).repeat_interleave(n)  # (N,)
    return ids[index].to(device), mask[index].to(device), index.to(device)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: ``cumsum(mask) − 1``, clamped at 0 on the padding.

    >>> position_ids(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])).tolist()
    [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
