"""The experiment engine: every task × arm trains, resume after a kill, DDP, reports, bad input."""

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ibnorm.lab.experiments import data as D
from ibnorm.lab.experiments.arms import DEFAULT_ARMS, parse_arm
from ibnorm.lab.experiments.compare import make_plans, run_plans, sweep_arms
from ibnorm.lab.experiments.results_file import read_results
from ibnorm.lab.experiments.report import summarize, write_report
from ibnorm.lab.experiments.tasks import get_task
from ibnorm.lab.experiments.train import INTERRUPT_ENV, TrainConfig, train_run


def _fmnist_available() -> bool:
    try:
        D.load_fashion_mnist()
    except FileNotFoundError:
        return False
    return True


def _austen_available() -> bool:
    try:
        D.load_austen_text()
    except (FileNotFoundError, ImportError):
        return False
    return True


TASKS = ["mnist1d-cnn", "mnist1d-mlp", "pydoc-gpt2", "pydoc-llama", "fmnist-resnet", "fmnist-vit", "austen-gpt2", "austen-llama"]
NEEDS = {"fmnist": _fmnist_available, "austen": _austen_available}


def _arms_for(task):
    parent = get_task(task).parent
    arms = []
    for spec in DEFAULT_ARMS:
        try:
            parse_arm(spec, parent)
        except ValueError:
            continue
        arms.append(spec)
    return arms


@pytest.mark.parametrize("task", TASKS)
def test_every_task_trains_three_steps_with_every_arm(task, tmp_path):
    for prefix, available in NEEDS.items():
        if task.startswith(prefix) and not available():
            pytest.skip(f"{prefix} data not installed (run `make data`)")
    arms = _arms_for(task)
    plans = make_plans([task], arms, seeds=1, steps=3, batch_size=8, eval_every=3, eval_items=256, final_items=256)
    rows = run_plans(plans, tmp_path, progress=False)
    assert sorted(r["arm"] for r in rows) == sorted(parse_arm(a, get_task(task).parent).name for a in arms)
    for r in rows:
        assert all(isinstance(v, float) and v == v for v in r["metrics"].values()), r["metrics"]
        assert r["metric"] in r["metrics"] and r["activation_bytes"] > 0 and r["step_time_s"] > 0
    expected = {"layer": {"dyt", "normalnorm"}, "batch": {"normalnorm"}, "rms": {"dyt"}}[get_task(task).parent]
    assert expected <= set(arms)


def _strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in ("step_time_s",)} for r in rows]


@pytest.mark.slow  # a fresh process, a build or an export: seconds each
def test_resume_after_kill_gives_the_same_results(tmp_path, monkeypatch):
    plans = make_plans(["mnist1d-mlp"], ["parent", "ib-L"], seeds=2, steps=40, batch_size=32, eval_every=10, eval_items=300, checkpoint_every=10)
    reference = run_plans(plans, tmp_path / "straight", progress=False)

    interrupted = tmp_path / "interrupted"
    monkeypatch.setenv(INTERRUPT_ENV, "mnist1d-mlp/ib-L/1:25")
    with pytest.raises(KeyboardInterrupt):
        run_plans(plans, interrupted, progress=False)
    finished = read_results(interrupted)
    assert [(r["arm"], r["seed"]) for r in finished] == [("parent", 0), ("parent", 1), ("ib-L", 0)]
    (checkpoint,) = (interrupted / "runs/mnist1d-mlp/ib-L").glob("final-seed1-*/checkpoint.pt")
    assert torch.load(checkpoint, weights_only=True)["step"] == 20

    monkeypatch.delenv(INTERRUPT_ENV)
    resumed = run_plans(plans, interrupted, progress=False)
    assert _strip_timing(resumed) == _strip_timing(reference)
    assert not checkpoint.exists()
    # running again trains nothing and changes nothing
    before = (interrupted / "results.jsonl").read_text()
    run_plans(plans, interrupted, progress=False)
    assert (interrupted / "results.jsonl").read_text() == before


def _ddp_worker(rank, world, port, task_name, arm, out_file):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        task = get_task(task_name)
        result = train_run(task, task.load(None), parse_arm(arm, task.parent), 0, _DDP_CONFIG, Path(out_file).parent / f"r{rank}", progress=False)
        if rank == 0:
            torch.save([p["train_loss"] for p in result["curve"]], out_file)
    finally:
        dist.destroy_process_group()


_DDP_CONFIG = TrainConfig(steps=6, batch_size=16, lr=1e-2, eval_every=1, checkpoint_every=1000, eval_items=64)


@pytest.mark.slow  # a fresh process, a build or an export: seconds each
@pytest.mark.parametrize("task,arm", [("mnist1d-cnn", "ib-L"), ("mnist1d-cnn", "parent"), ("mnist1d-mlp", "ib-T")])
def test_two_process_ddp_matches_one_process(task, arm, tmp_path):
    single = train_run(get_task(task), get_task(task).load(None), parse_arm(arm, get_task(task).parent), 0, _DDP_CONFIG, tmp_path / "single", progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_file = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, port, task, arm, str(out_file)), nprocs=2)
    ddp = torch.load(out_file)
    single_losses = [p["train_loss"] for p in single["curve"]]
    # same global batch and synchronized batch statistics: equal up to float32 reduction order
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(single_losses), rtol=1e-4, atol=1e-5)


