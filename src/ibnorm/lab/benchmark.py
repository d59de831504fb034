"""Speed and memory of IB layers against their torch parents (``ibnorm bench``).

Kernel benchmark: for each grouping (layer, RMS, batch, group) at the shapes of the
fused-path issue, in float32 and bfloat16, it times forward (with autograd recording, as
in training), backward (repeated on one retained graph), forward+backward and inference
(eval mode without autograd: batch grouping on its running statistics), for

* ``parent``: the torch layer (nn.LayerNorm, nn.RMSNorm, nn.BatchNorm2d, nn.GroupNorm);
* ``ib_cpp``: the IB layer on the vectorized C++ kernels (the CPU default where they build);
* ``ib_compiled``: the IB layer on the Inductor-compiled fused path;
* ``ib_eager``: the IB layer's fused Function with uncompiled bodies;
* ``composite``: the IB layer as plain ops differentiated by autograd (the reference);

each timed against the parent in a phase of its own, the two alternating call by call (so that
drift on a shared machine hits both alike, and a slow implementation never runs between the
parent and a fast one), for at least ``repeats`` rounds and ``min_seconds`` of calls each; it
records the median time, the ratio to the parent (the median over the phase's rounds of the
implementation's time over the parent's in that round), the bytes
autograd saves for backward (unique storages seen by ``saved_tensors_hooks``) and, for
``ib_cpp`` and ``ib_compiled``, the first call's time (which includes building, loading or
compiling). Gradients are returned, not accumulated into ``.grad`` (:func:`gradients`).
``--impls`` narrows the implementations; ``--runs K`` times everything K times over on fresh
tensors and reports the median ratio with its range (:func:`combine_runs`): on a shared VM one
run's ratio moves by a tenth or more with where its buffers land.

With ``--device cuda`` it times, at transformer and ResNet sizes, with CUDA events after an
L2 flush, the torch layer (``parent``), the IB layer on its hand-written Triton kernels
(``ib_triton``) and ``torch.compile`` of the IB layer, which compiles the composite
(``composite_compiled``); besides times and ratios it reports the achieved bandwidth in
GB/s: the bytes a kernel must move (forward: read x, write y; backward: read x and g_y,
write g_x) over the time.

Model-step benchmark: one AdamW training step of tiny GPT-2, LLaMA and ResNet models built
from ``transformers`` configs, with the parent norms vs converted to IBNorm, in interleaved
pairs of steps (at least 5 s per arm); the overhead is the median of the pair ratios.

Both time each grouping's library default IBNorm (:data:`ibnorm.DEFAULT_VARIANTS`) unless told otherwise.
"""

from __future__ import annotations

import copy
import ctypes
import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

from ._io import atomic_write_bytes, atomic_write_csv
from ._measure import saved_tensor_bytes
from ._plotting import figure_png, pyplot
from ibnorm.defaults import Variant
from ibnorm.convert import convert_norms
from ibnorm.ops import dispatch, use_backend

