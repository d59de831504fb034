"""The ``ibnorm`` command: ``compare``, ``sweep``, ``results``, ``roi``, ``demo``, ``analyze``
and ``bench``.

Every subcommand is one :class:`Subcommand` in :data:`SUBCOMMANDS`: its help line, a
function that adds its arguments to its parser and a function that runs it. Bad input is
refused by that parser: one ``ibnorm <command>: error: ...`` line and exit status 2, never
a traceback.

``compare`` and ``sweep`` also run under ``torchrun --nproc-per-node N``: the process group
is initialized from the environment (gloo on CPU, nccl on CUDA) and rank 0 writes files.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shlex
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Optional, Sequence

import torch
import torch.distributed as dist

from ibnorm.analysis.capture import DEFAULT_MAX_EXAMPLES, SITES
from ibnorm.baselines import DYT_GROUPINGS, NORMALNORM_GROUPINGS
from ibnorm.compression import PLACEMENTS, available_compressions, check_lam, get_compression
from ibnorm.defaults import DEFAULT_VARIANTS

from .analysis_run import (
    ANALYSIS,
    DEFAULT_MAX_VALUES,
    analyze_run,
    check_analysis_rows,
    find_out_folder,
    merge_analysis_rows,
    output_folder,
)
from .benchmark import DEFAULT_MIN_SECONDS, DTYPES, GROUPINGS, IMPLEMENTATIONS, MODELS, run_benchmarks
from .experiments.arms import DEFAULT_ARMS, SPEC_PLACEMENT, default_arms
from .experiments.campaign import DEFAULT_PLAN, ShardsNotReady, load_plan, run_campaign
from .experiments.compare import Shard, make_plans, run_plans, sweep_arms
from .experiments.demo import run_demo
from .experiments.report import write_report
from .experiments.results_file import RESULTS, check_results_rows, merge_results, read_results, read_results_file
from .experiments.roi import format_roi, roi_table
from .experiments.tasks import get_task

Runner = Callable[[argparse.ArgumentParser, argparse.Namespace, Sequence[str]], None]


@dataclass(frozen=True)
class Subcommand:
    """One ``ibnorm`` subcommand: ``add_arguments(parser)`` declares its arguments and
    ``run(parser, args, argv)`` runs it (``parser`` is the subcommand's own, for errors;
    ``argv`` the whole command line after ``ibnorm``)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Runner


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _fail(parser: argparse.ArgumentParser, exc: BaseException | str) -> NoReturn:
    """Bad input: the error on one line, exit status 2."""
    parser.error(str(exc))


def _check_out_folder(parser: argparse.ArgumentParser, flag: str, folder: Path) -> None:
    """``folder`` is a folder or can be made one: refused before any work, not after it."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        _fail(parser, f"{flag} {folder}: {existing} is a file, not a folder")


def _finished_runs(parser: argparse.ArgumentParser, out: Path) -> list[dict[str, Any]]:
    """The rows of ``out``'s results file, checked now: a damaged file is named before a run
    trains, not after."""
    try:
        return read_results(out)
    except ValueError as exc:
        _fail(parser, exc)
    except OSError as exc:
        _fail(parser, f"{out / RESULTS}: {exc}")


# =============================================================================== compare, sweep
def _init_distributed() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _is_writer() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _experiment_arguments(parser: argparse.ArgumentParser) -> None:
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
    _shard_argument(parser)


def _shard_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shard",
        type=_shard,
        default=Shard(),
        metavar="K/N",
        help="run only shard K of N (0-based); the N shards may run at once, as separate processes",
    )


def _shard(text: str) -> Shard:
    try:
        return Shard.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


# make_plans names its parameters; the flags that set them
_PLAN_FLAGS = {
    "seeds": "--seeds",
    "steps": "--steps",
    "batch_size": "--batch-size",
    "eval_every": "--eval-every",
    "lr": "--lr",
    "first_seed": "--first-seed",
    "device": "--device",
    "analyze_every": "--analyze",
    "tune_lr": "--tune-lr",
}


def _with_flags(exc: BaseException) -> str:
    """``exc``'s message, a leading parameter name of make_plans written as its flag."""
    text = str(exc)
    name = re.match(r"[a-z_]+(?= must | ')", text)
    return _PLAN_FLAGS[name.group()] + text[name.end():] if name and name.group() in _PLAN_FLAGS else text


