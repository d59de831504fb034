"""The `ibnorm` command line: every subcommand's help, a tiny real run of each (``demo``
excepted: it has no flag that makes it small), bad input answered by one error line and
exit status 2, never a traceback, and every recorded command still parses."""

import json
import re
import shlex
from pathlib import Path

import pytest

import ibnorm
from ibnorm.lab.cli import SUBCOMMANDS, build_parser, main

RESULTS_DIR = Path(__file__).resolve().parents[1] / "docs" / "results"


def _error_exit(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # no usage block, no traceback
    assert re.match(r"ibnorm( [a-z]+)?: error: ", lines[0]), lines[0]
    return lines[0]


def test_compare_records_the_command_and_placement_then_roi_and_analyze_read_it(tmp_path, capsys):
    argv = ["compare", "--tasks", "mnist1d-mlp", "--arms", "parent", "ib:L:1:centered", "--seeds", "1", "--steps", "3"]
    main(argv + ["--out", str(tmp_path), "--no-progress"])
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in rows] == ["parent", "ib:L:1:centered"]
    assert rows[1]["arm_spec"]["placement"] == "centered"
    assert all(r["command"].startswith("ibnorm compare --tasks mnist1d-mlp") for r in rows)
    assert (tmp_path / "report.md").exists() and "| ib:L:1:centered |" in (tmp_path / "report.md").read_text()
    capsys.readouterr()
    main(["roi", str(tmp_path)])
    assert "ib:L:1:centered" in capsys.readouterr().out
    main(["analyze", str(tmp_path), "--max-examples", "64", "--sites", "norm_out", "--no-progress"])
    assert f"analysis: {tmp_path.resolve() / 'analysis.md'} " in capsys.readouterr().out
    analysed = [json.loads(line) for line in (tmp_path / "analysis.jsonl").read_text().splitlines()]
    assert {(r["arm"], r["layer_type"]) for r in analysed} == {("parent", "LayerNorm"), ("ib:L:1:centered", "IBLayerNorm")}
    before = (tmp_path / "results.jsonl").read_text()
    main(argv + ["--out", str(tmp_path), "--report-only"])
    assert (tmp_path / "results.jsonl").read_text() == before


def test_sweep_trains_each_family_and_lambda(tmp_path):
    main(["sweep", "--task", "mnist1d-mlp", "--lams", "0", "0.5", "--families", "S", "T", "--seeds", "1", "--steps", "2",
          "--out", str(tmp_path), "--no-progress"])
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(r["arm"] for r in rows) == ["ib:S:0.5", "ib:T:0.5", "parent"]
    assert all(r["command"].startswith("ibnorm sweep --task mnist1d-mlp") for r in rows)
    assert "| ib:T:0.5 |" in (tmp_path / "report.md").read_text()