def test_report_lists_every_arm_with_plots(tmp_path):
    arms = ["parent", "ib-L", "ib:T:0.5", "dyt"]
    plans = make_plans(["mnist1d-mlp"], arms, seeds=2, steps=6, batch_size=16, eval_every=3, eval_items=200)
    run_plans(plans, tmp_path, progress=False)
    report = write_report(tmp_path, "test report")
    text = report.read_text()
    for arm in arms:
        assert f"| {arm} |" in text
    assert "p=" in text and "step time" in text
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 and all(arm in page for arm in arms)
    assert (tmp_path / "plots/mnist1d-mlp-curves.png").stat().st_size > 1000
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {"task", "arm", "seed", "metrics", "step_time_s", "activation_bytes", "config", "versions"} <= set(rows[0])
    table = summarize(rows)["mnist1d-mlp"]
    assert [r["arm"] for r in table][0] == "parent" and all(r["n"] == 2 for r in table)


def test_sweep_arms_and_plot(tmp_path):
    arms = sweep_arms(["S", "T"], [0, 0.5, 2])
    assert arms == ["parent", "ib:S:0.5", "ib:S:2", "ib:T:0.5", "ib:T:2"]
    plans = make_plans(["mnist1d-mlp"], arms, seeds=1, steps=3, batch_size=16, eval_every=3, eval_items=100)
    run_plans(plans, tmp_path, progress=False)
    write_report(tmp_path)
    assert (tmp_path / "plots/mnist1d-mlp-sweep.png").exists()


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(tasks=["mnist9"], arms=["parent"]), ValueError, r"task='mnist9' is not known; accepted: \["),
        (dict(tasks=["mnist1d-cnn"], arms=["ib-Q"]), ValueError, r"compression='Q' is not registered"),
        (dict(tasks=["mnist1d-cnn"], arms=["ib:L:-1"]), ValueError, r"lam must be a finite real number >= 0, got -1"),
        (dict(tasks=["mnist1d-cnn"], arms=["ib:L:big"]), ValueError, r"lam 'big' is not a number"),
        (dict(tasks=["mnist1d-cnn"], arms=["dyt"]), ValueError, r"'dyt' replaces layer and rms norms only"),
        (dict(tasks=["mnist1d-cnn"], arms=["fancy"]), ValueError, r"arm='fancy' is not known; accepted"),
        (dict(tasks=["mnist1d-cnn"], arms=["parent"], steps=0), ValueError, r"steps must be a positive int, got 0"),
        (dict(tasks=["mnist1d-cnn"], arms=["parent"], tune_lr=1), ValueError, r"tune_lr must be 0"),
    ],
)
def test_bad_input_raises_before_training(kwargs, error, message):
    with pytest.raises(error, match=message):
        make_plans(**kwargs)


def test_missing_data_fails_before_any_training(tmp_path):
    plans = make_plans(["mnist1d-mlp", "fmnist-resnet"], ["parent"], seeds=1, steps=2)
    with pytest.raises(FileNotFoundError, match="make data|dataset-fashion-mnist"):
        run_plans(plans, tmp_path, data_dir=str(tmp_path / "nowhere"), progress=False)
    assert not (tmp_path / "results.jsonl").exists()


def test_analyze_records_information_plane_trajectories(tmp_path):
    plans = make_plans(["mnist1d-cnn"], ["parent", "ib-T"], seeds=1, steps=4, batch_size=16, eval_every=2, eval_items=100, analyze_every=2)
    rows = run_plans(plans, tmp_path, progress=False)
    for r in rows:
        assert [p["step"] for p in r["curve"]] == [2, 4]
        layers = r["curve"][-1]["layers"]
        assert len(layers) == 3 and all({"I_XT_kernel", "I_TY_kernel", "kurtosis", "hoyer"} <= set(layer) for layer in layers)
    write_report(tmp_path)
    assert (tmp_path / "plots/mnist1d-cnn-information-plane.png").stat().st_size > 1000
    assert (tmp_path / "plots/mnist1d-cnn-layer-stats.png").exists()


