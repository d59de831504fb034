"""One kernel case, the IB layer against its parent alone, for A/B of two source trees.

`ibnorm bench` times every case and implementation (each in a phase of its own against the
parent). This script times only the `cpp` backend against the parent, for one case at any
shape, for at least `--seconds` of calls per arm and mode, and prints the paired ratios (median
over rounds of IB time / parent time in the same round) for forward, forward+backward and
inference (eval, no autograd). Run in fresh processes that alternate between two checkouts
(`PYTHONPATH=<tree>/src`), it compares kernel versions under the same machine conditions.

Run (CPU, nothing else running):
  .venv/bin/python benchmarks/kernel_pair.py --grouping layer --shape 8192 1024 --dtype float32
"""

from __future__ import annotations

import argparse
import statistics

import torch

import ibnorm
from ibnorm.lab.benchmark import (
    DTYPES,
    GROUPINGS,
    gradients,
    interleaved_times,
    layer_inputs,
    layer_pair,
    paired_ratio,
    steady_allocator,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grouping", choices=GROUPINGS, default="layer")
    parser.add_argument("--shape", type=int, nargs="+", default=[8192, 1024])
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--seconds", type=float, default=1.5, help="at least this many seconds of calls per arm and mode")
    args = parser.parse_args()
    steady_allocator()
    dtype = DTYPES[args.dtype]
    x, grad = layer_inputs(args.shape, dtype)
    parent, layer = layer_pair(args.grouping, args.shape, dtype, None, None, None)
    modes = {
        "forward": {"parent": lambda: parent(x), "ib": lambda: layer(x)},
        "fwd_bwd": {"parent": lambda: gradients(parent(x), x, parent, grad), "ib": lambda: gradients(layer(x), x, layer, grad)},
    }
    with ibnorm.use_backend("cpp"):
        samples = {mode: interleaved_times(calls, 20, args.seconds) for mode, calls in modes.items()}
        parent.eval(), layer.eval()
        with torch.no_grad():
            samples["inference"] = interleaved_times(modes["forward"], 20, args.seconds)
    print(f"{args.grouping} {'x'.join(map(str, args.shape))} {args.dtype}, {torch.get_num_threads()} threads, cpp vs parent:")
    for mode, times in samples.items():
        medians = {arm: statistics.median(t) * 1e3 for arm, t in times.items()}
        print(
            f"  {mode:9s} parent {medians['parent']:8.3f} ms  ib {medians['ib']:8.3f} ms  "
            f"ratio {paired_ratio(times, 'ib'):.3f} ({len(times['ib'])} rounds)"
        )


if __name__ == "__main__":
    main()
