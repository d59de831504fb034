"""Quiet step-time measurement: every arm of a task trained a few steps in interleaved
rounds, so that background load and thermal drift hit all arms alike. The medians go to
``<out>/timing.json``, which the report and ``ibnorm roi`` prefer over the step times
recorded during training (those runs may have shared the CPU with other work).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .._io import atomic_write_text
from .arms import parse_arm
from .tasks import Task
from .train import parameter_groups

TIMING = "timing.json"
NOTE = "measured quietly, interleaved"


def measure_step_times(
    task: Task,
    data: Any,
    arm_specs: Sequence[str],
    *,
    batch_size: int,
    steps: int = 30,
    warmup: int = 5,
    rounds: int = 5,
) -> dict[str, float]:
    """Median seconds of one AdamW training step (forward, backward, update) per arm.

    Each arm's model is built from the same initial weights; after ``warmup`` untimed
    steps per arm, ``steps`` timed steps per arm are split over ``rounds`` rounds, and in
    each round every arm runs its share in turn (the order rotating between rounds)."""
    for name, value in (("batch_size", batch_size), ("steps", steps), ("rounds", rounds)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    specs = list(dict.fromkeys(arm_specs))
    if not specs:
        raise ValueError("arm_specs must name at least one arm")
    arms = [parse_arm(spec, task.parent) for spec in specs]  # all specs checked before any model is built
    trainers = {}
    for spec, arm in zip(specs, arms):
        torch.manual_seed(0)
        model = arm.apply(task.build(data)).train()
        optimizer = torch.optim.AdamW(parameter_groups(model, task.defaults.weight_decay), lr=task.defaults.lr)
        trainers[spec] = (model, optimizer)
    counters = dict.fromkeys(specs, 0)
    times: dict[str, list[float]] = {spec: [] for spec in specs}

    def run(spec: str, count: int, record: bool) -> None:
        model, optimizer = trainers[spec]
        for _ in range(count):
            inputs, targets = task.batch(data, 0, counters[spec], batch_size)
            counters[spec] += 1
            began = time.perf_counter()
            loss = task.loss(model, inputs, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if record:
                times[spec].append(time.perf_counter() - began)

    for spec in specs:
        run(spec, warmup, record=False)
    for r in range(rounds):
        share = steps // rounds + (r < steps % rounds)
        for spec in specs[r % len(specs) :] + specs[: r % len(specs)]:
            run(spec, share, record=True)
    return {spec: statistics.median(ts) for spec, ts in times.items()}


def write_timing(out: Path, task_name: str, times: dict[str, float], *, batch_size: Optional[int] = None) -> Path:
    """Record ``times`` (arm → median seconds) for ``task_name`` in ``<out>/timing.json``,
    replacing that task's earlier entry (arms timed in different sessions are not
    comparable) and keeping the other tasks'."""
    if not times or not all(isinstance(t, (int, float)) and math.isfinite(t) and t > 0 for t in times.values()):
        raise ValueError(f"times must map arms to positive finite seconds, got {times!r}")
    path = Path(out) / TIMING
    tasks = read_timing(out)
    tasks[task_name] = {
        "step_time_s": dict(times),
        "batch_size": batch_size,
        "torch_threads": torch.get_num_threads(),
        "note": NOTE,
    }
    return atomic_write_text(path, json.dumps({"tasks": tasks}, indent=2, sort_keys=True) + "\n")


def read_timing(out: Path) -> dict[str, dict[str, Any]]:
    """Task → ``{"step_time_s": {arm: s}, "batch_size", "torch_threads", "note"}``; empty
    when ``<out>/timing.json`` does not exist; a ValueError naming the file where it is damaged."""
    path = Path(out) / TIMING
    if not path.exists():
        return {}
    try:
        tasks = json.loads(path.read_text())["tasks"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a timing file ({type(exc).__name__}: {exc})") from None
    if not isinstance(tasks, dict):
        raise ValueError(f"{path} is not a timing file ('tasks' must be an object)")
    return tasks