ROW_SHAPES = [(4096, 768), (8192, 1024), (2048, 4096)]
IMAGE_SHAPES = [(64, 64, 32, 32)]
IMPLEMENTATIONS = {"parent": None, "ib_cpp": "cpp", "ib_compiled": "compiled", "ib_eager": "eager", "composite": "reference"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_PARENTS: dict[str, Callable[[Sequence[int]], nn.Module]] = {
    "layer": lambda shape: nn.LayerNorm(shape[-1]),
    "rms": lambda shape: nn.RMSNorm(shape[-1]),
    "batch": lambda shape: nn.BatchNorm2d(shape[1]),
    "group": lambda shape: nn.GroupNorm(32, shape[1]),
}
GROUPINGS = tuple(_PARENTS)
MODELS = ("gpt2", "llama", "resnet")

CUDA_ROW_SHAPES = [(4096, 768), (8192, 1024), (16384, 4096), (4096, 8192)]
CUDA_IMAGE_SHAPES = [(64, 64, 56, 56)]
CUDA_IMPLEMENTATIONS = ("parent", "ib_triton", "composite_compiled")
# Elements of x moved per element by each mode: forward reads x, writes y; backward reads x, g_y, writes g_x.
TRAFFIC = {"forward": 2, "backward": 3, "fwd_bwd": 5}
MODES = tuple(TRAFFIC)
MODES_TIMED = (*MODES, "inference")
# CPU kernel phases: at least this many seconds of calls per implementation and mode (a call of
# a few hundred µs needs hundreds of samples for its median to settle).
DEFAULT_MIN_SECONDS = 0.3


def layer_pair(
    grouping: str, shape: Sequence[int], dtype: torch.dtype,
    compression: Optional[str], lam: Optional[float], placement: Optional[str],
) -> tuple[nn.Module, nn.Module]:
    """The torch layer timed for ``grouping`` on input ``shape`` (rows: features last; images:
    (N, C, H, W), GroupNorm with 32 groups) and its IB counterpart from the table of norms
    (:func:`ibnorm.convert_norms` of a copy)."""
    parent = _PARENTS[grouping](shape).to(dtype)
    converted, _ = convert_norms(copy.deepcopy(parent), compression, lam, placement=placement)
    return parent, converted


def _layer_variant(layer: nn.Module) -> str:
    """How the rows name the IB layer they timed, e.g. ``S:0.1:centered``."""
    return str(Variant(layer.compression, layer.lam_value(), layer.placement))


def interleaved_times(
    calls: dict[str, Callable[[], object]], repeats: int, min_seconds: float = 0.0, warmup: int = 2
) -> dict[str, list[float]]:
    """Seconds of each call of each function, after ``warmup`` calls each: in rounds that call
    every function once, the order rotating by one per round (two functions: alternating), so
    that drift on a shared machine hits all alike; at least ``repeats`` rounds and, where given,
    ``min_seconds`` of calls per function (a short call's median needs many samples)."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    rounds = 0
    while rounds < repeats or min(sum(v) for v in samples.values()) < min_seconds:
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            calls[name]()
            samples[name].append(time.perf_counter() - start)
        rounds += 1
    return samples


def paired_ratio(samples: dict[str, list[float]], name: str, base: str = "parent") -> float:
    """The median over rounds of ``name``'s time / ``base``'s time in the same round."""
    return statistics.median(a / b for a, b in zip(samples[name], samples[base]))


def paired_phases(
    calls: dict[str, Callable[[], object]], repeats: int, min_seconds: float = 0.0, base: str = "parent"
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Each implementation timed in its own phase alternating with ``base`` alone
    (:func:`interleaved_times` of the pair): the samples of every implementation (``base``'s from
    all phases) and each one's :func:`paired_ratio` from its phase. A slow implementation called
    between two fast ones changes what they find in cache and in the allocator, so rounds of all
    implementations together put the slow ones' footprint into the fast ones' ratios."""
    samples: dict[str, list[float]] = {base: []}
    ratios: dict[str, float] = {base: 1.0}
    for name, call in calls.items():
        if name == base:
            continue
        pair = interleaved_times({base: calls[base], name: call}, repeats, min_seconds)
        samples[base] += pair[base]
        samples[name] = pair[name]
        ratios[name] = paired_ratio(pair, name, base)
    return samples, ratios


def gradients(
    y: torch.Tensor, x: torch.Tensor, module: nn.Module, grad: torch.Tensor, retain_graph: bool = False
) -> tuple[torch.Tensor, ...]:
    """The gradients of ``x`` and of ``module``'s trainable parameters for upstream ``grad``,
    returned, not added into ``.grad``. In a training step x's gradient flows on to the layer
    below and ``zero_grad(set_to_none=True)`` leaves the parameters' to be assigned; adding into
    a leaf's ``.grad`` would time one more read-modify-write of x's size, the same for every
    implementation, and so pull every ratio towards 1."""
    inputs = (x, *(p for p in module.parameters() if p.requires_grad))
    return torch.autograd.grad(y, inputs, grad, retain_graph=retain_graph)


def combine_runs(
    runs: Sequence[Sequence[dict[str, object]]],
    key_columns: Sequence[str],
    median_columns: Sequence[str],
    range_columns: Sequence[str] = (),
    sum_columns: Sequence[str] = (),
) -> list[dict[str, object]]:
    """Rows of repeated runs of one benchmark (the same cases, named by ``key_columns``, in the
    same order in each run) as one row each: the first run's values, with ``median_columns``
    replaced by their median over runs, ``sum_columns`` by their total, ``<c>_min`` and
    ``<c>_max`` added for each of ``range_columns`` and ``runs`` the number of runs."""
    if not runs:
        raise ValueError("runs must hold at least one run's rows, got none")
    key = lambda row: tuple(row[c] for c in key_columns)  # noqa: E731
    if len({tuple(map(key, rows)) for rows in runs}) != 1:
        raise ValueError(f"every run must have the same rows ({', '.join(key_columns)}) in the same order")
    combined = []
    for rows in zip(*runs):
        row = dict(rows[0])
        for c in median_columns:
            row[c] = round(statistics.median(float(r[c]) for r in rows), 6)
        for c in sum_columns:
            row[c] = sum(r[c] for r in rows)
        for c in range_columns:
            row[f"{c}_min"], row[f"{c}_max"] = min(r[c] for r in rows), max(r[c] for r in rows)
        row["runs"] = len(rows)
        combined.append(row)
    return combined


def _time_modes(
    impls: dict[str, tuple[nn.Module, str]], x: torch.Tensor, grad: torch.Tensor, repeats: int, min_seconds: float
) -> dict[str, tuple[dict[str, list[float]], dict[str, float]]]:
    """Per mode (forward, backward on a retained graph, forward+backward, inference), the
    :func:`paired_phases` of every implementation against the parent: ``impls`` maps a name to
    its module and the backend it runs on."""

    def on(backend: str, fn: Callable[[], object]) -> Callable[[], object]:
        def call() -> object:
            with use_backend(backend):
                return fn()

        return call

    forward = {name: on(b, lambda m=m: m(x)) for name, (m, b) in impls.items()}
    graphs = {name: call() for name, call in forward.items()}
    modes = {
        "forward": forward,
        "backward": {
            name: on(b, lambda y=graphs[name], m=m: gradients(y, x, m, grad, retain_graph=True)) for name, (m, b) in impls.items()
        },
        "fwd_bwd": {name: on(b, lambda m=m: gradients(m(x), x, m, grad)) for name, (m, b) in impls.items()},
    }
    timed = {mode: paired_phases(calls, repeats, min_seconds) for mode, calls in modes.items()}
    modules = {module for module, _ in impls.values()}
    for module in modules:
        module.eval()  # inference: batch grouping switches to its running statistics
    with torch.no_grad():
        timed["inference"] = paired_phases(forward, repeats, min_seconds)  # the forward calls, now without autograd
    for module in modules:
        module.train()
    return timed


def _cases(
    groupings: Sequence[str], dtypes: Sequence[str], row_shapes: Sequence[Sequence[int]], image_shapes: Sequence[Sequence[int]]
) -> list[tuple[str, tuple[int, ...], str]]:
    return [
        (g, tuple(s), d)
        for g in groupings
        for s in (row_shapes if g in ("layer", "rms") else image_shapes)
        for d in dtypes
    ]


def layer_inputs(shape: Sequence[int], dtype: torch.dtype, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """x (requiring grad) and an upstream gradient, the same on every device."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(device, dtype).requires_grad_(True)
    return x, torch.randn(shape, generator=gen).to(device, dtype)


def kernel_benchmark(
    groupings: Sequence[str] = GROUPINGS,
    dtypes: Sequence[str] = ("float32", "bfloat16"),
    repeats: int = 10,
    compression: Optional[str] = None,
    lam: Optional[float] = None,
    placement: Optional[str] = None,
    row_shapes: Sequence[Sequence[int]] = ROW_SHAPES,
    image_shapes: Sequence[Sequence[int]] = IMAGE_SHAPES,
    min_seconds: float = 0.0,
    impls: Sequence[str] = tuple(IMPLEMENTATIONS),
    runs: int = 1,
) -> list[dict[str, object]]:
    """One row per case and implementation (``parent`` and ``impls``). With ``runs`` > 1 the
    whole set of cases is timed ``runs`` times over, on fresh tensors each time (the ratio of one
    timing moves with where its buffers land and with what the machine does meanwhile), and each
    row holds the medians over runs, with the forward+backward and inference ratios' ranges
    (:func:`combine_runs`); ``first_call_s`` is the first run's."""
    unknown = [i for i in impls if i not in IMPLEMENTATIONS]
    if unknown or not set(impls) - {"parent"}:
        raise ValueError(f"impls must name at least one of {[i for i in IMPLEMENTATIONS if i != 'parent']}, got {list(impls)}")
    if runs < 1:
        raise ValueError(f"runs must be a positive int, got {runs}")
    chosen = {i: b for i, b in IMPLEMENTATIONS.items() if i == "parent" or i in impls}
    cases = _cases(groupings, dtypes, row_shapes, image_shapes)
    per_run: list[list[dict[str, object]]] = []
    progress = tqdm(total=runs * len(cases), desc="kernel benchmark")
    for _ in range(runs):
        rows: list[dict[str, object]] = []
        for grouping, shape, dtype_name in cases:
            rows += _kernel_case(grouping, shape, dtype_name, chosen, repeats, compression, lam, placement, min_seconds)
            progress.update()
        per_run.append(rows)
    progress.close()
    ratios = [f"ratio_{m}" for m in MODES_TIMED]
    keys = ["grouping", "shape", "dtype", "impl"]
    return combine_runs(per_run, keys, [f"{m}_s" for m in MODES_TIMED] + ratios, ["ratio_fwd_bwd", "ratio_inference"])


def _kernel_case(
    grouping: str, shape: tuple[int, ...], dtype_name: str, chosen: dict[str, Optional[str]], repeats: int,
    compression: Optional[str], lam: Optional[float], placement: Optional[str], min_seconds: float,
) -> list[dict[str, object]]:
    dtype = DTYPES[dtype_name]
    x, grad = layer_inputs(shape, dtype)
    parent, layer = layer_pair(grouping, shape, dtype, compression, lam, placement)
    impls = {impl: (parent, "eager") if backend is None else (layer, backend) for impl, backend in chosen.items()}
    first_call_s, saved_bytes = {}, {}
    for impl, (module, backend) in impls.items():
        with use_backend(backend):
            start = time.perf_counter()  # the first call builds, loads or compiles, where anything does
            gradients(module(x), x, module, grad)
            first_call_s[impl] = time.perf_counter() - start
            saved_bytes[impl] = saved_tensor_bytes(lambda: module(x))
    timed = _time_modes(impls, x, grad, repeats, min_seconds)
    return [
        {
            "grouping": grouping,
            "shape": "x".join(map(str, shape)),
            "dtype": dtype_name,
            "impl": impl,
            "variant": _layer_variant(layer),
            **{f"{m}_s": round(statistics.median(timed[m][0][impl]), 6) for m in MODES_TIMED},
            "first_call_s": round(first_call_s[impl], 6) if backend in ("compiled", "cpp") else float("nan"),
            "saved_bytes": saved_bytes[impl],
            **{f"ratio_{m}": round(timed[m][1][impl], 3) for m in MODES_TIMED},
            "saved_bytes_ratio": round(saved_bytes[impl] / saved_bytes["parent"], 3),
            "input_bytes": x.numel() * x.element_size(),
        }
        for impl, backend in chosen.items()
    ]


def _cuda_median_time(run: Callable[[], object], prepare: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``run`` on the GPU, timed by CUDA events; before each sample,
    untimed, ``prepare`` runs and a 256 MiB buffer is cleared so no input sits in L2."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        prepare()
        flush.zero_()
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples)


def _cuda_time_modes(module: Callable[[torch.Tensor], torch.Tensor], params: Sequence[nn.Parameter],
                     x: torch.Tensor, grad: torch.Tensor, repeats: int) -> dict[str, float]:
    """Forward (recording autograd), backward alone (of a fresh forward) and both, with
    gradients cleared between samples so no accumulation is timed; and the first call."""
    graph: list[torch.Tensor] = []

    def clear() -> None:
        for t in (x, *params):
            t.grad = None

    def forward_untimed() -> None:
        clear()
        graph[:] = [module(x)]

    torch.cuda.synchronize()
    started = time.perf_counter()
    module(x).backward(grad)  # compiles, where anything compiles
    torch.cuda.synchronize()
    first_call_s = time.perf_counter() - started
    for _ in range(2):
        module(x).backward(grad)
    return {
        "forward_s": _cuda_median_time(lambda: module(x), clear, repeats),
        "backward_s": _cuda_median_time(lambda: graph.pop().backward(grad), forward_untimed, repeats),
        "fwd_bwd_s": _cuda_median_time(lambda: module(x).backward(grad), clear, repeats),
        "first_call_s": first_call_s,
    }


def cuda_kernel_benchmark(
    groupings: Sequence[str] = GROUPINGS,
    dtypes: Sequence[str] = ("float32", "bfloat16"),
    repeats: int = 50,
    compression: Optional[str] = None,
    lam: Optional[float] = None,
    placement: Optional[str] = None,
    row_shapes: Sequence[Sequence[int]] = CUDA_ROW_SHAPES,
    image_shapes: Sequence[Sequence[int]] = CUDA_IMAGE_SHAPES,
    on_case: Optional[Callable[[list[dict[str, object]]], object]] = None,
) -> list[dict[str, object]]:
    """Time and achieved GB/s of ``CUDA_IMPLEMENTATIONS`` on the current GPU, per case;
    ``on_case`` gets the rows so far after every case (to save partial results)."""
    device_name = torch.cuda.get_device_name()
    rows: list[dict[str, object]] = []
    for grouping, shape, dtype_name in tqdm(_cases(groupings, dtypes, row_shapes, image_shapes), desc="cuda kernel benchmark"):
        dtype = DTYPES[dtype_name]
        x, grad = layer_inputs(shape, dtype, "cuda")
        parent, layer = (m.to("cuda") for m in layer_pair(grouping, shape, dtype, compression, lam, placement))
        torch._dynamo.reset()  # a fresh, shape-specialized compile per case, never the recompile limit
        callables = {"parent": (parent, "eager"), "ib_triton": (layer, "triton"),
                     "composite_compiled": (torch.compile(layer, dynamic=False), "auto")}
        results = {}
        for impl in CUDA_IMPLEMENTATIONS:
            module, backend = callables[impl]
            params = list(parent.parameters() if impl == "parent" else layer.parameters())
            with use_backend(backend):
                results[impl] = _cuda_time_modes(module, params, x, grad, repeats)
        moved = x.numel() * x.element_size()
        for impl, r in results.items():
            rows.append(
                {
                    "device": device_name,
                    "grouping": grouping,
                    "shape": "x".join(map(str, shape)),
                    "dtype": dtype_name,
                    "impl": impl,
                    "variant": _layer_variant(layer),
                    **{f"{m}_s": round(r[f"{m}_s"], 7) for m in MODES},
                    **{f"gbps_{m}": round(TRAFFIC[m] * moved / r[f"{m}_s"] / 1e9, 1) for m in MODES},
                    **{f"ratio_{m}": round(r[f"{m}_s"] / results["parent"][f"{m}_s"], 3) for m in MODES},
                    "ratio_fwd_bwd_vs_compiled": round(r["fwd_bwd_s"] / results["composite_compiled"]["fwd_bwd_s"], 3),
                    "first_call_s": round(r["first_call_s"], 3),
                    "input_bytes": moved,
                }
            )
        if on_case is not None:
            on_case(rows)
    return rows


def _tiny_models() -> dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], torch.Tensor]]]:
    import transformers

    tokens = torch.randint(0, 512, (8, 128), generator=torch.Generator().manual_seed(0))
    images = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1))

    def lm_loss(model: nn.Module) -> torch.Tensor:
        return model(tokens, labels=tokens).loss

    def image_loss(model: nn.Module) -> torch.Tensor:
        return nn.functional.cross_entropy(model(images).logits, labels)

    return {
        "gpt2": (
            lambda: transformers.GPT2LMHeadModel(
                transformers.GPT2Config(vocab_size=512, n_positions=128, n_embd=256, n_layer=4, n_head=4)
            ),
            lm_loss,
        ),
        "llama": (
            lambda: transformers.LlamaForCausalLM(
                transformers.LlamaConfig(
                    vocab_size=512,
                    hidden_size=256,
                    intermediate_size=688,
                    num_hidden_layers=4,
                    num_attention_heads=4,
                    num_key_value_heads=4,
                    max_position_embeddings=128,
                )
            ),
            lm_loss,
        ),
        "resnet": (
            lambda: transformers.ResNetForImageClassification(
                transformers.ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1], num_labels=10)
            ),
            image_loss,
        ),
    }


