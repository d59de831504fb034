"""``ibnorm compare`` and ``ibnorm sweep``: A/B runs over tasks × arms × seeds.

Every finished run is one line of ``<out>/results.jsonl`` (task, arm, seed, phase,
metrics, curve, step time, activation bytes, config, versions), rewritten atomically after
each run. Running the same command again skips finished runs and resumes an interrupted
one from its checkpoint; an interrupt (Ctrl-C) leaves a valid results file. Arguments are
all checked, and data loaded, before any training starts. A command's runs can be split
into shards (``--shard K/N``) that run at once, as separate processes on one results folder:
appends hold a lock on the folder, and an arm's final runs wait for its rate tuning.
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
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

import torch

from ibnorm import __version__
from .._io import atomic_write_bytes, atomic_write_text
from .arms import SPEC_PLACEMENT, Arm, ib_spec, parse_arm
from .probe import finite_or_none
from .results_file import RESULTS, merge_results, read_results, run_key
from .tasks import Task, get_task
from .train import TrainConfig, train_run

TUNE_POLL_SECONDS = 10.0
TUNE_WAIT_SECONDS = 6 * 3600.0  # a final run waits this long for other shards' tuning runs


class Shard(NamedTuple):
    """Shard ``index`` of ``count``: every ``count``-th run of a command, from the ``index``-th
    (0-based), in the order all rate-tuning runs, then all final runs."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``"K/N"`` with 0 ≤ K < N."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            index = count = -1
        if not 0 <= index < count:
            raise ValueError(f"shard must be K/N with 0 <= K < N (e.g. 0/4), got {text!r}")
        return cls(index, count)


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
            raise ValueError(f"device {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from exc
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"device {device!r}: the lab trains on 'cpu' or 'cuda[:N]'")
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine")
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
    _save_final_model(run_dir, result.pop("model"))
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
    merge_results(out, [row])
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)  # only once the row is in: until then the run resumes
    done.add(key)
    return row


RETRAINED = "retrained.json"


def retrain_model(out: Path, row: dict[str, Any], data: Any, *, progress: bool = False) -> dict[str, Any]:
    """Train the run of ``row`` (a finished run of ``<out>/results.jsonl``) again on the CPU, with
    its task, arm, seed and configuration, and save its model as ``final.pt`` in its run folder:
    for an analysis of a run whose model is not on this machine (models are not committed, and
    runs trained elsewhere bring none). The results file is not touched. The run folder gets
    ``retrained.json`` first (written before the model, so that the model never appears without
    it), returned too: the task metric as recorded and as retrained and their |Δ| (None where
    either is not finite), and the recorded device, process count and code commit. The same
    model comes back only where training is deterministic and those match (one CPU process, the
    same thread count and code); elsewhere it is another draw of the same protocol."""
    task = get_task(row["task"])
    arm = parse_arm(row["arm"], task.parent)
    run_dir = Path(out) / row["run_dir"]
    result = train_run(task, data, arm, row["seed"], TrainConfig(**row["config"]), run_dir, progress=progress)
    old, new = finite_or_none(row["metrics"].get(task.metric)), finite_or_none(result["metrics"].get(task.metric))
    record = {
        "metric": task.metric,
        "recorded": old,
        "retrained": new,
        "abs_delta": None if old is None or new is None else abs(new - old),
        "recorded_device": row.get("device"),
        "recorded_world_size": row.get("world_size"),
        "recorded_commit": (row.get("versions") or {}).get("ibnorm_commit"),
        "device": _device_name(None),
        "commit": _versions().get("ibnorm_commit"),
    }
    atomic_write_text(run_dir / RETRAINED, json.dumps(record, sort_keys=True) + "\n")
    _save_final_model(run_dir, result.pop("model"))
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    return record


