"""``python -m workbench.experiments <what> ...``: every result in ``results/`` comes from one of these.

=============  =========================================================================================
subcommand     writes
=============  =========================================================================================
``arms``       ``OUT/results.json`` + ``summary.csv``: arms × seeds of a scenario, with verdicts
``signature``  ``OUT/signature.json``: check 1 (Δ by p bin, positive mode, envelope) per engine setting
``overlap``    ``OUT/overlap.json``: check 2 (safe-set overlap, boundary-token rate) per engine setting
``sweep``      ``OUT/sweep.json`` + ``sweep.csv``: check 3 (the ρ sweep)
``prop55``     ``OUT/prop55.json``: Prop 5.5's bound on the measured Z vs the measured |J_mp − J|
``variants``   ``OUT/<variant>/results.json``: the headline arms under RLOO, GRPO and PPO-clip
``adaptive``   ``OUT/kappa<κ>/results.json``: fixed vs entropy-scaled ρ
=============  =========================================================================================

Examples::

    python -m workbench.experiments arms floor --arms naive,dvp_mis --seeds 0,1,2 --out results/headline
    python -m workbench.experiments signature --engines bf16,bf16+gaussian:0.5 --out results/signature
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from workbench.dvp import DEFAULT_RHO
from workbench.experiments.runner import atomic_write_json


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(
                f"--set {pair!r}: write key=value (value as JSON, e.g. lr=1e-4 or grad_clip=null)"
            )
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _policy(scenario: str) -> tuple[Any, Any, Any, dict[str, Any]]:
    from workbench import models, tasks
    from workbench.experiments.presets import SCENARIOS
    from workbench.experiments.runner import resolve_model

    scen = SCENARIOS[scenario]
    model, tok = models.resolve_policy(resolve_model(scen["model"]))
    return model, tok, tasks.make_task(scen["task"], **scen.get("task_kwargs", {})), scen


def _engines(text: str) -> list[tuple[str, str | None]]:
    """``"bf16,bf16+gaussian:0.5,fp32+floor:13.5"`` → ``[("bf16", None), ("bf16", "gaussian:0.5"), …]``."""
    out = []
    for item in text.split(","):
        dtype, _, pert = item.strip().partition("+")
        out.append((dtype, pert or None))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "python -m workbench.experiments " + " ".join(shlex.quote(a) for a in argv)
    p = argparse.ArgumentParser(
        prog="python -m workbench.experiments",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="what", required=True)

    a = sub.add_parser("arms")
    a.add_argument("scenario")
    a.add_argument("--arms", default="naive,dvp_mis")
    a.add_argument("--reference", default="dvp_mis", help="degradation reference arm ('none' to disable)")

    for name in ("signature", "overlap", "prop55"):
        s = sub.add_parser(name)
        s.add_argument("--scenario", default="floor", help="whose policy and task to probe")
        s.add_argument("--engines", default="bf16,bf16+gaussian:0.5")
        s.add_argument("--trajectories", type=int, default=1024)

    s = sub.add_parser("sweep")
    s.add_argument("scenario")
    s.add_argument(
        "--rhos", default=None, help="comma list; 'none' = no pruning, 'e13' = e^-13 (default: the grid)"
    )
    s = sub.add_parser("variants")
    s.add_argument("scenario")
    s = sub.add_parser("adaptive")
    s.add_argument("scenario")
    s.add_argument("--kappas", default="0,0.5")

    for s in sub.choices.values():
        s.add_argument("--seeds", default="0,1,2")
        s.add_argument("--steps", type=int, default=None)
        s.add_argument("--quick", action="store_true")
        s.add_argument("--set", action="append", default=[], help="config override key=JSON")
        s.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
        s.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    seeds, out, overrides = _ints(args.seeds), Path(args.out), _overrides(args.set)
    t0 = time.perf_counter()
    if args.what == "arms":
        from workbench.experiments.demo import format_table
        from workbench.experiments.runner import run_arms

        ref = None if args.reference == "none" else args.reference
        res = run_arms(
            args.scenario,
            args.arms.split(","),
            seeds,
            args.steps,
            args.quick,
            reference=ref,
            overrides=overrides,
            out_dir=out,
            command=command,
        )
        sys.stdout.write(format_table(res) + "\n")
    elif args.what in ("signature", "overlap"):
        from workbench.experiments.overlap import measure_overlap
        from workbench.experiments.signature import measure_signature

        model, tok, task, _ = _policy(args.scenario)
        fn = measure_signature if args.what == "signature" else measure_overlap
        rows = [
            fn(
                model,
                tok,
                task,
                engine_dtype=d,
                perturbation=pert,
                n_trajectories=args.trajectories,
                seed=seeds[0],
            ).to_dict()
            for d, pert in _engines(args.engines)
        ]
        atomic_write_json(
            out / f"{args.what}.json",
            {"command": command, "scenario": args.scenario, "seed": seeds[0], "results": rows},
        )
    elif args.what == "prop55":
        from workbench.experiments.beyond import prop55_on_policy

        model, tok, task, _ = _policy(args.scenario)
        pts = prop55_on_policy(model, tok, task, n_trajectories=args.trajectories, seed=seeds[0])
        atomic_write_json(
            out / "prop55.json",
            {
                "command": command,
                "scenario": args.scenario,
                "seed": seeds[0],
                "points": [pt.to_dict() for pt in pts],
            },
        )
    elif args.what == "sweep":
        from workbench.experiments.sweep import SWEEP_RHOS, rho_sweep

        def rho_of(text: str) -> float | None:
            text = text.strip().lower()
            return None if text == "none" else DEFAULT_RHO if text == "e13" else float(text)

        rho_sweep(
            args.scenario,
            SWEEP_RHOS if args.rhos is None else [rho_of(x) for x in args.rhos.split(",")],
            seeds=seeds,
            steps=args.steps,
            quick=args.quick,
            overrides=overrides,
            out_dir=str(out),
            command=command,
        )
    elif args.what == "variants":
        from workbench.experiments.beyond import loss_variants

        loss_variants(
            args.scenario, seeds=seeds, steps=args.steps, quick=args.quick, out_dir=str(out), command=command
        )
    elif args.what == "adaptive":
        from workbench.experiments.beyond import adaptive_rho

        kappas = [float(x) for x in args.kappas.split(",")]
        adaptive_rho(args.scenario, kappas, seeds, args.steps, args.quick, out_dir=str(out), command=command)
    sys.stderr.write(f"done in {time.perf_counter() - t0:.0f} s → {out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
