"""SyncIBBatchNorm against a single process on the concatenated batch.

Two real processes (``torch.distributed`` with gloo on 127.0.0.1) each run several
configurations on their share of a global batch; the parent compares what they report
with an :class:`ibnorm.IBBatchNorm2d` that sees the whole batch. One spawn serves every
configuration (a module-scoped fixture), so the per-configuration tests only compare. The
single process's first output is itself checked against IBNorm written in the tests.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import ibnorm
import references

WORLD_SIZE = 2
CHANNELS = 3
GLOBAL_BATCH = 8
SPATIAL = (5, 5)
STEPS = 3
LR = 0.1
ATOL = 1e-10
RTOL = 1e-10
DTYPE = torch.float64

# name -> layer keyword arguments (besides num_features and dtype)
CONFIGS = {
    "S": dict(compression="S", lam=0.7),
    "L": dict(compression="L", lam=0.7),
    "T": dict(compression="T", lam=0.7),
    "lam0": dict(compression="L", lam=0.0),
    "learnable": dict(compression="L", lam=0.5, learnable_lam=True),
    "momentum_none": dict(compression="T", lam=0.7, momentum=None),
    "standardized": dict(compression="S", lam=0.7, placement="standardized"),
}
# name -> samples per rank (must sum to GLOBAL_BATCH)
SPLITS = {"even": (4, 4), "uneven": (3, 5)}
BUFFERS = ("running_mean", "running_var", "running_mean_psi", "running_var_psi", "num_batches_tracked")


# ---------------------------------------------------------------------------
# shared, deterministic data and models (identical in parent and children)
# ---------------------------------------------------------------------------


def _case_seed(config: str, split: str) -> int:
    return 1000 * list(CONFIGS).index(config) + 10 * list(SPLITS).index(split) + 7


def _make_data(seed: int) -> dict[str, list[torch.Tensor]]:
    """Per-step global inputs and upstream gradients, plus one eval input.

    Channels get different scales and shifts so that the statistics are far from (0, 1).
    """
    gen = torch.Generator().manual_seed(seed)
    shape = (GLOBAL_BATCH, CHANNELS) + SPATIAL
    scale = (torch.rand(1, CHANNELS, 1, 1, generator=gen, dtype=DTYPE) * 2 + 0.5)
    shift = torch.randn(1, CHANNELS, 1, 1, generator=gen, dtype=DTYPE) * 3
    xs = [torch.randn(shape, generator=gen, dtype=DTYPE) * scale + shift for _ in range(STEPS)]
    # a heavy-tailed element per step so that ψ actually compresses something
    for x in xs:
        x[0, 0, 0, 0] += 10.0
    gs = [torch.randn(shape, generator=gen, dtype=DTYPE) for _ in range(STEPS)]
    x_eval = torch.randn(shape, generator=gen, dtype=DTYPE) * scale + shift
    return {"x": xs, "g": gs, "x_eval": [x_eval]}


def _init_params(layer: nn.Module, seed: int) -> None:
    """Non-trivial γ and β, identical wherever the same seed is used."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(CHANNELS, generator=gen, dtype=DTYPE) + 0.5)
        layer.bias.copy_(torch.randn(CHANNELS, generator=gen, dtype=DTYPE))


def _param_names(config: str) -> list[str]:
    return ["weight", "bias"] + (["lam_raw"] if CONFIGS[config].get("learnable_lam") else [])


def _run_steps(layer: nn.Module, xs, gs, x_eval, config: str, reduce_grad=None) -> dict:
    """STEPS training steps (forward, backward, SGD with the (reduced) grads), then eval."""
    params = dict(layer.named_parameters())
    out: dict = {"y": [], "x_grad": [], "param_grad": {n: [] for n in _param_names(config)}, "lam": []}
    layer.train()
    for x, g in zip(xs, gs):
        x = x.clone().requires_grad_(True)
        for p in params.values():
            p.grad = None
        y = layer(x)
        (y * g).sum().backward()
        out["y"].append(y.detach().clone())
        out["x_grad"].append(x.grad.detach().clone())
        for name in _param_names(config):
            grad = params[name].grad.detach().clone()
            if reduce_grad is not None:
                reduce_grad(grad)
            out["param_grad"][name].append(grad)
        with torch.no_grad():
            for name in _param_names(config):
                params[name].sub_(LR * out["param_grad"][name][-1])
        out["lam"].append(float(layer.lam_value()))
    out["buffers"] = {name: getattr(layer, name).detach().clone() for name in BUFFERS}
    layer.eval()
    with torch.no_grad():
        out["y_eval"] = layer(x_eval).detach().clone()
    out["params_final"] = {name: p.detach().clone() for name, p in params.items()}
    return out


def _reference(config: str, split: str) -> dict:
    seed = _case_seed(config, split)
    data = _make_data(seed)
    layer = ibnorm.IBBatchNorm2d(CHANNELS, dtype=DTYPE, **CONFIGS[config])
    _init_params(layer, seed)
    return _run_steps(layer, data["x"], data["g"], data["x_eval"][0], config)


