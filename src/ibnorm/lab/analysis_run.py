"""``ibnorm analyze``: representation analysis of the finished runs of an ``ibnorm compare``.

For every ``final`` run in ``<out>/results.jsonl`` (optionally filtered by task and arm) the
model is rebuilt exactly as it was trained (``task.build`` → ``arm.apply`` →
``load_state_dict(final.pt)``), run in eval mode on a probe set, and every normalization
layer's output is captured (:mod:`ibnorm.analysis.capture`). Per layer the activation
statistics and the mutual-information estimates of
:func:`~ibnorm.analysis.information_plane.layer_information` are computed.

The rebuilt model is checked by a strict ``load_state_dict``.

Probe set: :func:`~ibnorm.lab.experiments.probe.probe_set` on the task's test split
(channel means for classification, one example per token position for language models).
With ``spatial="mean"`` the statistics of a convolutional layer describe channel averages
over positions, not the per-element distribution the norm acts on. The probe classifier behind the I(T;Y) lower
bound is trained on a seeded half of the probe set and evaluated on the other half (for
language models, positions of one window can land on both sides).

Sites. The per-layer rows above are the ``norm_out`` site (``site`` field ``"norm_out"``); ``sites``
adds, for kurtosis and sparsity only, the norm inputs (``norm_in``), the block outputs
(``block_out``, the residual stream) and the activation-module outputs (``act_out``) of
:func:`~ibnorm.analysis.capture.find_sites`: one row per run × site × layer with
``spatial="examples"``, i.e. per-element values (every position of a feature map or
sequence is an example, the channels are the units) rather than channel means, drawn as a
seeded uniform subsample of at most ``max_values`` values per layer (``max_values //
units`` positions; :class:`~ibnorm.analysis.capture.ActivationCapture`) from all positions
of the probe set, after the ``max_units`` unit subsample. Sites a model does not expose
as modules (an activation applied functionally in ``forward``) are named in
``analysis.md`` as unavailable.

Outputs, written atomically into ``<out>`` (into the run folder when one run folder is
given): ``analysis.jsonl`` (one row per run × site × layer with its ``site``,
all estimates in bits; non-finite numbers as null), ``analysis.md`` (per task, per arm and
norm layer the mean over seeds of kurtosis, Hoyer sparsity, I(X;T) and I(T;Y), and one
sentence per non-parent arm stating the measured direction against the parent; per site
and arm the layer-averaged kurtosis, Hoyer sparsity and fraction |z| < 0.1, and the
seed-paired comparison of :func:`site_comparison`), and
``plots/analysis-<task>-plane.png`` / ``-stats.png`` (norm outputs).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from ibnorm.analysis.capture import (
    DEFAULT_MAX_EXAMPLES,
    DEFAULT_MAX_UNITS,
    SITES,
    capture_activations,
    check_sites,
    find_sites,
    split_site_key,
)
from ibnorm.analysis.information_plane import information_plane
from ibnorm.analysis.significance import CONFIDENCE
from ibnorm.analysis.stats import activation_stats, paired_comparison

from ._io import atomic_write_bytes, atomic_write_text
from .analysis_plots import plot_information_plane, plot_layer_stats
from .experiments.arms import parse_arm
from .experiments.compare import RETRAINED, retrain_model
from .experiments.results_file import folder_lock, read_results, read_results_file
from .experiments.probe import finite_or_none, probe_set
from .experiments.tasks import get_task

__all__ = ["analyze_run", "merge_analysis_rows", "check_analysis_rows", "find_out_folder", "output_folder", "summarize_analysis", "site_comparison", "ANALYSIS"]

ANALYSIS = "analysis.jsonl"
#: values kept per layer at the sites beyond the norm outputs
DEFAULT_MAX_VALUES = 100_000

# (row key, table header, summary name) of the quantities the report compares.
_REPORTED = (
    ("kurtosis", "kurtosis", "kurtosis"),
    ("hoyer", "Hoyer", "sparsity (Hoyer)"),
    ("I_XT_kernel", "I(X;T) kernel", "I(X;T) (kernel)"),
    ("I_TY_kernel", "I(T;Y) kernel", "I(T;Y) (kernel)"),
    ("I_TY_probe", "I(T;Y) probe", "I(T;Y) (probe bound)"),
)

# Statistics averaged per site, and those of them compared seed-paired against the parent.
_SITE_MEANS = ("kurtosis", "hoyer", "near_zero_fraction")
_SITE_PAIRED = ("kurtosis", "hoyer")
_SITE_WORDS = {
    "norm_in": "norm input",
    "norm_out": "norm output",
    "block_out": "block output",
    "act_out": "activation output",
}
_SPATIAL_WORDS = {"mean": "channel means", "flatten": "flattened", "examples": "per element"}


def find_out_folder(path: Union[str, Path]) -> tuple[Path, Optional[str]]:
    """``(out, run_dir)``: ``path`` itself when it holds ``results.jsonl``; for a single run
    folder (holding ``final.pt``), the nearest parent holding ``results.jsonl`` and the run
    folder relative to it."""
    path = Path(path).resolve()
    if (path / "results.jsonl").exists():
        return path, None
    if (path / "final.pt").exists():
        for parent in path.parents:
            if (parent / "results.jsonl").exists():
                return parent, str(path.relative_to(parent))
    raise FileNotFoundError(f"{path} is neither an `ibnorm compare` output folder (results.jsonl) nor a run folder inside one")


def output_folder(run_dir_or_out: Union[str, Path]) -> Path:
    """Where :func:`analyze_run` writes: the output folder itself, or for a single run folder
    that run folder (so analyzing one run never overwrites the analysis of the whole set)."""
    out, only_run = find_out_folder(run_dir_or_out)
    return out if only_run is None else out / only_run


def _load_state(model: torch.nn.Module, state: dict[str, Any]) -> None:
    """``load_state_dict(strict=True)``, except that the ψ running statistics a parent's
    BatchNorm gains when trained under torchrun on CPU (it runs as SyncIBBatchNorm with
    λ = 0, which is BatchNorm exactly) are dropped when the rebuilt layer has none."""
    own = model.state_dict()
    extra = [k for k in state if k not in own and k.endswith(("running_mean_psi", "running_var_psi"))]
    model.load_state_dict({k: v for k, v in state.items() if k not in extra})


def _layer_types(model: torch.nn.Module) -> dict[str, str]:
    return {name: type(module).__name__ for name, module in model.named_modules()}


def analyze_run(
    run_dir_or_out: Union[str, Path],
    *,
    tasks: Optional[Sequence[str]] = None,
    arms: Optional[Sequence[str]] = None,
    max_examples: int = DEFAULT_MAX_EXAMPLES,
    seed: int = 0,
    data_dir: Optional[str] = None,
    max_units: int = DEFAULT_MAX_UNITS,
    n_bins: int = 30,
    noise_var: float = 0.2,
    probe_epochs: int = 100,
    sites: Sequence[str] = SITES,
    max_values: int = DEFAULT_MAX_VALUES,
    retrain_missing: bool = False,
    progress: bool = False,
    summary: bool = True,
) -> list[dict[str, Any]]:
    """Analyze the ``final`` runs of an ``ibnorm compare`` output folder (or one run folder
    inside it) and write ``analysis.jsonl``, ``analysis.md`` and ``plots/analysis-*.png``
    into the output folder, or into the run folder when given one (:func:`output_folder`;
    see the module docstring). Returns the rows (one per run, site and layer). With
    ``summary=False`` only ``analysis.jsonl`` is written (rows bound for another folder).
    ``noise_var`` is the kernel estimator's σ² relative to each layer's total
    variance (the sum of its unit variances); ``data_dir`` is where Fashion-MNIST lives, as for ``ibnorm compare``.
    ``sites`` (a subset of :data:`~ibnorm.analysis.capture.SITES`): ``norm_out`` is always
    analysed; the others add per-element kurtosis/sparsity rows of at most ``max_values``
    values per layer (at least ``2 × max_units``, so that every layer keeps two positions).

    Incremental: a run with rows of the same settings in ``analysis.jsonl`` is not analysed
    again (rows made elsewhere, e.g. on a GPU machine for the runs trained there, join that
    file with :func:`merge_analysis_rows`); new rows are appended after every run, and no
    earlier row is dropped (other settings, runs outside ``tasks``/``arms``), while the
    returned rows and ``analysis.md`` cover this call's runs and settings. A run with neither
    rows nor its model (``final.pt``) here is trained again with ``retrain_missing``
    (:func:`~ibnorm.lab.experiments.compare.retrain_model`: its rows carry ``retrained``, the
    recorded and retrained metric, and ``analysis.md`` states the largest |Δ|), else left out
    and named there. Rows written before settings were recorded count as made with
    :data:`LEGACY_SETTINGS` (the defaults then, which `make results` used).
    """
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 4:
        raise ValueError(f"max_examples must be an int >= 4, got {max_examples!r}")
    extra_sites = [site for site in check_sites(sites) if site != "norm_out"]
    if extra_sites and (isinstance(max_values, bool) or not isinstance(max_values, int) or max_values < 2 * max_units):
        raise ValueError(f"max_values must be an int >= 2 * max_units = {2 * max_units}, got {max_values!r}")
    out, only_run = find_out_folder(run_dir_or_out)
    runs = [
        r
        for r in read_results(out)
        if r["phase"] == "final"
        and (tasks is None or r["task"] in tasks)
        and (arms is None or r["arm"] in arms)
        and (only_run is None or Path(r["run_dir"]) == Path(only_run))
    ]
    if not runs:
        raise ValueError(f"no finished 'final' runs to analyze in {out / 'results.jsonl'} (tasks={tasks}, arms={arms})")
    runs.sort(key=lambda r: (r["task"], r["arm"] != "parent", r["arm"], r["seed"]))
    settings = {
        "max_examples": max_examples,
        "seed": seed,
        "max_units": max_units,
        "n_bins": n_bins,
        "noise_var": noise_var,
        "probe_epochs": probe_epochs,
        "sites": ["norm_out", *sorted(extra_sites)],
        "max_values": max_values if extra_sites else None,
    }
    target = out if only_run is None else out / only_run
    earlier = _read_analysis(target)
    kept = _rows_by_run(earlier, settings)
    missing = {r["run_dir"] for r in runs if r["run_dir"] not in kept and not (out / r["run_dir"] / "final.pt").exists()}
    if missing and not retrain_missing and len(missing) == len(runs):
        raise ValueError(
            f"no model on this machine for the {len(missing)} final run(s) of {out / 'results.jsonl'} (final.pt in each run "
            "folder; models are not committed) and no analysis rows with these settings: analyse where the models are, "
            "or train them again (--retrain-missing, retrain_missing=True)"
        )
    new_rows: list[dict[str, Any]] = []
    data_cache: dict[str, Any] = {}
    for i, run in enumerate(runs):
        if run["run_dir"] in kept or (run["run_dir"] in missing and not retrain_missing):
            continue
        task = get_task(run["task"])
        if task.name not in data_cache:
            data_cache = {task.name: task.load(data_dir)}  # one task's data in memory at a time
        data = data_cache[task.name]
        if run["run_dir"] in missing:
            if progress:
                print(f"[{i + 1}/{len(runs)}] {run['task']} {run['arm']} seed {run['seed']}: training again (model not here)", flush=True)
            retrain_model(out, run, data, progress=progress)
        run_rows = _analyze_one(out, run, task, data, settings, extra_sites)
        new_rows += run_rows
        # every earlier row stays (rows of other settings, of runs outside this call, or made elsewhere
        # cannot always be made again); written after every run, so that a killed analysis resumes
        atomic_write_text(target / ANALYSIS, "".join(json.dumps(row, sort_keys=True) + "\n" for row in earlier + new_rows))
        if progress:
            sites_note = f", {sum(_site(r) != 'norm_out' for r in run_rows)} site rows" if extra_sites else ""
            layers = sum(_site(r) == "norm_out" for r in run_rows)
            print(f"[{i + 1}/{len(runs)}] {run['task']} {run['arm']} seed {run['seed']}: {layers} layers{sites_note}", flush=True)
    analysed = {**kept, **_rows_by_run(new_rows, settings)}
    rows = [row for r in runs for row in analysed.get(r["run_dir"], ())]
    if summary:
        _write_markdown(target, rows, noise_var, [r for r in runs if r["run_dir"] not in analysed])
    return rows


def _settings_key(row: dict[str, Any]) -> str:
    return json.dumps(row.get("analysis_settings", LEGACY_SETTINGS), sort_keys=True)


def _rows_by_run(rows: Sequence[dict[str, Any]], settings: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Run folder → its rows made with ``settings`` (rows written before settings were recorded
    count as :data:`LEGACY_SETTINGS`)."""
    wanted = json.dumps(settings, sort_keys=True)
    by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if _settings_key(row) == wanted:
            by_run[row["run_dir"]].append(row)
    return dict(by_run)


