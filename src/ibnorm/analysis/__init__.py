"""Representation analysis: what normalization layers output, and how much information it carries.

- :mod:`~ibnorm.analysis.capture`: forward hooks collecting norm-layer outputs on a probe set,
  or by site: norm inputs and outputs, block outputs, activation-module outputs.
- :mod:`~ibnorm.analysis.stats`: kurtosis, Hoyer sparsity, near-zero and tail fractions, the
  seed-paired t-test; :class:`ActivationMonitor` for use during training.
- :mod:`~ibnorm.analysis.mutual_information`: binning, noise/kernel, variational-probe and
  kNN estimators of I(X;T) and I(T;Y), all in bits.
- :mod:`~ibnorm.analysis.information_plane`: per-layer estimates for a model.
- :mod:`~ibnorm.analysis.significance`: t-intervals, the seed-paired t-test, Holm's
  adjustment (:mod:`~ibnorm.analysis.student_t` holds the t distribution).

Everything here needs torch alone. Running the analysis over experiment folders
(``ibnorm analyze``) and plotting belong to the lab (:mod:`ibnorm.lab.analysis_run`).
"""

from __future__ import annotations

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
from .information_plane import information_plane, layer_information
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
from .stats import (
    ActivationMonitor,
    activation_stats,
    excess_kurtosis,
    hoyer_sparsity,
    near_zero_fraction,
    paired_comparison,
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
    "paired_comparison",
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
]