# ---------------------------------------------------------------------------
# the distributed worker
# ---------------------------------------------------------------------------


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60)
    )
    try:
        results = {}
        for split, sizes in SPLITS.items():
            start = sum(sizes[:rank])
            local = slice(start, start + sizes[rank])
            for config in CONFIGS:
                seed = _case_seed(config, split)
                data = _make_data(seed)
                layer = ibnorm.SyncIBBatchNorm(CHANNELS, dtype=DTYPE, **CONFIGS[config])
                _init_params(layer, seed)
                assert layer._process_group() is dist.group.WORLD
                results[(config, split)] = _run_steps(
                    layer,
                    [x[local] for x in data["x"]],
                    [g[local] for g in data["g"]],
                    data["x_eval"][0][local],
                    config,
                    reduce_grad=lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM),
                )
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if not dist.is_gloo_available():
        pytest.skip("gloo backend is not available")
    out_dir = tmp_path_factory.mktemp("sync_ibbn")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------
# 1 + 2. distributed equals single process on the concatenated batch
# ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_sync_matches_single_process(rank_results, config, split):
    ref = _reference(config, split)
    layer = ibnorm.IBBatchNorm2d(CHANNELS, dtype=DTYPE, **CONFIGS[config])
    _init_params(layer, _case_seed(config, split))
    lam = None if CONFIGS[config]["lam"] == 0 else torch.tensor(layer.lam_value(), dtype=DTYPE)  # λ = 0: the parent norm
    first, _ = references.ib_norm(
        "batch", _make_data(_case_seed(config, split))["x"][0], layer.weight.detach(), layer.bias.detach(), lam,
        layer.compression, layer.placement, eps=layer.eps,
    )
    _close(ref["y"][0], first, "single-process output at step 0 against the reference")
    sizes = SPLITS[split]
    ranks = [r[(config, split)] for r in rank_results]
    bounds = [sum(sizes[:r]) for r in range(WORLD_SIZE + 1)]

    for step in range(STEPS):
        for r, res in enumerate(ranks):
            local = slice(bounds[r], bounds[r + 1])
            assert res["y"][step].shape[0] == sizes[r]
            _close(res["y"][step], ref["y"][step][local], f"rank {r} output, step {step}")
            _close(res["x_grad"][step], ref["x_grad"][step][local], f"rank {r} input grad, step {step}")
            for name in _param_names(config):
                _close(
                    res["param_grad"][name][step],
                    ref["param_grad"][name][step],
                    f"rank {r} all-reduced {name} grad, step {step}",
                )
            assert res["lam"][step] == pytest.approx(ref["lam"][step], abs=ATOL)

    for r, res in enumerate(ranks):
        local = slice(bounds[r], bounds[r + 1])
        for name in BUFFERS:
            if name == "num_batches_tracked":
                assert int(res["buffers"][name]) == int(ref["buffers"][name]) == STEPS
            else:
                _close(res["buffers"][name], ref["buffers"][name], f"rank {r} {name}")
        for name, value in ref["params_final"].items():
            _close(res["params_final"][name], value, f"rank {r} final {name}")
        _close(res["y_eval"], ref["y_eval"][local], f"rank {r} eval output")

    if CONFIGS[config].get("lam") == 0.0:
        # λ = 0: the ψ buffers are left alone (u = z), on every rank as in the reference.
        fresh = ibnorm.IBBatchNorm2d(CHANNELS, dtype=DTYPE, **CONFIGS[config])
        for res in ranks:
            for name in ("running_mean_psi", "running_var_psi"):
                torch.testing.assert_close(res["buffers"][name], getattr(fresh, name), atol=0, rtol=0)
    else:
        # the ψ statistics really moved (otherwise the buffer comparison would be vacuous)
        fresh = ibnorm.IBBatchNorm2d(CHANNELS, dtype=DTYPE, **CONFIGS[config])
        assert not torch.allclose(ref["buffers"]["running_var_psi"], fresh.running_var_psi)


@pytest.mark.slow
def test_ranks_agree_bitwise_on_shared_state(rank_results):
    """Every rank ends with the same buffers and parameters (the all-reduce is symmetric)."""
    for key in rank_results[0]:
        a, b = rank_results[0][key], rank_results[1][key]
        for name in BUFFERS:
            assert torch.equal(a["buffers"][name], b["buffers"][name]), (key, name)
        for name in a["params_final"]:
            assert torch.equal(a["params_final"][name], b["params_final"][name]), (key, name)


@pytest.mark.slow
def test_sync_differs_from_local_batch_stats(rank_results):
    """Sanity check that synchronization matters: a plain layer on rank 0's half alone
    gives a different output from what the synchronized rank 0 produced."""
    config, split = "L", "uneven"
    seed = _case_seed(config, split)
    data = _make_data(seed)
    layer = ibnorm.IBBatchNorm2d(CHANNELS, dtype=DTYPE, **CONFIGS[config])
    _init_params(layer, seed)
    local = layer(data["x"][0][: SPLITS[split][0]]).detach()
    assert not torch.allclose(local, rank_results[0][(config, split)]["y"][0], atol=1e-3)


