"""Representation analysis: what normalization layers output, and how much information it carries.

- :mod:`~ibnorm.analysis.capture`: forward hooks collecting norm-layer outputs on a probe set,
  or by site: norm inputs and outputs, block outputs, activation-module outputs.
- :mod:`~ibnorm.analysis.stats`: kurtosis, Hoyer sparsity, near-zero and tail fractions, the
  seed-paired t-test; :class:`ActivationMonitor` for use during training.
- :mod:`~ibnorm.analysis.mutual_information`: binning, noise/kernel, variational-probe and
  kNN (scikit-learn) estimators of I(X;T) and I(T;Y), all in bits.
- :mod:`~ibnorm.analysis.information_plane`: per-layer estimates for a model and their plots.
- :mod:`~ibnorm.analysis.run_analysis`: :func:`analyze_run` over an ``ibnorm compare``
  output folder (``ibnorm analyze``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from .capture import (
    SITES,
    ActivationCapture,
    SiteMap,
    capture_activations,
    channel_dim,
    find_sites,
    is_activation,
    is_norm_layer,
    norm_layer_names,
    site_key,
    split_site_key,
)
from .information_plane import information_plane, layer_information, plot_information_plane, plot_layer_stats
from .mutual_information import (
    NATS_PER_BIT,
    bin_activations,
    binned_mutual_information,
    discrete_symbols,
    entropy_discrete,
    kernel_mutual_information,
    knn_mutual_information,
    knn_mutual_information_pairs,
    mutual_information_discrete,
    mutual_information_from_joint,
    probe_mutual_information,
    train_test_split,
)
from .run_analysis import analyze_run, find_out_folder, output_folder, site_comparison, summarize_analysis
from .stats import (
    ActivationMonitor,
    activation_stats,
    excess_kurtosis,
    hoyer_sparsity,
    near_zero_fraction,
    paired_difference,
    tail_mass,
)

__all__ = [
    "ActivationCapture",
    "capture_activations",
    "channel_dim",
    "is_norm_layer",
    "norm_layer_names",
    "SITES",
    "SiteMap",
    "find_sites",
    "is_activation",
    "site_key",
    "split_site_key",
    "ActivationMonitor",
    "activation_stats",
    "excess_kurtosis",
    "hoyer_sparsity",
    "near_zero_fraction",
    "tail_mass",
    "paired_difference",
    "NATS_PER_BIT",
    "entropy_discrete",
    "mutual_information_discrete",
    "mutual_information_from_joint",
    "discrete_symbols",
    "bin_activations",
    "binned_mutual_information",
    "kernel_mutual_information",
    "probe_mutual_information",
    "train_test_split",
    "knn_mutual_information",
    "knn_mutual_information_pairs",
    "layer_information",
    "information_plane",
    "plot_information_plane",
    "plot_layer_stats",
    "analyze_run",
    "find_out_folder",
    "output_folder",
    "summarize_analysis",
    "site_comparison",
    "main",
]


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """``ibnorm analyze RUN_DIR [--max-examples N] [--seed S] [--tasks ...] [--arms ...]
    [--sites SITE ... | all] [--max-values V]``: run :func:`analyze_run` and print where
    ``analysis.md`` is. Returns its path."""
    parser = argparse.ArgumentParser(
        prog="ibnorm analyze",
        description="Per-layer activation statistics and mutual-information estimates of the runs of an `ibnorm compare`",
    )
    parser.add_argument("run_dir", type=Path, help="an `ibnorm compare --out` folder, or one run folder inside it")
    parser.add_argument("--max-examples", type=int, default=2000, help="probe examples (token positions for LMs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", nargs="+", default=None)
    parser.add_argument("--arms", nargs="+", default=None)
    parser.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST idx files")
    parser.add_argument(
        "--sites",
        nargs="+",
        choices=SITES + ("all",),
        default=["all"],
        help="where to measure: norm inputs/outputs, block outputs, activation outputs; 'all' (default) for every site",
    )
    parser.add_argument("--max-values", type=int, default=100_000, help="values kept per layer at the added sites")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(None if argv is None else list(argv))
    analyze_run(
        args.run_dir,
        tasks=args.tasks,
        arms=args.arms,
        max_examples=args.max_examples,
        seed=args.seed,
        data_dir=args.data_dir,
        sites=SITES if "all" in args.sites else args.sites,
        max_values=args.max_values,
        progress=not args.no_progress,
    )
    target = output_folder(args.run_dir)
    path = target / "analysis.md"
    print(f"analysis: {path} (rows in {target / 'analysis.jsonl'}, plots in {target / 'plots'})")
    return path
