"""The ``workbench`` command: ``sft``, ``train``, ``report``, ``horizon``, ``demo`` and ``diagnose``.

Examples::

    workbench sft --preset add2 --out workbench/assets/policies     # remake a shipped policy
    workbench train --preset bf16/dvp_mis --steps 50 --run-dir runs/a
    workbench train --config runs/a/config.json --run-dir runs/a --resume --steps 50
    workbench report runs/a runs/b --out report.html
    workbench report results/headline_floor12/results.json --out headline.svg   # needs kaleido
    workbench horizon results/headline_floor12 results/floor12_t64 --out results/horizon
    workbench demo --steps 60
    workbench diagnose --model multiadd --engine torch --engine-dtype bf16 --samples 256 --out d
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

_NONE = ("none", "null")
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _parse_none(text: str) -> None:
    if text.lower() not in _NONE:
        raise ValueError(text)


def _parse_bool(text: str) -> bool:
    if text.lower() not in _BOOLS:
        raise ValueError(text)
    return _BOOLS[text.lower()]


def _parse_mapping(text: str) -> dict[str, Any]:
    value = json.loads(text)  # json.JSONDecodeError is a ValueError
    if not isinstance(value, dict):
        raise ValueError(text)
    return value


#: How the text of a flag becomes each type a config field can declare; ``Mapping`` takes a JSON object.
_PARSERS: dict[Any, Callable[[str], Any]] = {
    type(None): _parse_none,
    bool: _parse_bool,
    int: int,
    float: float,
    Mapping: _parse_mapping,
    str: str,
}


def _members(annotation: Any) -> list[Any]:
    """The types a field accepts, in the order a flag's text is tried: declared order, ``str`` last.

    ``str`` accepts any text, so ``float | str | None`` reads ``1e-3`` as a float, ``none`` as None and
    ``same`` as a string.
    """
    union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    members = typing.get_args(annotation) if union else (annotation,)
    return sorted((typing.get_origin(m) or m for m in members), key=lambda m: m is str)


def _type_name(annotation: Any) -> str:
    """What a flag of this type accepts (``int``, ``float | none`` …), for help and errors."""
    names = {type(None): "none", Mapping: "JSON object"}
    return " | ".join(names.get(m, getattr(m, "__name__", str(m))) for m in _members(annotation))


def _parse_value(text: str, name: str, annotation: Any) -> Any:
    """The text of flag ``--name`` as a value of the config field's declared type.

    Each member type of ``annotation`` is tried in :func:`_members` order; the first that parses wins.
    Range checks are left to ``RLOOConfig.__post_init__``, so a flag and a config file fail alike.

    Raises:
        argparse.ArgumentTypeError: no member type parses ``text``; the message names the field, the
            value, the accepted types and an example.
    """
    for member in _members(annotation):
        try:
            return _PARSERS[member](text)
        except ValueError:
            continue
    raise argparse.ArgumentTypeError(
        f"RLOOConfig.{name}={text!r} is invalid: allowed {_type_name(annotation)}. "
        f"Pass a value of that type, e.g. --{name.replace('_', '-')} {_example(annotation)}."
    )


def _example(annotation: Any) -> str:
    """A valid flag value for the first non-None type of ``annotation``, for error messages."""
    examples = {bool: "true", int: "8", float: "0.5", Mapping: "'{\"digits\": 2}'"}
    return next((examples[m] for m in _members(annotation) if m in examples), "none")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--field-name`` flag per :class:`~workbench.config.RLOOConfig` field, parsed by its type."""
    from workbench.config import RLOOConfig

    group = parser.add_argument_group("config fields (override the preset / config file; 'none' for None)")
    hints = typing.get_type_hints(RLOOConfig)
    for f in dataclasses.fields(RLOOConfig):
        ann = hints[f.name]
        factory = f.default_factory
        default = f.default if f.default is not dataclasses.MISSING else factory()  # type: ignore[misc]
        group.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f"cfg_{f.name}",
            default=argparse.SUPPRESS,  # an absent flag leaves no attribute, so `--rho none` is an override
            metavar="V",
            type=functools.partial(_parse_value, name=f.name, annotation=ann),
            help=f"({_type_name(ann)}, default {default})",
        )


