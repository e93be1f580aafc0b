"""Tiny models and the char-level tokenizer: build → save → load round trips and clear load errors."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
import transformers

from workbench import models
from workbench.models import (
    MIN_VOCAB_SIZE,
    PolicyNotFoundError,
    TinyModelConfig,
    available_policies,
    build_tiny_model,
    build_tokenizer,
    encode_prompt,
    head_dim_of,
    load_policy,
    policy_metadata,
    pretrained_policy,
    resolve_policy,
    save_policy,
    widen_heads,
)
from workbench.tasks import ALPHABET, SPECIAL_TOKENS, TASKS, make_task

SMALL = TinyModelConfig(vocab_size=256, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def tokenizer() -> transformers.PreTrainedTokenizerFast:
    return build_tokenizer(4096)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = TinyModelConfig()
    tok = build_tokenizer(cfg.vocab_size)
    path = tmp_path_factory.mktemp("policies") / "tiny"
    save_policy(build_tiny_model(cfg, tok), tok, path, metadata={"task": "addition", "steps": 3})
    return path


def logits_of(model: transformers.PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits  # (B, T, V)


# --- tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_layout(tokenizer) -> None:
    assert len(tokenizer) == 4096
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.unk_token_id == 3
    assert tokenizer.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == list(SPECIAL_TOKENS)
    # one id per ALPHABET char, consecutive, in ALPHABET order
    ids = tokenizer.encode(ALPHABET)
    assert ids == list(range(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + len(ALPHABET)))
    assert tokenizer.convert_ids_to_tokens(4095) == f"<unused_{4095 - MIN_VOCAB_SIZE}>"
    assert tokenizer.padding_side == "left"


def test_tokenizer_one_id_per_char_and_round_trip_on_task_strings(tokenizer, tmp_path: Path) -> None:
    assert tokenizer.encode("12+34=") == [tokenizer.convert_tokens_to_ids(c) for c in "12+34="]
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps({"prompt": "what is (1+2)^2?", "answer": "\\boxed{9}"}) + "\n")
    strings = ["", " ", "  a  b ", "\\boxed{\\frac{3}{4}}", ALPHABET, ALPHABET[::-1]]
    for name in TASKS:
        task = make_task(name, path=f) if name == "jsonl" else make_task(name)
        for p in task.sample(30, random.Random(0)):
            strings += [p.prompt, p.answer, task.sft_text(p)]
    for s in strings:
        ids = tokenizer.encode(s)
        assert len(ids) == len(s)
        assert tokenizer.decode(ids) == s


def test_tokenizer_specials_unknowns_and_tail(tokenizer) -> None:
    ids = tokenizer.encode("7<eos>")
    assert ids == [tokenizer.convert_tokens_to_ids("7"), tokenizer.eos_token_id]
    assert tokenizer.encode("A\u00e9") == [tokenizer.unk_token_id] * 2
    seven = tokenizer.convert_tokens_to_ids("7")
    assert tokenizer.decode([seven, 2, 0, 0]) == "7<eos><pad><pad>"
    assert tokenizer.decode([seven, 2, 0, 0], skip_special_tokens=True) == "7"
    # tail ids are ordinary tokens: they stay visible even when specials are skipped
    assert tokenizer.decode([seven, 4000], skip_special_tokens=True) == f"7<unused_{4000 - MIN_VOCAB_SIZE}>"
    batch = tokenizer(["12", "1"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [[5, 6], [0, 5]]  # left padding with pad id 0
    assert batch["attention_mask"].tolist() == [[1, 1], [0, 1]]


@pytest.mark.parametrize("vocab_size", [MIN_VOCAB_SIZE - 1, 0, 64.0, True])
def test_tokenizer_rejects_small_vocab(vocab_size) -> None:
    with pytest.raises(ValueError, match=f"vocab_size={vocab_size!r}"):
        build_tokenizer(vocab_size)


def test_min_vocab_tokenizer_has_no_tail() -> None:
    tok = build_tokenizer(MIN_VOCAB_SIZE)
    assert len(tok) == MIN_VOCAB_SIZE
    assert tok.decode(tok.encode(ALPHABET)) == ALPHABET


# --- model -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_build_tiny_model(family: str) -> None:
    cfg = TinyModelConfig(family=family)
    tok = build_tokenizer(cfg.vocab_size)
    state = torch.random.get_rng_state()
    model = build_tiny_model(cfg, tok)
    assert torch.equal(torch.random.get_rng_state(), state), "the global RNG must be left alone"
    expected_cls = transformers.Qwen2ForCausalLM if family == "qwen2" else transformers.LlamaForCausalLM
    assert type(model) is expected_cls and not model.training
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert model.get_input_embeddings().weight.shape == (4096, 64)
    assert len(model.model.layers) == 2
    for holder in (model.config, model.generation_config):
        assert (holder.pad_token_id, holder.bos_token_id, holder.eos_token_id) == (0, 1, 2)
    ids = torch.tensor([tok.encode("12+34=")])
    assert logits_of(model, ids).shape == (1, 6, 4096)


def test_build_is_seeded() -> None:
    a, b = build_tiny_model(SMALL), build_tiny_model(SMALL)
    c = build_tiny_model(dataclasses.replace(SMALL, seed=1))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_build_rejects_a_tokenizer_larger_than_the_vocab() -> None:
    with pytest.raises(ValueError, match=r"4096 ids but cfg.vocab_size=256"):
        build_tiny_model(SMALL, build_tokenizer(4096))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vocab_size": MIN_VOCAB_SIZE - 1}, "vocab_size="),
        ({"hidden_size": 30, "num_heads": 4}, "hidden_size=30"),
        ({"hidden_size": 12, "num_heads": 4}, "even head"),  # head_dim 3 is odd
        ({"num_layers": 0}, "num_layers=0"),
        ({"family": "gpt2"}, "family='gpt2'"),
        ({"seed": -1}, "seed=-1"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TinyModelConfig(**kwargs)


# --- save / load -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_save_load_round_trip_gives_identical_logits(tmp_path: Path, family: str) -> None:
    cfg = TinyModelConfig(family=family, seed=3)
    tok = build_tokenizer(cfg.vocab_size)
    model = build_tiny_model(cfg, tok)
    path = save_policy(model, tok, tmp_path / "p")
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    loaded, loaded_tok = load_policy(path)
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([tok.encode("12+34=46"), tok.encode("sort dcba=abc")[:8]])
    torch.testing.assert_close(logits_of(loaded, ids), logits_of(model, ids), rtol=0, atol=0)
    for s in ["12+34=", "a in abc=", " x ", "\\boxed{1}"]:
        assert loaded_tok.encode(s) == tok.encode(s)
        assert loaded_tok.decode(loaded_tok.encode(s)) == s
    assert loaded_tok.eos_token_id == 2 and loaded_tok.padding_side == "left"
    assert loaded.generation_config.eos_token_id == 2
    # an ordinary HF model directory: transformers loads it on its own
    plain = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    torch.testing.assert_close(logits_of(plain, ids), logits_of(model, ids), rtol=0, atol=0)


@pytest.mark.parametrize(("dtype", "expected"), [("bf16", torch.bfloat16), (torch.float16, torch.float16)])
def test_load_dtype(saved: Path, dtype, expected: torch.dtype) -> None:
    model, _ = load_policy(saved, dtype=dtype)
    assert model.model.embed_tokens.weight.dtype == expected


def test_load_rejects_unknown_dtype(saved: Path) -> None:
    with pytest.raises(ValueError, match="dtype='int8'"):
        load_policy(saved, dtype="int8")


def test_metadata_round_trip(saved: Path, tmp_path: Path) -> None:
    assert policy_metadata(saved) == {"task": "addition", "steps": 3}
    assert policy_metadata(tmp_path) == {}
    model, tok = build_tiny_model(SMALL), build_tokenizer(SMALL.vocab_size)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_policy(model, tok, tmp_path / "x", metadata={"bad": object()})
    assert not (tmp_path / "x").exists()


def test_save_replaces_atomically_and_leaves_no_temp_dirs(tmp_path: Path) -> None:
    tok = build_tokenizer(SMALL.vocab_size)
    first = build_tiny_model(SMALL, tok)
    second = build_tiny_model(dataclasses.replace(SMALL, seed=9), tok)
    path = tmp_path / "policy"
    save_policy(first, tok, path, metadata={"v": 1})
    save_policy(second, tok, path, metadata={"v": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["policy"]
    loaded, _ = load_policy(path)
    assert torch.equal(loaded.model.embed_tokens.weight, second.model.embed_tokens.weight)
    assert policy_metadata(path) == {"v": 2}


def test_failed_save_keeps_the_old_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = build_tokenizer(SMALL.vocab_size)
    model = build_tiny_model(SMALL, tok)
    path = save_policy(model, tok, tmp_path / "policy", metadata={"v": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(tok), "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        save_policy(model, tok, path, metadata={"v": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["policy"]
    assert policy_metadata(path) == {"v": 1}
    monkeypatch.undo()
    load_policy(path)


def test_save_refuses_to_replace_a_non_model_directory(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match="refusing to replace"):
        save_policy(build_tiny_model(SMALL), build_tokenizer(SMALL.vocab_size), tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "precious"


# --- load errors -------------------------------------------------------------------------------


def copy_policy(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_load_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(PolicyNotFoundError, match=r"does not exist.*pretrained_policy"):
        load_policy(tmp_path / "absent")
    assert issubclass(PolicyNotFoundError, FileNotFoundError) and issubclass(PolicyNotFoundError, ValueError)


def test_load_not_a_model_dir(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"not a Hugging Face model directory \(no config.json\)"):
        load_policy(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        load_policy(tmp_path / "file")


def test_load_truncated_safetensors(saved: Path, tmp_path: Path) -> None:
    broken = copy_policy(saved, tmp_path / "broken")
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors is corrupt or truncated"):
        load_policy(broken)
    weights.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match=r"corrupt or truncated"):
        load_policy(broken)


def test_load_missing_weights_or_tokenizer(saved: Path, tmp_path: Path) -> None:
    no_weights = copy_policy(saved, tmp_path / "nw", skip=("model.safetensors",))
    with pytest.raises(ValueError, match="has no weights"):
        load_policy(no_weights)
    no_tok = copy_policy(saved, tmp_path / "nt", skip=("tokenizer.json", "tokenizer_config.json"))
    with pytest.raises(ValueError, match="has no tokenizer"):
        load_policy(no_tok)


def test_load_rejects_a_tokenizer_from_another_model(saved: Path, tmp_path: Path) -> None:
    small = build_tiny_model(SMALL)
    mixed = save_policy(small, build_tokenizer(4096), tmp_path / "mixed")
    with pytest.raises(ValueError, match=r"4096 ids but the model embeds only 256"):
        load_policy(mixed)


# --- shipped policies --------------------------------------------------------------------------


def test_pretrained_policy_missing_lists_available(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "PRETRAINED_DIR", tmp_path)
    assert available_policies() == []
    with pytest.raises(PolicyNotFoundError, match=r"no shipped policy named 'addition'.*available: \[\]"):
        pretrained_policy("addition")
    tok = build_tokenizer(SMALL.vocab_size)
    save_policy(build_tiny_model(SMALL, tok), tok, tmp_path / "sort")
    (tmp_path / "junk").mkdir()
    assert available_policies() == ["sort"]
    assert pretrained_policy("sort") == tmp_path / "sort"
    with pytest.raises(PolicyNotFoundError, match=r"available: \['sort'\]"):
        pretrained_policy("junk")
    with pytest.raises(ValueError, match="plain policy name"):
        pretrained_policy("../sort")


def test_pretrained_dir_is_inside_the_package() -> None:
    assert models.PRETRAINED_DIR.parts[-3:] == ("workbench", "assets", "policies")


def test_resolve_policy(saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh, tok = resolve_policy(None, vocab_size=128, seed=5)
    assert fresh.get_input_embeddings().weight.shape[0] == 128 and len(tok) == 128
    again, _ = resolve_policy(None, vocab_size=128, seed=5)
    assert torch.equal(fresh.model.embed_tokens.weight, again.model.embed_tokens.weight)
    from_dir, _ = resolve_policy(saved, dtype="bf16")
    assert from_dir.model.embed_tokens.weight.dtype == torch.bfloat16
    monkeypatch.setattr(models, "PRETRAINED_DIR", saved.parent)
    shipped, _ = resolve_policy(saved.name)
    torch.testing.assert_close(
        shipped.model.embed_tokens.weight, load_policy(saved)[0].model.embed_tokens.weight
    )
    with pytest.raises(PolicyNotFoundError, match=r"no shipped policy named 'nope'.*available: \['tiny'\]"):
        resolve_policy("nope")
    with pytest.raises(PolicyNotFoundError, match="does not exist"):
        resolve_policy(tmp_path / "nope")


def test_encode_prompt_is_a_prefix_of_the_sft_text(tokenizer) -> None:
    for name in ("addition", "sort", "count", "multiadd", "probe"):
        task = make_task(name)
        for p in task.sample(20, random.Random(1)):
            prompt, full = encode_prompt(tokenizer, p.prompt), encode_prompt(tokenizer, task.sft_text(p))
            assert full[: len(prompt)] == prompt and len(full) == len(task.sft_text(p))
            assert tokenizer.bos_token_id not in full and tokenizer.eos_token_id not in full


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("heads", [4, 2])
def test_widen_heads_computes_the_same_function(family: str, heads: int) -> None:
    """Zero-padded heads (RoPE pairs moved to the same frequencies, q rescaled) change no logit."""
    cfg = TinyModelConfig(vocab_size=256, hidden_size=64, num_heads=heads, family=family, seed=3)
    tok = build_tokenizer(256)
    model = build_tiny_model(cfg, tok)
    with torch.no_grad():  # random biases, so a misplaced q/k/v bias row cannot hide behind zeros
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    wide = widen_heads(model, 2 * cfg.head_dim)
    assert wide.config.model_type == "llama" and wide.config.head_dim == 2 * cfg.head_dim
    x = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(x)
    mask[0, :7] = 0  # left padding: positions must line up too
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = model(input_ids=x, attention_mask=mask, position_ids=pos).logits
        b = wide(input_ids=x, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(b[mask.bool()], a[mask.bool()], atol=2e-5, rtol=1e-5)


def test_widen_heads_rejects_widths_that_are_not_multiples() -> None:
    model = build_tiny_model(SMALL, build_tokenizer(SMALL.vocab_size))
    with pytest.raises(ValueError, match=r"head_dim=24 must be a multiple of the model's head_dim=16"):
        widen_heads(model, 24)


def test_shipped_policies_are_servable_by_vllms_cpu_attention() -> None:
    from workbench.engines.vllm_engine import CPU_HEAD_DIMS

    for name in available_policies():
        config = load_policy(pretrained_policy(name))[0].config
        assert head_dim_of(config) in CPU_HEAD_DIMS, name
    assert TinyModelConfig().head_dim in CPU_HEAD_DIMS