def _train_step(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> Callable[[], None]:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model).backward()
        opt.step()

    return step


def model_step_benchmark(
    models: Sequence[str] = MODELS,
    repeats: int = 10,
    compression: Optional[str] = None,
    lam: Optional[float] = None,
    placement: Optional[str] = None,
    min_seconds: float = 5.0,
    runs: int = 1,
) -> list[dict[str, object]]:
    """Training-step time of each tiny model with its norms and converted to IBNorm: the
    median step of each arm, and the overhead as the median over interleaved pairs of
    ibnorm step / parent step, minus 1. With ``runs`` > 1 every model is built and timed
    ``runs`` times over and each row holds the medians over runs with the overhead's range."""
    if runs < 1:
        raise ValueError(f"runs must be a positive int, got {runs}")
    specs = _tiny_models()
    per_run: list[list[dict[str, object]]] = []
    progress = tqdm(total=runs * len(models), desc="model-step benchmark")
    for _ in range(runs):
        rows = []
        for name in models:
            rows.append(_model_step(name, *specs[name], repeats, compression, lam, placement, min_seconds))
            progress.update()
        per_run.append(rows)
    progress.close()
    return combine_runs(per_run, ["model"], ["parent_step_s", "ibnorm_step_s", "overhead_pct"], ["overhead_pct"], ["pairs"])