# ---------------------------------------------------------------------------
# 3. convert_sync_ibbatchnorm keeps the very same state
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(compression="T", lam=0.3),
        dict(compression="S", lam=0.5, learnable_lam=True),
        dict(compression="L", lam=0.0, momentum=None, eps=1e-3),
    ],
    ids=["T-fixed", "S-learnable", "L-lam0-momentum-none"],
)
def test_convert_sync_ibbatchnorm_keeps_state(kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, CHANNELS, 3, padding=1), ibnorm.IBBatchNorm2d(CHANNELS, **kwargs), nn.ReLU()
    )
    model.train()
    model(torch.randn(4, 2, 5, 5))  # move the running buffers away from their initial values
    model.eval()
    old = model[1]
    conv = model[0]
    params = dict(old.named_parameters())
    buffers = dict(old.named_buffers())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 2, 5, 5)
    with torch.no_grad():
        y_before = model(x)

    converted = ibnorm.convert_sync_ibbatchnorm(model)
    assert converted is model
    new = model[1]
    assert type(new) is ibnorm.SyncIBBatchNorm
    assert model[0] is conv and type(model[2]) is nn.ReLU
    assert new.process_group is None
    assert new.training is False
    assert new.compression == old.compression == kwargs["compression"]
    assert new.lam_value() == pytest.approx(old.lam_value(), abs=1e-7)
    assert new.learnable_lam == kwargs.get("learnable_lam", False)
    assert (new.num_features, new.eps, new.momentum, new.affine, new.track_running_stats) == (
        old.num_features,
        old.eps,
        old.momentum,
        old.affine,
        old.track_running_stats,
    )
    new_params = dict(new.named_parameters())
    new_buffers = dict(new.named_buffers())
    assert set(new_params) == set(params)
    assert set(new_buffers) == set(buffers) == set(BUFFERS)
    for name, p in params.items():
        assert new_params[name] is p, name
    for name, b in buffers.items():
        assert new_buffers[name] is b, name
    if kwargs.get("learnable_lam"):
        assert new.lam_raw is old.lam_raw
    assert model.state_dict().keys() == state.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():
        assert torch.equal(model(x), y_before)


def test_convert_sync_ibbatchnorm_root_and_training_flag():
    old = ibnorm.IBBatchNorm2d(CHANNELS, compression="S", lam=0.9)
    old.train()
    new = ibnorm.convert_sync_ibbatchnorm(old)
    assert type(new) is ibnorm.SyncIBBatchNorm and new is not old
    assert new.training is True
    assert new.weight is old.weight and new.running_var_psi is old.running_var_psi
    # an already synchronized layer is left as it is
    assert ibnorm.convert_sync_ibbatchnorm(new) is new


# ---------------------------------------------------------------------------
# 4. without a process group it is a plain batch layer
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["L", "learnable", "lam0"])
def test_sync_without_process_group_is_plain_batch_norm(config):
    assert not dist.is_initialized()
    seed = _case_seed(config, "even")
    data = _make_data(seed)
    plain = ibnorm.IBBatchNorm2d(CHANNELS, dtype=DTYPE, **CONFIGS[config])
    sync = ibnorm.SyncIBBatchNorm(CHANNELS, dtype=DTYPE, **CONFIGS[config])
    _init_params(plain, seed)
    _init_params(sync, seed)
    assert sync._process_group() is None
    a = _run_steps(plain, data["x"], data["g"], data["x_eval"][0], config)
    b = _run_steps(sync, data["x"], data["g"], data["x_eval"][0], config)
    for step in range(STEPS):
        assert torch.equal(a["y"][step], b["y"][step])
        assert torch.equal(a["x_grad"][step], b["x_grad"][step])
        for name in _param_names(config):
            assert torch.equal(a["param_grad"][name][step], b["param_grad"][name][step]), name
    for name in BUFFERS:
        assert torch.equal(a["buffers"][name], b["buffers"][name]), name
    assert torch.equal(a["y_eval"], b["y_eval"])


def test_sync_without_process_group_float32():
    assert not dist.is_initialized()
    torch.manual_seed(3)
    x = torch.randn(6, CHANNELS, 4, 4) * 2 + 1
    plain = ibnorm.IBBatchNorm2d(CHANNELS, compression="T", lam=0.7)
    sync = ibnorm.SyncIBBatchNorm(CHANNELS, compression="T", lam=0.7)
    y_plain, y_sync = plain(x), sync(x)
    assert y_sync.dtype == torch.float32
    assert torch.equal(y_plain, y_sync)
    for name in BUFFERS:
        assert torch.equal(getattr(plain, name), getattr(sync, name)), name
