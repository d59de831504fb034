"""Representation analysis: estimators against known values, statistics against scipy, hooks
(shapes, caps, no leaks), the training monitor, and ``analyze_run`` end to end."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from ibnorm import IBBatchNorm2d, IBLayerNorm, IBRMSNorm
from ibnorm.analysis import (
    ActivationCapture,
    ActivationMonitor,
    activation_stats,
    bin_activations,
    binned_mutual_information,
    capture_activations,
    channel_dim,
    entropy_discrete,
    excess_kurtosis,
    hoyer_sparsity,
    information_plane,
    is_norm_layer,
    kernel_mutual_information,
    knn_mutual_information,
    knn_mutual_information_pairs,
    mutual_information_discrete,
    mutual_information_from_joint,
    near_zero_fraction,
    norm_layer_names,
    probe_mutual_information,
    tail_mass,
)
from ibnorm.analysis import student_t
from ibnorm.baselines import DyT, NormalBatchNorm, NormalLayerNorm
from ibnorm.lab.analysis_plots import plot_information_plane, plot_layer_stats
from ibnorm.lab.analysis_run import analyze_run
from ibnorm.lab.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The estimators run many tiny ops; on a shared 2-core machine one thread is much faster.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _mixture_entropy_bits(centers, weights, var):
    """Differential entropy (bits) of a 1-D Gaussian mixture by dense trapezoid quadrature."""
    sd = math.sqrt(var)
    xs = np.linspace(min(centers) - 12 * sd, max(centers) + 12 * sd, 400_001)
    dens = sum(w * np.exp(-((xs - c) ** 2) / (2 * var)) for c, w in zip(centers, weights)) / math.sqrt(2 * math.pi * var)
    safe = np.where(dens > 0, dens, 1.0)
    return float(-np.trapezoid(dens * np.log2(safe), xs))


# =============================================================================== estimators
def test_knn_estimator_matches_jointly_gaussian_mi():
    # The noise/kernel estimator targets I(X; T + noise) of a deterministic T, not the MI of a
    # continuous Gaussian pair, so this check uses the KSG kNN estimator.
    rng = np.random.default_rng(0)
    rhos = np.array([0.9, 0.7, 0.5])
    x = rng.standard_normal((2000, 3))
    t = x * rhos + rng.standard_normal((2000, 3)) * np.sqrt(1 - rhos**2)
    truth = float(np.sum(-0.5 * np.log2(1 - rhos**2)))
    estimate = knn_mutual_information_pairs(x, t, seed=0)
    assert abs(estimate - truth) < 0.1 * truth, (estimate, truth)
    # per-unit classif wrapper: a unit equal to the label (plus tiny noise) carries ~H(Y), a noise unit ~0
    y = rng.integers(0, 2, 2000)
    per_unit = knn_mutual_information(np.stack([y + 0.01 * rng.standard_normal(2000), rng.standard_normal(2000)], 1), y)
    assert per_unit.shape == (2,) and per_unit[0] > 0.9 and per_unit[1] < 0.05


def test_kernel_bounds_on_clustered_representation_with_known_mi():
    # T takes 4 values (equal mass); T + N(0, σ²) is a 4-component Gaussian mixture, whose
    # I(X; T̃) = H(mixture) − H(noise) is computed here by quadrature.
    centers, var = [-2.0, 0.0, 1.0, 3.0], 0.1
    t = np.repeat(centers, 50)
    y = np.repeat([0, 0, 1, 1], 50)
    h_noise = 0.5 * math.log2(2 * math.pi * math.e * var)
    exact_xt = _mixture_entropy_bits(centers, [0.25] * 4, var) - h_noise
    exact_ty = (
        _mixture_entropy_bits(centers, [0.25] * 4, var)
        - 0.5 * _mixture_entropy_bits(centers[:2], [0.5, 0.5], var)
        - 0.5 * _mixture_entropy_bits(centers[2:], [0.5, 0.5], var)
    )
    est = kernel_mutual_information(t, y, noise_var=var)
    assert est["I_XT_lower"] <= exact_xt <= est["I_XT"] <= math.log2(len(t))
    assert est["I_XT"] - exact_xt < 0.1 * exact_xt
    assert est["I_TY_lower"] <= exact_ty <= est["I_TY_upper"]
    assert est["noise_var"] == var

    # well separated relative to σ (σ² = 0.05): the I(T;Y) estimate is within 10% too
    var = 0.05
    exact_ty = (
        _mixture_entropy_bits(centers, [0.25] * 4, var)
        - 0.5 * _mixture_entropy_bits(centers[:2], [0.5, 0.5], var)
        - 0.5 * _mixture_entropy_bits(centers[2:], [0.5, 0.5], var)
    )
    est = kernel_mutual_information(t, y, noise_var=var)
    assert abs(est["I_TY"] - exact_ty) < 0.1 * exact_ty

    # relative noise is scale-free; identical points carry no information
    rng = np.random.default_rng(1)
    pts = rng.standard_normal((300, 5))
    a = kernel_mutual_information(pts, noise_var=0.2, relative=True)
    b = kernel_mutual_information(7.0 * pts, noise_var=0.2, relative=True)
    assert a["I_XT"] == pytest.approx(b["I_XT"], rel=1e-9) and 0 < a["I_XT"] < math.log2(300)
    assert kernel_mutual_information(np.ones((50, 3)))["I_XT"] == pytest.approx(0.0, abs=1e-12)


def test_discrete_and_binned_mi_are_exact():
    x = np.tile(np.arange(12), 5)
    assert mutual_information_discrete(x, x % 3) == pytest.approx(math.log2(3), abs=1e-6)
    assert mutual_information_discrete(x, x % 4) == pytest.approx(2.0, abs=1e-6)
    assert mutual_information_discrete(x, x) == pytest.approx(math.log2(12), abs=1e-6)
    assert entropy_discrete(x) == pytest.approx(math.log2(12), abs=1e-12)
    # a constructed joint table, enumerated: binary symmetric channel with flip probability 1/4
    counts = {(0, 0): 3, (0, 1): 1, (1, 0): 1, (1, 1): 3}
    a = np.array([k[0] for k, c in counts.items() for _ in range(c)])
    b = np.array([k[1] for k, c in counts.items() for _ in range(c)])
    h = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    assert mutual_information_discrete(a, b) == pytest.approx(1.0 - h, abs=1e-6)
    assert mutual_information_from_joint([[3, 1], [1, 3]]) == pytest.approx(1.0 - h, abs=1e-6)
    assert mutual_information_from_joint(np.outer([0.2, 0.8], [0.5, 0.3, 0.2])) == pytest.approx(0.0, abs=1e-12)
    # rows of a 2-D array are symbols
    pairs = np.stack([x % 2, x % 3], axis=1)  # (x mod 2, x mod 3) = x mod 6
    assert mutual_information_discrete(pairs, x % 6) == pytest.approx(math.log2(6), abs=1e-6)

    # binning: 4 distinct levels with 4 equal-width (or equal-mass) bins are recovered exactly
    levels = np.tile(np.arange(4.0), 25)
    for strategy in ("uniform", "quantile"):
        codes = bin_activations(levels, 4, strategy)
        assert mutual_information_discrete(codes[:, 0], levels) == pytest.approx(2.0, abs=1e-6)
        res = binned_mutual_information(np.stack([levels, 2 * levels], 1), levels % 2, n_bins=4, strategy=strategy)
        assert res["I_XT"] == pytest.approx(2.0, abs=1e-6)  # H(T_b): T deterministic, examples distinct
        assert res["I_TY"] == pytest.approx(1.0, abs=1e-6)
        assert res["H_T_given_Y"] == pytest.approx(1.0, abs=1e-6)
    assert bin_activations(np.random.default_rng(0).standard_normal((100, 3)), 30).max() <= 29


def test_probe_bound_never_exceeds_entropy_and_is_tight_when_known():
    rng = np.random.default_rng(0)
    # T = one-hot(Y) + small noise: I(T;Y) = H(Y) (non-uniform prior)
    y = rng.choice(4, size=1200, p=[0.4, 0.3, 0.2, 0.1])
    t = np.eye(4)[y] + 0.1 * rng.standard_normal((1200, 4))
    res = probe_mutual_information(t[:600], y[:600], t[600:], y[600:])
    assert res["I_TY"] <= res["H_Y"] and res["I_TY"] >= 0.9 * res["H_Y"]
    assert res["H_Y"] == pytest.approx(entropy_discrete(y[600:]))

    # two equal-variance Gaussian classes at ±1: logistic regression is the Bayes decoder,
    # I(T;Y) = H(T) − H(T|Y) by quadrature
    n = 6000
    y = rng.integers(0, 2, n)
    t = (2 * y - 1) + rng.standard_normal(n)
    truth = _mixture_entropy_bits([-1.0, 1.0], [0.5, 0.5], 1.0) - 0.5 * math.log2(2 * math.pi * math.e)
    res = probe_mutual_information(t[: n // 2], y[: n // 2], t[n // 2 :], y[n // 2 :])
    assert res["I_TY"] <= res["H_Y"] and abs(res["I_TY"] - truth) < 0.1 * truth, (res, truth)

    # uninformative features: clamped to [0, H(Y)]
    for seed in range(3):
        r = np.random.default_rng(seed)
        y = r.integers(0, 5, 200)
        res = probe_mutual_information(r.standard_normal((100, 20)), y[:100], r.standard_normal((100, 20)), y[100:])
        assert 0.0 <= res["I_TY"] <= res["H_Y"] and res["I_TY_raw"] <= res["H_Y"]


# =============================================================================== statistics
def test_kurtosis_matches_scipy_and_hoyer_extremes():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    data = np.concatenate([rng.standard_normal((500, 3)), rng.exponential(size=(500, 3)), rng.standard_t(5, (500, 3))], 1)
    np.testing.assert_allclose(excess_kurtosis(data, dim=0), stats.kurtosis(data, axis=0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(excess_kurtosis(torch.from_numpy(data.T), dim=1), stats.kurtosis(data.T, axis=1), rtol=1e-10)

    assert hoyer_sparsity(np.eye(7)[3]) == pytest.approx(1.0)
    assert hoyer_sparsity(-2.5 * np.eye(7)[0]) == pytest.approx(1.0)
    assert hoyer_sparsity(np.full(7, 3.0)) == pytest.approx(0.0, abs=1e-12)
    assert hoyer_sparsity(np.array([1.0, -1, 1, -1])) == pytest.approx(0.0, abs=1e-12)
    assert 0.0 < hoyer_sparsity(np.array([1.0, 0.5, 0, 0])) < 1.0
    np.testing.assert_allclose(hoyer_sparsity(np.stack([np.eye(5)[1], np.ones(5)]), dim=1), [1.0, 0.0], atol=1e-12)

    gauss = rng.standard_normal((20000, 5)) * 3 + 1
    assert near_zero_fraction(gauss) == pytest.approx(0.0797, abs=0.005)
    assert tail_mass(gauss) == pytest.approx(0.0027, abs=0.001)
    summary = activation_stats(np.concatenate([gauss[:1000], np.zeros((1000, 1))], 1))
    assert summary["dead_fraction"] == pytest.approx(1 / 6) and abs(summary["kurtosis"]) < 0.3
    assert summary["n_examples"] == 1000 and summary["n_units"] == 6


def _ksg_reference_nats(x, y, k):
    """Kraskov et al. 2004, estimator 1, written from the paper with loops, on x and y each
    divided by its (biased) standard deviation: ε_i the max-norm distance to the k-th
    neighbour, n_x / n_y the other points strictly closer than ε_i in x / in y."""
    from scipy.special import digamma

    x, y = x / x.std(), y / y.std()
    n = len(x)
    nx, ny = np.empty(n), np.empty(n)
    for i in range(n):
        dx, dy = np.abs(x - x[i]), np.abs(y - y[i])
        joint = np.maximum(dx, dy)
        joint[i] = np.inf
        eps = np.sort(joint)[k - 1]
        nx[i], ny[i] = np.sum(dx < eps) - 1, np.sum(dy < eps) - 1
    return max(0.0, digamma(n) + digamma(k) - digamma(nx + 1).mean() - digamma(ny + 1).mean())


def _ross_reference_nats(c, labels, k):
    """Ross 2014 with loops: per point of a label seen N_y ≥ 2 times, k_i = min(k, N_y − 1), d_i
    the distance to its k_i-th neighbour of the same label, m_i the points (itself included)
    strictly closer than d_i among all kept points."""
    from scipy.special import digamma

    counts = {v: int(np.sum(labels == v)) for v in np.unique(labels)}
    keep = np.array([counts[v] > 1 for v in labels])
    c, labels = c[keep], labels[keep]
    terms = []
    for i in range(len(c)):
        same = np.abs(c[labels == labels[i]] - c[i])
        k_i = min(k, counts[labels[i]] - 1)
        d = np.sort(same)[k_i]  # index 0 is the point itself
        m = np.sum(np.abs(c - c[i]) < d)
        terms.append(digamma(k_i) - digamma(counts[labels[i]]) - digamma(m))
    return max(0.0, digamma(len(c)) + float(np.mean(terms)))


def test_knn_estimators_match_references_written_from_the_papers_and_scikit_learn():
    """Continuous data (no ties: the 1e-10 jitter cannot reorder neighbours), the per-unit
    values in bits equal the loop references above and scikit-learn's estimators. (Labels
    seen a few times are left out of the scikit-learn check: for small groups it finds
    neighbours by brute force from ‖a‖² + ‖b‖² − 2ab, whose rounding moves points across
    the neighbour radius.)"""
    feature_selection = pytest.importorskip("sklearn.feature_selection")
    rng = np.random.default_rng(3)
    n = 300
    y = rng.integers(0, 4, n)
    y[:3] = 7  # a rare label
    y[3] = 9  # a label seen once: left out
    x = np.stack([y + rng.standard_normal(n), rng.standard_normal(n) * 5, np.sin(y) + 0.3 * rng.exponential(size=n)], 1)
    got = knn_mutual_information(x, y, n_neighbors=3)
    reference = [_ross_reference_nats(x[:, u], y, 3) / math.log(2) for u in range(3)]
    np.testing.assert_allclose(got, reference, rtol=1e-12, atol=1e-12)
    common = slice(4, None)
    sk = feature_selection.mutual_info_classif(x[common], y[common], discrete_features=False, n_neighbors=3, random_state=0)
    np.testing.assert_allclose(knn_mutual_information(x[common], y[common], n_neighbors=3), sk / math.log(2), rtol=1e-9, atol=1e-12)

    target = x[:, 0] + rng.standard_normal(n)
    got = knn_mutual_information(x, target, discrete_target=False, n_neighbors=4)
    reference = [_ksg_reference_nats(x[:, u], target, 4) / math.log(2) for u in range(3)]
    np.testing.assert_allclose(got, reference, rtol=1e-12, atol=1e-12)
    sk = feature_selection.mutual_info_regression(x, target, n_neighbors=4, random_state=0) / math.log(2)
    np.testing.assert_allclose(got, sk, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="n_neighbors"):
        knn_mutual_information(x, y, n_neighbors=0)


def test_quantile_bins_equal_numpys_quantiles_with_ties():
    """Equal-mass bin edges are numpy's (linear) quantiles value for value, so tied values
    (ReLU zeros, repeated levels) fall in the same bins as with ``np.searchsorted``."""
    rng = np.random.default_rng(5)
    for n, n_bins in ((7, 3), (100, 30), (391, 30), (50, 1)):
        t = np.maximum(rng.standard_normal((n, 4)), 0)
        t[:, 3] = rng.integers(0, 3, n)
        edges = np.quantile(t, np.arange(1, n_bins) / n_bins, axis=0)
        reference = np.stack([np.searchsorted(edges[:, u], t[:, u], side="right") for u in range(4)], 1)
        np.testing.assert_array_equal(bin_activations(t, n_bins, "quantile").numpy(), reference)


def test_student_t_against_closed_forms_and_scipy():
    stats = pytest.importorskip("scipy.stats")
    for t in (0.0, 1e-8, 0.3, 1.0, 4.3, 12.7, 1e3, -2.0):
        # ν = 1 (Cauchy) and ν = 2 have closed forms
        assert student_t.sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, rel=1e-13)
        assert student_t.sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), rel=1e-13)
    for df in (1, 2, 3, 4, 7, 29, 100, 2.5):
        for t in (-3.0, 0.2, 1.0, 2.5, 6.0, 40.0):
            assert student_t.sf(t, df) == pytest.approx(stats.t.sf(t, df), rel=1e-10)
        for q in (0.025, 0.3, 0.6, 0.9, 0.975, 0.995, 1 - 1e-9):
            assert student_t.ppf(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-10)
            assert student_t.sf(-student_t.ppf(q, df), df) == pytest.approx(q, rel=1e-12)
    assert student_t.ppf(0.5, 3) == 0.0 and student_t.sf(math.inf, 3) == 0.0
    with pytest.raises(ValueError, match="q must lie in"):
        student_t.ppf(1.0, 3)
    with pytest.raises(ValueError, match="df must be"):
        student_t.sf(1.0, 0)


# =============================================================================== hooks
class _ToyRMSNorm(nn.Module):  # a transformers-style RMSNorm, matched by its class name
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm1d(6)  # (N, 6, 8), channel-first
        self.ibbn = IBBatchNorm2d(6)  # (N, 6, 2, 4)
        self.fc = nn.Linear(48, 16)
        self.ln = nn.LayerNorm(16)
        self.ib = IBLayerNorm(16)
        self.rms = IBRMSNorm(4)  # (N, 4, 4), feature-last
        self.head = nn.Linear(16, 3)

    def stages(self, x):
        a = self.bn(self.conv(x))
        b = self.ibbn(a.relu().reshape(-1, 6, 2, 4))
        c = self.ln(self.fc(b.flatten(1)))
        d = self.ib(c)
        e = self.rms(d.reshape(-1, 4, 4))
        return {"bn": a, "ibbn": b, "ln": c, "ib": d, "rms": e}

    def forward(self, x):
        return self.head(self.stages(x)["rms"].flatten(1))


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_norm_layer_detection():
    for module in (nn.LayerNorm(4), nn.RMSNorm(4), nn.GroupNorm(2, 4), nn.BatchNorm2d(4), nn.InstanceNorm1d(4), IBLayerNorm(4), DyT(4), NormalLayerNorm(4), _ToyRMSNorm(4)):
        assert is_norm_layer(module), module
    for module in (NormalBatchNorm(4), IBBatchNorm2d(4), nn.BatchNorm1d(4), nn.GroupNorm(2, 4)):
        assert is_norm_layer(module) and channel_dim(module) == 1
    for module in (nn.LayerNorm(4), IBRMSNorm(4), DyT(4), _ToyRMSNorm(4)):
        assert channel_dim(module) == -1
    assert not is_norm_layer(nn.Linear(2, 2)) and not is_norm_layer(nn.ReLU())
    assert norm_layer_names(_Tiny()) == ["bn", "ibbn", "ln", "ib", "rms"]


def test_capture_shapes_values_caps_and_no_leaked_hooks():
    torch.manual_seed(0)
    model = _Tiny().eval()
    x = torch.randn(10, 2, 8)
    with torch.no_grad():
        ref = model.stages(x)
    expected = {
        "mean": {"bn": (10, 6), "ibbn": (10, 6), "ln": (10, 16), "ib": (10, 16), "rms": (10, 4)},
        "flatten": {"bn": (10, 48), "ibbn": (10, 48), "ln": (10, 16), "ib": (10, 16), "rms": (10, 16)},
        "examples": {"bn": (80, 6), "ibbn": (80, 6), "ln": (10, 16), "ib": (10, 16), "rms": (40, 4)},
    }
    for spatial, shapes in expected.items():
        acts = capture_activations(model, x, spatial=spatial, max_units=None, max_examples=None, batch_size=4)
        assert {k: tuple(v.shape) for k, v in acts.items()} == shapes
        assert all(v.dtype == torch.float32 for v in acts.values())
        assert _no_hooks(model)
    acts = capture_activations(model, x, max_units=None, max_examples=None)
    torch.testing.assert_close(acts["bn"], ref["bn"].mean(2))
    torch.testing.assert_close(acts["rms"], ref["rms"].mean(1))
    acts = capture_activations(model, x, spatial="examples", max_units=None, max_examples=None)
    torch.testing.assert_close(acts["bn"], ref["bn"].transpose(1, 2).reshape(-1, 6))
    torch.testing.assert_close(acts["rms"], ref["rms"].reshape(-1, 4))

    # caps: at most max_examples rows and max_units seeded units per layer
    with ActivationCapture(model, spatial="flatten", max_units=5, max_examples=7, seed=3) as cap:
        with torch.no_grad():
            for batch in x.split(4):
                model(batch)
    assert _no_hooks(model)
    acts = cap.activations
    for name, t in acts.items():
        assert t.shape == (7, 5) and t.numel() <= 7 * 5
        index = cap.unit_indices[name]
        assert index.tolist() == sorted(set(index.tolist())) and len(index) == 5
    torch.testing.assert_close(acts["ln"], ref["ln"][:7, cap.unit_indices["ln"]])
    torch.testing.assert_close(acts["bn"], ref["bn"].flatten(1)[:7, cap.unit_indices["bn"]])
    assert cap.total_units["bn"] == 48 and cap.total_units["ln"] == 16
    again = ActivationCapture(model, spatial="flatten", max_units=5, max_examples=7, seed=3)
    with again, torch.no_grad():
        model(x)
    assert all(torch.equal(again.unit_indices[n], cap.unit_indices[n]) for n in cap.names)

    # chosen layers by name/class; hooks are removed even when the forward fails
    only = capture_activations(model, x, layers=[nn.LayerNorm, "rms"], max_examples=None)
    assert sorted(only) == ["ln", "rms"]
    with pytest.raises(RuntimeError, match="boom"):
        with ActivationCapture(model):
            assert not _no_hooks(model)
            raise RuntimeError("boom")
    assert _no_hooks(model)
    with pytest.raises(ValueError):
        ActivationCapture(model, layers="nope")


def test_activation_monitor_every_k_steps_with_writer():
    torch.manual_seed(0)
    model = _Tiny().train()
    probe = torch.randn(32, 2, 8)

    class Writer:
        def __init__(self):
            self.calls = []

        def add_scalar(self, tag, value, step):
            self.calls.append((tag, value, step))

    writer = Writer()
    monitor = ActivationMonitor(model, probe, every=2, writer=writer, stats=("kurtosis", "hoyer"))
    running = model.bn.running_mean.clone()
    first = monitor.step(0)
    assert set(first) == {f"{n}/{s}" for n in ("bn", "ibbn", "ln", "ib", "rms") for s in ("kurtosis", "hoyer")}
    assert monitor.step(1) is None and monitor.step(2) is not None
    assert model.training and torch.equal(model.bn.running_mean, running) and _no_hooks(model)
    assert [h["step"] for h in monitor.history] == [0, 2]
    assert len(writer.calls) == 20 and writer.calls[0][0].startswith("activations/") and {c[2] for c in writer.calls} == {0, 2}


def test_activation_monitor_tensorboard(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    model = _Tiny()
    monitor = ActivationMonitor(model, torch.randn(8, 2, 8), every=1, log_dir=str(tmp_path))
    monitor.step(0)
    monitor.close()
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())


def test_information_plane_rows_and_plots():
    torch.manual_seed(0)
    model = _Tiny().eval()
    x = torch.randn(60, 2, 8)
    y = torch.arange(60) % 3
    rows = information_plane(model, x, y, max_examples=50, probe_epochs=20)
    assert [r["layer"] for r in rows] == ["bn", "ibbn", "ln", "ib", "rms"]
    for r in rows:
        assert r["n_examples"] == 50
        assert 0 <= r["I_XT_kernel_lower"] <= r["I_XT_kernel"] <= math.log2(50) + 1e-9
        assert 0 <= r["I_TY_probe"] <= r["H_Y"] and 0 <= r["I_XT_bin"] <= math.log2(50) + 1e-9
    rows = [dict(r, arm="parent") for r in rows] + [dict(r, arm="ib-L", I_XT_kernel=r["I_XT_kernel"] / 2) for r in rows]
    assert plot_information_plane(rows).startswith(PNG)
    assert plot_layer_stats(rows, stats=("kurtosis", "hoyer", "tail_mass_3sigma")).startswith(PNG)


# =============================================================================== end to end
@pytest.mark.slow  # a fresh process, a build or an export: seconds each
def test_analyze_run_end_to_end(tmp_path, capsys):
    from ibnorm.lab.experiments.compare import make_plans, run_plans

    plans = make_plans(["mnist1d-mlp"], ["parent", "ib-L"], seeds=2, steps=3, batch_size=16, eval_every=3, eval_items=100)
    results = run_plans(plans, tmp_path, progress=False)
    rows = analyze_run(tmp_path, max_examples=200, sites=("norm_out",))

    lines = (tmp_path / "analysis.jsonl").read_text().splitlines()
    assert len(lines) == len(rows) == 2 * 2 * 2  # arms × seeds × LayerNorms
    stored = [json.loads(line) for line in lines]
    assert {(r["arm"], r["seed"], r["layer"]) for r in stored} == {
        (a, s, layer) for a in ("parent", "ib-L") for s in (0, 1) for layer in ("net.1", "net.4")
    }
    assert {r["layer_type"] for r in stored if r["arm"] == "ib-L"} == {"IBLayerNorm"}
    assert {r["layer_type"] for r in stored if r["arm"] == "parent"} == {"LayerNorm"}
    for r in stored:
        assert r["n_examples"] == 200 and r["units"] == "bits"
        assert 0 <= r["I_XT_kernel"] <= math.log2(200) + 1e-9 and 0 <= r["I_TY_probe"] <= r["H_Y"]
        assert r["kurtosis"] is not None and r["hoyer"] is not None
    md = (tmp_path / "analysis.md").read_text()
    assert "| parent (n=2) | net.1 |" in md and "| ib-L (n=2) | net.4 |" in md
    assert "ib-L vs parent" in md and "kurtosis" in md
    for name in ("plane", "stats"):
        png = tmp_path / "plots" / f"analysis-mnist1d-mlp-{name}.png"
        assert png.read_bytes().startswith(PNG) and f"plots/{png.name}" in md

    # the CLI entry on one run folder writes into that folder and says where
    run_dir = tmp_path / results[0]["run_dir"]
    main(["analyze", str(run_dir), "--max-examples", "64", "--no-progress", "--sites", "norm_out"])
    path = run_dir.resolve() / "analysis.md"
    assert path.exists() and f"analysis: {path} " in capsys.readouterr().out
    assert len((run_dir / "analysis.jsonl").read_text().splitlines()) == 2
    assert len((tmp_path / "analysis.jsonl").read_text().splitlines()) == 8  # untouched
