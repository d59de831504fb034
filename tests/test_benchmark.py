"""The timing helpers of ``ibnorm bench``: interleaved rounds, paired ratios, gradients that
are returned rather than accumulated, and repeated runs."""

from __future__ import annotations

import time

import pytest

import torch
from torch import nn

from ibnorm.lab.benchmark import combine_runs, gradients, interleaved_times, kernel_benchmark, paired_phases, paired_ratio


def test_rounds_rotate_the_order_and_time_every_call():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("parent", "a", "b")}
    samples = interleaved_times(calls, repeats=4, warmup=1)
    assert order[:3] == ["parent", "a", "b"]  # the warm-up, in order
    rounds = [order[3 + 3 * k : 6 + 3 * k] for k in range(4)]
    assert rounds == [["parent", "a", "b"], ["a", "b", "parent"], ["b", "parent", "a"], ["parent", "a", "b"]]
    assert {name: len(v) for name, v in samples.items()} == {"parent": 4, "a": 4, "b": 4}


def test_two_functions_alternate_and_min_seconds_adds_rounds():
    order = []
    calls = {
        "parent": lambda: (order.append("p"), time.sleep(0.001)),
        "ibnorm": lambda: (order.append("i"), time.sleep(0.002)),
    }
    samples = interleaved_times(calls, repeats=1, min_seconds=0.01, warmup=0)
    assert order[:4] == ["p", "i", "i", "p"]
    assert sum(samples["parent"]) >= 0.01 and len(samples["parent"]) == len(samples["ibnorm"]) >= 2
    assert len(samples["parent"]) <= 11  # each parent call sleeps 1 ms: 10 rounds reach 0.01 s


def test_each_implementation_alternates_with_the_parent_in_a_phase_of_its_own():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("parent", "a", "b")}
    samples, ratios = paired_phases(calls, repeats=2)
    # per phase: two warm-up calls each, then rounds alternating the order; "a" never meets "b"
    phase = lambda x: ["parent", "parent", x, x, "parent", x, x, "parent"]  # noqa: E731
    assert order == phase("a") + phase("b")
    assert {name: len(v) for name, v in samples.items()} == {"parent": 4, "a": 2, "b": 2}
    for k, name in enumerate(("a", "b")):  # each ratio from its own phase's rounds
        own = {"parent": samples["parent"][2 * k : 2 * k + 2], name: samples[name]}
        assert ratios[name] == paired_ratio(own, name)
    assert ratios["parent"] == 1.0


def test_paired_ratio_is_the_median_of_the_rounds_ratios():
    samples = {"parent": [1.0, 2.0, 4.0], "ib": [1.5, 2.0, 20.0]}
    # ratios 1.5, 1.0, 5.0: the median 1.5 (the ratio of the medians, 2.0 / 2.0 = 1, would differ)
    assert paired_ratio(samples, "ib") == pytest.approx(1.5)


def test_steady_allocator_fixes_glibcs_thresholds_or_says_it_cannot():
    import ctypes
    import platform

    from ibnorm.lab.benchmark import steady_allocator

    has_mallopt = platform.system() == "Linux" and hasattr(ctypes.CDLL(None), "mallopt")
    assert steady_allocator() is has_mallopt


def test_gradients_are_returned_and_leave_every_grad_unset():
    torch.manual_seed(0)
    layer = nn.LayerNorm(6)
    x = torch.randn(4, 6, requires_grad=True)
    grad = torch.randn(4, 6)
    g_x, g_w, g_b = gradients(layer(x), x, layer, grad)
    # against the derivative of the layer written out: y = γ·(x − μ)/σ + β
    mu, var = x.detach().mean(-1, keepdim=True), x.detach().var(-1, unbiased=False, keepdim=True)
    r = (var + layer.eps).rsqrt()
    xhat = (x.detach() - mu) * r
    gh = grad * layer.weight.detach()
    expected = r * (gh - gh.mean(-1, keepdim=True) - xhat * (gh * xhat).mean(-1, keepdim=True))
    torch.testing.assert_close(g_x, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_w, (grad * xhat).sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_b, grad.sum(0))
    assert x.grad is None and layer.weight.grad is None and layer.bias.grad is None


def test_combine_runs_takes_medians_ranges_and_totals_over_runs():
    run = lambda r, n, t: [{"case": "a", "ratio": r, "n": n, "t": t}, {"case": "b", "ratio": 2 * r, "n": n, "t": t}]  # noqa: E731
    rows = combine_runs([run(1.2, 10, 9.0), run(1.0, 12, 5.0), run(1.5, 11, 1.0)], ["case"], ["ratio", "t"], ["ratio"], ["n"])
    assert rows[0] == {"case": "a", "ratio": 1.2, "n": 33, "t": 5.0, "ratio_min": 1.0, "ratio_max": 1.5, "runs": 3}
    assert rows[1]["ratio"] == 2.4 and (rows[1]["ratio_min"], rows[1]["ratio_max"]) == (2.0, 3.0)
    assert combine_runs([run(1.0, 1, 1.0), run(2.0, 1, 1.0)], ["case"], ["ratio"])[0]["ratio"] == 1.5  # even count: the midpoint
    with pytest.raises(ValueError, match="same rows"):
        combine_runs([run(1.0, 1, 1.0), run(1.0, 1, 1.0)[:1]], ["case"], ["ratio"])
    with pytest.raises(ValueError, match="same rows"):  # the same number of rows, another order
        combine_runs([run(1.0, 1, 1.0), run(1.0, 1, 1.0)[::-1]], ["case"], ["ratio"])


def test_kernel_benchmark_times_the_chosen_implementations_once_per_run():
    rows = kernel_benchmark(["layer"], ["float32"], repeats=2, row_shapes=[(8, 16)], impls=["ib_eager"], runs=2)
    assert [r["impl"] for r in rows] == ["parent", "ib_eager"]
    assert all(r["runs"] == 2 and r["ratio_fwd_bwd_min"] <= r["ratio_fwd_bwd"] <= r["ratio_fwd_bwd_max"] for r in rows)
    for impls in (["ib_fast"], [], ["parent"]):
        with pytest.raises(ValueError, match="impls must name at least one of"):
            kernel_benchmark(["layer"], ["float32"], row_shapes=[(8, 16)], impls=impls)
    with pytest.raises(ValueError, match="runs must be a positive int"):
        kernel_benchmark(["layer"], ["float32"], row_shapes=[(8, 16)], runs=0)