def _model_step(
    name: str, build: Callable[[], nn.Module], loss_fn: Callable[[nn.Module], torch.Tensor], repeats: int,
    compression: Optional[str], lam: Optional[float], placement: Optional[str], min_seconds: float,
) -> dict[str, object]:
    torch.manual_seed(0)
    parent = build()
    converted, record = convert_norms(copy.deepcopy(parent), compression, lam, placement=placement)
    steps = {arm: _train_step(model, loss_fn) for arm, model in (("parent", parent), ("ibnorm", converted))}
    samples = interleaved_times(steps, repeats, min_seconds, warmup=15)  # warm-up: allocator, thread pool
    times = {arm: statistics.median(v) for arm, v in samples.items()}
    return {
        "model": name,
        "variant": " ".join(f"{g}={Variant(o['compression'], o['lam'], o['placement'])}" for g, o in record.options.items()),
        "backend": dispatch.resolve_backend(torch.device("cpu")),
        "norm_layers": len(record),
        "parent_step_s": round(times["parent"], 5),
        "ibnorm_step_s": round(times["ibnorm"], 5),
        "pairs": len(samples["parent"]),
        "overhead_pct": round(100 * (paired_ratio(samples, "ibnorm") - 1), 2),
    }


def plot_kernels(
    rows: list[dict[str, object]],
    path: Path,
    impls: Optional[Sequence[str]] = None,
    value: str = "ratio_fwd_bwd",
    ylabel: str = "forward+backward time / torch parent",
    title: Optional[str] = None,
) -> Optional[Path]:
    """Bar chart of ``value`` per case and implementation (default: forward+backward time
    relative to the parent, for every IB implementation in ``rows``), with the range over runs
    as whiskers where the rows combine several; None if matplotlib is missing."""
    try:
        plt = pyplot()
    except ImportError:
        return None

    labels = sorted({(r["grouping"], r["shape"], r["dtype"]) for r in rows}, key=str)
    present = {r["impl"] for r in rows}
    impls = impls or [i for i in IMPLEMENTATIONS if i != "parent" and i in present]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(labels)), 4.5))
    width = 0.8 / len(impls)
    for k, impl in enumerate(impls):
        cells = [next(r for r in rows if (r["grouping"], r["shape"], r["dtype"]) == label and r["impl"] == impl) for label in labels]
        values = [r[value] for r in cells]
        spread = None
        if cells[0].get("runs", 1) > 1 and f"{value}_min" in cells[0]:  # the bar is the median, the whisker the range
            spread = [[r[value] - r[f"{value}_min"] for r in cells], [r[f"{value}_max"] - r[value] for r in cells]]
        ax.bar([i + k * width for i in range(len(labels))], values, width, label=impl, yerr=spread, capsize=2)
    if value.startswith("ratio"):
        ax.axhline(1.0, color="black", lw=1)
    ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels([f"{g}\n{s}\n{d}" for g, s, d in labels], fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"IBNorm vs torch parent, {torch.get_num_threads()} CPU threads (lower is better)")
    ax.legend()
    fig.tight_layout()
    return atomic_write_bytes(path, figure_png(fig, dpi=120))


