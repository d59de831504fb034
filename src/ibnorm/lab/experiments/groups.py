"""Final runs grouped for comparison: by task, arm, budget (the training config without the
learning rate, which each arm may tune) and learning rate; groups are never pooled. Each
group meets the parent group of the same budget, and the step times that the report and
the cost/benefit table use."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from statistics import median
from typing import Any, Iterable, Mapping, Optional

from .timing import TIMING

QUIET_TIMES = f"step times: quiet interleaved measurement ({TIMING})"
TRAINING_TIMES = "step times: median of training steps (runs may have shared the CPU; indicative only)"


def is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def run_device(row: Mapping[str, Any]) -> str:
    """The kind of device a run trained on: "cpu" (whatever its thread count, and for older
    rows that name none), else the accelerator's name as the row gives it."""
    device = row.get("device") or "cpu"
    return "cpu" if device.startswith("cpu") else device


def is_diverged(row: Mapping[str, Any]) -> bool:
    """A run diverged if it says so or its ranked metric is missing or non-finite."""
    return bool(row.get("diverged")) or not is_finite_number((row.get("metrics") or {}).get(row["metric"]))


@dataclass(eq=False)
class Group:
    """The final runs of one arm in one task at one budget and learning rate."""

    task: str
    arm: str
    budget: str  # JSON of the config without lr: equal budgets, equal strings
    lr: float
    runs: list[dict[str, Any]]
    label: str = ""

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.budget)

    @property
    def valid(self) -> list[dict[str, Any]]:
        return [r for r in self.runs if not is_diverged(r)]

    def values(self, key: str) -> dict[int, float]:
        """Seed → finite ``metrics[key]`` of the non-diverged runs."""
        pairs = ((r["seed"], (r.get("metrics") or {}).get(key)) for r in self.valid)
        return {seed: float(v) for seed, v in pairs if is_finite_number(v)}

    def median(self, key: str, device: Optional[str] = None) -> float:
        """Median of a finite per-run number (step time, activation bytes) over all runs, or
        over the runs trained on ``device`` (a row's ``device``; rows without one ran on CPU)."""
        runs = self.runs if device is None else [r for r in self.runs if run_device(r) == device]
        xs = [r[key] for r in runs if is_finite_number(r.get(key))]
        return median(xs) if xs else float("nan")


def group_runs(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[Group]]:
    """Task → its groups of final runs, parent first; labels name the budget (and lr) only
    where a task has several."""
    by_key: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["phase"] == "final":
            budget = json.dumps({k: v for k, v in r["config"].items() if k != "lr"}, sort_keys=True)
            by_key.setdefault((r["task"], r["arm"], budget, r["config"]["lr"]), []).append(dict(r))
    tasks: dict[str, list[Group]] = {}
    for (task, arm, budget, lr), runs in by_key.items():
        tasks.setdefault(task, []).append(Group(task, arm, budget, lr, runs))
    for groups in tasks.values():
        groups.sort(key=lambda g: (g.arm != "parent", g.arm, g.config.get("steps", 0), g.budget, g.lr))
        budgets = [json.loads(b) for b in dict.fromkeys(g.budget for g in groups)]
        varying = sorted({k for b in budgets for k in b if any(b.get(k) != o.get(k) for o in budgets)}, key=lambda k: (k != "steps", k))
        for g in groups:
            parts = [f"{g.config.get(k)} steps" if k == "steps" else f"{k}={g.config.get(k)}" for k in varying]
            if sum(o.arm == g.arm and o.budget == g.budget for o in groups) > 1:
                parts.append(f"lr={g.lr:g}")
            g.label = g.arm + (f" @ {', '.join(parts)}" if parts else "")
    return tasks


def parent_group(group: Group, groups: list[Group]) -> Optional[Group]:
    """The parent group of the same budget: the one with the same lr if any, else the one
    with the most non-diverged runs."""
    parents = [g for g in groups if g.arm == "parent" and g.budget == group.budget]
    if not parents:
        return None
    return next((p for p in parents if p.lr == group.lr), max(parents, key=lambda p: len(p.valid)))


def step_times(groups: list[Group], timing: Mapping[str, Any]) -> tuple[dict[Group, float], str]:
    """Step seconds per group and where they come from: ``timing.json`` when its entry
    for the task covers every arm at the groups' batch size, else the training medians on
    one device (NaN for a group with no run there)."""
    entry = timing.get(groups[0].task) if groups else None
    if entry and all(g.arm in entry["step_time_s"] and entry.get("batch_size") in (None, g.config.get("batch_size")) for g in groups):
        return {g: float(entry["step_time_s"][g.arm]) for g in groups}, QUIET_TIMES
    devices = Counter(run_device(r) for g in groups for r in g.runs)
    if len(devices) <= 1:
        return {g: g.median("step_time_s") for g in groups}, TRAINING_TIMES
    # Step times of different machines are not comparable: take them from the device the
    # parent trained on most, and leave arms that never ran there without a time.
    on_parent = Counter(run_device(r) for g in groups if g.arm == "parent" for r in g.runs)
    device = (on_parent or devices).most_common(1)[0][0]
    source = f"{TRAINING_TIMES}; the runs trained on {len(devices)} devices, so only those on {device} are timed"
    return {g: g.median("step_time_s", device) for g in groups}, source