def merge_analysis_rows(out: Path, rows: Sequence[dict[str, Any]]) -> int:
    """Add to ``out``'s analysis.jsonl the rows of final runs of its results.jsonl that it has
    none for with the same settings, or has only from a model trained again (rows made where
    the run was trained, e.g. on a GPU machine whose models stay there, replace those); returns
    how many rows were added. Rows of runs the results file lacks are refused. Holds the
    folder's lock (:func:`~ibnorm.lab.experiments.results_file.folder_lock`), so that shards merging
    the analyses of their final runs at once keep each other's rows. ``analysis.md`` follows at
    the next analysis."""
    with folder_lock(out):
        return _merge_analysis_rows(out, rows)


def check_analysis_rows(rows: Sequence[Any], source: str | Path = "analysis rows") -> list[dict[str, Any]]:
    """``rows`` as a list, each an object with ``run_dir``, ``task``, ``arm``, ``seed`` and
    ``site``, else a ValueError naming ``source`` (the file they were read from) and the row."""
    rows = list(rows)
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not {"run_dir", "task", "arm", "seed", "site"} <= row.keys():
            raise ValueError(f"{source}: row {number} lacks one of run_dir, task, arm, seed, site: {str(row)[:120]}")
    return rows


def _read_analysis(folder: Path) -> list[dict[str, Any]]:
    """The rows of ``folder``/analysis.jsonl (none where it does not exist), each checked."""
    path = Path(folder) / ANALYSIS
    return check_analysis_rows(read_results_file(path), path) if path.exists() else []


