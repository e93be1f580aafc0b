"""Tiny causal language models and their char-level tokenizer, built locally; load any local HF model.

Everything here is ordinary Hugging Face: a ``Qwen2ForCausalLM`` (or ``LlamaForCausalLM``) made from
a config with seeded random init and tied embeddings, a ``PreTrainedTokenizerFast`` built with the
``tokenizers`` library, saved and loaded as a normal model directory (``config.json``,
``model.safetensors``, ``tokenizer.json`` ...). No hub access, ever: a directory made here loads with
``AutoModelForCausalLM.from_pretrained``, and :func:`load_policy` loads any local model directory,
tiny or real.

The tokenizer maps one character of :data:`workbench.tasks.ALPHABET` to one id and pads the
vocabulary with ``<unused_i>`` ids up to ``vocab_size`` (4,096 by default). Real models also carry
many ids a task never needs; that unused *tail* is where training–inference mismatch bites (see
``THEORY.md``), so the toy keeps one. Unused ids are ordinary (non-special) tokens: decoding one
gives the visible text ``<unused_i>``, so a completion that samples the tail is never silently
cleaned into a correct answer.

>>> tok = build_tokenizer(vocab_size=128)
>>> ids = tok.encode("12+34=")
>>> len(ids), tok.decode(ids), len(tok)
(6, '12+34=', 128)
>>> tok.decode([tok.convert_tokens_to_ids("7"), tok.eos_token_id, 127], skip_special_tokens=True)
'7<unused_68>'
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from workbench.tasks import ALPHABET, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, UNK_TOKEN

FAMILIES: tuple[str, ...] = ("qwen2", "llama")
"""Architectures :func:`build_tiny_model` can build."""
MIN_VOCAB_SIZE: int = len(SPECIAL_TOKENS) + len(ALPHABET)
"""Special tokens + one id per ALPHABET character: the smallest vocabulary that holds every task."""
PRETRAINED_DIR: Path = Path(__file__).resolve().parent / "assets" / "policies"
"""Where shipped policies live, one HF model directory per name (made by ``make policies``)."""
METADATA_FILE: str = "workbench.json"
"""File in a policy directory holding :func:`save_policy`'s ``metadata`` (task, SFT recipe, ...)."""

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
_TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
)


class PolicyNotFoundError(FileNotFoundError, ValueError):
    """A policy directory (or shipped policy name) does not exist. Both a FileNotFoundError and a
    ValueError, so either ``except`` catches it."""


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of a tiny causal LM (defaults: ≈ 0.37 M parameters, most of them the tied embedding).

    The defaults (two 32-wide heads) are a shape vLLM's CPU attention serves (head widths 32, 64, ...).

    >>> TinyModelConfig(hidden_size=32, num_heads=4).head_dim
    8
    """

    vocab_size: int = 4096
    """Embedding rows = tokenizer size. At least MIN_VOCAB_SIZE (special tokens + ALPHABET); the rest
    are unused ids — the tail a real model also has."""
    hidden_size: int = 64
    """Width of the residual stream; must be divisible by ``num_heads`` with an even head dim (RoPE)."""
    num_layers: int = 2
    """Transformer blocks."""
    num_heads: int = 2
    """Attention heads (no grouped-query attention: as many key/value heads). The default gives
    32-wide heads, the narrowest vLLM's CPU backend serves; the shipped policies were trained with 4
    and are saved widened (:func:`widen_heads`)."""
    intermediate_size: int = 192
    """Width of the SwiGLU MLP."""
    max_position_embeddings: int = 256
    """Longest sequence (prompt + response) the model is configured for."""
    family: str = "qwen2"
    """Architecture: ``"qwen2"`` (Qwen2ForCausalLM, the default) or ``"llama"`` (LlamaForCausalLM)."""
    seed: int = 0
    """Seed of the random init: the same config gives bit-identical weights."""

    def __post_init__(self) -> None:
        for name, lo in (
            ("vocab_size", MIN_VOCAB_SIZE),
            ("hidden_size", 2),
            ("num_layers", 1),
            ("num_heads", 1),
            ("intermediate_size", 1),
            ("max_position_embeddings", 2),
            ("seed", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                extra = " (special tokens + workbench.tasks.ALPHABET)" if name == "vocab_size" else ""
                raise ValueError(f"{name}={value!r} must be an integer >= {lo}{extra}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be num_heads={self.num_heads} times an even head "
                "dimension (rotary embeddings rotate pairs); e.g. hidden_size=64, num_heads=4"
            )
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r} must be one of {FAMILIES}")

    @property
    def head_dim(self) -> int:
        """Per-head width, ``hidden_size // num_heads``."""
        return self.hidden_size // self.num_heads


