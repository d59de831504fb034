"""How much of the IB BatchNorm's training-step overhead on the tiny ResNet is Python.

Times the bench's tiny ResNet (`ibnorm bench`'s model step: 16 BatchNorms on 2×2 to 32×32 maps)
against the same model converted to IBNorm, twice: as the library runs it, and with every IB
BatchNorm's forward replaced by a direct call of the C++ autograd node with prebuilt arguments
(no module, functional or dispatch Python; the same kernels, running statistics included).
Each overhead is the median over interleaved pairs of steps (alternating order) of
IB step / parent step − 1, as the bench's model step, with at least `--seconds` per arm.

Run (CPU, nothing else running): HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/python_overhead.py
"""

from __future__ import annotations

import argparse
import copy
import types

import torch

from ibnorm import convert_norms
from ibnorm.compression import BUILTIN_COMPRESSIONS
from ibnorm.lab import benchmark
from ibnorm.modules import IBBatchNorm2d
from ibnorm.ops import cpp


def overhead(steps: dict, seconds: float) -> tuple[float, int]:
    """Median of IB step / parent step − 1 over interleaved pairs, and the number of pairs."""
    samples = benchmark.interleaved_times(steps, repeats=1, min_seconds=seconds, warmup=10)
    return benchmark.paired_ratio(samples, "ibnorm") - 1, len(samples["parent"])


def direct_node_forward(layer: IBBatchNorm2d, module: types.ModuleType, lam: torch.Tensor) -> types.MethodType:
    """A training forward for ``layer`` that calls the C++ node with prebuilt arguments."""
    scales = (1.0, 1.0, 1.0, 1.0)  # the buffers' values do not change the timing

    def forward(self: IBBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
        self.num_batches_tracked.add_(1)
        shape = (x.shape[0], x.shape[1], x.shape[2] * x.shape[3])
        buffers = (self.running_mean, self.running_var, self.running_mean_psi, self.running_var_psi)
        family = [c.name for c in BUILTIN_COMPRESSIONS].index(self.compression)  # the C++ family code
        args = (x, self.weight, self.bias, lam, None, None, None, None, *buffers, self.momentum, scales, shape)
        return module.apply(*args, 1, family, self.eps, True, self.placement == "standardized", False)[0]

    return types.MethodType(forward, layer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="at least this many seconds of steps per arm")
    args = parser.parse_args()
    module = cpp.load()
    if module is None:
        raise SystemExit("the C++ kernels are unavailable here")
    build, loss_fn = benchmark._tiny_models()["resnet"]
    torch.manual_seed(0)
    parent = build()
    converted, _ = convert_norms(copy.deepcopy(parent))
    steps = {arm: benchmark._train_step(model, loss_fn) for arm, model in (("parent", parent), ("ibnorm", converted))}
    value, pairs = overhead(steps, args.seconds)
    print(f"library path:         {100 * value:+.1f}% step time ({pairs} pairs)")
    for layer in converted.modules():
        if isinstance(layer, IBBatchNorm2d):
            layer.forward = direct_node_forward(layer, module, torch.tensor(layer.lam_value()))
    value, pairs = overhead(steps, args.seconds)
    print(f"direct C++ node call: {100 * value:+.1f}% step time ({pairs} pairs)")


if __name__ == "__main__":
    main()
