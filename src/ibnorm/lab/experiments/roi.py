"""Cost/benefit of an arm in training compute: ``ibnorm roi RUN_DIR [--gpu-hours H] [--price P]``.

An arm's final validation value is converted into the training compute the parent needs
to reach it (the compute-equivalent gain), and set against the arm's extra step time:
net = (1 + gain) / (1 + time overhead) − 1 is the parent-equivalent compute the arm buys
per unit of wall time, relative to the parent; positive means worth it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from ibnorm.analysis.significance import CONFIDENCE, MIN_PAIRED_SEEDS

from .groups import Group, group_runs, is_finite_number, parent_group, step_times
from .results_file import read_results
from .timing import read_timing

CAVEAT = (
    "gain = s*/S − 1, where s* is the step at which the parent's mean validation curve first reaches the last point of "
    "the arm's mean validation curve (linear interpolation; both curves measured alike) and S the parent's budget; net = (1 + gain)/(1 + time overhead) − 1. "
    "Approximate: intermediate points of a cosine schedule are not what a shorter-budget run would reach."
)
EXTRAPOLATED = "* extrapolated past the parent's curve with a least-squares fit v = a + b·log(step) over its last half."
AT_FIRST_EVAL = "≤: the parent's first evaluation already reaches the arm's value, so gain and net are at most this (the curve is not measured before it)."
#: Resamples of the seed bootstrap behind the intervals of gain and net (fixed RNG seed, so
#: a report is reproduced exactly).
BOOTSTRAP_RESAMPLES = 2000
INTERVALS = (
    f"[ ]: {CONFIDENCE:.0%} seed-paired percentile bootstrap ({BOOTSTRAP_RESAMPLES} resamples of the seeds both arms ran, "
    f"at least {MIN_PAIRED_SEEDS}; the point estimate uses all of each arm's); the net's at the measured step time; "
    "a lower bound marked ≤ comes from resamples the parent's first evaluation already reaches. With few seeds such intervals are too narrow."
)

Curves = Mapping[int, Mapping[float, float]]


@dataclass(frozen=True)
class EquivalentGain:
    """``gain`` = s*/S − 1; ``reached_step`` = s*; ``extrapolated`` when s* lies past the
    parent's curve (inf: the fit never reaches the target; NaN: too few points to fit);
    ``at_first_eval`` when the curve's first point already reaches the target, so that the
    true s* may lie anywhere before it and ``gain`` is an upper bound."""

    gain: float
    extrapolated: bool
    reached_step: float
    at_first_eval: bool = False


def compute_equivalent_gain(
    parent_steps: Sequence[float], parent_values: Sequence[float], target: float, higher_is_better: bool
) -> EquivalentGain:
    """The parent's training compute, as a fraction of its full budget S = last step,
    needed to first reach ``target``, minus one: gain = s*/S − 1.

    s* interpolates linearly between the curve points (s_i, v_i) around the first point
    that reaches the target (s* = s_0 if the first point already does: then the gain is an
    upper bound, as the curve says nothing of the steps before s_0). If no point does,
    v = a + b·log s is fitted by least squares over the last half of the curve and
    s* = exp((target − a)/b), but never below S, since the curve itself stayed short of
    the target; a slope pointing away from the target gives gain = inf.

    Caveat: this reads a shorter budget off the full run's curve, but under a cosine
    schedule the intermediate points are not what a run with that shorter budget would
    reach (its learning rate would have decayed earlier); the figure is an approximation."""
    steps, values = [float(s) for s in parent_steps], [float(v) for v in parent_values]
    if not steps or len(steps) != len(values):
        raise ValueError(f"need equally many steps and values (at least one), got {len(steps)} and {len(values)}")
    if steps[0] <= 0 or any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"steps must be positive and strictly increasing, got {steps}")
    if not all(math.isfinite(v) for v in [*values, target]):
        raise ValueError(f"values and target must be finite, got {values} and {target}")
    total = steps[-1]
    sign = 1.0 if higher_is_better else -1.0
    for i, (s, v) in enumerate(zip(steps, values)):
        if sign * (v - target) >= 0:
            if i == 0:
                return EquivalentGain(s / total - 1, False, s, at_first_eval=True)
            s0, v0 = steps[i - 1], values[i - 1]
            reached = s0 + (target - v0) / (v - v0) * (s - s0)
            return EquivalentGain(reached / total - 1, False, reached)
    tail = list(zip(steps, values))[len(steps) // 2 :]
    if len(tail) < 2:
        return EquivalentGain(float("nan"), True, float("nan"))
    xs, vs = [math.log(s) for s, _ in tail], [v for _, v in tail]
    x_mean, v_mean = fmean(xs), fmean(vs)
    slope = math.fsum((x - x_mean) * (v - v_mean) for x, v in zip(xs, vs)) / math.fsum((x - x_mean) ** 2 for x in xs)
    if sign * slope <= 0:
        return EquivalentGain(math.inf, True, math.inf)
    exponent = x_mean + (target - v_mean) / slope
    reached = max(total, math.exp(exponent)) if exponent < 700 else math.inf
    return EquivalentGain(reached / total - 1, True, reached)


def net_gain(gain: float, time_overhead: float) -> float:
    """Parent-equivalent compute per unit of wall time, relative to the parent:
    (1 + gain) / (1 + time_overhead) − 1, both as fractions (0.1 = +10%)."""
    return (1 + gain) / (1 + time_overhead) - 1


def _seed_curves(group: Group, key: str) -> dict[int, dict[float, float]]:
    """Seed → {step: finite ``key`` value} of the group's non-diverged runs that have any."""
    curves = {}
    for r in group.valid:
        curve = {float(p["step"]): float(p[key]) for p in r.get("curve") or () if is_finite_number(p.get(key))}
        if curve:
            curves[r["seed"]] = curve
    return curves


