"""The ``workbench train`` flags: every RLOOConfig field, parsed with its declared type, failing clearly."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from workbench.cli import _config_from_args, build_parser, main
from workbench.config import RLOOConfig

#: field → (flag text, the value the config must hold, extra flags the value needs to be valid).
FIELD_CASES: dict[str, tuple[str, object, tuple[str, ...]]] = {
    "model": ("multiadd", "multiadd", ()),
    "task": ("count", "count", ()),
    "task_kwargs": ('{"digits": 2}', {"digits": 2}, ()),
    "vocab_size": ("128", 128, ()),
    "k": ("8", 8, ()),
    "prompts_per_step": ("8", 8, ()),
    "max_new_tokens": ("12", 12, ()),
    "temperature": ("0.7", 0.7, ()),
    "lr": ("1e-4", 1e-4, ()),
    "lr_schedule": ("cosine", "cosine", ()),
    "warmup_steps": ("3", 3, ()),
    "total_steps": ("50", 50, ()),
    "weight_decay": ("0.01", 0.01, ()),
    "grad_clip": ("0.5", 0.5, ()),
    "rho": ("1e-3", 1e-3, ()),
    "engine_rho": ("1e-4", 1e-4, ()),  # float | str | None: a number is a float ...
    "is_mode": ("token_tis", "token_tis", ()),
    "is_lo": ("0.5", 0.5, ()),
    "is_hi": ("3", 3.0, ()),
    "veto": ("1e-3", 1e-3, ()),
    "trust_region": ("0.5", 0.5, ()),
    "trust_region_div": ("k2", "k2", ()),
    "drop_boundary_tokens": ("false", False, ()),
    "drop_boundary_suffix": ("true", True, ()),
    "rho_entropy_scale": ("0.5", 0.5, ()),
    "advantage": ("grpo", "grpo", ()),
    "loss_type": ("ppo_clip", "ppo_clip", ()),
    "ppo_epochs": ("2", 2, ("--loss-type", "ppo_clip")),
    "clip_eps": ("0.3", 0.3, ()),
    "agg": ("seq_mean", "seq_mean", ()),
    "dual_clip": ("3", 3.0, ("--loss-type", "ppo_clip")),
    "loss_norm": ("valid", "valid", ()),
    "rejected_in_baseline": ("true", True, ()),
    "verl_metrics": ("true", True, ()),
    "train_dtype": ("bf16", "bf16", ()),
    "device": ("cuda", "cuda", ()),
    "engine": ("vllm", "vllm", ()),
    "engine_dtype": ("fp16", "fp16", ()),
    "perturbation": ("gaussian:0.3", "gaussian:0.3", ()),
    "seed": ("1", 1, ()),
    "chunk_size": ("256", 256, ()),
    "fused_head": ("false", False, ()),
    "checkpoint_every": ("3", 3, ()),
    "eval_every": ("3", 3, ()),
    "eval_prompts": ("8", 8, ()),
}

OPTIONAL_FIELDS = [
    "model",
    "max_new_tokens",
    "grad_clip",
    "rho",
    "engine_rho",
    "is_lo",
    "is_hi",
    "veto",
    "trust_region",
    "dual_clip",
    "perturbation",
]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _config(*flags: str, preset: str | None = None) -> RLOOConfig:
    argv = ["train", *(["--preset", preset] if preset else []), *flags]
    return _config_from_args(build_parser().parse_args(argv))


def test_the_walk_covers_every_config_field() -> None:
    fields = [f.name for f in dataclasses.fields(RLOOConfig)]
    assert sorted(FIELD_CASES) == sorted(fields), "add the new RLOOConfig field to FIELD_CASES"
    hints = typing.get_type_hints(RLOOConfig)
    optional = [f for f in fields if type(None) in typing.get_args(hints[f])]
    assert sorted(OPTIONAL_FIELDS) == sorted(optional)


@pytest.mark.parametrize("name", list(FIELD_CASES))
def test_every_field_is_set_from_its_flag_with_its_declared_type(name: str) -> None:
    text, want, extra = FIELD_CASES[name]
    cfg = _config(_flag(name), text, *extra)
    got = getattr(cfg, name)
    assert got == want and type(got) is type(want), (got, want)
    assert getattr(RLOOConfig(), name) != want  # the flag changed something
    changed = set(cfg.diff()) - {name} - {f.lstrip("-").replace("-", "_") for f in extra[::2]}
    assert not changed, f"--{name} also changed {changed}"


@pytest.mark.parametrize("name", OPTIONAL_FIELDS)
@pytest.mark.parametrize("spelling", ["none", "None", "null"])
def test_none_sets_an_optional_field_to_none(name: str, spelling: str) -> None:
    assert getattr(_config(_flag(name), spelling), name) is None


def test_engine_rho_keeps_its_string_spelling() -> None:
    assert _config("--engine-rho", "1e-4", "--engine-rho", "same").engine_rho == "same"


def test_the_integer_flags_of_the_bar_override_a_preset() -> None:
    cfg = _config(
        *("--k", "2", "--seed", "1", "--prompts-per-step", "2", "--checkpoint-every", "1"),
        *("--eval-every", "1"),
        preset="bf16/dvp_mis",
    )
    assert (cfg.k, cfg.seed, cfg.prompts_per_step, cfg.checkpoint_every, cfg.eval_every) == (2, 1, 2, 1, 1)
    assert cfg.engine_dtype == "bf16" and cfg.is_mode == "token_mis"  # the rest comes from the preset


def test_flags_override_a_config_file(tmp_path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(RLOOConfig(k=6, lr=1e-5).to_dict()))
    cfg = _config("--config", str(path), "--k", "3")
    assert (cfg.k, cfg.lr) == (3, 1e-5)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--k", "x"), "RLOOConfig.k='x' is invalid: allowed int. Pass a value of that type, e.g. --k 8."),
        (("--k", "none"), "RLOOConfig.k='none' is invalid: allowed int."),
        (("--max-new-tokens", "1.5"), "RLOOConfig.max_new_tokens='1.5' is invalid: allowed int | none."),
        (("--rho", "e-13"), "RLOOConfig.rho='e-13' is invalid: allowed float | none."),
        (("--drop-boundary-tokens", "maybe"), "allowed bool. Pass a value of that type, e.g."),
        (("--task-kwargs", "[1]"), "RLOOConfig.task_kwargs='[1]' is invalid: allowed JSON object."),
        (("--task-kwargs", "{digits: 2}"), "e.g. --task-kwargs '{\"digits\": 2}'"),
    ],
)
def test_a_value_of_the_wrong_type_names_field_value_types_and_fix(flags, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["train", *flags])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--k", "1"), "RLOOConfig.k=1 is invalid: allowed k >= 2."),
        (("--eval-every", "-1"), "RLOOConfig.eval_every/eval_prompts=(-1, 32) is invalid"),
        (("--temperature", "0"), "RLOOConfig.temperature=0.0 is invalid: allowed a finite value > 0."),
        (("--ppo-epochs", "2"), "Set loss_type='ppo_clip'"),
    ],
)
def test_an_out_of_range_value_gets_the_configs_own_error(flags, message, capsys, tmp_path) -> None:
    assert main(["train", "--preset", "bf16/dvp_mis", "--run-dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.slow
def test_train_runs_with_the_integer_flags(tmp_path, capsys) -> None:
    argv = ["train", "--preset", "bf16/dvp_mis", "--k", "2", "--seed", "1", "--prompts-per-step", "2"]
    argv += ["--checkpoint-every", "1", "--eval-every", "1", "--steps", "1", "--run-dir", str(tmp_path)]
    assert main(argv) == 0
    assert "step 1: reward" in capsys.readouterr().out
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["k"], saved["seed"], saved["prompts_per_step"]) == (2, 1, 2)
    [row] = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row["eval/reward"] is not None  # eval_every=1 measured it
    assert any((tmp_path / "checkpoints").iterdir())
