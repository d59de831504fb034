"""One training run (task × arm × seed) with checkpoint/resume and optional DDP.

Every arm of a comparison gets the same steps, batch size, AdamW optimizer and
warmup+cosine schedule. Checkpoints (model, optimizer, schedule, step, curve) are written
atomically every ``checkpoint_every`` steps; a run started again with the same directory
resumes from its last checkpoint and, since batches are a pure function of (seed, step),
finishes with the same result as an uninterrupted run. Under ``torchrun`` (an initialized
process group) the model is wrapped in DistributedDataParallel, batch-grouped norms become
their synchronized versions, and each rank takes its share of the same global batch.
"""

from __future__ import annotations

import io
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ibnorm.convert import convert_norms, convert_sync_ibbatchnorm
from ibnorm.norms import torch_norm_classes

from .._io import atomic_write_bytes
from .._measure import saved_tensor_bytes
from .arms import Arm
from .probe import information_snapshot
from .tasks import Task

INTERRUPT_ENV = "IBNORM_INTERRUPT_AT"  # "<task>/<arm>/<seed>:<step>": raise KeyboardInterrupt there (resume tests)


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    eval_every: int = 100
    warmup_fraction: float = 0.05
    checkpoint_every: int = 200
    eval_items: int = 10_000  # examples (or characters) per evaluation during training (the curve)
    final_items: Optional[int] = None  # per final val/test/held-in evaluation; None: the whole split
    analyze_every: int = 0  # steps between information-plane snapshots (0: none); taken at evaluations

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _schedule(cfg: TrainConfig) -> Any:
    warmup = max(1, int(cfg.warmup_fraction * cfg.steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, cfg.steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices and kernels only.

    Parameters with at most one dimension — norm gains and biases, every bias, λ
    (``lam_raw``) and DyT's α — get no decay, for every arm alike: decaying a norm gain
    pulls it toward 0, and decaying λ would push IBNorm toward its parent norm.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def final_evaluation(task: Task, model: nn.Module, data: Any, items: Optional[int]) -> dict[str, float]:
    """Test and validation metrics on ``items`` examples/characters of each split (None:
    the whole split), and the generalization gap: the test loss minus the loss on as many
    training examples (characters) as the test evaluation saw.

    ``gen_gap = heldout_loss − heldin_loss`` in the task's loss unit (nats per example for
    classification, bits per character for language models)."""
    metrics = {**task.evaluate(model, data, "test", items), **task.evaluate(model, data, "val", items)}
    heldin = task.evaluate(model, data, "train", task.evaluated_items(data, "test", items))
    loss_key = "bpc" if task.kind == "lm" else "loss"
    metrics["heldin_loss"] = heldin[f"train_{loss_key}"]
    metrics["heldout_loss"] = metrics[f"test_{loss_key}"]
    metrics["gen_gap"] = metrics["heldout_loss"] - metrics["heldin_loss"]
    return metrics


def _distributed() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def activation_bytes(task: Task, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> int:
    """Bytes autograd saves for backward in one training forward: the activation-memory
    cost of a step."""
    return saved_tensor_bytes(lambda: task.loss(model, inputs, targets))


def _interrupt_step(label: str) -> Optional[int]:
    target = os.environ.get(INTERRUPT_ENV, "")
    if target.rpartition(":")[0] == label:
        return int(target.rpartition(":")[2])
    return None


def train_run(
    task: Task,
    data: Any,
    arm: Arm,
    seed: int,
    cfg: TrainConfig,
    run_dir: Path,
    *,
    progress: bool = True,
    device: Optional[str] = None,
) -> dict[str, Any]:
    """Train, evaluate and return ``{"metrics", "curve", "diverged", "step_time_s",
    "activation_bytes", ...}``. A non-finite training loss stops the run: it is returned
    with ``diverged=True`` and NaN metrics, to be counted, not dropped. ``device`` (e.g.
    ``"cuda"``) is where the model trains; it is not part of the protocol's configuration."""
    rank, world = _distributed()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the number of processes ({world})")
    torch.manual_seed(seed)
    model = arm.apply(task.build(data)).to(device or "cpu")
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(_synchronize_batch_norms(model))
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg))
    start, curve, step_times = 0, [], []
    checkpoint = Path(run_dir) / "checkpoint.pt"
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True, map_location=device or "cpu")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, curve, step_times = state["step"], state["curve"], state["step_times"]

    label = f"{task.name}/{arm.name}/{seed}"
    interrupt_at = _interrupt_step(label)
    local = cfg.batch_size // world
    probe = task.batch(data, seed, 0, cfg.batch_size)
    act_bytes = activation_bytes(task, model, probe[0][:local], probe[1][:local])
    losses: list[float] = []
    diverged_at: Optional[int] = None
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=label, leave=False, dynamic_ncols=True)
    model.train()
    for step in range(start, cfg.steps):
        if interrupt_at is not None and step == interrupt_at:
            raise KeyboardInterrupt(f"{INTERRUPT_ENV} reached at {label}:{step}")
        inputs, targets = task.batch(data, seed, step, cfg.batch_size)
        inputs, targets = inputs[rank * local : (rank + 1) * local], targets[rank * local : (rank + 1) * local]
        began = time.perf_counter()
        loss = task.loss(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if loss.is_cuda:
            torch.cuda.synchronize()  # time the GPU's work, not the kernel launches
        step_times.append(time.perf_counter() - began)
        losses.append(_global_mean(loss.detach(), world))
        if not math.isfinite(losses[-1]):
            diverged_at = step + 1
            break
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            point = {"step": step + 1, "train_loss": sum(losses) / len(losses)}
            point.update(task.evaluate(_unwrap(model), data, "val", cfg.eval_items))
            if cfg.analyze_every and ((step + 1) % cfg.analyze_every == 0 or step + 1 == cfg.steps) and rank == 0:
                point["layers"] = information_snapshot(task, data, _unwrap(model), seed=seed)
            curve.append(point)
            losses = []
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps and rank == 0:
            _save_checkpoint(checkpoint, model, optimizer, scheduler, step + 1, curve, step_times)
    if bar is not None:
        bar.close()
    if diverged_at is None:
        metrics = final_evaluation(task, _unwrap(model), data, cfg.final_items)
        metrics["train_loss"] = curve[-1]["train_loss"] if curve else float("nan")
    else:
        metrics = {task.metric: float("nan"), task.metric.replace("test_", "val_"): float("nan")}
    return {
        "metrics": metrics,
        "curve": curve,
        "diverged": diverged_at is not None,
        "diverged_at_step": diverged_at,
        "step_time_s": statistics.median(step_times) if step_times else float("nan"),
        "activation_bytes": act_bytes,
        "world_size": world,
        "model": _unwrap(model),
    }


def _synchronize_batch_norms(model: nn.Module) -> nn.Module:
    """Batch statistics over the global batch. torch's SyncBatchNorm syncs only on GPUs, so
    on CPU the parent's BatchNorms become SyncIBBatchNorm with λ = 0, which is BatchNorm
    exactly and all-reduces through any backend (gloo included)."""
    if any(p.is_cuda for p in model.parameters()):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    else:
        model, _ = convert_norms(model, lam=0.0, include=torch_norm_classes("batch"))
    return convert_sync_ibbatchnorm(model)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _global_mean(value: torch.Tensor, world: int) -> float:
    if world > 1:
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value)
        value /= world
    return float(value)


def _save_checkpoint(path: Path, model, optimizer, scheduler, step: int, curve: list, step_times: list) -> None:
    buffer = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "curve": curve,
            "step_times": step_times,
        },
        buffer,
    )
    atomic_write_bytes(path, buffer.getvalue())