def test_results_runs_a_recorded_plan(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    entry = {"name": "tiny", "stage": "screen", "argv": ["compare", "--tasks", "mnist1d-mlp", "--arms", "parent", "--seeds", "1", "--steps", "2"]}
    plan.write_text(json.dumps({"entries": [entry]}))
    main(["results", "--plan", str(plan), "--no-progress"])
    rows = [json.loads(line) for line in (tmp_path / "tiny" / "results.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in rows] == ["parent"] and "## tiny" in (tmp_path / "SUMMARY.md").read_text()
    assert "[tiny] ibnorm compare --tasks mnist1d-mlp" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_quick_writes_its_tables(tmp_path, capsys):
    main(["bench", "--quick", "--groupings", "layer", "--dtypes", "float32", "--models", "--out", str(tmp_path)])
    lines = (tmp_path / "kernels.csv").read_text().splitlines()
    assert lines[0].startswith("grouping,shape,dtype,impl,")
    assert sorted(line.split(",")[3] for line in lines[1:]) == sorted(["parent", "ib_cpp", "ib_compiled", "ib_eager", "composite"])
    header = lines[0].split(",")
    first = dict(zip(header, lines[1].split(",")))
    # the library's default variant unless told otherwise, and an inference (eval, no autograd) ratio
    default = ibnorm.DEFAULT_VARIANTS["layer"]
    assert first["variant"] == f"{default.compression}:{default.lam}:{default.placement}"
    assert float(first["ratio_inference"]) > 0
    assert (tmp_path / "kernels.png").read_bytes().startswith(b"\x89PNG")
    assert "backend resolved for cpu" in capsys.readouterr().out


def test_bench_runs_reports_the_median_and_range_of_the_chosen_implementations(tmp_path, capsys):
    main(["bench", "--quick", "--groupings", "rms", "--dtypes", "float32", "--models", "--impls", "ib_eager",
          "--runs", "2", "--out", str(tmp_path)])
    lines = (tmp_path / "kernels.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    assert [r["impl"] for r in rows] == ["parent", "ib_eager"]
    assert all(r["runs"] == "2" for r in rows)
    rms = ibnorm.DEFAULT_VARIANTS["rms"]
    assert all(r["variant"] == f"{rms.compression}:{rms.lam}:{rms.placement}" for r in rows)  # the grouping's default
    eager = rows[1]
    assert float(eager["ratio_fwd_bwd_min"]) <= float(eager["ratio_fwd_bwd"]) <= float(eager["ratio_fwd_bwd_max"])
    assert "ratio_fwd_bwd_max" in capsys.readouterr().out.splitlines()[1]  # the table's header shows the range


@pytest.mark.parametrize(
    "argv,message",
    [
        (["compare", "--tasks", "mnist9", "--out", "x"], "task='mnist9' is not known"),
        (["compare", "--tasks", "mnist1d-cnn", "--arms", "ib:L:one", "--out", "x"], "lam 'one' is not a number"),
        (["compare", "--tasks", "mnist1d-cnn", "--arms", "dyt", "--out", "x"], "'dyt' replaces layer and rms norms only"),
        (["compare", "--tasks", "mnist1d-cnn", "--steps", "0", "--out", "x"], "--steps must be a positive int"),
        (["compare", "--tasks", "mnist1d-cnn", "--analyze", "-3", "--out", "x"], "--analyze must be 0 (off) or a positive number of steps, got -3"),
        (["compare", "--tasks", "mnist1d-cnn", "--tune-lr", "1", "--out", "x"], "--tune-lr must be 0 (off) or the number of rates to try (>= 2)"),
        (["sweep", "--task", "mnist1d-cnn", "--placements", "middle", "--out", "x"], "invalid choice: 'middle'"),
        (["results", "--only", "nope"], "unknown plan entries ['nope']"),
        (["results", "--shard", "2/2"], "shard must be K/N with 0 <= K < N (e.g. 0/4), got '2/2'"),
        (["results", "--merge", "/nonexistent"], "--merge /nonexistent is not a folder"),
        (["compare", "--tasks", "mnist1d-cnn", "--shard", "one", "--out", "x"], "shard must be K/N"),
        (["results", "--plan", "/nonexistent/plan.json"], "does not exist"),
        (["roi", "/nonexistent"], "ibnorm roi: error"),
        (["compare", "--tasks", "mnist1d-cnn", "--device", "warp9", "--out", "x"], "--device 'warp9' is not a torch device"),
        (["compare", "--tasks", "mnist1d-cnn", "--first-seed", "-1", "--out", "x"], "--first-seed must be an int >= 0"),
        (["demo", "--steps", "3"], "unrecognized arguments: --steps 3"),
        (["analyze", "/nonexistent"], "is neither an `ibnorm compare` output folder"),
        (["analyze", "x", "--sites", "everywhere"], "invalid choice: 'everywhere'"),
        (["bench", "--groupings", "instance"], "invalid choice: 'instance'"),
        (["bench", "--compression", "Q"], "compression='Q' is not registered"),
        (["bench", "--lam", "-1"], "lam must be"),
        (["bench", "--placement", "middle"], "invalid choice: 'middle'"),
        (["bench", "--repeats", "0"], "--repeats must be a positive int"),
        (["bench", "--seconds", "-1"], "--seconds must be a finite number >= 0"),
        (["bench", "--seconds", "nan"], "--seconds must be a finite number >= 0"),
        (["bench", "--runs", "0"], "--runs must be a positive int"),
        (["bench", "--impls", "ib_fast"], "invalid choice: 'ib_fast'"),
        (["bench", "--device", "cuda", "--runs", "3"], "--runs and --impls apply to the CPU benchmark only"),
        (["bench", "--quick", "--seconds", "5"], "--quick has no --seconds minimum"),
        (["compare", "--tasks", "mnist1d-cnn", "--device", "mps", "--out", "x"], "--device 'mps': the lab trains on 'cpu' or 'cuda[:N]'"),
        (["compare", "--tasks", "mnist1d-cnn", "--arms", "ib:S:-1", "--out", "x"], "arm 'ib:S:-1': lam must be"),
        (["compare", "--tasks", "mnist1d-cnn", "--arms", "ib:Q:1", "--out", "x"], "arm 'ib:Q:1': compression='Q'"),
        (["nope"], "invalid choice: 'nope'"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(capsys, argv, message):
    assert message in _error_exit(capsys, argv)


COMPARE = ["compare", "--tasks", "mnist1d-mlp", "--arms", "parent", "--seeds", "1", "--steps", "2", "--no-progress"]


@pytest.mark.parametrize("command", [COMPARE, ["demo"], ["bench", "--quick"]])
def test_an_output_folder_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, command):
    (tmp_path / "afile").write_text("mine")
    error = _error_exit(capsys, [*command, "--out", str(tmp_path / "afile" / "sub")])
    assert f"{tmp_path / 'afile'} is a file, not a folder" in error
    assert (tmp_path / "afile").read_text() == "mine"


DAMAGED = [
    ('{"task": "t", oops\n', "line 1 is not JSON"),
    ("42\n", "line 1 is not a JSON object"),
    ('{"task": "t"}\n', "row 1 lacks one of task, arm, seed, phase, config_key"),
    (None, "is a folder, not a file of JSON lines"),
]


@pytest.mark.parametrize("content,message", DAMAGED)
@pytest.mark.parametrize("command", [[*COMPARE, "--out"], [*COMPARE, "--report-only", "--out"], ["demo", "--out"], ["analyze"]])
def test_a_damaged_results_file_is_named_and_left_as_it_is(tmp_path, capsys, command, content, message):
    results = tmp_path / "run" / "results.jsonl"
    if content is None:
        results.mkdir(parents=True)
    else:
        results.parent.mkdir()
        results.write_text(content)
    error = _error_exit(capsys, [*command, str(tmp_path / "run")])
    assert str(results) in error and message in error
    assert results.is_dir() if content is None else results.read_text() == content
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["results.jsonl"]


def test_report_only_needs_runs(tmp_path, capsys):
    error = _error_exit(capsys, [*COMPARE, "--report-only", "--out", str(tmp_path / "none")])
    assert "--report-only: no runs in" in error and not (tmp_path / "none").exists()


def test_roi_names_a_damaged_timing_file(tmp_path, capsys):
    row = {"task": "t", "arm": "parent", "seed": 0, "phase": "final", "config_key": "k", "run_dir": "r"}
    (tmp_path / "results.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "timing.json").write_text("{broken")
    assert f"{tmp_path / 'timing.json'} is not a timing file" in _error_exit(capsys, ["roi", str(tmp_path)])


@pytest.mark.parametrize(
    "plan,message",
    [
        ("{not json", "is not JSON"),
        ('{"entries": 5}', "must hold a JSON object with an 'entries' list"),
        ("[1, 2]", "must hold a JSON object with an 'entries' list"),
        ('{"entries": [{"name": "a"}]}', "entry 0 must be an object with a 'name' string and an 'argv' list"),
        (  # a typo in a later entry is found before the first one runs
            '{"entries": [{"name": "a", "argv": ["compare", "--tasks", "mnist1d-mlp"]}, '
            '{"name": "b", "argv": ["compare", "--tasks", "mnist9"]}]}',
            "plan entry 'b': task='mnist9' is not known",
        ),
    ],
)
def test_a_malformed_plan_is_one_error_line(tmp_path, capsys, plan, message):
    (tmp_path / "plan.json").write_text(plan)
    assert message in _error_exit(capsys, ["results", "--plan", str(tmp_path / "plan.json"), "--report-only"])


@pytest.mark.parametrize("suffix", ["jsonl", "analysis.jsonl"])
@pytest.mark.parametrize("content,message", [("{oops\n", "line 1 is not JSON"), ('{"task": "t"}\n', "row 1 lacks one of")])
def test_a_malformed_merge_file_is_one_error_line_and_changes_nothing(tmp_path, capsys, suffix, content, message):
    """Entry e's file is fine, entry f's is not: every file is checked before any is merged."""
    argv = ["compare", "--tasks", "mnist1d-mlp", "--arms", "parent"]
    (tmp_path / "plan.json").write_text(json.dumps({"entries": [{"name": "e", "argv": argv}, {"name": "f", "argv": argv}]}))
    (tmp_path / "gpu").mkdir()
    row = {"task": "mnist1d-mlp", "arm": "parent", "seed": 0, "phase": "final", "config_key": "k", "run_dir": "runs/r"}
    (tmp_path / "gpu" / "e.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "gpu" / f"f.{suffix}").write_text(content)
    error = _error_exit(capsys, ["results", "--plan", str(tmp_path / "plan.json"), "--merge", str(tmp_path / "gpu"), "--report-only"])
    assert f"--merge: {tmp_path / 'gpu' / f'f.{suffix}'}" in error and message in error
    assert not any((tmp_path / entry / "results.jsonl").exists() for entry in ("e", "f"))


@pytest.mark.parametrize("damaged", ["results.jsonl", "analysis.jsonl"])
def test_merging_into_a_damaged_folder_is_one_error_line_and_changes_nothing(tmp_path, capsys, damaged):
    argv = ["compare", "--tasks", "mnist1d-mlp", "--arms", "parent"]
    (tmp_path / "plan.json").write_text(json.dumps({"entries": [{"name": "e", "argv": argv}]}))
    row = {"task": "mnist1d-mlp", "arm": "parent", "seed": 0, "phase": "final", "config_key": "k", "run_dir": "runs/r"}
    analysis = {"run_dir": "runs/r", "task": "mnist1d-mlp", "arm": "parent", "seed": 0, "site": "norm_out"}
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "e.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "gpu" / "e.analysis.jsonl").write_text(json.dumps(analysis) + "\n")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "results.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "e" / damaged).write_text('{"task": "t"}\n')
    files = lambda: {p.name: p.read_text() for p in (tmp_path / "e").iterdir() if p.name != ".results.lock"}  # noqa: E731
    before = files()
    error = _error_exit(capsys, ["results", "--plan", str(tmp_path / "plan.json"), "--merge", str(tmp_path / "gpu"), "--report-only"])
    assert f"{tmp_path / 'e' / damaged}: row 1 lacks one of" in error
    assert files() == before


def test_missing_data_is_an_error_line_before_any_training(tmp_path, capsys):
    argv = ["compare", "--tasks", "fmnist-resnet", "--arms", "parent", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o")]
    assert "Fashion-MNIST" in _error_exit(capsys, argv)
    assert not (tmp_path / "o" / "results.jsonl").exists()


def test_default_arms_fit_every_task():
    from ibnorm.lab.experiments.arms import default_arms, parse_arm

    for parents, absent in (({"rms"}, {"normalnorm"}), ({"batch"}, {"dyt"}), ({"layer"}, set()), ({"layer", "rms"}, {"normalnorm"})):
        arms = default_arms(parents)
        assert not absent & set(arms) and "parent" in arms and "ib" in arms
        for parent in parents:
            for spec in arms:
                parse_arm(spec, parent)


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_subcommand_has_help(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and f"usage: ibnorm {command}" in capsys.readouterr().out


def test_every_recorded_command_still_parses():
    """The commands in the committed results rows and in the campaign plan are accepted by
    today's parser (parsing only: nothing runs)."""
    parser, _ = build_parser()
    commands = {
        json.loads(line)["command"] for path in RESULTS_DIR.glob("*/results.jsonl") for line in path.read_text().splitlines() if line
    }
    assert {c.split()[1] for c in commands} >= {"compare", "sweep", "demo"}
    for command in sorted(commands):
        parser.parse_args(shlex.split(command)[1:])
    for entry in json.loads((RESULTS_DIR / "plan.json").read_text())["entries"]:
        parser.parse_args([*entry["argv"], "--out", "x"])


@pytest.mark.slow
def test_sigterm_stops_training_like_ctrl_c(tmp_path):
    """A background shard stopped by `timeout` gets SIGTERM: it exits as Ctrl-C does (status
    130, the resume message), not killed mid-write."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    argv = ["compare", "--tasks", "mnist1d-mlp", "--arms", "parent", "--seeds", "1", "--steps", "1000000", "--out", str(out), "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "ibnorm.lab.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (out / "runs").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # inside the training loop
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "interrupted: finished runs are in" in output
