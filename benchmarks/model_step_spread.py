"""How much the model-step overhead moves between processes.

`ibnorm bench`'s model step measures one process: interleaved pairs of training steps, the
median of the pair ratios. On this shared 2-core machine that median is stable within a process
but moves by several points from one process to the next (memory layout, thread placement), so
one run cannot settle a target of a few percent. This script runs the same measurement in
`--runs` fresh processes, one after another, and writes every run and their median, mean,
standard error and range to `benchmarks/results/model_step_spread.csv`.

The processes fix glibc's mmap threshold at 256 MiB (`benchmark.steady_allocator`, as `ibnorm
bench` does): with its dynamic default a fresh process maps and faults in the step's medium-size
tensors anew at every step, which added about 10 ms to both arms' 20 ms ResNet step here and
diluted the ratio (`--default-malloc` keeps glibc's default). With `--warm` each process first
runs the batch-grouping kernel benchmark, as `ibnorm bench` does before its model step.

Run (CPU, nothing else running): HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/model_step_spread.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

from ibnorm.lab._io import atomic_write_csv
from ibnorm.lab.benchmark import MODELS

ONE_RUN = (
    "import json, sys; from ibnorm.lab import benchmark; "
    "sys.argv[4] == 'steady' and benchmark.steady_allocator(); "
    "sys.argv[3] == 'warm' and benchmark.kernel_benchmark(groupings=['batch'], dtypes=['float32'], repeats=3); "
    "row = benchmark.model_step_benchmark(models=[sys.argv[1]], min_seconds=float(sys.argv[2]))[0]; "
    "print(json.dumps(row))"
)


def one_run(model: str, seconds: float, warm: bool, steady_malloc: bool) -> dict:
    """The model-step row of one fresh process (after a batch-grouping kernel benchmark in it
    where ``warm``; with glibc's mmap threshold fixed, as ``ibnorm bench`` does, where ``steady_malloc``)."""
    command = [sys.executable, "-c", ONE_RUN, model, str(seconds), "warm" if warm else "fresh"]
    command.append("steady" if steady_malloc else "default")
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet", choices=MODELS)
    parser.add_argument("--runs", type=int, default=8, help="fresh processes (default 8)")
    parser.add_argument("--seconds", type=float, default=4.0, help="at least this many seconds of steps per arm and run")
    parser.add_argument(
        "--warm", action="store_true", help="run the batch kernel benchmark first in each process, as `ibnorm bench` does"
    )
    parser.add_argument("--default-malloc", action="store_true", help="keep glibc's dynamic mmap threshold")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/model_step_spread[_warm].csv")
    args = parser.parse_args()
    if args.runs < 2:
        parser.error(f"--runs must be at least 2, got {args.runs}")
    out = args.out or Path(f"benchmarks/results/model_step_spread{'_warm' if args.warm else ''}.csv")
    steady = not args.default_malloc
    rows = [
        one_run(args.model, args.seconds, args.warm, steady)
        for _ in tqdm(range(args.runs), desc=f"{args.model} step, fresh processes")
    ]
    overheads = [r["overhead_pct"] for r in rows]
    summary = {
        "median": statistics.median(overheads),
        "mean": statistics.mean(overheads),
        "sem": statistics.stdev(overheads) / len(overheads) ** 0.5,
        "min": min(overheads),
        "max": max(overheads),
    }
    table = [{"run": k + 1, **r} for k, r in enumerate(rows)]
    table += [{"run": name, "model": args.model, "overhead_pct": round(v, 2)} for name, v in summary.items()]
    atomic_write_csv(out, table)
    print(", ".join(f"{k} {v:+.2f}%" for k, v in summary.items()) + f" over {args.runs} processes -> {out}")


if __name__ == "__main__":
    main()