def build_tokenizer(vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """A char-level tokenizer over ALPHABET, padded with ``<unused_i>`` ids to ``vocab_size``.

    Ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3 (any character outside ALPHABET), then
    ALPHABET in order, then ``<unused_0>``, ``<unused_1>``, ... . ``encode`` adds no special tokens
    (one id per character); ``decode`` concatenates characters, so ``decode(encode(s)) == s`` for every
    string over ALPHABET. Padding is on the left, as decoder-only generation wants.

    Args:
        vocab_size: total ids, at least :data:`MIN_VOCAB_SIZE`.

    Returns:
        A ``PreTrainedTokenizerFast`` (saved and loaded like any HF tokenizer).

    >>> tok = build_tokenizer(64)
    >>> tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.encode("0+1")
    (0, 1, 2, [4, 14, 5])
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size!r} must be an integer >= {MIN_VOCAB_SIZE} "
            f"({len(SPECIAL_TOKENS)} special tokens + {len(ALPHABET)} ALPHABET characters)"
        )
    symbols = list(SPECIAL_TOKENS) + list(ALPHABET)
    symbols += [f"<unused_{i}>" for i in range(vocab_size - len(symbols))]
    vocab = {s: i for i, s in enumerate(symbols)}
    core = Tokenizer(WordLevel(vocab, unk_token=UNK_TOKEN))
    # Every character is its own pre-token ([\s\S] also matches newlines, unlike ".").
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()  # join tokens with no separator
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(
    cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase | None = None
) -> PreTrainedModel:
    """A randomly initialised causal LM (seeded by ``cfg.seed``) with tied input/output embeddings.

    The tokenizer's pad/bos/eos ids are written into ``model.config`` and ``model.generation_config``
    so ``generate`` and the engines stop at eos. The global torch RNG is left untouched.

    Args:
        cfg: model shape and seed.
        tokenizer: must fit in ``cfg.vocab_size``; default ``build_tokenizer(cfg.vocab_size)``.

    Returns:
        ``Qwen2ForCausalLM`` or ``LlamaForCausalLM`` in fp32, in eval mode (like ``from_pretrained``).
    """
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg.vocab_size)
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} ids but cfg.vocab_size={cfg.vocab_size}; "
            f"use TinyModelConfig(vocab_size={len(tokenizer)}) or build_tokenizer({cfg.vocab_size})"
        )
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id}
    ids["eos_token_id"] = tokenizer.eos_token_id
    for name, value in ids.items():
        if value is None or not 0 <= value < cfg.vocab_size:
            raise ValueError(f"tokenizer {name}={value!r} must be an id in [0, {cfg.vocab_size})")
    common: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        **ids,
    )
    if cfg.family == "qwen2":
        config, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    else:
        config, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = cls(config)
    model.generation_config = GenerationConfig(**ids)
    return model.eval()


def head_dim_of(config: Any) -> int:
    """Per-head width of an HF config (its ``head_dim`` when set, else ``hidden_size // heads``)."""
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _widen_rows(weight: torch.Tensor, heads: int, old: int, new: int) -> torch.Tensor:
    """Re-lay a q/k/v projection's output rows (or bias) from ``heads × old`` to ``heads × new``.

    Rotary embeddings (HF ``rotate_half``) pair dim ``i`` with ``i + d/2`` and turn the pair at
    frequency ``θ^(−2i/d)``. In a head ``r = new/old`` times wider, old dim ``i`` moves to ``r·i`` and
    old dim ``d/2 + i`` to ``new/2 + r·i``: the same frequency, so RoPE is unchanged. The other dims
    are zero.
    """
    ratio, half = new // old, old // 2
    idx = torch.arange(half)
    target = torch.cat([ratio * idx, new // 2 + ratio * idx])  # (old,)
    rows = weight.reshape(heads, old, *weight.shape[1:])  # (heads, old, ...)
    out = weight.new_zeros(heads, new, *weight.shape[1:])  # (heads, new, ...)
    out[:, target] = rows
    return out.reshape(heads * new, *weight.shape[1:])


@torch.no_grad()
def widen_heads(model: PreTrainedModel, head_dim: int = 32) -> PreTrainedModel:
    """An exactly equivalent ``LlamaForCausalLM`` whose attention heads are ``head_dim`` wide.

    Why: vLLM's CPU attention serves only head widths 32, 64, 80, ... (``VLLM_CPU.md``), while the
    shipped policies were trained with 16-wide heads. Zero-padding each head changes nothing the
    model computes: q/k/v gain zero rows placed so rotary embeddings turn every old pair at its old
    frequency (:func:`_widen_rows`), q is scaled by ``sqrt(head_dim / old)`` so ``q·k / sqrt(d)`` is
    the same score, and o_proj reads only the old value dims. vLLM's Qwen2 ignores ``head_dim`` in
    the config (it uses ``hidden_size // heads``), so the result is a Llama model with
    ``attention_bias=True`` (Qwen2's q/k/v biases; o_proj's bias is zero). Logits agree with the
    input model to float rounding (tested: max |Δ| ≲ 1e-5 in fp32).

    Args:
        model: a ``Qwen2ForCausalLM`` or ``LlamaForCausalLM`` with no sliding window.
        head_dim: the new width: a multiple of the old one (e.g. 16 → 32).

    Returns:
        A new fp32 model in eval mode (``model`` is not modified).
    """
    config = model.config
    if config.model_type not in FAMILIES:
        raise ValueError(f"model_type={config.model_type!r} must be one of {FAMILIES} to widen its heads")
    old = head_dim_of(config)
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < old or head_dim % old:
        raise ValueError(
            f"head_dim={head_dim!r} must be a multiple of the model's head_dim={old}, e.g. {2 * old}"
        )
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    qkv_bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    keep += ("num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")
    keep += ("pad_token_id", "bos_token_id", "eos_token_id", "hidden_act", "rope_parameters")
    wide_config = transformers.LlamaConfig(
        **{k: getattr(config, k) for k in keep}, head_dim=head_dim, attention_bias=qkv_bias
    )
    wide = transformers.LlamaForCausalLM(wide_config).eval()
    scale = (head_dim / old) ** 0.5
    state = {k: v.float() for k, v in model.state_dict().items()}
    new_state: dict[str, torch.Tensor] = {}
    for name, target in wide.state_dict().items():
        if name in state and state[name].shape == target.shape:
            new_state[name] = state[name]
            continue
        parts = name.rsplit(".", 2)  # (..., "q_proj", "weight")
        proj, kind = parts[-2], parts[-1]
        if proj == "o_proj" and kind == "weight":  # (hidden, heads*old) → read only the old value dims
            cols = _widen_rows(state[name].T.contiguous(), heads, old, head_dim).T
            new_state[name] = cols.contiguous()
        elif proj == "o_proj":  # the bias Qwen2 does not have
            new_state[name] = torch.zeros_like(target)
        elif proj in ("q_proj", "k_proj", "v_proj") and name in state:
            n = heads if proj == "q_proj" else kv_heads
            rows = _widen_rows(state[name], n, old, head_dim)
            new_state[name] = rows * scale if proj == "q_proj" else rows
        else:
            raise ValueError(f"widen_heads: no rule for parameter {name!r} of shape {tuple(target.shape)}")
    wide.load_state_dict(new_state, strict=True)
    wide.generation_config = model.generation_config
    return wide


#: Model families whose logits are exactly ``lm_head(model.model(...).last_hidden_state)``: no soft-capping, no
#: logit scaling (checked again on the config), so the fused LM-head path computes the model's own logits.
FUSED_HEAD_FAMILIES: tuple[str, ...] = ("qwen2", "qwen3", "llama", "mistral")

_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def fused_head_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """``(backbone, output layer)`` of an HF causal LM whose logits are ``output_layer(backbone(...).last_hidden_state)``.

    ``None`` (use the logits) unless the model's ``model_type`` is one of :data:`FUSED_HEAD_FAMILIES`, its config
    sets none of the logit transforms other families apply (soft-capping, ``logit_scale``, ``logits_scaling`` …),
    the backbone is ``model.model`` and ``model.get_output_embeddings()`` is a plain ``torch.nn.Linear`` (not a
    PEFT layer; a PEFT model is looked through with ``get_base_model()``). Used by
    :class:`workbench.trainer.RLOOTrainer` and :class:`workbench.integrations.trl.DVPGRPOTrainer` to call
    :func:`workbench.dvp.lm_head_token_stats` instead of materialising the logits.

    >>> model = build_tiny_model(TinyModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2))
    >>> backbone, head = fused_head_parts(model)
    >>> type(backbone).__name__, tuple(head.weight.shape)
    ('Qwen2Model', (64, 16))
    """
    get_base = getattr(model, "get_base_model", None)  # a PEFT model: look at the model it wraps
    model = get_base() if callable(get_base) else model
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in FUSED_HEAD_FAMILIES:
        return None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    backbone = getattr(model, "model", None)
    if type(head) is not torch.nn.Linear or not isinstance(backbone, torch.nn.Module):
        return None
    return backbone, head


def _parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype={dtype!r} must be torch.float32/bfloat16/float16 or one of {sorted(_DTYPES)}")


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Silence transformers' shard progress bars (noise in tests and notebooks), then restore them."""
    logging = transformers.utils.logging
    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def save_policy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save model + tokenizer (+ metadata) as a normal HF model directory, atomically.

    Everything is written to a temporary sibling directory, which then replaces ``path`` with a
    rename: a crash leaves either the old directory or the new one, never a half-written mix. An
    existing ``path`` is replaced only if it is empty or a model directory (has ``config.json``).

    Args:
        model: any ``PreTrainedModel`` (weights are written as safetensors).
        tokenizer: its tokenizer.
        path: the directory to create or replace.
        metadata: JSON-serialisable facts about the policy (task, recipe, accuracy ...), written to
            ``workbench.json`` and read back by :func:`policy_metadata`.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"path={str(path)!r} is a file; pass a directory path for the policy")
    if path.is_dir() and any(path.iterdir()) and not (path / "config.json").is_file():
        raise ValueError(
            f"path={str(path)!r} is a non-empty directory that is not a model directory (no config.json); "
            "refusing to replace it — choose another path"
        )
    payload = None
    if metadata is not None:
        try:
            payload = json.dumps(dict(metadata), indent=2, sort_keys=True)
        except TypeError as e:
            raise ValueError(f"metadata must be JSON-serialisable: {e}") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        with _quiet_progress():
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if payload is not None:
            (tmp / METADATA_FILE).write_text(payload + "\n", encoding="utf-8")
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _check_model_dir(path: Path) -> None:
    """Raise a clear error for the usual ways a local model directory is broken."""
    if not path.exists():
        raise PolicyNotFoundError(
            f"path={str(path)!r} does not exist; pass a directory written by save_policy or "
            f"save_pretrained, or pretrained_policy(name) (shipped: {available_policies()})"
        )
    if not path.is_dir():
        raise ValueError(f"path={str(path)!r} is a file, not a model directory; pass its parent directory")
    if not (path / "config.json").is_file():
        raise ValueError(
            f"path={str(path)!r} is not a Hugging Face model directory (no config.json); "
            "save one with save_policy(model, tokenizer, path)"
        )
    shards = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({e}); re-save the model") from e
        missing = sorted(n for n in names if not (path / n).is_file())
        if missing:
            raise ValueError(f"path={str(path)!r} lacks weight shards {missing} listed in {index.name}")
    if not shards and not any(
        (path / n).is_file() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")
    ):
        raise ValueError(
            f"path={str(path)!r} has no weights (no *.safetensors or pytorch_model.bin); re-save the model"
        )
    from safetensors import safe_open

    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:  # reads and checks the header only
                f.keys()
        except Exception as e:
            raise ValueError(
                f"{shard} is corrupt or truncated ({e}); re-save the policy (save_policy) or re-copy the file"
            ) from e
    if not any((path / n).is_file() for n in _TOKENIZER_FILES):
        raise ValueError(
            f"path={str(path)!r} has no tokenizer (none of {list(_TOKENIZER_FILES)}); "
            "save it with tokenizer.save_pretrained(path) or use save_policy"
        )


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """``AutoTokenizer``, except for tokenizers saved as a plain ``tokenizers`` pipeline.

    transformers 5 lets ``config.json``'s ``model_type`` override the saved tokenizer class for some
    families: for ``qwen2`` it rebuilds a byte-level BPE around our char-level vocabulary (spaces are
    lost). A ``tokenizer_config.json`` that declares a generic fast tokenizer is loaded as exactly
    that, so the pipeline in ``tokenizer.json`` is used as saved.
    """
    declared = None
    config_file = path / "tokenizer_config.json"
    if config_file.is_file() and (path / "tokenizer.json").is_file():
        with contextlib.suppress(ValueError):
            declared = json.loads(config_file.read_text(encoding="utf-8")).get("tokenizer_class")
    if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_policy(
    path: str | os.PathLike[str], *, dtype: torch.dtype | str = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from any local HF model directory, offline.

    Uses ``AutoModelForCausalLM`` / ``AutoTokenizer`` with ``local_files_only=True`` (no remote code;
    a tokenizer saved as a generic fast tokenizer, like ours, is loaded as saved — plain
    ``AutoTokenizer`` would rebuild a byte-level one for ``qwen2`` directories), after checking the directory so that the usual failures read plainly: a missing directory
    (:class:`PolicyNotFoundError`), no ``config.json``, no or truncated weights, no tokenizer
    (``ValueError`` naming the path and the fix).

    Args:
        path: the model directory.
        dtype: ``torch.float32`` / ``bfloat16`` / ``float16`` or ``"fp32"``, ``"bf16"``, ``"fp16"``.

    Returns:
        The model (eval mode, on CPU) and its tokenizer.
    """
    path = Path(path)
    torch_dtype = _parse_dtype(dtype)
    _check_model_dir(path)
    try:
        with _quiet_progress():
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, local_files_only=True
            )
    except Exception as e:
        raise ValueError(f"could not load the model in {str(path)!r}: {type(e).__name__}: {e}") from e
    try:
        tokenizer = _load_tokenizer(path)
    except Exception as e:
        raise ValueError(f"could not load the tokenizer in {str(path)!r}: {type(e).__name__}: {e}") from e
    n_embed = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_embed:
        raise ValueError(
            f"the tokenizer in {str(path)!r} has {len(tokenizer)} ids but the model embeds only {n_embed}; "
            "the tokenizer does not belong to this model"
        )
    return model.eval(), tokenizer


def resolve_policy(
    spec: str | os.PathLike[str] | None,
    *,
    vocab_size: int = 4096,
    seed: int = 0,
    dtype: torch.dtype | str = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` from a shipped policy name, a local model directory, or ``None`` (fresh).

    A plain name (no path separator) that is a shipped policy wins over a same-named directory in the
    working directory; anything else is loaded as a path with :func:`load_policy`.

    Args:
        spec: ``None`` for a fresh :class:`TinyModelConfig` model, a name from
            :func:`available_policies`, or a directory.
        vocab_size: vocabulary of a fresh model (ignored otherwise).
        seed: init seed of a fresh model (ignored otherwise).
        dtype: dtype to load a saved policy in (a fresh model is fp32).

    Returns:
        The model (eval mode) and its tokenizer.

    Raises:
        PolicyNotFoundError: a plain name that is neither shipped nor an existing directory (the
            message lists the shipped names), or a path that does not exist.
    """
    if spec is None:
        cfg = TinyModelConfig(vocab_size=vocab_size, seed=seed)
        tokenizer = build_tokenizer(cfg.vocab_size)
        return build_tiny_model(cfg, tokenizer), tokenizer
    text = os.fspath(spec)
    plain = isinstance(spec, str) and Path(text).name == text and not text.startswith(".")
    if plain and text in available_policies():
        return load_policy(pretrained_policy(text), dtype=dtype)
    if plain and not Path(text).exists():
        pretrained_policy(text)  # raises PolicyNotFoundError listing the shipped names
    return load_policy(text, dtype=dtype)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added (no bos, no eos).

    With the char-level tokenizer this is one id per character, and ``encode_prompt(prompt)`` is a
    prefix of ``encode_prompt(prompt + completion)`` — which SFT label masking relies on. (BPE
    tokenizers of real models may merge across that boundary.)

    >>> encode_prompt(build_tokenizer(64), "1+1=")
    [5, 14, 5, 18]
    """
    return list(tokenizer.encode(text, add_special_tokens=False))


def policy_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``metadata`` saved with a policy by :func:`save_policy` (``{}`` if none was saved)."""
    file = Path(path) / METADATA_FILE
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e.msg} at line {e.lineno}); re-save the policy") from e


def available_policies() -> list[str]:
    """Names of the policies shipped in :data:`PRETRAINED_DIR` (directories with a ``config.json``)."""
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / "config.json").is_file())


def pretrained_policy(name: str) -> Path:
    """Path of the shipped policy ``name`` (load it with :func:`load_policy`).

    Raises:
        PolicyNotFoundError: no such policy; the message lists the shipped names and how to make them.
    """
    if not isinstance(name, str) or not name or Path(name).name != name or name.startswith("."):
        raise ValueError(
            f"name={name!r} must be a plain policy name such as 'addition'; see available_policies()"
        )
    path = PRETRAINED_DIR / name
    if not (path / "config.json").is_file():
        raise PolicyNotFoundError(
            f"no shipped policy named {name!r} in {PRETRAINED_DIR}; available: {available_policies()}. "
            "Make them with `make policies` (workbench sft --all) or pass a directory to load_policy"
        )
    return path
