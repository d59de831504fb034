"""Capture sites beyond the norm output (norm input, block output, activation output), the
per-element value cap, and the seed-paired site comparison of ``ibnorm analyze``."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from ibnorm.analysis import SITES, ActivationCapture, capture_activations, find_sites, paired_comparison
from ibnorm.lab.analysis_run import _site_markdown, analyze_run, site_comparison

ALL = dict(max_units=None, max_examples=None)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")


def _hooks(model):
    return {(name, kind): list(getattr(m, kind)) for name, m in model.named_modules() for kind in _HOOK_DICTS if getattr(m, kind)}


def _no_hooks(model):
    return not _hooks(model)


class _Residual(nn.Module):
    def __init__(self, dim, functional=False):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)
        self.act = None if functional else nn.GELU()

    def forward(self, x):
        h = self.norm(x)
        return x + self.fc(torch.relu(h) if self.act is None else self.act(h))


class _Tower(nn.Module):
    def __init__(self, functional=False):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([_Residual(8, functional), _Residual(8, functional)])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


# =============================================================================== values
def test_sequential_sites_equal_a_manual_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(10, 6)
    with torch.no_grad():
        fed = model[0](x)
        normed = model[1](fed)
    acts = capture_activations(model, x, sites=SITES, **ALL)
    assert sorted(acts) == ["act_out:2", "block_out:2", "norm_in:1", "norm_out:1"]
    torch.testing.assert_close(acts["norm_in:1"], fed)
    torch.testing.assert_close(acts["norm_out:1"], normed)
    torch.testing.assert_close(acts["act_out:2"], torch.relu(normed))
    torch.testing.assert_close(acts["block_out:2"], torch.relu(normed))  # the stage Linear → LayerNorm → ReLU
    assert not torch.equal(acts["norm_in:1"], acts["norm_out:1"])

    # channel-first stages: per element, the activation's channels are those of its BatchNorm
    conv = nn.Sequential(nn.Conv1d(2, 5, 3, padding=1), nn.BatchNorm1d(5), nn.ReLU(), nn.Conv1d(5, 5, 3), nn.BatchNorm1d(5), nn.ReLU()).eval()
    xc = torch.randn(4, 2, 9)
    with torch.no_grad():
        fed = conv[0](xc)
        out = conv(xc)
    acts = capture_activations(conv, xc, sites=SITES, spatial="examples", **ALL)
    assert find_sites(conv).modules["block_out"] == [("2", conv[2]), ("5", conv[5])]
    torch.testing.assert_close(acts["norm_in:1"], fed.transpose(1, 2).reshape(-1, 5))
    torch.testing.assert_close(acts["block_out:5"], out.transpose(1, 2).reshape(-1, 5))


def test_residual_blocks_and_functional_activations():
    torch.manual_seed(0)
    model = _Tower().eval()
    x = torch.randn(3, 7, 4)
    with torch.no_grad():
        stream = model.embed(x)
        expected = {}
        for i, block in enumerate(model.blocks):
            normed = block.norm(stream)
            expected |= {f"norm_in:blocks.{i}.norm": stream, f"norm_out:blocks.{i}.norm": normed, f"act_out:blocks.{i}.act": nn.functional.gelu(normed)}
            stream = block(stream)
            expected[f"block_out:blocks.{i}"] = stream
    acts = capture_activations(model, x, sites=SITES, spatial="examples", **ALL)
    assert sorted(acts) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(acts[key], value.reshape(-1, value.shape[-1]), msg=key)
    assert find_sites(model).unavailable == {}

    # an activation applied with torch.relu in forward has no module: reported, not skipped
    functional = find_sites(_Tower(functional=True))
    assert functional.modules["act_out"] == [] and "functionally" in functional.unavailable["act_out"]
    from ibnorm.lab.experiments.models import SmallResNet

    resnet = find_sites(SmallResNet())
    assert [n for n, _ in resnet.modules["block_out"]] == ["stages.0", "stages.1", "stages.2"]
    assert [n for n, _ in resnet.modules["act_out"]] == ["stem.2"] + [f"stages.{i}.act{j}" for i in range(3) for j in (1, 2)]
    assert "act_out" not in resnet.unavailable
    with pytest.raises(ValueError, match="sites"):
        find_sites(model, ["nowhere"])
    with pytest.raises(ValueError, match="not both"):
        ActivationCapture(model, "blocks.0.norm", sites=["norm_in"])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_models_expose_every_site(arch, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=64)
        model = transformers.GPT2LMHeadModel(config).eval()
        first_block = "transformer.h.0"
    else:
        config = transformers.LlamaConfig(
            vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64
        )
        model = transformers.LlamaForCausalLM(config).eval()
        first_block = "model.layers.0"
    found = find_sites(model)
    counts = {site: len(mods) for site, mods in found.modules.items()}
    assert counts == {"norm_in": 5, "norm_out": 5, "block_out": 2, "act_out": 2} and found.unavailable == {}
    assert [n for n, _ in found.modules["block_out"]] == [first_block, first_block[:-1] + "1"]

    ids = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    before = _hooks(model)  # transformers may keep hooks of its own after a forward
    acts = capture_activations(model, ids, sites=SITES, spatial="examples", **ALL)
    assert len(acts) == 14 and all(v.shape[0] == 32 for v in acts.values())
    torch.testing.assert_close(acts[f"block_out:{first_block}"], hidden[1].reshape(-1, 32))
    assert acts[f"act_out:{found.modules['act_out'][0][0]}"].shape == (32, 128 if arch == "gpt2" else 64)
    assert _hooks(model) == before


# =============================================================================== hooks and caps
def test_site_hooks_are_removed_on_exit_and_on_error():
    model = _Tower()
    x = torch.randn(2, 5, 4)
    capture = ActivationCapture(model, sites=SITES, spatial="examples")
    with capture, torch.no_grad():
        assert not _no_hooks(model)
        assert sum(len(m._forward_hooks) for m in model.modules()) == len(capture.names) == 8
        model(x)
    assert _no_hooks(model) and len(capture.activations) == 8
    with pytest.raises(RuntimeError, match="boom"):
        with ActivationCapture(model, sites=["norm_in", "act_out"]):
            raise RuntimeError("boom")
    assert _no_hooks(model)


def test_value_cap_is_a_seeded_subsample_of_all_rows():
    torch.manual_seed(0)
    model = _Tower().eval()
    x = torch.randn(12, 10, 4)
    full = capture_activations(model, x, sites=["block_out"], spatial="examples", **ALL)["block_out:blocks.1"]

    def capped(seed):
        return capture_activations(
            model, x, sites=["block_out"], spatial="examples", batch_size=5, max_units=None, max_examples=None, max_values=200, seed=seed
        )["block_out:blocks.1"]

    kept = capped(0)
    assert kept.shape == (200 // 8, 8)
    rows = [int(torch.nonzero((full == row).all(1))[0]) for row in kept]
    assert rows == sorted(rows) and len(set(rows)) == len(rows)  # distinct rows, in production order
    assert rows[-1] > 60  # drawn from all 120 rows, not the first 25
    assert torch.equal(capped(0), kept) and not torch.equal(capped(1), kept)


# =============================================================================== paired table
def _site_rows(values, site="act_out", layers=("a", "b")):
    """Rows of ``{arm: [per-seed layer-average kurtosis]}``: the layers are ± 1 around it."""
    rows = []
    for arm, per_seed in values.items():
        for seed, value in enumerate(per_seed):
            for i, layer in enumerate(layers):
                offset = 1.0 if i % 2 else -1.0
                rows.append(
                    {"task": "t", "site": site, "arm": arm, "seed": seed, "layer": layer, "spatial": "examples",
                     "kurtosis": value + offset, "hoyer": 0.2 + 0.01 * seed + offset / 10 - (arm != "parent") * 0.05, "near_zero_fraction": 0.1}
                )
    return rows


def test_paired_site_table_matches_scipy_ttest_rel():
    rng = np.random.default_rng(0)
    parent = rng.normal(3.0, 1.0, 5)
    arm = parent - 0.7 + rng.normal(0, 0.2, 5)
    entries = site_comparison(_site_rows({"parent": parent, "ib-L": arm}))
    assert [(e["site"], e["arm"]) for e in entries] == [("act_out", "parent"), ("act_out", "ib-L")]
    assert entries[0]["paired"] is None and entries[1]["layers"] == 2 and entries[1]["seeds"] == 5
    assert entries[1]["kurtosis"] == pytest.approx(arm.mean())
    result = entries[1]["paired"]["kurtosis"]
    reference = stats.ttest_rel(arm, parent)
    low, high = reference.confidence_interval(0.95)
    assert result["n"] == 5 and result["note"] is None
    assert result["delta"] == pytest.approx(np.mean(arm - parent), rel=1e-12)
    assert result["p"] == pytest.approx(reference.pvalue, rel=1e-10)
    assert (result["ci_low"], result["ci_high"]) == (pytest.approx(low, rel=1e-10), pytest.approx(high, rel=1e-10))
    # Hoyer is 0.05 lower for every seed: a zero-variance difference has no p, and says so
    hoyer = entries[1]["paired"]["hoyer"]
    assert hoyer["delta"] == pytest.approx(-0.05) and hoyer["p"] is None and hoyer["note"] == "zero-variance differences"

    md = "\n".join(_site_markdown(entries, {"block_out": "no container of blocks"}, 1000))
    assert "Does IBNorm raise kurtosis and sparsity? (paired over seeds)" in md
    assert f"p={reference.pvalue:.3g}" in md and "zero-variance differences" in md
    assert "excess kurtosis lower" in md and "Hoyer sparsity lower" in md
    assert "block_out unavailable for this model: no container of blocks" in md

    two = site_comparison(_site_rows({"parent": [1.0, 2.0], "ib-L": [1.5, 2.7]}))[1]["paired"]["kurtosis"]
    assert two["n"] == 2 and two["p"] is None and two["ci_low"] is None and two["note"] == "too few seeds"
    assert two["delta"] == pytest.approx(0.6)
    assert "too few seeds" in "\n".join(_site_markdown(site_comparison(_site_rows({"parent": [1.0, 2.0], "ib-L": [1.5, 2.7]})), {}, 1000))
    assert paired_comparison([1.0, float("nan"), 2.0, 4.0], [0.0, 0.0, 1.0, 1.0])["n"] == 3


@pytest.mark.slow
def test_analyze_run_reports_every_site(tmp_path):
    from ibnorm.lab.experiments.compare import make_plans, run_plans

    plans = make_plans(["mnist1d-cnn"], ["parent", "ib-L"], seeds=2, steps=2, batch_size=16, eval_every=2, eval_items=50)
    run_plans(plans, tmp_path, progress=False)
    rows = analyze_run(tmp_path, max_examples=64, probe_epochs=5, sites=SITES, max_values=2000)
    stored = [json.loads(line) for line in (tmp_path / "analysis.jsonl").read_text().splitlines()]
    assert len(stored) == len(rows) == 2 * 2 * (3 + 3 * 3)  # runs × (norm_out MI rows + 3 sites × 3 layers)
    by_site = {site: {r["layer"] for r in stored if r["site"] == site} for site in SITES}
    assert by_site == {
        "norm_in": {"features.1", "features.4", "features.7"},
        "norm_out": {"features.1", "features.4", "features.7"},
        "block_out": {"features.2", "features.5", "features.8"},
        "act_out": {"features.2", "features.5", "features.8"},
    }
    for r in stored:
        if r["site"] != "norm_out":
            assert r["spatial"] == "examples" and r["n_examples"] * r["n_units"] <= 2000 and r["n_units"] == 25
            assert r["kurtosis"] is not None and "I_XT_kernel" not in r
    md = (tmp_path / "analysis.md").read_text()
    assert "Does IBNorm raise kurtosis and sparsity? (paired over seeds)" in md
    for site in SITES:
        assert f"| {site} | ib-L |" in md and f"({site}), measured against the parent" in md
    assert "too few seeds" in md and "per element" in md and "channel means" in md


def test_analysis_keeps_earlier_rows_names_missing_models_and_trains_them_again(tmp_path, capsys):
    from ibnorm.lab.analysis_run import merge_analysis_rows
    from ibnorm.lab.cli import main
    from ibnorm.lab.experiments.compare import make_plans, run_plans

    plans = make_plans(["mnist1d-mlp"], ["parent", "ib-L"], seeds=2, steps=3, batch_size=16, eval_every=3, eval_items=100)
    results = run_plans(plans, tmp_path, progress=False)
    models = {r["run_dir"]: tmp_path / r["run_dir"] / "final.pt" for r in results}
    saved = {run: path.read_bytes() for run, path in models.items()}
    settings = dict(max_examples=64, probe_epochs=5, sites=("norm_out",))
    first = analyze_run(tmp_path, **settings)
    assert {r["run_dir"] for r in first} == set(models) and all(r["analysis_settings"]["max_examples"] == 64 for r in first)

    def stored():
        return [json.loads(line) for line in (tmp_path / "analysis.jsonl").read_text().splitlines()]

    for path in models.values():
        path.unlink()
    # the same settings: every run's rows are kept, no model is needed
    assert analyze_run(tmp_path, **settings) == first and stored() == first
    # other settings: the rows do not apply, and without models nothing can be analysed
    with pytest.raises(ValueError, match="retrain_missing=True"):
        analyze_run(tmp_path, **{**settings, "max_examples": 32})

    kept_run = results[0]["run_dir"]
    models[kept_run].write_bytes(saved[kept_run])
    rows = analyze_run(tmp_path, **{**settings, "max_examples": 32})
    assert {r["run_dir"] for r in rows} == {kept_run}
    assert stored() == first + rows  # the 64-example rows stay: no earlier row is dropped
    md = (tmp_path / "analysis.md").read_text()
    assert "Not analysed (3 final runs with neither their model on this machine nor rows with these settings" in md

    main(["analyze", str(tmp_path), "--max-examples", "32", "--sites", "norm_out", "--retrain-missing", "--no-progress"])
    assert "analysis: " in capsys.readouterr().out
    rows = [r for r in stored() if r["analysis_settings"]["max_examples"] == 32 and r["analysis_settings"]["probe_epochs"] == 100]
    assert {r["run_dir"] for r in rows} == set(models) and all(path.exists() for path in models.values())
    retrained = {r["run_dir"]: r["retrained"] for r in rows if "retrained" in r}
    assert set(retrained) == set(models) - {kept_run}
    for record in retrained.values():  # one CPU process, same threads and code: the same run again
        assert record["abs_delta"] == 0 and record["recorded"] == record["retrained"] and record["metric"] == "test_acc"
    md = (tmp_path / "analysis.md").read_text()
    assert "Not analysed" not in md and "3 runs were analysed from models trained again" in md and "recorded run: 0.000" in md

    # rows made elsewhere (a GPU machine) join a file that lacks their runs, once; rows of the run's
    # own model replace rows of a retrained one, not the other way round
    mine = [r for r in rows if r["run_dir"] == kept_run]
    (tmp_path / "analysis.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mine))
    assert merge_analysis_rows(tmp_path, rows) == len(rows) - len(mine)
    assert merge_analysis_rows(tmp_path, rows) == 0
    other = next(iter(retrained))
    original = [{k: v for k, v in r.items() if k != "retrained"} for r in rows if r["run_dir"] == other]
    assert merge_analysis_rows(tmp_path, original) == len(original)
    assert merge_analysis_rows(tmp_path, [r for r in rows if r["run_dir"] == other]) == 0
    assert sum("retrained" in r for r in stored()) == sum("retrained" in r for r in rows) - len(original)
    with pytest.raises(ValueError, match="no final run"):
        merge_analysis_rows(tmp_path, [dict(mine[0], run_dir="runs/elsewhere")])


def test_compare_analyze_finals_analyses_each_final_run_while_its_model_is_here(tmp_path, capsys, monkeypatch):
    import ibnorm.lab.cli as cli
    from ibnorm.lab.cli import main
    from ibnorm.lab.experiments.results_file import read_results

    # smaller probes for speed, in the hook's analyses and `ibnorm analyze`'s alike; every other setting is each path's own
    monkeypatch.setattr(cli, "analyze_run", lambda *a, **k: analyze_run(*a, **{**k, "max_examples": 64, "probe_epochs": 5}))

    argv = ["compare", "--tasks", "mnist1d-mlp", "--arms", "parent", "ib-L", "--seeds", "1", "--steps", "3"]
    argv += ["--eval-every", "3", "--tune-lr", "2", "--out", str(tmp_path), "--no-progress", "--analyze-finals"]
    main(argv)
    finals = {r["run_dir"] for r in read_results(tmp_path) if r["phase"] == "final"}
    stored = [json.loads(line) for line in (tmp_path / "analysis.jsonl").read_text().splitlines()]
    assert len(finals) == 2 and {r["run_dir"] for r in stored} == finals  # the tuning runs are not analysed
    assert {r["site"] for r in stored} == set(SITES)  # `ibnorm analyze`'s defaults: every site
    for run in finals:
        (tmp_path / run / "final.pt").unlink()
    # the same rows (same settings) serve `ibnorm analyze` (the campaign's closing step) without the models
    main(["analyze", str(tmp_path), "--no-progress"])
    assert "Not analysed" not in (tmp_path / "analysis.md").read_text()
    capsys.readouterr()
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun: rank 0 would analyse while the others time out
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "--analyze-finals needs one process (not torchrun)" in errors[0]


def test_shards_analyse_their_own_final_runs_and_merge_the_rows(tmp_path, monkeypatch):
    import ibnorm.lab.cli as cli
    from ibnorm.lab.cli import main
    from ibnorm.lab.experiments.results_file import read_results

    monkeypatch.setattr(cli, "analyze_run", lambda *a, **k: analyze_run(*a, **{**k, "max_examples": 64, "probe_epochs": 5}))
    argv = ["compare", "--tasks", "mnist1d-mlp", "--arms", "parent", "ib-L", "--seeds", "1", "--steps", "3"]
    argv += ["--eval-every", "3", "--out", str(tmp_path), "--no-progress", "--analyze-finals"]
    main([*argv, "--shard", "0/2"])
    (first,) = [r["run_dir"] for r in read_results(tmp_path)]
    rows = lambda: [json.loads(line) for line in (tmp_path / "analysis.jsonl").read_text().splitlines()]  # noqa: E731
    assert {r["run_dir"] for r in rows()} == {first}
    main([*argv, "--shard", "1/2"])  # the other shard: its run only, merged beside the first's rows
    finals = {r["run_dir"] for r in read_results(tmp_path)}
    assert len(finals) == 2 and {r["run_dir"] for r in rows()} == finals
    assert all((tmp_path / run / "analysis.jsonl").exists() for run in finals)  # each made in its run's folder
    assert not any((tmp_path / run / "analysis.md").exists() or (tmp_path / run / "plots").exists() for run in finals)
    assert not (tmp_path / "analysis.md").exists()  # the summary waits for the closing analysis
    for run in finals:
        (tmp_path / run / "final.pt").unlink()
    main(["analyze", str(tmp_path), "--no-progress"])  # the closing analysis: every row already there
    assert "Not analysed" not in (tmp_path / "analysis.md").read_text()


def _merge_rows_repeatedly(out: str, run_dirs: list[str], start) -> None:
    from ibnorm.lab.analysis_run import merge_analysis_rows

    start.wait()  # both processes merge at once
    for run_dir in run_dirs:
        merge_analysis_rows(Path(out), [{"run_dir": run_dir, "task": "t", "arm": "a", "seed": 0, "site": "norm_out"}])


@pytest.mark.slow
def test_concurrent_merges_of_analysis_rows_keep_every_row(tmp_path):
    import multiprocessing

    runs = [f"runs/r{k}" for k in range(300)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps({"task": "t", "arm": "a", "seed": k, "phase": "final", "config_key": "c", "run_dir": r}) + "\n" for k, r in enumerate(runs)))
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    workers = [context.Process(target=_merge_rows_repeatedly, args=(str(tmp_path), runs[k::2], start)) for k in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    stored = [json.loads(line)["run_dir"] for line in (tmp_path / "analysis.jsonl").read_text().splitlines()]
    assert sorted(stored) == sorted(runs)


def test_a_failed_analysis_after_a_final_run_warns_and_training_goes_on(tmp_path, capsys, monkeypatch):
    import ibnorm.lab.cli as cli
    from ibnorm.lab.cli import main
    from ibnorm.lab.experiments.results_file import read_results

    def broken(*args, **kwargs):
        raise ValueError("probe data unreadable")

    monkeypatch.setattr(cli, "analyze_run", broken)
    argv = ["compare", "--tasks", "mnist1d-mlp", "--arms", "parent", "ib-L", "--seeds", "1", "--steps", "3"]
    main([*argv, "--eval-every", "3", "--out", str(tmp_path), "--no-progress", "--analyze-finals"])
    assert len([r for r in read_results(tmp_path) if r["phase"] == "final"]) == 2  # both arms trained
    warnings = [line for line in capsys.readouterr().err.splitlines() if "--analyze-finals" in line]
    assert len(warnings) == 2 and all("failed (ValueError: probe data unreadable)" in w and "training goes on" in w for w in warnings)