def _merge_analysis_rows(out: Path, rows: Sequence[dict[str, Any]]) -> int:
    finals = {r["run_dir"] for r in read_results(out) if r["phase"] == "final"}
    rows = check_analysis_rows(rows)
    for row in rows:
        if row["run_dir"] not in finals:
            raise ValueError(f"analysis rows for run {row['run_dir']!r}, which is no final run of {Path(out) / 'results.jsonl'}")
    path = Path(out) / ANALYSIS
    existing = _read_analysis(out)
    incoming: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        incoming[(row["run_dir"], _settings_key(row))].append(row)
    present: dict[tuple[str, str], bool] = {}  # (run, settings) → whether its rows come from a retrained model
    for row in existing:
        key = (row["run_dir"], _settings_key(row))
        present[key] = present.get(key, True) and "retrained" in row
    replace = {k for k, group in incoming.items() if k not in present or (present[k] and not any("retrained" in r for r in group))}
    if not replace:
        return 0
    kept = [r for r in existing if (r["run_dir"], _settings_key(r)) not in replace]
    added = [r for k in replace for r in incoming[k]]
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept + added))
    return len(added)


# What `ibnorm analyze` (and `make results`) used before rows recorded their settings: rows
# without ``analysis_settings`` were made with these.
LEGACY_SETTINGS = {
    "max_examples": 2000,
    "seed": 0,
    "max_units": 256,
    "n_bins": 30,
    "noise_var": 0.2,
    "probe_epochs": 100,
    "sites": ["norm_out", "act_out", "block_out", "norm_in"],
    "max_values": 100_000,
}


