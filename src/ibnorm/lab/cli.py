"""The ``ibnorm`` command: ``compare``, ``sweep``, ``results``, ``roi``, ``demo``, ``analyze``
and ``bench``.

``compare`` and ``sweep`` also run under ``torchrun --nproc-per-node N``: the process group
is initialized from the environment (gloo on CPU, nccl on CUDA) and rank 0 writes files.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from .compression import PLACEMENTS


def _init_distributed() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _is_writer() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _experiment_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="run folder (results.jsonl, report.md, report.html)")
    parser.add_argument("--seeds", type=int, help="seeds per arm (default: the task's, 5 image / 3 LM)")
    parser.add_argument("--steps", type=int, help="training steps per run (default: the task's)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--data-dir", help="folder with the Fashion-MNIST idx files")
    parser.add_argument("--device", default=None, help="train on this device, e.g. cuda (default: cpu)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are FIRST, FIRST+1, … (default 0)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from results.jsonl; train nothing")


def _fail(parser: argparse.ArgumentParser, exc: BaseException) -> None:
    """Bad input: the parser's usage and the error on one line, exit status 2."""
    parser.error(" ".join(str(exc).split()))


def _run(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    tasks: Sequence[str],
    arms: Sequence[str],
    title: str,
    command: str,
    tune_lr: int = 0,
    analyze: int = 0,
) -> None:
    from .experiments.compare import make_plans, run_plans
    from .experiments.report import write_report

    try:
        plans = make_plans(
            tasks,
            arms,
            args.seeds,
            args.steps,
            args.batch_size,
            args.lr,
            args.eval_every,
            tune_lr,
            analyze_every=analyze,
            first_seed=args.first_seed,
            device=args.device,
        )
    except (ValueError, TypeError) as exc:
        _fail(parser, exc)
    if args.report_only:
        report = write_report(args.out, title)
        print(f"report: {report} and {report.with_suffix('.html')}")
        return
    _init_distributed()
    try:
        run_plans(plans, args.out, args.data_dir, progress=not args.no_progress, command=command, device=args.device)
    except FileNotFoundError as exc:  # data missing: found before any training starts
        _fail(parser, exc)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished runs are in {args.out / 'results.jsonl'}; run the same command to resume")
        raise SystemExit(130)
    if _is_writer():
        report = write_report(args.out, title)
        print(f"report: {report} and {report.with_suffix('.html')}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="ibnorm", description="IBNorm for PyTorch: A/B experiments and benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)

    compare = sub.add_parser("compare", help="A/B comparison of arms on tasks over several seeds")
    compare.add_argument("--tasks", nargs="+", required=True, help="e.g. mnist1d-cnn fmnist-resnet austen-gpt2 text:PATH")
    compare.add_argument("--arms", nargs="+", default=None, help="default: parent ib ib-S ib-L ib-T ib-learnable, normalnorm (batch/layer tasks), dyt (layer tasks)")
    compare.add_argument("--tune-lr", type=int, default=0, help="try K learning rates per arm on the validation split first")
    compare.add_argument(
        "--analyze", type=int, default=0, metavar="K", help="information-plane snapshot every K steps (at evaluations)"
    )
    _experiment_args(compare)

    sweep = sub.add_parser("sweep", help="metric vs λ for each compression family")
    sweep.add_argument("--task", required=True)
    sweep.add_argument("--lams", nargs="+", type=float, default=[0, 0.25, 0.5, 1, 2, 4])
    sweep.add_argument("--families", nargs="+", default=["S", "L", "T"])
    sweep.add_argument("--placements", nargs="+", default=["standardized"], choices=PLACEMENTS)
    _experiment_args(sweep)

    results = sub.add_parser("results", help="run or resume the evidence campaign of a recorded plan (make results)")
    results.add_argument("--plan", type=Path, default=None, help="plan file (default: docs/results/plan.json)")
    results.add_argument("--only", nargs="+", help="run only these plan entries")
    results.add_argument("--report-only", action="store_true", help="rewrite every report; train nothing")
    results.add_argument("--no-progress", action="store_true")
    results.add_argument("--device", default=None, help="train on this device, e.g. cuda (default: cpu)")

    demo = sub.add_parser("demo", help="the quick preset behind `make demo` (a few minutes on 2 cores)")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))

    sub.add_parser("bench", help="speed and memory of IB layers vs the torch parents", add_help=False)
    sub.add_parser("analyze", help="activation statistics and mutual information of a finished compare run", add_help=False)
    sub.add_parser("roi", help="compute-equivalent gain vs time overhead of each arm of a run folder", add_help=False)
    if argv[:1] == ["roi"]:
        from .experiments.roi import main as roi

        roi(argv[1:])
        return None
    if argv[:1] == ["bench"]:
        from .benchmark import main as bench

        return bench(argv[1:])
    if argv[:1] == ["analyze"]:
        from .analysis import main as analyze

        analyze(argv[1:])
        return None
    args = parser.parse_args(argv)
    command = "ibnorm " + shlex.join(argv)

    if args.command == "compare":
        from .experiments.arms import default_arms
        from .experiments.tasks import get_task

        arms = args.arms
        if arms is None:
            try:
                arms = default_arms({get_task(t).parent for t in args.tasks})
            except ValueError as exc:
                _fail(compare, exc)
        title = f"ibnorm compare: {', '.join(args.tasks)}"
        _run(compare, args, args.tasks, arms, title, command, args.tune_lr, args.analyze)
    elif args.command == "sweep":
        from .experiments.compare import sweep_arms

        arms = sweep_arms(args.families, args.lams, args.placements)
        _run(sweep, args, [args.task], arms, f"ibnorm sweep: {args.task}", command)
    elif args.command == "results":
        from .experiments.campaign import DEFAULT_PLAN, load_plan, run_campaign

        plan = args.plan or DEFAULT_PLAN
        try:  # bad input is refused here; errors during the campaign keep their traceback
            names = [e.name for e in load_plan(plan)]
        except (ValueError, FileNotFoundError) as exc:
            _fail(results, exc)
        unknown = sorted(set(args.only or ()) - set(names))
        if unknown:
            results.error(f"--only names unknown plan entries {unknown}; the plan has {names}")
        run_campaign(main, plan, args.only, report_only=args.report_only, progress=not args.no_progress, device=args.device)
    elif args.command == "demo":
        from .experiments.demo import run_demo

        run_demo(args.out)


if __name__ == "__main__":
    main()
