"""The timing helpers of ``ibnorm bench``: interleaved rounds and paired ratios."""

from __future__ import annotations

import time

import pytest

from ibnorm.lab.benchmark import interleaved_times, paired_phases, paired_ratio


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