def _save_final_model(run_dir: Path, model: torch.nn.Module) -> None:
    """The trained model's state as ``final.pt`` in its run folder, written atomically."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    atomic_write_bytes(run_dir / "final.pt", buffer.getvalue())


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
    shard: Shard = Shard(),
    after_final: Optional[Callable[[dict[str, Any]], None]] = None,
) -> list[dict]:
    """Run every plan (loading each task's data once), skipping runs already in results.
    ``command`` (the command line that asked for these runs) and the device that trained
    (``device``, default CPU) are recorded in every row; ``shard`` runs only its share.
    ``after_final(row)`` is called (by the writing process) after each final run this call
    trains, once its row and model are saved: e.g. to analyse the model while it is here.

    With ``tune_lr = K`` each arm first trains its first seed at K rates log-spaced over
    [lr/3, 3·lr] and keeps the rate with the best *validation* metric (a diverged trial
    scores worst); the test split is never looked at. A shard whose final run needs a
    tuning run of another shard waits for it to appear in the results."""
    from tqdm import tqdm

    out = Path(out)
    plans = list(plans)
    loaded = {plan.task.name: plan.task.load(data_dir) for plan in plans}  # fail on missing data before training
    done = {run_key(r) for r in read_results(out)}
    tuning = [(plan, arm, lr) for plan in plans for arm in plan.arms for lr in _lr_grid(plan.config.lr, plan.tune_lr)]
    finals = [(plan, arm, seed) for plan in plans for arm in plan.arms for seed in plan.seeds]
    jobs = [("tune", *job) for job in tuning] + [("final", *job) for job in finals]
    mine = jobs[shard.index :: shard.count]
    bar = tqdm(total=len(mine), desc="runs", disable=not progress, dynamic_ncols=True)
    for phase, plan, arm, value in mine:
        data = loaded[plan.task.name]
        if phase == "tune":
            trial = replace(plan.config, lr=value)
            _run_one(out, plan.task, data, arm, plan.seeds[0], trial, "tune", done, progress, command, device)
        else:
            cfg = replace(plan.config, lr=_tuned_lr(out, plan, arm)) if plan.tune_lr else plan.config
            row = _run_one(out, plan.task, data, arm, value, cfg, "final", done, progress, command, device)
            if row is not None and after_final is not None:
                after_final(row)
        bar.update(1)
    bar.close()
    return read_results(out)


def _tuned_lr(out: Path, plan: Plan, arm: Arm) -> float:
    """The rate of ``arm``'s tuning runs (on the plan's first seed) with the best validation
    metric, the first in grid order among equals; while some are missing, other shards are
    running them: wait, polling the results, for at most TUNE_WAIT_SECONDS."""
    grid = _lr_grid(plan.config.lr, plan.tune_lr)
    keys = {_config_key(replace(plan.config, lr=lr), arm): lr for lr in grid}
    wanted = {(plan.task.name, arm.name, plan.seeds[0], "tune", key) for key in keys}
    start, last_note = time.monotonic(), None
    while True:
        rows: dict[str, dict[str, Any]] = {}
        for r in read_results(out):
            if run_key(r) in wanted:
                rows.setdefault(r["config_key"], r)
        missing = len(keys) - len(rows)
        if not missing:
            break
        waited = time.monotonic() - start
        if waited > TUNE_WAIT_SECONDS:
            raise RuntimeError(
                f"{plan.task.name} {arm.name}: {missing} rate-tuning runs did not appear in {out / RESULTS} within "
                f"{TUNE_WAIT_SECONDS:.0f} s; is every shard of this command running?"
            )
        if last_note is None or time.monotonic() - last_note > 600:
            print(f"{plan.task.name} {arm.name}: waiting for {missing} rate-tuning runs of other shards", flush=True)
            last_note = time.monotonic()
        time.sleep(TUNE_POLL_SECONDS)
    val_metric = plan.task.metric.replace("test_", "val_")
    sign = 1 if plan.task.higher_is_better else -1
    scores = {}
    for key, lr in keys.items():
        score = rows[key]["metrics"].get(val_metric)
        scores[lr] = sign * score if score is not None and math.isfinite(score) else -math.inf
    return max(grid, key=scores.get)


def sweep_arms(families: Sequence[str], lams: Sequence[float], placements: Sequence[str] = (SPEC_PLACEMENT,)) -> list[str]:
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