def _analyze_one(
    out: Path, run: dict[str, Any], task: Any, data: Any, settings: dict[str, Any], extra_sites: Sequence[str]
) -> list[dict[str, Any]]:
    """The rows of one final run: its norm outputs' statistics and information estimates, and
    kurtosis/sparsity at ``extra_sites`` (the sites its model lacks are recorded in its norm_out
    rows as ``unavailable_sites``)."""
    model = parse_arm(run["arm"], task.parent).apply(task.build(data))
    _load_state(model, torch.load(out / run["run_dir"] / "final.pt", map_location="cpu", weights_only=True))
    inputs, labels, spatial = probe_set(task, data, settings["max_examples"])
    batch_size = 250 if task.kind != "lm" else 8
    layer_rows = information_plane(
        model,
        inputs,
        labels,
        forward=task.logits,
        spatial=spatial,
        max_units=settings["max_units"],
        max_examples=settings["max_examples"],
        batch_size=batch_size,
        seed=settings["seed"],
        n_bins=settings["n_bins"],
        noise_var=settings["noise_var"],
        relative_noise=True,
        probe_epochs=settings["probe_epochs"],
    )
    types = _layer_types(model)
    ident = {k: run[k] for k in ("task", "arm", "seed", "phase", "run_dir")}
    marker = out / run["run_dir"] / RETRAINED
    if marker.exists():  # this model was trained again here (retrain_model), not the run's own
        ident["retrained"] = json.loads(marker.read_text())
    found = find_sites(model, extra_sites) if extra_sites else None
    unavailable = dict(found.unavailable) if found else {}
    rows = []
    for lr in layer_rows:
        row = {
            **ident,
            "site": "norm_out",
            "layer_type": types.get(lr["layer"], ""),
            "spatial": spatial,
            "units": "bits",
            "unavailable_sites": unavailable,
            "analysis_settings": settings,
            **lr,
        }
        rows.append({k: finite_or_none(v) for k, v in row.items()})
    present = [site for site in extra_sites if found.modules[site]] if found else []
    if not present:
        return rows
    acts = capture_activations(
        model,
        inputs,
        sites=present,
        forward=task.logits,
        batch_size=batch_size,
        spatial="examples",
        max_units=settings["max_units"],
        max_examples=None,
        max_values=settings["max_values"],
        seed=settings["seed"],
    )
    depth: dict[str, int] = defaultdict(int)
    for key, values in acts.items():
        site, layer = split_site_key(key)
        row = {
            **ident,
            "site": site,
            "layer": layer,
            "layer_index": depth[site],
            "layer_type": types.get(layer, ""),
            "spatial": "examples",
            "max_values": settings["max_values"],
            "analysis_settings": settings,
            **activation_stats(values),
        }
        depth[site] += 1
        rows.append({k: finite_or_none(v) for k, v in row.items()})
    return rows