def _train_and_report(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    tasks: Sequence[str],
    arms: Sequence[str],
    title: str,
    command: str,
    tune_lr: int = 0,
    analyze: int = 0,
    analyze_finals: bool = False,
) -> None:
    _check_out_folder(parser, "--out", args.out)
    finished = _finished_runs(parser, args.out)
    if args.report_only and not finished:
        _fail(parser, f"--report-only: no runs in {args.out / RESULTS} to report")
    if args.report_only and (args.shard.count > 1 or analyze_finals):
        _fail(parser, "--report-only trains nothing: leave out --shard and --analyze-finals")
    if analyze_finals and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # rank 0 would analyse while the other ranks wait in the next run's collectives, past their timeout
        _fail(parser, ValueError("--analyze-finals needs one process (not torchrun): run `ibnorm analyze OUT` after training"))
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
        _fail(parser, _with_flags(exc))
    if args.report_only:
        report = write_report(args.out, title)
        print(f"report: {report} and {report.with_suffix('.html')}")
        return
    _init_distributed()
    try:
        with _stop_on_sigterm():
            run_plans(
                plans,
                args.out,
                args.data_dir,
                progress=not args.no_progress,
                command=command,
                device=args.device,
                shard=args.shard,
                after_final=_analysis_of_finals(args) if analyze_finals else None,
            )
    except FileNotFoundError as exc:  # data missing: found before any training starts
        _fail(parser, exc)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished runs are in {args.out / RESULTS}; run the same command to resume")
        raise SystemExit(130)
    if _is_writer():
        report = write_report(args.out, title)
        print(f"report: {report} and {report.with_suffix('.html')}")


