"""Does a consumer of the IB layer's output lose what non-temporal stores save?

Layer 8192×1024 float32 (y and g_x above the C++ kernels' streaming threshold) against
nn.LayerNorm, each followed by a consumer: y.sum() (reads y right after), a Linear, and g_x.sum()
after the backward. Prints the paired ratios (median over rounds of IB time / parent time in the
same round, `cpp` backend, the library's default IBNorm). Run in fresh processes alternating two
checkouts (`PYTHONPATH=<tree>/src`), nothing else running:
  .venv/bin/python benchmarks/kernel_consumer.py
"""

from __future__ import annotations

import statistics

import torch

import ibnorm
from ibnorm.lab.benchmark import gradients, interleaved_times, layer_inputs, layer_pair, paired_ratio, steady_allocator


def main() -> None:
    steady_allocator()
    shape = (8192, 1024)
    x, grad = layer_inputs(shape, torch.float32)
    parent, layer = layer_pair("layer", shape, torch.float32, None, None, None)
    linear = torch.nn.Linear(shape[-1], 256)
    with ibnorm.use_backend("cpp"):
        with torch.no_grad():
            samples = {
                "fwd+read": interleaved_times({"parent": lambda: parent(x).sum(), "ib": lambda: layer(x).sum()}, 20, 1.0),
                "fwd+linear": interleaved_times({"parent": lambda: linear(parent(x)), "ib": lambda: linear(layer(x))}, 20, 1.0),
            }
        samples["bwd+read"] = interleaved_times(
            {
                "parent": lambda: gradients(parent(x), x, parent, grad)[0].sum(),
                "ib": lambda: gradients(layer(x), x, layer, grad)[0].sum(),
            },
            20,
            1.0,
        )
    print("  ".join(f"{m} {paired_ratio(t, 'ib'):.3f} (ib {statistics.median(t['ib']) * 1e3:.2f} ms)" for m, t in samples.items()))


if __name__ == "__main__":
    main()