# =============================================================================== report
def _mean(values: Sequence[Any]) -> float:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.fmean(vals) if vals else float("nan")


def _site(row: dict[str, Any]) -> str:
    return row.get("site", "norm_out")  # rows written before sites existed are norm outputs


def summarize_analysis(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task, over the ``norm_out`` rows: ``{"layers": [names in depth order], "arms":
    {arm: {layer: {key: mean over seeds}}}, "seeds": {arm: n}, "sentences": [...]}``."""
    out: dict[str, dict[str, Any]] = {}
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if _site(r) == "norm_out":
            by_task[r["task"]].append(r)
    for task, trows in by_task.items():
        order: dict[str, int] = {}
        for r in trows:
            order.setdefault(r["layer"], r["layer_index"])
        layers = sorted(order, key=order.get)
        cells: dict[str, dict[str, dict[str, list]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
        seeds: dict[str, set] = defaultdict(set)
        for r in trows:
            seeds[r["arm"]].add(r["seed"])
            for key, _, _ in _REPORTED:
                cells[r["arm"]][r["layer"]][key].append(r.get(key))
        arms_sorted = sorted(cells, key=lambda a: (a != "parent", a))
        means = {arm: {layer: {k: _mean(v) for k, v in cells[arm][layer].items()} for layer in cells[arm]} for arm in arms_sorted}
        out[task] = {
            "layers": layers,
            "arms": means,
            "seeds": {arm: len(seeds[arm]) for arm in arms_sorted},
            "sentences": _sentences(means, {arm: len(seeds[arm]) for arm in arms_sorted}),
        }
    return out


def _direction(value: float, reference: float) -> str:
    if math.isnan(value) or math.isnan(reference):
        return "not comparable"
    if math.isclose(value, reference, rel_tol=1e-6, abs_tol=1e-9):
        return "equal"
    return "lower" if value < reference else "higher"


def _sentences(means: dict[str, dict[str, dict[str, float]]], seeds: dict[str, int]) -> list[str]:
    """For each non-parent arm: the measured direction of each quantity against the parent,
    averaged over the layers both have (a description of this measurement, nothing more)."""
    parent = means.get("parent")
    if parent is None:
        return ["no parent arm: no comparison."]
    sentences = []
    for arm, layers in means.items():
        if arm == "parent":
            continue
        shared = [layer for layer in layers if layer in parent]
        if not shared:
            sentences.append(f"{arm}: no layer in common with the parent; no comparison.")
            continue
        parts = []
        for key, _, name in _REPORTED:
            mine = _mean([layers[layer][key] for layer in shared])
            ref = _mean([parent[layer][key] for layer in shared])
            parts.append(f"{name} {_direction(mine, ref)} ({_fmt(mine)} vs {_fmt(ref)})")
        sentences.append(
            f"{arm} vs parent, mean over {len(shared)} layer(s) and {seeds[arm]} vs {seeds['parent']} seed(s): " + "; ".join(parts) + "."
        )
    return sentences


def _fmt(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.3f}"


def site_comparison(rows: Sequence[dict[str, Any]], confidence: float = CONFIDENCE) -> list[dict[str, Any]]:
    """Per task, site and arm (sites in :data:`~ibnorm.analysis.capture.SITES` order, the
    parent first): ``{"task", "site", "arm", "seeds", "layers", "spatial", "kurtosis",
    "hoyer", "near_zero_fraction", "paired"}``.

    For each run (task, site, arm, seed) a statistic is first averaged over the site's layers
    (those where it is finite), giving one value per seed; the arm's entry is the mean of
    these over its seeds. ``paired`` (None for the parent, and when there is no parent) maps
    ``kurtosis`` and ``hoyer`` to :func:`~ibnorm.analysis.stats.paired_comparison` of the
    arm's per-seed values against the parent's over the seeds both have (Δ = arm − parent;
    paired t-test, no interval or p for fewer than 3 seeds or zero-variance differences).
    Rows without a ``site`` count as ``norm_out``."""
    per_seed: dict[tuple[str, str, str], dict[int, dict[str, list]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    layers: dict[tuple[str, str, str], set] = defaultdict(set)
    spatial: dict[tuple[str, str, str], set] = defaultdict(set)
    for r in rows:
        cell = (r["task"], _site(r), r["arm"])
        layers[cell].add(r["layer"])
        spatial[cell].add(r.get("spatial", ""))
        for key in _SITE_MEANS:
            per_seed[cell][r["seed"]][key].append(r.get(key))
    averaged = {cell: {seed: {k: _mean(v) for k, v in stats.items()} for seed, stats in seeds.items()} for cell, seeds in per_seed.items()}
    out = []
    for task, site, arm in sorted(averaged, key=lambda c: (c[0], SITES.index(c[1]) if c[1] in SITES else len(SITES), c[2] != "parent", c[2])):
        mine = averaged[(task, site, arm)]
        parent = averaged.get((task, site, "parent"))
        paired = None
        if arm != "parent" and parent is not None:
            shared = sorted(set(mine) & set(parent))
            paired = {
                key: paired_comparison([mine[s][key] for s in shared], [parent[s][key] for s in shared], confidence) for key in _SITE_PAIRED
            }
        out.append(
            {
                "task": task,
                "site": site,
                "arm": arm,
                "seeds": len(mine),
                "layers": len(layers[(task, site, arm)]),
                "spatial": ", ".join(sorted(spatial[(task, site, arm)])),
                **{key: _mean([v[key] for v in mine.values()]) for key in _SITE_MEANS},
                "paired": paired,
            }
        )
    return out


def _signed(x: float) -> str:
    return f"{x:+.3f}"


def _paired_cell(result: dict[str, Any]) -> str:
    """``Δ [CI] p`` of one paired comparison for a table cell."""
    if result["delta"] is None:
        return f"– ({result['note']})"
    if result["p"] is None:
        return f"{_signed(result['delta'])} ({result['note']}, n={result['n']})"
    return f"{_signed(result['delta'])} [{_signed(result['ci_low'])}, {_signed(result['ci_high'])}] p={result['p']:.3g} (n={result['n']})"


def _paired_phrase(name: str, result: dict[str, Any]) -> str:
    """``"kurtosis higher (Δ +0.1, 95% CI [...], p = ...)"``: the measured direction in words."""
    delta = result["delta"]
    if delta is None:
        return f"{name} not compared ({result['note']})"
    direction = "higher" if delta > 0 else "lower" if delta < 0 else "equal"
    if result["p"] is None:
        return f"{name} {direction} (Δ {_signed(delta)}, {result['n']} paired seeds: {result['note']}, no test)"
    return (
        f"{name} {direction} (Δ {_signed(delta)}, 95% CI [{_signed(result['ci_low'])}, {_signed(result['ci_high'])}], "
        f"p = {result['p']:.3g}, {result['n']} paired seeds)"
    )


def _site_markdown(entries: Sequence[dict[str, Any]], unavailable: dict[str, str], max_values: Optional[int]) -> list[str]:
    """The per-site means table, the paired table, one sentence per site and the unavailable sites."""
    cap = f"at most {max_values} values per layer" if max_values else "a capped number of values per layer"
    md = [
        "### Kurtosis and sparsity by site",
        "",
        "Each statistic is averaged over the site's layers per seed, then over seeds. norm_out uses the rows above; "
        "the other sites use per-element values (every position of a feature map or sequence an example, channels "
        f"the units), a seeded uniform subsample of {cap}.",
        "",
        "| site | arm | layers | values | excess kurtosis | Hoyer | fraction \\|z\\| < 0.1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        values = ", ".join(_SPATIAL_WORDS.get(v, v) for v in e["spatial"].split(", "))
        md.append(
            f"| {e['site']} | {e['arm']} (n={e['seeds']}) | {e['layers']} | {values} | "
            + " | ".join(_fmt(e[k]) for k in _SITE_MEANS)
            + " |"
        )
    md += [
        "",
        "### Does IBNorm raise kurtosis and sparsity? (paired over seeds)",
        "",
        "Δ = arm − parent of the layer-averaged value, paired over the seeds both have: mean Δ, 95% t-interval and "
        "the paired t-test p (scipy.stats.ttest_rel); none for fewer than 3 paired seeds or zero-variance differences.",
        "",
        "| site | arm | Δ kurtosis [95% CI] p | Δ Hoyer [95% CI] p |",
        "|---|---|---|---|",
    ]
    compared = [e for e in entries if e["paired"] is not None]
    for e in compared:
        md.append(f"| {e['site']} | {e['arm']} | {_paired_cell(e['paired']['kurtosis'])} | {_paired_cell(e['paired']['hoyer'])} |")
    if not compared:
        md.append("| – | – | no parent arm, or no other arm: no comparison | |")
    md.append("")
    for site in dict.fromkeys(e["site"] for e in compared):
        parts = [
            f"{e['arm']}: " + ", ".join(_paired_phrase(n, e["paired"][k]) for k, n in (("kurtosis", "excess kurtosis"), ("hoyer", "Hoyer sparsity")))
            for e in compared
            if e["site"] == site
        ]
        md.append(f"- At the {_SITE_WORDS.get(site, site)} ({site}), measured against the parent: " + "; ".join(parts) + ".")
    md += [f"- {site} unavailable for this model: {reason}." for site, reason in unavailable.items()]
    return md + [""]


def _write_markdown(out: Path, rows: Sequence[dict[str, Any]], noise_var: float, left_out: Sequence[dict[str, Any]]) -> Path:
    summary = summarize_analysis(rows)
    sites = site_comparison(rows)
    unavailable: dict[str, dict[str, str]] = defaultdict(dict)
    for r in rows:
        for site, reason in (r.get("unavailable_sites") or {}).items():
            unavailable[r["task"]].setdefault(site, reason)
    md = [
        "# ibnorm representation analysis",
        "",
        f"{len(rows)} layer rows in `{ANALYSIS}`. All information quantities are in bits; I(X;T) is the kernel "
        f"(noise σ² = {noise_var:g} × the layer's total variance) pairwise upper bound on I(X; T + noise), bounded by "
        "log2(#probe examples); I(T;Y) kernel is Saxe et al.'s difference of bounds; the probe value is a "
        "linear-decoder lower bound (≤ H(Y)). Values are means over seeds.",
        "",
    ]
    if left_out:
        names = ", ".join(f"{r['task']} {r['arm']} seed {r['seed']}" for r in left_out)
        md += [f"Not analysed ({len(left_out)} final runs with neither their model on this machine nor rows with these settings; `--retrain-missing` trains them again): {names}.", ""]
    retrained = {r["run_dir"]: r["retrained"] for r in rows if "retrained" in r}
    if retrained:
        deltas = [v["abs_delta"] for v in retrained.values() if v.get("abs_delta") is not None]
        unmatched = len(retrained) - len(deltas)
        md += [
            f"{len(retrained)} runs were analysed from models trained again with their recorded task, arm, seed and "
            "configuration (their own models were not on the machine that analysed them); largest |Δ| of the task metric "
            f"against the recorded run: {_fmt(max(deltas)) if deltas else '–'}"
            + (f"; {unmatched} with a non-finite metric in one of the two (diverged)" if unmatched else "")
            + ".",
            "",
        ]
    for task, info in summary.items():
        md += [f"## {task}", "", "| arm | layer | " + " | ".join(h for _, h, _ in _REPORTED) + " |", "|---|---|" + "---|" * len(_REPORTED)]
        for arm, layers in info["arms"].items():
            for layer in info["layers"]:
                if layer in layers:
                    md.append(f"| {arm} (n={info['seeds'][arm]}) | {layer} | " + " | ".join(_fmt(layers[layer][k]) for k, _, _ in _REPORTED) + " |")
        md += [""] + [f"- {s}" for s in info["sentences"]] + [""]
        caps = {r.get("max_values") for r in rows if r["task"] == task and _site(r) != "norm_out"}
        md += _site_markdown([e for e in sites if e["task"] == task], unavailable.get(task, {}), max(caps) if caps else None)
        trows = [r for r in rows if r["task"] == task and _site(r) == "norm_out"]
        safe = task.replace(":", "_").replace("/", "_")
        for name, png in (
            ("plane", plot_information_plane(trows, title=f"{task}: information plane (mean over seeds)")),
            ("stats", plot_layer_stats(trows, title=f"{task}: activation statistics (mean over seeds)")),
        ):
            path = atomic_write_bytes(out / "plots" / f"analysis-{safe}-{name}.png", png)
            md += [f"![{task} {name}](plots/{path.name})", ""]
    return atomic_write_text(out / "analysis.md", "\n".join(md) + "\n")
