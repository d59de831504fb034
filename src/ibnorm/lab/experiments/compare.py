"""``ibnorm compare`` and ``ibnorm sweep``: A/B runs over tasks × arms × seeds.

Every finished run is one line of ``<out>/results.jsonl`` (task, arm, seed, phase,
metrics, curve, step time, activation bytes, config, versions), rewritten atomically after
each run. Running the same command again skips finished runs and resumes an interrupted
one from its checkpoint; an interrupt (Ctrl-C) leaves a valid results file. Arguments are
all checked, and data loaded, before any training starts.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import platform
import re
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from ibnorm import __version__
from .._io import atomic_write_bytes, atomic_write_text
from .arms import Arm, ib_spec, parse_arm
from .tasks import Task, get_task
from .train import TrainConfig, train_run

RESULTS = "results.jsonl"


@dataclass(frozen=True)
class Plan:
    task: Task
    arms: tuple[Arm, ...]
    seeds: tuple[int, ...]
    config: TrainConfig
    tune_lr: int = 0


def make_plans(
    tasks: Sequence[str],
    arms: Sequence[str],
    seeds: Optional[int] = None,
    steps: Optional[int] = None,
    batch_size: Optional[int] = None,
    lr: Optional[float] = None,
    eval_every: Optional[int] = None,
    tune_lr: int = 0,
    eval_items: int = 10_000,
    checkpoint_every: Optional[int] = None,
    analyze_every: int = 0,
    final_items: Optional[int] = None,
    first_seed: int = 0,
    device: Optional[str] = None,
) -> list[Plan]:
    """Validate everything up front: unknown tasks/arms, bad λ and bad budgets raise here.
    ``eval_items`` bounds the evaluations along the curve, ``final_items`` the final ones
    (None: the whole validation and test splits). Seeds are ``first_seed, first_seed + 1, …``:
    a comparison whose arms were chosen on a sweep's seeds should start past them, so that
    the runs that made the choice are not also the evidence for it. ``device`` is checked here."""
    if not tasks:
        raise ValueError("tasks must name at least one task")
    if not arms:
        raise ValueError("arms must name at least one arm")
    for name, value in (
        ("seeds", seeds),
        ("steps", steps),
        ("batch_size", batch_size),
        ("eval_every", eval_every),
        ("final_items", final_items),
    ):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if isinstance(first_seed, bool) or not isinstance(first_seed, int) or first_seed < 0:
        raise ValueError(f"first_seed must be an int >= 0, got {first_seed!r}")
    if device is not None:
        try:
            kind = torch.device(device).type
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device={device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from exc
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: CUDA is not available on this machine")
    if not isinstance(analyze_every, int) or isinstance(analyze_every, bool) or analyze_every < 0:
        raise ValueError(f"analyze_every must be 0 (off) or a positive number of steps, got {analyze_every!r}")
    if not isinstance(tune_lr, int) or tune_lr < 0 or tune_lr == 1:
        raise ValueError(f"tune_lr must be 0 (off) or the number of rates to try (>= 2), got {tune_lr!r}")
    plans = []
    for name in tasks:
        task = get_task(name)
        d = task.defaults
        total = steps or d.steps
        cfg = TrainConfig(
            steps=total,
            batch_size=batch_size or d.batch_size,
            lr=lr or d.lr,
            weight_decay=d.weight_decay,
            eval_every=min(eval_every or d.eval_every, total),
            checkpoint_every=checkpoint_every or max(1, min(200, total // 4)),
            eval_items=eval_items,
            final_items=final_items,
            analyze_every=analyze_every,
        )
        parsed = tuple(parse_arm(a, task.parent) for a in dict.fromkeys(arms))
        plans.append(Plan(task, parsed, tuple(range(first_seed, first_seed + (seeds or d.seeds))), cfg, tune_lr))
    return plans


def _config_key(cfg: TrainConfig, arm: Arm) -> str:
    blob = json.dumps({"config": cfg.as_dict(), "arm": arm.__dict__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def read_results(out: Path) -> list[dict[str, Any]]:
    path = Path(out) / RESULTS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append_result(out: Path, row: dict[str, Any]) -> None:
    rows = read_results(out) + [row]
    atomic_write_text(Path(out) / RESULTS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def _device_name(device: Optional[str]) -> str:
    if device and torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'' if threads == 1 else 's'})"


def _folder_name(name: str) -> str:
    """A task or arm name as one safe path component (``text:/a/b.txt`` → ``text__a_b.txt``)."""
    return re.sub(r"[^\w.-]", "_", name)


def _versions() -> dict[str, str]:
    versions = {"ibnorm": __version__, "torch": torch.__version__, "python": platform.python_version()}
    commit = _source_commit()
    if commit:
        versions["ibnorm_commit"] = commit
    return versions


@functools.lru_cache(maxsize=1)
def _source_commit() -> Optional[str]:
    """The git commit of the ibnorm source this process runs, with ``+modified`` where the
    package's files differ from it; None outside a git checkout (an installed wheel). A
    campaign runs for weeks while the kernels change: each row says which code made it."""
    package = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(package), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "-C", str(package), "status", "--porcelain", "--", "."], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0 or status.returncode != 0:
        return None
    return commit.stdout.strip() + ("+modified" if status.stdout.strip() else "")


def _run_one(
    out: Path,
    task: Task,
    data: Any,
    arm: Arm,
    seed: int,
    cfg: TrainConfig,
    phase: str,
    done: set,
    progress: bool,
    command: Optional[str],
    device: Optional[str],
) -> Optional[dict[str, Any]]:
    key = (task.name, arm.name, seed, phase, _config_key(cfg, arm))
    if key in done:
        return None
    # the config key in the folder name: a checkpoint never resumes a run of another configuration
    run_dir = Path(out) / "runs" / _folder_name(task.name) / _folder_name(arm.name) / f"{phase}-seed{seed}-{key[-1]}"
    result = train_run(task, data, arm, seed, cfg, run_dir, progress=progress, device=device)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    buffer = io.BytesIO()
    torch.save(result.pop("model").state_dict(), buffer)
    atomic_write_bytes(run_dir / "final.pt", buffer.getvalue())
    row = {
        "task": task.name,
        "arm": arm.name,
        "seed": seed,
        "phase": phase,
        "config_key": key[-1],
        "config": cfg.as_dict(),
        "arm_spec": arm.__dict__,
        "parent": task.parent,
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "equivalence_margin": task.equivalence_margin,
        "command": command,
        "device": _device_name(device),
        "run_dir": str(run_dir.relative_to(out)),
        "versions": _versions(),
        **result,
    }
    _append_result(out, row)
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    done.add(key)
    return row


def _lr_grid(base: float, k: int) -> list[float]:
    """k rates log-spaced over [base/3, base*3]."""
    return [base * 3 ** (-1 + 2 * i / (k - 1)) for i in range(k)]


def run_plans(
    plans: Iterable[Plan],
    out: Path,
    data_dir: Optional[str] = None,
    progress: bool = True,
    command: Optional[str] = None,
    device: Optional[str] = None,
) -> list[dict]:
    """Run every plan (loading each task's data once), skipping runs already in results.
    ``command`` (the command line that asked for these runs) and the device that trained
    (``device``, default CPU) are recorded in every row.

    With ``tune_lr = K`` each arm first trains its first seed at K rates log-spaced over
    [lr/3, 3·lr] and keeps the rate with the best *validation* metric (a diverged trial
    scores worst); the test split is never looked at."""
    from tqdm import tqdm

    out = Path(out)
    plans = list(plans)
    loaded = {plan.task.name: plan.task.load(data_dir) for plan in plans}  # fail on missing data before training
    done = {(r["task"], r["arm"], r["seed"], r["phase"], r["config_key"]) for r in read_results(out)}
    total = sum(len(p.arms) * (len(p.seeds) + p.tune_lr) for p in plans)
    bar = tqdm(total=total, desc="runs", disable=not progress, dynamic_ncols=True)
    for plan in plans:
        data = loaded[plan.task.name]
        for arm in plan.arms:
            cfg = plan.config
            if plan.tune_lr:
                scores = {}
                for lr in _lr_grid(plan.config.lr, plan.tune_lr):
                    trial = replace(plan.config, lr=lr)
                    _run_one(out, plan.task, data, arm, plan.seeds[0], trial, "tune", done, progress, command, device)
                    row = next(
                        r
                        for r in read_results(out)
                        if (r["task"], r["arm"], r["phase"], r["config_key"]) == (plan.task.name, arm.name, "tune", _config_key(trial, arm))
                    )
                    val_metric = plan.task.metric.replace("test_", "val_")
                    sign = 1 if plan.task.higher_is_better else -1
                    score = row["metrics"].get(val_metric)
                    scores[lr] = sign * score if score is not None and math.isfinite(score) else -math.inf
                    bar.update(1)
                cfg = replace(plan.config, lr=max(scores, key=scores.get))
            for seed in plan.seeds:
                _run_one(out, plan.task, data, arm, seed, cfg, "final", done, progress, command, device)
                bar.update(1)
    bar.close()
    return read_results(out)


def sweep_arms(families: Sequence[str], lams: Sequence[float], placements: Sequence[str] = ("standardized",)) -> list[str]:
    """Arm specs for a family × λ × placement grid; λ = 0 is the parent itself, listed once."""
    arms = ["parent"] if any(lam == 0 for lam in lams) else []
    arms += [
        ib_spec(f, lam, placement)
        for placement in placements
        for f in families
        for lam in lams
        if lam != 0
    ]
    return arms
