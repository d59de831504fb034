"""Forward+backward time of the C++ CPU kernels (ibnorm.ops.cpp) against the torch parents.

For each case (layer and RMS at 8192×1024 and 2048×4096, batch and group at 64×64×32×32; float32
and bfloat16) it times one training step of the layer, ``y = f(x); y.backward(g)``, for

* ``parent``: nn.LayerNorm / nn.RMSNorm / nn.BatchNorm2d (train) / nn.GroupNorm(32);
* ``cpp``: IBNormFunction with the C++ bodies, on the view ibnorm.functional builds;
* ``eager``: the same Function with function.py's plain-torch bodies (the uncompiled path);

interleaved round by round (so a change in machine load hits every implementation alike), and
prints and writes to CSV the median time and the median of the per-round ratios to the parent.
The IB batch layer here does not update running buffers; nn.BatchNorm2d does (a few µs).

Run on a quiet machine: .venv/bin/python benchmarks/cpp_rows.py [--repeats 20] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ibnorm import get_compression
from ibnorm.ops import cpp
from ibnorm.ops.function import Bodies, IBNormFunction, KernelConfig, eager_bodies

CASES = [
    ("layer", (8192, 1024)),
    ("layer", (2048, 4096)),
    ("rms", (8192, 1024)),
    ("rms", (2048, 4096)),
    ("batch", (64, 64, 32, 32)),
    ("group", (64, 64, 32, 32)),
]
QUICK_CASES = [("layer", (256, 1024)), ("rms", (256, 1024)), ("batch", (8, 64, 8, 8)), ("group", (8, 64, 8, 8))]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
NUM_GROUPS = 32


def parent_layer(grouping: str, shape: tuple[int, ...], dtype: torch.dtype) -> nn.Module:
    if grouping == "layer":
        return nn.LayerNorm(shape[-1], dtype=dtype)
    if grouping == "rms":
        return nn.RMSNorm(shape[-1], dtype=dtype)
    if grouping == "batch":
        return nn.BatchNorm2d(shape[1], dtype=dtype)
    return nn.GroupNorm(NUM_GROUPS, shape[1], dtype=dtype)


def ib_step(
    grouping: str,
    parent: nn.Module,
    shape: tuple[int, ...],
    compression: str,
    lam: float,
    placement: str,
    make_bodies: Callable[[KernelConfig], Bodies],
) -> Callable[[Tensor], Tensor]:
    """x ↦ IB output through IBNormFunction on the view ibnorm.functional builds for ``grouping``,
    with the parent's weight and bias (so both sides train the same parameters)."""
    if grouping in ("layer", "rms"):
        view, affine, dims, dynamic = (-1, shape[-1]), (1, shape[-1]), (1,), (0,)
    elif grouping == "batch":
        view, affine, dims, dynamic = (shape[0], shape[1], -1), (1, shape[1], 1), (0, 2), (0, 2)
    else:
        per_group = shape[1] // NUM_GROUPS
        view, affine = (shape[0], NUM_GROUPS, per_group, -1), (1, NUM_GROUPS, per_group, 1)
        dims, dynamic = (2, 3), (0, 3)
    weight = parent.weight
    bias: Optional[Tensor] = getattr(parent, "bias", None)
    x_view = torch.empty(shape).reshape(view)
    cfg = KernelConfig(
        dims,
        dynamic,
        tuple(s for d, s in enumerate(x_view.shape) if d not in dynamic),
        1e-5,
        get_compression(compression),
        grouping != "rms",
        placement,
        False,
        True,
        bias is not None,
    )
    bodies = make_bodies(cfg)
    lam_tensor = torch.tensor(lam)

    def step(x: Tensor) -> Tensor:
        w = weight.reshape(affine)
        b = None if bias is None else bias.reshape(affine)
        y = IBNormFunction.apply(x.reshape(view), w, b, lam_tensor, None, None, None, None, cfg, bodies)[0]
        return y.reshape(x.shape)

    return step


def time_interleaved(steps: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, list[float]]:
    for _ in range(warmup):
        for step in steps.values():
            step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            samples[name].append(time.perf_counter() - start)
    return samples


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    if not cpp.available():
        raise SystemExit("the ibnorm C++ kernels are unavailable here (see the warning above)")
    rows: list[dict[str, object]] = []
    cases = QUICK_CASES if args.quick else CASES
    for (grouping, shape), dtype_name in ((c, d) for c in cases for d in args.dtypes):
        dtype = DTYPES[dtype_name]
        gen = torch.Generator().manual_seed(0)
        x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(dtype).requires_grad_(True)
        grad = torch.randn(shape, generator=gen).to(dtype)
        parent = parent_layer(grouping, shape, dtype).train()
        forwards = {
            "parent": parent,
            "cpp": ib_step(grouping, parent, shape, args.compression, args.lam, args.placement, cpp.bodies),
            "eager": ib_step(grouping, parent, shape, args.compression, args.lam, args.placement, eager_bodies),
        }

        def training_step(forward: Callable[[Tensor], Tensor]) -> Callable[[], None]:
            def step() -> None:
                x.grad = None
                parent.zero_grad(set_to_none=True)
                forward(x).backward(grad)

            return step

        samples = time_interleaved({k: training_step(f) for k, f in forwards.items()}, args.repeats, args.warmup)
        for impl, times in samples.items():
            ratios = [t / p for t, p in zip(times, samples["parent"])]
            rows.append(
                {
                    "grouping": grouping,
                    "shape": "x".join(map(str, shape)),
                    "dtype": dtype_name,
                    "impl": impl,
                    "compression": args.compression,
                    "lam": args.lam,
                    "placement": args.placement,
                    "threads": torch.get_num_threads(),
                    "fwd_bwd_ms": round(1e3 * statistics.median(times), 3),
                    "ratio_to_parent": round(statistics.median(ratios), 3),
                }
            )
            print(
                f"{grouping:6s} {rows[-1]['shape']:>14s} {dtype_name:9s} {impl:7s} "
                f"{rows[-1]['fwd_bwd_ms']:9.3f} ms  x{rows[-1]['ratio_to_parent']:.2f}",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpp_rows.csv"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--compression", default="S", choices=["S", "L", "T"])
    parser.add_argument("--lam", type=float, default=0.25)
    parser.add_argument("--placement", default="standardized", choices=["standardized", "centered"])
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke test, not a measurement)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
