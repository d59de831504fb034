"""The fair protocol: weight-decay groups, final evaluation and the generalization gap,
validation-only choices, the campaign plan and its `best:<placement>` resolution."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from ibnorm.baselines import convert_to_dyt
from ibnorm.convert import convert_norms
from ibnorm.lab.experiments import campaign as C
from ibnorm.lab.experiments.compare import sweep_arms
from ibnorm.lab.experiments.tasks import get_task
from ibnorm.lab.experiments.train import final_evaluation, parameter_groups


def test_weight_decay_skips_every_parameter_with_at_most_one_dim():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Conv1d(8, 8, 3), nn.BatchNorm1d(8), nn.Linear(8, 2, bias=False))
    model, _ = convert_norms(model, "L", 1.0, learnable_lam=True)
    model, _ = convert_to_dyt(nn.Sequential(model, nn.LayerNorm(2)))
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])
    assert decayed == ["0.0.weight", "0.2.weight", "0.4.weight"]  # the Linear/Conv kernels only
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert {"0.1.lam_raw", "0.3.lam_raw", "0.1.weight", "0.1.bias", "0.0.bias"} <= undecayed
    assert any(n.endswith("alpha") for n in undecayed)  # DyT's α
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_final_evaluation_covers_whole_splits_and_measures_the_gap():
    task = get_task("mnist1d-mlp")
    data = task.load(None)
    torch.manual_seed(0)
    model = task.build(data)
    metrics = final_evaluation(task, model, data, None)
    x_test, y_test = data.test
    x_train, y_train = data.train
    with torch.no_grad():
        model.eval()
        test_loss = nn.functional.cross_entropy(model(x_test), y_test).item()
        heldin = nn.functional.cross_entropy(model(x_train[: len(x_test)]), y_train[: len(x_test)]).item()
        accuracy = 100.0 * (model(x_test).argmax(-1) == y_test).float().mean().item()
    assert metrics["test_loss"] == pytest.approx(test_loss, rel=1e-5)
    assert metrics["heldin_loss"] == pytest.approx(heldin, rel=1e-5)
    assert metrics["gen_gap"] == pytest.approx(test_loss - heldin, rel=1e-4, abs=1e-6)
    assert metrics["test_acc"] == pytest.approx(accuracy)
    assert "val_acc" in metrics and task.evaluated_items(data, "test", None) == len(x_test)


def test_lm_final_evaluation_reads_whole_windows_of_the_whole_split():
    task = get_task("pydoc-llama")
    data = task.load(None)
    n = task.evaluated_items(data, "test", None)
    assert n % task.block_size == 0 and len(data["test"]) - task.block_size - 1 < n <= len(data["test"]) - 1
    assert task.evaluated_items(data, "test", 1000) == (1000 // task.block_size) * task.block_size


def test_sweep_arms_cover_both_placements_and_keep_lambda_exact():
    arms = sweep_arms(["L"], [0, 0.1, 1 / 3], ["standardized", "centered"])
    assert arms == ["parent", "ib:L:0.1", "ib:L:0.3333333333333333", "ib:L:0.1:centered", "ib:L:0.3333333333333333:centered"]
    assert float(arms[2].split(":")[2]) == 1 / 3


def _row(arm, seed, val, test, placement="standardized", higher=True, kind="ib"):
    return {
        "task": "t",
        "arm": arm,
        "seed": seed,
        "phase": "final",
        "config_key": f"{arm}-10",
        "metric": "test_acc",
        "higher_is_better": higher,
        "metrics": {"val_acc": val, "test_acc": test},
        "arm_spec": {"kind": kind, "placement": placement, "learnable_lam": False},
        "parent": "batch",
        "config": {"steps": 10, "batch_size": 8, "lr": 1e-3},
        "step_time_s": 0.01,
        "activation_bytes": 1000,
        "curve": [],
    }


SWEEP_GRID = ["--families", "S", "L", "T", "--lams", "0", "0.1", "1", "2", "--placements", "standardized", "centered", "--seeds", "3"]
# (validation, test) of the arms that matter; every other arm of the grid scores 80/80
_SCORES = {
    "parent": (90.0, 90.0),
    "ib:S:0.1": (92.0, 80.0),  # best on validation (+seed), worst on test: the choice must follow validation
    "ib:L:1": (91.0, 99.0),
    "ib:T:1:centered": (85.0, 70.0),
    "ib:S:2:centered": (86.0, 60.0),
}


def _sweep_rows(seeds=3):
    arms = sweep_arms(["S", "L", "T"], [0, 0.1, 1, 2], ["standardized", "centered"])
    rows = []
    for seed in range(seeds):
        for arm in arms:
            val, test = _SCORES.get(arm, (80.0, 80.0))
            placement = "centered" if arm.endswith(":centered") else "standardized"
            rows.append(_row(arm, seed, val + seed * (arm == "ib:S:0.1"), test, placement, kind="parent" if arm == "parent" else "ib"))
    return rows


def test_best_variants_are_chosen_on_validation_only():
    best = C.best_variants(_sweep_rows())
    assert best["standardized"][0] == "ib:S:0.1" and best["standardized"][1] == pytest.approx(93.0)
    assert best["centered"][0] == "ib:S:2:centered"
    lower = [dict(r, higher_is_better=False) for r in _sweep_rows()]
    arm, value, _ = C.best_variants(lower)["standardized"]
    assert value == 80.0 and not arm.endswith("centered") and arm not in _SCORES


def test_equal_validation_means_go_to_the_first_arm_of_the_grid():
    arms = sweep_arms(["S", "L", "T"], [0.1], ["centered"])  # grid order: S, L, T
    rows = [_row(arm, seed, 90.0 if arm != "ib:L:0.1:centered" else 80.0, 80.0, "centered") for seed in range(3) for arm in reversed(arms)]
    assert C.ranked_variants(rows)[0][0] == "ib:T:0.1:centered"  # no grid given: the rows' order
    assert C.ranked_variants(rows, (arms, 3))[0][0] == "ib:S:0.1:centered"


def test_best_variants_wait_for_an_unfinished_sweep():
    rows = _sweep_rows()[:-1]  # one arm is a seed short
    with pytest.raises(LookupError, match="not finished"):
        C.best_variants(rows)
    with pytest.raises(LookupError, match="not finished"):
        C.best_variants(_sweep_rows(seeds=2))




def _plan(tmp_path, entries):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"entries": entries}))
    return path


def test_campaign_resolves_best_arms_and_skips_entries_whose_sweep_is_unfinished(tmp_path):
    plan = _plan(
        tmp_path,
        [
            {"name": "sweep-x", "argv": ["sweep", "--task", "mnist1d-mlp", *SWEEP_GRID]},
            {"name": "final-x", "argv": ["compare", "--tasks", "mnist1d-mlp", "--arms", "parent", "best:standardized", "best:centered", "--seeds", "5"], "best_from": "sweep-x"},
        ],
    )
    calls = []
    waiting = C.run_campaign(calls.append, plan, progress=False)
    assert waiting == ["final-x"]
    assert calls == [["sweep", "--task", "mnist1d-mlp", *SWEEP_GRID, "--out", str(tmp_path / "sweep-x"), "--no-progress"]]
    (tmp_path / "sweep-x").mkdir()
    rows = _sweep_rows()
    # every arm present with 3 seeds but one arm of the grid missing: still unfinished
    (tmp_path / "sweep-x" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["arm"] != "ib:L:1"))
    calls.clear()
    assert C.run_campaign(calls.append, plan, only=["final-x"], progress=False) == ["final-x"] and calls == []
    (tmp_path / "sweep-x" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls.clear()
    assert C.run_campaign(calls.append, plan, only=["final-x"], progress=False) == []
    (argv,) = calls
    assert argv[argv.index("--arms") + 1 : argv.index("--seeds")] == ["parent", "ib:S:0.1", "ib:S:2:centered"]
    assert argv[argv.index("--out") + 1] == str(tmp_path / "final-x") and "--no-progress" in argv
    with pytest.raises(ValueError, match="unknown plan entries"):
        C.run_campaign(calls.append, plan, only=["nope"])


def test_a_sharded_campaign_passes_its_shard_and_leaves_timing_and_closing_analysis_to_an_unsharded_run(tmp_path, monkeypatch):
    from ibnorm.lab.experiments.compare import Shard

    plan = _plan(tmp_path, [{"name": "final-y", "stage": "final", "argv": ["compare", "--tasks", "mnist1d-mlp", "--arms", "parent", "--seeds", "1"]}])
    calls = []
    monkeypatch.setattr(C, "_time_arms", lambda entry, argv, root: calls.append("timed"))
    assert C.run_campaign(calls.append, plan, progress=False, shard=Shard(1, 3)) == []
    (argv,) = calls  # neither quiet timing nor the closing `analyze`; each shard analyses its own final runs
    assert argv[-3:] == ["--shard", "1/3", "--analyze-finals"]
    calls.clear()
    C.run_campaign(calls.append, plan, progress=False)
    assert calls[0][-1] == "--analyze-finals"  # each final run analysed while its model is here
    assert calls[1:] == ["timed", ["analyze", str(tmp_path / "final-y"), "--retrain-missing", "--no-progress"]]
    calls.clear()
    C.run_campaign(calls.append, plan, report_only=True, shard=Shard(1, 3))
    assert calls == []  # nothing run yet: no report to rewrite, and --shard never goes with --report-only


def test_a_sharded_campaign_refuses_entries_whose_sweep_is_unfinished(tmp_path, capsys):
    from ibnorm.lab.cli import main
    from ibnorm.lab.experiments.compare import Shard

    plan = _plan(
        tmp_path,
        [
            {"name": "sweep-x", "argv": ["sweep", "--task", "mnist1d-mlp", *SWEEP_GRID]},
            {"name": "final-x", "argv": ["compare", "--tasks", "mnist1d-mlp", "--arms", "parent", "best:centered", "--seeds", "5"], "best_from": "sweep-x"},
        ],
    )
    calls = []
    with pytest.raises(C.ShardsNotReady, match=r"not ready: \['final-x'\]"):
        C.run_campaign(calls.append, plan, shard=Shard(0, 2))
    assert calls == []  # refused before anything ran, the sweep included
    with pytest.raises(SystemExit) as exc:
        main(["results", "--plan", str(plan), "--shard", "1/2"])
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "a sharded campaign needs the sweeps its entries choose from finished first" in errors[0]
    C.run_campaign(calls.append, plan, only=["sweep-x"], shard=Shard(1, 2), progress=False)  # the sweep alone may be sharded
    assert calls and calls[0][-2:] == ["--shard", "1/2"]


@pytest.mark.parametrize(
    "entries,message",
    [
        ([{"name": "a", "argv": ["train"]}], "must start with 'compare' or 'sweep'"),
        ([{"name": "a", "argv": ["sweep", "--out", "x"]}], "leave --out out"),
        ([{"name": "a", "argv": ["sweep", "--task", "t", "--seeds", "3"]}], "a sweep must state"),
        ([{"name": "a", "stage": "final", "argv": ["sweep", "--task", "t", "--seeds", "3", "--lams", "0", "--families", "S", "--placements", "centered"]}], "a 'final' entry must be a compare"),
        ([{"name": "a", "argv": ["compare"]}, {"name": "a", "argv": ["compare"]}], "unique"),
    ],
)
def test_bad_plans_are_refused(tmp_path, entries, message):
    with pytest.raises(ValueError, match=message):
        C.load_plan(_plan(tmp_path, entries))


def test_the_recorded_plan_is_valid():
    entries = C.load_plan(Path(__file__).parents[1] / C.DEFAULT_PLAN)
    names = [e.name for e in entries]
    for entry in entries:
        if entry.best_from is not None:
            assert names.index(entry.best_from) < names.index(entry.name)
        flag = "--task" if entry.argv[0] == "sweep" else "--tasks"
        get_task(entry.argv[entry.argv.index(flag) + 1])


def test_run_folders_are_single_safe_path_components(tmp_path):
    from ibnorm.lab.experiments.compare import make_plans, run_plans
    from ibnorm.lab.experiments.results_file import read_results

    text = tmp_path / "my corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    plans = make_plans([f"text:{text}"], ["ib:L:0.5:centered"], seeds=1, steps=2, batch_size=4, eval_every=2, eval_items=256, final_items=256)
    (row,) = run_plans(plans, tmp_path / "out", progress=False)
    parts = Path(row["run_dir"]).parts
    assert parts[0] == "runs" and len(parts) == 4 and all(":" not in p and " " not in p for p in parts)
    assert (tmp_path / "out" / row["run_dir"] / "final.pt").exists()
    assert read_results(tmp_path / "out")[0]["arm_spec"]["placement"] == "centered"


def test_a_variant_that_diverged_on_any_seed_is_never_chosen():
    rows = _sweep_rows()
    for r in rows:
        if r["arm"] == "ib:S:0.1" and r["seed"] == 1:
            r["diverged"] = True
            r["metrics"]["val_acc"] = float("nan")
    assert C.best_variants(rows)["standardized"][0] == "ib:L:1"


def test_the_default_arm_is_named_by_what_it_is():
    import ibnorm
    from ibnorm.lab.experiments.arms import ib_spec, parse_arm

    arm = parse_arm("ib", "batch")
    default = ibnorm.DEFAULT_VARIANTS["batch"]
    assert arm.name == ib_spec(default.compression, default.lam, default.placement)
    again = parse_arm(arm.name, "batch")
    assert (again.compression, again.lam, again.placement) == (arm.compression, arm.lam, arm.placement)
    assert parse_arm("ib:S:0.5", "batch").placement == "standardized"  # a spec without placement never follows the default


def test_seeds_start_at_first_seed_and_tuning_uses_the_first_of_them(tmp_path):
    from ibnorm.lab.experiments.compare import make_plans, run_plans

    plans = make_plans(["mnist1d-mlp"], ["parent"], seeds=2, steps=2, batch_size=8, eval_every=2, eval_items=64, tune_lr=2, first_seed=7)
    rows = run_plans(plans, tmp_path, progress=False)
    assert sorted((r["phase"], r["seed"]) for r in rows) == [("final", 7), ("final", 8), ("tune", 7), ("tune", 7)]


def test_rank_arms_take_the_kth_variant_of_the_screen_on_validation(tmp_path):
    plan = _plan(
        tmp_path,
        [
            {"name": "sweep-x", "argv": ["sweep", "--task", "mnist1d-mlp", *SWEEP_GRID]},
            {"name": "check-x", "stage": "check", "argv": ["compare", "--tasks", "mnist1d-mlp", "--arms", "parent", "rank:1", "rank:2", "rank:4", "best:standardized", "--seeds", "3"], "best_from": "sweep-x"},
        ],
    )
    (tmp_path / "sweep-x").mkdir()
    (tmp_path / "sweep-x" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _sweep_rows()))
    calls = []
    assert C.run_campaign(calls.append, plan, only=["check-x"], progress=False) == []
    (argv,) = calls
    # validation means: S:0.1 93, L:1 91, S:2:centered 86, T:1:centered 85; best:standardized repeats rank 1
    assert argv[argv.index("--arms") + 1 : argv.index("--seeds")] == ["parent", "ib:S:0.1", "ib:L:1", "ib:T:1:centered"]
    for bad, error, message in (("rank:0", ValueError, "non-zero integer"), ("rank:x", ValueError, "non-zero integer"), ("rank:99", LookupError, "out of range")):
        entry = C.Entry("check-y", "check", ("compare", "--tasks", "mnist1d-mlp", "--arms", bad), "sweep-x")
        with pytest.raises(error, match=message):
            C.resolve_arms(entry, tmp_path, [*C.load_plan(plan), entry])


def test_spearman_rho_matches_its_definition_with_ties():
    a = [1.0, 2.0, 2.0, 4.0, 7.0, 3.0]
    b = [2.0, 1.0, 3.0, 5.0, 5.0, 4.0]
    # ranks with ties averaged, then Pearson's r of the ranks (worked by hand)
    ra = [1, 2.5, 2.5, 5, 6, 4]
    rb = [2, 1, 3, 5.5, 5.5, 4]
    ma, mb = sum(ra) / 6, sum(rb) / 6
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    expected = cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    assert C.spearman_rho(a, b) == pytest.approx(expected)
    assert C.spearman_rho([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert C.spearman_rho([1, 2], [1, 2]) != C.spearman_rho([1, 2], [1, 2])  # nan below 3 pairs
    with pytest.raises(ValueError, match="equal length"):
        C.spearman_rho([1, 2, 3], [1, 2])


def test_the_summary_states_how_well_the_screen_ranking_held(tmp_path):
    plan = _plan(
        tmp_path,
        [
            {"name": "sweep-x", "argv": ["sweep", "--task", "mnist1d-mlp", *SWEEP_GRID]},
            {"name": "check-x", "stage": "check", "argv": ["compare", "--tasks", "mnist1d-mlp", "--arms", "parent", "rank:1", "rank:2", "--seeds", "3"], "best_from": "sweep-x"},
        ],
    )
    for name, rows in (("sweep-x", _sweep_rows()), ("check-x", [_row(a, s, v, v, "standardized", kind="ib") for a, v in (("parent", 95.0), ("ib:S:0.1", 90.0), ("ib:L:1", 94.0)) for s in range(3)])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = C.write_summary(plan).read_text()
    # screen order S:0.1 (93) > L:1 (91) > parent (90); final budget 90 < 94 < 95: fully reversed
    assert "Spearman ρ = -1.00 over 3 arms" in text
    assert "the screen's best is `ib:S:0.1`, the final budget's best is `parent`" in text


def test_readme_evidence_table_is_the_summary_of_the_committed_results(monkeypatch):
    """SUMMARY.md is what the committed results files give (`ibnorm results --report-only`
    writes it), and README's evidence table is SUMMARY.md's, verbatim."""
    from ibnorm.lab.experiments.report import EVIDENCE_HEADER

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    text = C.summary_text(C.DEFAULT_PLAN)
    assert (root / "docs" / "results" / C.SUMMARY).read_text() == text, "run `ibnorm results --report-only`"
    start = text.index(EVIDENCE_HEADER)
    table = text[start : text.index("\n\n", start)]
    assert table.count("\n") >= 3 and table in (root / "README.md").read_text(), "copy SUMMARY.md's table into README"