def _curve_matrix(curves: Sequence[Mapping[float, float]]) -> tuple[list[float], np.ndarray]:
    """The steps every curve evaluated, and a (curves × steps) array of their values there."""
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return steps, np.array([[c[s] for s in steps] for c in curves], dtype=np.float64).reshape(len(curves), len(steps))


def _mean_curve(curves: Curves) -> tuple[list[float], list[float]]:
    """Steps every curve evaluated, and the mean over the curves there."""
    if not curves:
        return [], []
    steps, values = _curve_matrix(list(curves.values()))
    return steps, values.mean(axis=0).tolist()


class GainInterval(NamedTuple):
    """Bounds of the compute-equivalent gain (NaN where there is no interval); ``low_is_bound``
    when the lower one is only an upper bound on the true lower bound (see :func:`gain_interval`)."""

    low: float
    high: float
    low_is_bound: bool


def gain_interval(
    parent_curves: Curves,
    arm_curves: Curves,
    higher_is_better: bool,
    confidence: float = CONFIDENCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> GainInterval:
    """Seed-paired percentile bootstrap interval of the compute-equivalent gain.

    Over the n seeds both groups ran (NaN bounds when n < MIN_PAIRED_SEEDS), each resample
    draws n seeds with replacement, the same draw for the parent and the arm (a seed fixes
    initialization and data order for both), and computes :func:`compute_equivalent_gain`
    from the parent's mean curve to the last point of the arm's mean curve. The bounds are
    the (1 − c)/2 and (1 + c)/2 quantiles of the resampled gains, taken as order statistics
    (the lower and the higher neighbour), since a gain may be inf; a NaN gain (too few
    curve points to extrapolate) gives NaN bounds. A resample whose target the parent's
    first evaluation already reaches has only an upper bound for its gain
    (``at_first_eval``); where one lies at or below the lower bound, that bound is itself
    only an upper bound (``low_is_bound``). The upper bound stays conservative either way."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    none = GainInterval(float("nan"), float("nan"), False)
    paired = sorted(set(parent_curves) & set(arm_curves))
    if len(paired) < MIN_PAIRED_SEEDS:
        return none
    steps, parent = _curve_matrix([parent_curves[s] for s in paired])
    arm_steps, arm = _curve_matrix([arm_curves[s] for s in paired])
    if not steps or not arm_steps:
        return none
    draws = np.random.default_rng(seed).integers(0, len(paired), size=(resamples, len(paired)))
    parent_means, targets = parent[draws].mean(axis=1), arm[draws, -1].mean(axis=1)
    results = [compute_equivalent_gain(steps, m, t, higher_is_better) for m, t in zip(parent_means, targets)]
    gains = np.array([r.gain for r in results])
    if np.isnan(gains).any():
        return none
    tail = (1 - confidence) / 2
    low, high = float(np.quantile(gains, tail, method="lower")), float(np.quantile(gains, 1 - tail, method="higher"))
    return GainInterval(low, high, any(r.at_first_eval and r.gain <= low for r in results))


def _check_money(gpu_hours: Optional[float], price_per_hour: Optional[float]) -> None:
    for name, value in (("gpu_hours", gpu_hours), ("price_per_hour", price_per_hour)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def roi_rows(
    rows: Sequence[Mapping[str, Any]],
    timing: Mapping[str, Any],
    gpu_hours: Optional[float] = None,
    price_per_hour: Optional[float] = None,
) -> list[dict[str, Any]]:
    """One cost/benefit row per task × group (see :func:`roi_table`); ``timing`` is the
    content of ``timing.json``."""
    _check_money(gpu_hours, price_per_hour)
    nan = float("nan")
    table = []
    for task, groups in group_runs(rows).items():
        times, source = step_times(groups, timing)
        key = groups[0].runs[0]["metric"].replace("test_", "val_")
        curves = {g: _seed_curves(g, key) for g in groups}  # read once: every arm meets its parent's
        for g in groups:
            # The target is read off the arm's own mean curve, not its final metric: the curve
            # may be evaluated on a fixed slice of the validation split (eval_items) while the
            # final metric covers all of it, and only equal measurements can be compared.
            own_curves = curves[g]
            own_steps, own_values = _mean_curve(own_curves)
            final = own_values[-1] if own_steps else nan
            parent = parent_group(g, groups)
            interval = GainInterval(nan, nan, False)
            if g.arm == "parent":
                gain = EquivalentGain(0.0, False, float(g.config.get("steps", nan)))
            else:
                higher = g.runs[0]["higher_is_better"]
                parent_curves = curves[parent] if parent else {}
                steps, values = _mean_curve(parent_curves)
                ok = bool(steps) and math.isfinite(final)
                gain = compute_equivalent_gain(steps, values, final, higher) if ok else EquivalentGain(nan, False, nan)
                if ok:
                    interval = gain_interval(parent_curves, own_curves, higher)
            reference = parent or g
            time_overhead = times[g] / times[reference] - 1 if times[reference] > 0 else nan
            memory = reference.median("activation_bytes")
            row = {
                "task": task,
                "arm": g.label,
                "steps": g.config.get("steps"),
                "metric": key,
                "n": len(g.values(key)),
                "runs": len(g.runs),
                "val_mean": final,
                "gain": gain.gain,
                "gain_low": interval.low,
                "gain_high": interval.high,
                "gain_low_is_bound": interval.low_is_bound,
                "extrapolated": gain.extrapolated,
                "at_first_eval": gain.at_first_eval,
                "reached_step": gain.reached_step,
                "time_overhead": time_overhead,
                "memory_overhead": g.median("activation_bytes") / memory - 1 if memory > 0 else nan,
                "net": net_gain(gain.gain, time_overhead),
                "net_low": net_gain(interval.low, time_overhead),
                "net_high": net_gain(interval.high, time_overhead),
                "step_time_source": source,
            }
            if gpu_hours is not None and price_per_hour is not None:
                row["extra_cost"] = gpu_hours * time_overhead * price_per_hour
                row["gain_value"] = gpu_hours * gain.gain * price_per_hour
                row["net_value"] = row["gain_value"] - row["extra_cost"]
            table.append(row)
    return table


def roi_table(out_dir: Path, gpu_hours: Optional[float] = None, price_per_hour: Optional[float] = None) -> list[dict[str, Any]]:
    """Per task × arm (× budget) of ``out_dir/results.jsonl``: the last point of the mean
    validation curve over non-diverged seeds (``val_mean``), the compute-equivalent gain against the parent of the same
    budget with its seed-bootstrap interval (``gain_low``, ``gain_high``; see
    :func:`gain_interval`), time and memory overheads (fractions; step times from
    ``timing.json`` when it covers the task) and net (``net_low``, ``net_high``). With ``gpu_hours`` H and ``price_per_hour`` P also
    extra_cost = H·overhead·P, gain_value = H·gain·P and net_value = gain_value − extra_cost."""
    return roi_rows(read_results(out_dir), read_timing(out_dir), gpu_hours, price_per_hour)


def _pct(x: float) -> str:
    if math.isnan(x):
        return "–"
    return "+∞" if math.isinf(x) else f"{100 * x:+.1f}%"


def _money(x: float) -> str:
    if math.isnan(x):
        return "–"
    return "+∞" if math.isinf(x) else f"{x:+,.2f}"


def format_roi(rows: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table of :func:`roi_table` rows with the method's caveat and the
    step-time source of each task."""
    if not rows:
        return "No final runs."
    money = "extra_cost" in rows[0]
    head = "| task | arm | n | final val (curve mean) | compute-equivalent gain | time overhead | memory overhead | net |"
    rule = "|---|---|---|---|---|---|---|---|"
    if money:
        head += " extra cost | value of gain | net money |"
        rule += "---|---|---|"
    lines = [head, rule]
    for r in rows:
        value = "–" if math.isnan(r["val_mean"]) else f"{r['metric']} {r['val_mean']:.4g}"
        # a gain the parent's first evaluation already reaches is only bounded, and so is its interval: not shown
        bound, shown = ("≤ ", False) if r["at_first_eval"] else ("", not math.isnan(r["gain_low"]))
        low_bound = "≤ " if r["gain_low_is_bound"] else ""
        gain = bound + _pct(r["gain"]) + ("*" if r["extrapolated"] else "")
        net = bound + _pct(r["net"])
        if shown:
            gain += f" [{low_bound}{_pct(r['gain_low'])}, {_pct(r['gain_high'])}]"
            net += f" [{low_bound}{_pct(r['net_low'])}, {_pct(r['net_high'])}]"
        line = (
            f"| {r['task']} | {r['arm']} | {r['n']}/{r['runs']} | {value} | {gain} | {_pct(r['time_overhead'])} "
            f"| {_pct(r['memory_overhead'])} | {net} |"
        )
        if money:
            line += f" {_money(r['extra_cost'])} | {_money(r['gain_value'])} | {_money(r['net_value'])} |"
        lines.append(line)
    notes = ["", CAVEAT]
    if any(r["extrapolated"] for r in rows):
        notes.append(EXTRAPOLATED)
    if any(r["at_first_eval"] for r in rows):
        notes.append(AT_FIRST_EVAL)
    if any(not (math.isnan(r["gain_low"]) or r["at_first_eval"]) for r in rows):
        notes.append(INTERVALS)
    notes += [f"{task}: {source}." for task, source in dict.fromkeys((r["task"], r["step_time_source"]) for r in rows)]
    return "\n".join(lines + notes)