def _config_from_args(args: argparse.Namespace) -> Any:
    from workbench.config import RLOOConfig
    from workbench.experiments import make_config

    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_")}
    if args.config:
        base = RLOOConfig.from_json(args.config).to_dict()
        return RLOOConfig.from_dict({**base, **overrides})
    if args.preset:
        return make_config(args.preset, **overrides)
    return RLOOConfig(**overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from workbench.trainer import RLOOTrainer

    config = _config_from_args(args)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    trainer = RLOOTrainer(config, run_dir, resume=args.resume)
    print(f"run dir: {run_dir}  (config differs from defaults in: {sorted(config.diff()) or 'nothing'})")
    history = trainer.train(args.steps)
    if history:
        last = history[-1]
        print(
            f"step {int(last['step'])}: reward {last['reward/mean']:.3f}  k1 {last['mismatch/k1']:.2e}  "
            f"k3 {last['mismatch/k3']:.2e}  grad-norm {last['optim/grad_norm']:.2f}"
        )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from workbench.trainer import read_metrics
    from workbench.viz import EXPERIMENT_PANELS, save_figure, training_figure

    if len(args.runs) == 1 and Path(args.runs[0]).is_file():
        # An experiment's results.json: every arm × seed, one colour per arm, the verdict panels first.
        from workbench.experiments import load_results

        res = load_results(args.runs[0])
        groups = {r.name: r.arm for r in res.runs}
        title = f"{res.scenario}: {', '.join(res.arms)} — seeds {res.seeds}, {res.steps} steps"
        fig = training_figure(res.histories(), EXPERIMENT_PANELS, title=title, groups=groups)
    else:
        runs = {Path(r).name or str(r): read_metrics(r) for r in args.runs}
        fig = training_figure(runs, title="DVP Workbench report: " + ", ".join(runs))
    try:
        out = save_figure(fig, args.out)
    except (ImportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from workbench.models import policy_metadata
    from workbench.sft import PRESETS, SFTConfig, sft_policy

    if args.config:
        recipes = {Path(args.config).stem: SFTConfig.from_dict(json.loads(Path(args.config).read_text()))}
    elif args.all:
        recipes = dict(PRESETS)
    elif args.preset:
        if args.preset not in PRESETS:
            print(
                f"error: --preset {args.preset!r} is unknown; choose from {sorted(PRESETS)}", file=sys.stderr
            )
            return 2
        recipes = {args.preset: PRESETS[args.preset]}
    else:
        print("error: give --preset NAME, --all or --config FILE", file=sys.stderr)
        return 2
    for name, cfg in recipes.items():
        if args.steps:
            cfg = dataclasses.replace(cfg, steps=args.steps)
        out = sft_policy(cfg, out_dir=Path(args.out) / name if args.out else None)
        meta = policy_metadata(out)
        print(
            f"{name}: {out}  loss {meta['final_loss']:.3f}  sampled accuracy {meta['sampled_accuracy']:.2f}  "
            f"({meta['train_seconds']} s)"
        )
    return 0


def _results_of(path: str) -> Any:
    """The :class:`~workbench.experiments.ArmResults` of ``path``: a ``results.json`` or its directory."""
    from workbench.experiments import load_results

    p = Path(path)
    return load_results(p / "results.json" if p.is_dir() else p)


def cmd_horizon(args: argparse.Namespace) -> int:
    from workbench.experiments.horizon import horizon_rows
    from workbench.experiments.runner import atomic_write_json
    from workbench.viz import horizon_figure, save_figure

    rows = horizon_rows([_results_of(r) for r in args.results])
    extra = {label: horizon_rows([_results_of(r) for r in paths]) for label, *paths in args.extra or []}
    out = Path(args.out)
    atomic_write_json(
        out / "horizon.json",
        {
            "command": " ".join(["workbench", *sys.argv[1:]]),
            "inputs": args.results,
            "rows": rows,
            "extra": extra,
        },
    )
    fig = horizon_figure(rows, extra=extra, title=args.title)
    for suffix in (".html", ".svg"):
        try:
            print(f"wrote {save_figure(fig, out / ('horizon' + suffix))}")
        except ImportError as e:  # the SVG needs kaleido; the HTML and the JSON are written regardless
            print(f"skipped {suffix}: {e}", file=sys.stderr)
    for label, rs in {"": rows, **extra}.items():
        for r in rs:
            print(
                f"{label + ': ' if label else ''}{r['scenario']} T={r['T']:.0f} {r['arm']:>8}: damage "
                f"{r['damage_mean']:.3f} ± {r['damage_sd']:.3f} (seeds {r['seeds']}), tail draws per sequence "
                f"{r['tail_per_seq']:.2f}, k1 per sequence {r['k1_per_seq']:.2f}"
            )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from workbench.experiments.demo import run_demo
    from workbench.viz import save_training_report

    run = run_demo(steps=args.steps, seed=args.seed, out_dir=Path(args.out), quick=args.quick)
    page = save_training_report(
        run.histories(), Path(args.out) / "report.html", title=run.title, findings=run.findings()
    )
    print(run.summary())
    print(f"HTML report: {page}")
    return 0


def _parse_rhos(text: str) -> tuple[float, ...]:
    """``--rhos 1e-2,1e-4,…`` as floats (their range is checked by ``DiagnoseConfig``)."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--rhos {text!r} is invalid: allowed a comma-separated list of numbers in (0, 1], "
            "e.g. --rhos 1e-2,1e-4,2.26e-6"
        ) from None


def cmd_diagnose(args: argparse.Namespace) -> int:
    from workbench.experiments.diagnose import DEFAULT_RHOS, DiagnoseConfig, run_diagnosis
    from workbench.experiments.runner import atomic_write_text
    from workbench.viz.diagnose_report import diagnose_report_html

    config = DiagnoseConfig(
        model=args.model,
        engine=args.engine,
        engine_dtype=args.engine_dtype,
        perturbation=args.perturbation,
        task=args.task,
        prompts=args.prompts,
        samples=args.samples,
        k=args.k,
        batch_prompts=args.batch_prompts,
        max_new_tokens=args.max_new_tokens,
        rhos=args.rhos or DEFAULT_RHOS,
        seed=args.seed,
    )
    out = Path(args.out)
    result = run_diagnosis(config, out, force=args.force, progress=True)
    report = atomic_write_text(out / "report.html", diagnose_report_html(result.to_dict()))
    naive = result.naive
    print(
        f"{result.engine}: {result.n_tokens} tokens in {result.wall_s:.1f} s  k1 {naive['k1']:.2e}  "
        f"k3 {naive['k3']:.2e}  max |Δ| {naive['max_abs_delta']:.2e}"
    )
    print(f"recommended ρ = {result.recommendation['rho']:.3g}: {result.recommendation['reason']}")
    print(f"wrote {out / 'diagnosis.json'} and {report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``workbench`` command."""
    parser = argparse.ArgumentParser(
        prog="workbench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run RLOO (DVP + IS) from a preset, a config file or flags")
    p.add_argument("--preset", help="scenario or scenario/arm (see workbench.experiments.preset_names())")
    p.add_argument("--config", help="a JSON config file (e.g. a run's config.json)")
    p.add_argument("--run-dir", help="output directory (default runs/<timestamp>)")
    p.add_argument("--steps", type=int, default=50, help="steps to run (default 50)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint"
    )
    _add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sft", help="train (or fetch from cache) a warm-start policy")
    p.add_argument("--preset", help="a recipe name from workbench.sft.PRESETS")
    p.add_argument("--all", action="store_true", help="every preset")
    p.add_argument("--config", help="a JSON SFTConfig file")
    p.add_argument("--out", help="write policies to OUT/<name> (default: the cache)")
    p.add_argument("--steps", type=int, default=0, help="override the recipe's step count")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser(
        "report", help="plot run directories, or an experiment's results.json, into an HTML or SVG report"
    )
    p.add_argument(
        "runs", nargs="+", help="run directories holding metrics.jsonl, or one results.json of an experiment"
    )
    p.add_argument(
        "--out",
        default="report.html",
        help="file to write: .html (default report.html), or .svg/.png/.pdf (needs pip install kaleido)",
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "horizon", help="the horizon study: damage against response length from experiments' results"
    )
    p.add_argument(
        "results", nargs="+", help="results.json files (or their directories), each with a control arm"
    )
    p.add_argument(
        "--extra",
        nargs="+",
        action="append",
        metavar=("LABEL", "RESULTS"),
        help="another set, drawn with its own line style: a label, then its results (repeatable)",
    )
    p.add_argument("--out", default="results/horizon", help="directory for horizon.json/.html/.svg")
    p.add_argument(
        "--title",
        default="damage against response length",
        help="figure title (say what the unlabelled solid lines are, e.g. the model and the perturbation)",
    )
    p.set_defaults(func=cmd_horizon)

    p = sub.add_parser(
        "demo", help="the headline comparison: naive RLOO vs DVP + MIS, ending in an HTML report"
    )
    p.add_argument("--steps", type=int, default=None, help="steps per arm (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="the QUICK version (about a minute)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "diagnose",
        help="measure the mismatch of a model + engine pair before training (diagnosis.json + report.html)",
    )
    p.add_argument(
        "--model", required=True, help="a shipped policy name or a local Hugging Face model directory"
    )
    p.add_argument("--engine", default="torch", help="torch (anywhere) or vllm (needs vLLM installed)")
    p.add_argument("--engine-dtype", default="bf16", help="fp32, bf16 or fp16 (default bf16)")
    p.add_argument("--perturbation", help="emulated logit error for --engine torch, e.g. gaussian:0.3")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompts", help="a JSONL file of prompts ({'prompt': …, 'answer': …} per line)")
    source.add_argument("--task", help="a registered task to draw prompts from (default: the policy's own)")
    p.add_argument("--samples", type=int, default=256, help="responses to sample (default 256)")
    p.add_argument("--k", type=int, default=4, help="responses per prompt (default 4)")
    p.add_argument(
        "--batch-prompts", type=int, default=16, help="prompts per engine call (memory; default 16)"
    )
    p.add_argument("--max-new-tokens", type=int, default=None, help="response cap T (default: the task's)")
    p.add_argument(
        "--rhos", type=_parse_rhos, default=None, help="comma-separated ρ sweep (default 1e-2 … 1e-16)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory for diagnosis.json and report.html")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out directory")
    p.set_defaults(func=cmd_diagnose)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``workbench`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