def test_rows_name_the_commit_of_their_code():
    """Each row's versions name the git commit of the ibnorm source that made it (with
    "+modified" for uncommitted changes), where that source is a git checkout."""
    import re
    import subprocess

    from ibnorm.lab.experiments import compare

    package = Path(compare.__file__).resolve().parents[2]
    if subprocess.run(["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("ibnorm is not running from a git checkout")
    assert re.fullmatch(r"[0-9a-f]{12}(\+modified)?", compare._versions()["ibnorm_commit"])


@pytest.mark.parametrize("text,expected", [("0/1", (0, 1)), ("3/4", (3, 4))])
def test_shards_parse(text, expected):
    from ibnorm.lab.experiments.compare import Shard

    assert Shard.parse(text) == expected


@pytest.mark.parametrize("text", ["4/4", "-1/2", "1", "a/b", "1/0", "0/2/3"])
def test_bad_shards_are_refused(text):
    from ibnorm.lab.experiments.compare import Shard

    with pytest.raises(ValueError, match="shard must be K/N"):
        Shard.parse(text)


_SHARD_RUN = """
import sys
from ibnorm.lab.experiments import compare
compare.TUNE_POLL_SECONDS = 0.1
plans = compare.make_plans(["mnist1d-mlp"], ["parent", "ib-T"], seeds=2, steps=2, batch_size=8, eval_every=2, eval_items=64, tune_lr=3)
compare.run_plans(plans, sys.argv[1], progress=False, shard=compare.Shard.parse(sys.argv[2]))
"""


@pytest.mark.slow
def test_shards_run_at_once_make_the_runs_of_one_process(tmp_path):
    """Two shards in two processes at once on one folder: together exactly the runs of an
    unsharded command (none lost to a concurrent append, none twice), with the same tuned
    rates; the shard whose final runs need the other's tuning waits for it."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda out, shard: subprocess.Popen([sys.executable, "-c", _SHARD_RUN, str(out), shard], env=env)  # noqa: E731
    assert run(tmp_path / "one", "0/1").wait(timeout=300) == 0
    shards = [run(tmp_path / "two", f"{k}/2") for k in range(2)]
    assert [p.wait(timeout=300) for p in shards] == [0, 0]
    key = lambda r: (r["arm"], r["phase"], r["seed"], r["config"]["lr"], r["metrics"]["val_acc"])  # noqa: E731
    sharded, reference = read_results(tmp_path / "two"), read_results(tmp_path / "one")
    assert len(sharded) == 2 * 3 + 2 * 2 and sorted(map(key, sharded)) == sorted(map(key, reference))


def test_merge_adds_only_the_runs_a_results_file_lacks(tmp_path):
    from ibnorm.lab.experiments.results_file import merge_results

    def row(arm, seed, phase="final", value=1.0):
        return {"task": "t", "arm": arm, "seed": seed, "phase": phase, "config_key": "k", "value": value}

    assert merge_results(tmp_path, [row("parent", 0), row("ib", 0)]) == 2
    incoming = [row("ib", 0, value=2.0), row("ib", 1), row("ib", 1), row("ib", 0, phase="tune")]
    assert merge_results(tmp_path, incoming) == 2
    got = read_results(tmp_path)
    assert [(r["arm"], r["seed"], r["phase"], r["value"]) for r in got] == [
        ("parent", 0, "final", 1.0), ("ib", 0, "final", 1.0), ("ib", 1, "final", 1.0), ("ib", 0, "tune", 1.0)
    ]
    assert merge_results(tmp_path, incoming) == 0


def _tune_rows(plan, arm, scores, seed):
    from dataclasses import replace

    from ibnorm.lab.experiments import compare

    grid = compare._lr_grid(plan.config.lr, plan.tune_lr)
    return [
        {"task": plan.task.name, "arm": arm.name, "seed": seed, "phase": "tune", "config_key": compare._config_key(replace(plan.config, lr=lr), arm), "metrics": {"val_acc": v}}
        for lr, v in zip(grid, scores)
    ]


def test_a_final_run_waits_for_the_tuning_of_its_first_seed_and_takes_the_first_best_rate(tmp_path, monkeypatch):
    from ibnorm.lab.experiments import compare

    (plan,) = make_plans(["mnist1d-mlp"], ["parent"], seeds=2, steps=2, tune_lr=3, first_seed=7)
    arm = plan.arms[0]
    grid = compare._lr_grid(plan.config.lr, plan.tune_lr)
    stale = _tune_rows(plan, arm, [99.0, 1.0, 1.0], seed=0)  # another first seed's tuning: not this plan's
    rows = _tune_rows(plan, arm, [50.0, 60.0, 60.0], seed=7)
    later = [dict(rows[1], metrics={"val_acc": 0.0})]  # a second row of the same run: the first one counts
    states = iter([stale + rows[:1], stale + rows[:2], stale + rows + later])
    sleeps = []
    monkeypatch.setattr(compare, "read_results", lambda out: next(states))
    monkeypatch.setattr(compare.time, "sleep", sleeps.append)
    assert compare._tuned_lr(tmp_path, plan, arm) == grid[1]  # 60 twice: the first in grid order
    assert len(sleeps) == 2


def test_a_final_run_gives_up_on_tuning_that_never_appears(tmp_path, monkeypatch):
    from ibnorm.lab.experiments import compare

    (plan,) = make_plans(["mnist1d-mlp"], ["parent"], seeds=1, steps=2, tune_lr=2)
    monkeypatch.setattr(compare, "TUNE_WAIT_SECONDS", 0.0)
    monkeypatch.setattr(compare.time, "sleep", lambda s: None)
    with pytest.raises(RuntimeError, match="1 rate-tuning runs did not appear .* is every shard of this command running"):
        monkeypatch.setattr(compare, "read_results", lambda out: _tune_rows(plan, plan.arms[0], [50.0], seed=0))
        compare._tuned_lr(tmp_path, plan, plan.arms[0])