def format_table(rows: list[dict[str, object]], columns: Sequence[str]) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def steady_allocator(mmap_threshold: int = 256 * 2**20, trim_threshold: int = 2**30) -> bool:
    """Fix glibc's mmap and trim thresholds for this process, so that freed tensors up to
    ``mmap_threshold`` bytes are reused from the heap rather than mapped, faulted in and unmapped
    anew at every call. With glibc's dynamic default a fresh process did that for a ResNet step's
    medium-size tensors, which added about 10 ms to both arms of a 20 ms step and diluted the
    overhead ratio; a process that had freed larger tensors first (after a kernel benchmark) did
    not, so figures depended on what ran before. Returns False where the C library has no
    ``mallopt`` (not glibc): the allocator is then left as it is."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))


def run_benchmarks(
    out: Path,
    *,
    repeats: Optional[int] = None,
    groupings: Sequence[str] = GROUPINGS,
    dtypes: Sequence[str] = tuple(DTYPES),
    models: Sequence[str] = MODELS,
    compression: Optional[str] = None,
    lam: Optional[float] = None,
    placement: Optional[str] = None,
    quick: bool = False,
    device: str = "cpu",
    min_seconds: Optional[float] = None,
    impls: Sequence[str] = tuple(IMPLEMENTATIONS),
    runs: int = 1,
) -> None:
    """What ``ibnorm bench`` runs: the kernel benchmark (and on CPU the model-step benchmark
    of ``models``) into ``out`` as CSV and PNG, with tables on stdout. ``repeats`` defaults
    to 10 on CPU and 50 on CUDA; on CPU each implementation and mode also gets at least
    ``min_seconds`` of calls against the parent (default 0.3 s); ``quick`` uses small shapes,
    3 repeats and no minimum (a smoke test). On CPU, ``impls`` picks the implementations timed
    against the parent and ``runs`` repeats both benchmarks, reporting medians and ranges over
    runs. On CPU the process's allocator is made steady first (:func:`steady_allocator`)."""
    repeats = 3 if quick else repeats or (50 if device == "cuda" else 10)
    shapes = {"row_shapes": [(256, 128)], "image_shapes": [(8, 32, 8, 8)]} if quick else {}
    if device == "cuda":
        return _run_cuda(out, repeats, groupings, dtypes, compression, lam, placement, shapes)
    steady = steady_allocator()
    print(f"allocator: {'glibc mmap threshold fixed at 256 MiB' if steady else 'left as it is (no glibc mallopt)'}")
    min_seconds = 0.0 if quick else (DEFAULT_MIN_SECONDS if min_seconds is None else min_seconds)
    kernels = kernel_benchmark(
        groupings, dtypes, repeats, compression, lam, placement, **shapes, min_seconds=min_seconds, impls=impls, runs=runs
    )
    atomic_write_csv(out / "kernels.csv", kernels)
    columns = ["grouping", "shape", "dtype", "impl", "variant", "fwd_bwd_s", "ratio_forward", "ratio_backward", "ratio_fwd_bwd",
               "ratio_inference", "ratio_fwd_bwd_min", "ratio_fwd_bwd_max", "ratio_inference_min", "ratio_inference_max",
               "runs", "saved_bytes_ratio", "first_call_s"]
    print(format_table(kernels, _shown(columns, runs)))
    plot = plot_kernels(kernels, out / "kernels.png")
    print(f"\nwrote {out / 'kernels.csv'}" + (f" and {plot}" if plot else " (install matplotlib for the plot)"))
    if models:
        steps = model_step_benchmark(models, repeats, compression, lam, placement, min_seconds=0.0 if quick else 5.0, runs=runs)
        atomic_write_csv(out / "model_step.csv", steps)
        print()
        print(format_table(steps, _shown(list(steps[0]), runs)))
        print(f"\nwrote {out / 'model_step.csv'}")
    print(f"backend resolved for cpu: {dispatch.resolve_backend(torch.device('cpu'))}; torch {torch.__version__}")