def _analysis_of_finals(args: argparse.Namespace) -> Callable[[dict[str, Any]], None]:
    """After each final run: :func:`analyze_run` of OUT with its defaults (incremental, so only
    the runs not analysed yet), while the model is on this machine. A shard analyses only its
    own run, in the run's folder and without a summary there, and merges the rows into OUT's
    analysis.jsonl under the folder's lock (the shards' runs finish at once; ``analysis.md``
    follows at the next ``ibnorm analyze OUT``). A failed analysis is one warning line, and
    training goes on: the run's row is saved, and a later ``ibnorm analyze OUT``
    (``--retrain-missing`` where the model is gone) fills the gap."""

    def analyze(row: dict[str, Any]) -> None:
        try:
            if args.shard.count > 1:
                merge_analysis_rows(args.out, analyze_run(args.out / row["run_dir"], data_dir=args.data_dir, summary=False))
            else:
                analyze_run(args.out, data_dir=args.data_dir)
                print(f"analysis: {args.out / 'analysis.md'}")
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            print(
                f"ibnorm compare: warning: --analyze-finals: the analysis after {row['run_dir']} failed ({reason}); "
                f"training goes on; run `ibnorm analyze {args.out}` later",
                file=sys.stderr,
            )

    return analyze


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """Within: SIGTERM (``timeout``, a job scheduler, a script stopping its background shards,
    which ignore SIGINT) stops training as Ctrl-C does, finished runs kept."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", nargs="+", required=True, help="e.g. mnist1d-cnn fmnist-resnet austen-gpt2 text:PATH")
    parser.add_argument(
        "--arms",
        nargs="+",
        default=None,
        help=f"default: those of {' '.join(DEFAULT_ARMS)} that fit every task's parent norm (normalnorm: "
        f"{'/'.join(NORMALNORM_GROUPINGS)}, dyt: {'/'.join(DYT_GROUPINGS)})",
    )
    parser.add_argument("--tune-lr", type=int, default=0, help="try K learning rates per arm on the validation split first")
    parser.add_argument(
        "--analyze", type=int, default=0, metavar="K", help="information-plane snapshot every K steps (at evaluations)"
    )
    parser.add_argument(
        "--analyze-finals",
        action="store_true",
        help="run `ibnorm analyze` (its defaults) after each final run, while its model is on this machine",
    )
    _experiment_arguments(parser)


def _compare(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> None:
    arms = args.arms
    if arms is None:
        try:
            arms = default_arms({get_task(t).parent for t in args.tasks})
        except ValueError as exc:
            _fail(parser, exc)
    title = f"ibnorm compare: {', '.join(args.tasks)}"
    command = "ibnorm " + shlex.join(argv)
    _train_and_report(parser, args, args.tasks, arms, title, command, args.tune_lr, args.analyze, args.analyze_finals)


def _sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True)
    parser.add_argument("--lams", nargs="+", type=float, default=[0, 0.25, 0.5, 1, 2, 4])
    parser.add_argument("--families", nargs="+", default=available_compressions())
    parser.add_argument("--placements", nargs="+", default=[SPEC_PLACEMENT], choices=PLACEMENTS)
    _experiment_arguments(parser)


def _sweep(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> None:
    arms = sweep_arms(args.families, args.lams, args.placements)
    _train_and_report(parser, args, [args.task], arms, f"ibnorm sweep: {args.task}", "ibnorm " + shlex.join(argv))


# =============================================================================== results, demo
def _results_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plan", type=Path, default=None, help="plan file (default: docs/results/plan.json)")
    parser.add_argument("--only", nargs="+", help="run only these plan entries")
    parser.add_argument("--report-only", action="store_true", help="rewrite every report; train nothing")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--device", default=None, help="train on this device, e.g. cuda (default: cpu)")
    _shard_argument(parser)
    parser.add_argument(
        "--merge",
        type=Path,
        metavar="FOLDER",
        help="first add the runs of FOLDER/<entry>.jsonl and the analysis rows of FOLDER/<entry>.analysis.jsonl "
        "(as scripts/gpu_campaign.sh writes them) that an entry lacks",
    )


def _results(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> None:
    plan = args.plan or DEFAULT_PLAN
    try:  # bad input is refused here; errors during the campaign keep their traceback
        names = [e.name for e in load_plan(plan)]
    except (ValueError, FileNotFoundError) as exc:
        _fail(parser, exc)
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        parser.error(f"--only names unknown plan entries {unknown}; the plan has {names}")
    if args.merge is not None:
        if not args.merge.is_dir():
            parser.error(f"--merge {args.merge} is not a folder")
        steps = []
        for entry in load_plan(plan):
            if args.only and entry.name not in args.only:
                continue
            for source, check, merge, what in (
                (args.merge / f"{entry.name}.jsonl", check_results_rows, merge_results, "new runs"),
                (args.merge / f"{entry.name}.{ANALYSIS}", check_analysis_rows, merge_analysis_rows, "analysis rows"),
            ):
                if source.exists():
                    try:  # every file read and checked before any is merged (not JSON: a ValueError too)
                        steps.append((entry, source, check(read_results_file(source), source), merge, what))
                    except ValueError as exc:
                        _fail(parser, f"--merge: {exc}")
        for entry, source, rows, merge, what in steps:  # runs before their analysis rows, which name them
            try:
                added = merge(entry.out(Path(plan).parent), rows)
            except ValueError as exc:
                _fail(parser, f"--merge {source}: {exc}")
            print(f"[{entry.name}] merged {added} {what} from {source}")
    try:
        run_campaign(
            main, plan, args.only, report_only=args.report_only, progress=not args.no_progress, device=args.device, shard=args.shard
        )
    except ShardsNotReady as exc:  # raised before anything runs
        _fail(parser, exc)


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))


def _demo(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> None:
    _check_out_folder(parser, "--out", args.out)
    _finished_runs(parser, args.out)
    run_demo(args.out)


# =============================================================================== roi
def _roi_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a finished `ibnorm compare` folder (results.jsonl)")
    parser.add_argument("--gpu-hours", type=float, help="GPU hours of the parent's training budget to price")
    parser.add_argument("--price", type=float, help="price per GPU hour (with --gpu-hours)")


def _roi(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> None:
    for flag, value in (("--gpu-hours", args.gpu_hours), ("--price", args.price)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            parser.error(f"{flag} must be a finite number >= 0, got {value:g}")
    if (args.gpu_hours is None) != (args.price is None):
        parser.error("--gpu-hours and --price go together")
    if not args.run_dir.is_dir():
        parser.error(f"run folder {args.run_dir} {'is a file' if args.run_dir.exists() else 'does not exist'}")
    if not (args.run_dir / RESULTS).is_file():
        parser.error(f"no {RESULTS} in {args.run_dir}: run `ibnorm compare --out {args.run_dir}` first")
    try:
        rows = roi_table(args.run_dir, args.gpu_hours, args.price)
    except ValueError as exc:  # a damaged results.jsonl or timing.json, named in the message
        _fail(parser, exc)
    except (KeyError, TypeError) as exc:
        parser.error(f"{args.run_dir / RESULTS} lacks what a finished compare writes ({type(exc).__name__}: {exc})")
    if not rows:
        parser.error(f"no final runs in {args.run_dir / RESULTS}")
    print(format_roi(rows))


# =============================================================================== analyze
def _analyze_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="an `ibnorm compare --out` folder, or one run folder inside it")
    parser.add_argument("--max-examples", type=int, default=DEFAULT_MAX_EXAMPLES, help="probe examples (token positions for LMs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", nargs="+", default=None)
    parser.add_argument("--arms", nargs="+", default=None)
    parser.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST idx files")
    parser.add_argument(
        "--sites",
        nargs="+",
        choices=SITES + ("all",),
        default=["all"],
        help="where to measure: norm inputs/outputs, block outputs, activation outputs; 'all' (default) for every site",
    )
    parser.add_argument("--max-values", type=int, default=DEFAULT_MAX_VALUES, help="values kept per layer at the added sites")
    parser.add_argument(
        "--retrain-missing",
        action="store_true",
        help="train again the final runs whose model (final.pt) is not on this machine and that have no analysis rows",
    )
    parser.add_argument("--no-progress", action="store_true")


def _analyze(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> None:
    try:
        out, _ = find_out_folder(args.run_dir)
    except FileNotFoundError as exc:
        _fail(parser, exc)
    _finished_runs(parser, out)
    try:  # the arguments, the folder and its runs are checked before any model is built
        analyze_run(
            args.run_dir,
            tasks=args.tasks,
            arms=args.arms,
            max_examples=args.max_examples,
            seed=args.seed,
            data_dir=args.data_dir,
            sites=SITES if "all" in args.sites else args.sites,
            max_values=args.max_values,
            retrain_missing=args.retrain_missing,
            progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError) as exc:
        _fail(parser, exc)
    target = output_folder(args.run_dir)
    print(f"analysis: {target / 'analysis.md'} (rows in {target / 'analysis.jsonl'}, plots in {target / 'plots'})")


# =============================================================================== bench
def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--repeats", type=int, default=None, help="samples per timing (default: 10 on CPU, 50 on CUDA)")
    parser.add_argument("--groupings", nargs="+", default=list(GROUPINGS), choices=GROUPINGS)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    defaults = ", ".join(f"{g} {v}" for g, v in DEFAULT_VARIANTS.items())
    grouping_default = f"default: each grouping's library default ({defaults})"
    parser.add_argument("--compression", default=None, help=grouping_default)
    parser.add_argument("--lam", type=float, default=None, help=grouping_default)
    parser.add_argument("--placement", default=None, choices=PLACEMENTS, help=grouping_default)
    parser.add_argument(
        "--seconds", type=float, default=None,
        help=f"CPU: at least this many seconds of calls per implementation and mode, each against the parent "
        f"(default {DEFAULT_MIN_SECONDS})",
    )
    parser.add_argument(
        "--impls", nargs="+", default=None,
        choices=[i for i in IMPLEMENTATIONS if i != "parent"],
        help="CPU: the IB implementations timed against the parent (default: all)",
    )
    parser.add_argument(
        "--runs", type=int, default=1,
        help="CPU: time everything this many times over, on fresh tensors, and report the median ratio and its range",
    )
    parser.add_argument("--quick", action="store_true", help="small shapes, 3 repeats, no --seconds minimum (a smoke test)")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu",
        help="cuda: Triton kernels vs the parent and torch.compile of the composite, at GPU sizes, "
        "into kernels_cuda.csv/.png (no model-step benchmark)",
    )


def _bench(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> None:
    try:
        if args.compression is not None:
            get_compression(args.compression)
        if args.lam is not None:
            check_lam(args.lam)
    except (ValueError, TypeError) as exc:
        _fail(parser, exc)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be a positive int, got {args.repeats}")
    if args.seconds is not None and not (args.seconds >= 0 and math.isfinite(args.seconds)):
        parser.error(f"--seconds must be a finite number >= 0, got {args.seconds}")
    if args.runs < 1:
        parser.error(f"--runs must be a positive int, got {args.runs}")
    if args.device == "cuda" and (args.runs != 1 or args.impls is not None):
        parser.error("--runs and --impls apply to the CPU benchmark only, not --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    if args.quick and args.seconds is not None:
        parser.error("--quick has no --seconds minimum: give one of them")
    _check_out_folder(parser, "--out", args.out)
    run_benchmarks(
        args.out,
        repeats=args.repeats,
        groupings=args.groupings,
        dtypes=args.dtypes,
        models=args.models,
        compression=args.compression,
        lam=args.lam,
        placement=args.placement,
        quick=args.quick,
        device=args.device,
        min_seconds=args.seconds,
        impls=args.impls or tuple(IMPLEMENTATIONS),
        runs=args.runs,
    )


SUBCOMMANDS: dict[str, Subcommand] = {
    "compare": Subcommand("A/B comparison of arms on tasks over several seeds", _compare_arguments, _compare),
    "sweep": Subcommand("metric vs λ for each compression family", _sweep_arguments, _sweep),
    "results": Subcommand("run or resume the evidence campaign of a recorded plan (make results)", _results_arguments, _results),
    "roi": Subcommand("compute-equivalent gain vs time overhead of each arm of a run folder", _roi_arguments, _roi),
    "demo": Subcommand("the quick preset behind `make demo` (a few minutes on 2 cores)", _demo_arguments, _demo),
    "analyze": Subcommand(
        "activation statistics and mutual information of a finished compare run", _analyze_arguments, _analyze
    ),
    "bench": Subcommand("speed and memory of IB layers vs the torch parents", _bench_arguments, _bench),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``ibnorm`` parser and each subcommand's own parser, by name."""
    parser = OneLineErrorParser(prog="ibnorm", description="IBNorm for PyTorch: A/B experiments and benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    parsers = {}
    for name, command in SUBCOMMANDS.items():
        parsers[name] = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(parsers[name])
    return parser, parsers


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, parsers = build_parser()
    args = parser.parse_args(argv)
    SUBCOMMANDS[args.command].run(parsers[args.command], args, argv)


if __name__ == "__main__":
    main()