def _shown(columns: Sequence[str], runs: int) -> list[str]:
    """``columns`` without :func:`combine_runs`'s range columns and run count when there was one run."""
    return [c for c in columns if runs > 1 or not (c == "runs" or c.endswith(("_min", "_max")))]


def _run_cuda(
    out: Path, repeats: int, groupings: Sequence[str], dtypes: Sequence[str], compression: Optional[str],
    lam: Optional[float], placement: Optional[str], shapes: dict
) -> None:
    csv_path = out / "kernels_cuda.csv"
    kernels = cuda_kernel_benchmark(
        groupings, dtypes, repeats, compression, lam, placement,
        on_case=lambda rows: atomic_write_csv(csv_path, rows), **shapes,
    )
    columns = ["grouping", "shape", "dtype", "impl", "variant", "fwd_bwd_s", "gbps_forward", "gbps_backward", "gbps_fwd_bwd",
               "ratio_fwd_bwd", "ratio_fwd_bwd_vs_compiled", "first_call_s"]
    print(format_table(kernels, columns))
    plot = plot_kernels(
        kernels, out / "kernels_cuda.png", impls=CUDA_IMPLEMENTATIONS, value="gbps_fwd_bwd",
        ylabel="forward+backward GB/s (bytes that must move / time)",
        title=f"IBNorm ({', '.join(dict.fromkeys(r['variant'] for r in kernels))}) vs torch parent on {kernels[0]['device']} (higher is better)",
    )
    print(f"\nwrote {csv_path}" + (f" and {plot}" if plot else " (install matplotlib for the plot)"))
    print(f"backend resolved for cuda: {dispatch.resolve_backend(torch.device('cuda'))}; torch {torch.__version__}")
