"""The `ibnorm` command line: a tiny real run per experiment subcommand, and bad input
answered by one error line and exit status 2, never a traceback."""

import json

import pytest

from ibnorm.lab.cli import main


def _error_exit(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("ibnorm ") and ": error: " in last
    return last


def test_compare_records_the_command_and_placement_then_roi_reads_it(tmp_path, capsys):
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
    before = (tmp_path / "results.jsonl").read_text()
    main(argv + ["--out", str(tmp_path), "--report-only"])
    assert (tmp_path / "results.jsonl").read_text() == before


@pytest.mark.parametrize(
    "argv,message",
    [
        (["compare", "--tasks", "mnist9", "--out", "x"], "task='mnist9' is not known"),
        (["compare", "--tasks", "mnist1d-cnn", "--arms", "ib:L:one", "--out", "x"], "lam 'one' is not a number"),
        (["compare", "--tasks", "mnist1d-cnn", "--arms", "dyt", "--out", "x"], "'dyt' replaces LayerNorm only"),
        (["compare", "--tasks", "mnist1d-cnn", "--steps", "0", "--out", "x"], "steps must be a positive int"),
        (["sweep", "--task", "mnist1d-cnn", "--placements", "middle", "--out", "x"], "invalid choice: 'middle'"),
        (["results", "--only", "nope"], "unknown plan entries ['nope']"),
        (["results", "--plan", "/nonexistent/plan.json"], "does not exist"),
        (["roi", "/nonexistent"], "ibnorm roi: error"),
        (["compare", "--tasks", "mnist1d-cnn", "--device", "warp9", "--out", "x"], "device='warp9' is not a torch device"),
        (["compare", "--tasks", "mnist1d-cnn", "--first-seed", "-1", "--out", "x"], "first_seed must be an int >= 0"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(capsys, argv, message):
    assert message in _error_exit(capsys, argv)


def test_missing_data_is_an_error_line_before_any_training(tmp_path, capsys):
    argv = ["compare", "--tasks", "fmnist-resnet", "--arms", "parent", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o")]
    assert "Fashion-MNIST" in _error_exit(capsys, argv)
    assert not (tmp_path / "o" / "results.jsonl").exists()


def test_default_arms_fit_every_task():
    from ibnorm.lab.experiments.arms import default_arms, parse_arm

    for parents, absent in (({"rms"}, {"normalnorm", "dyt"}), ({"batch"}, {"dyt"}), ({"layer"}, set()), ({"layer", "rms"}, {"normalnorm", "dyt"})):
        arms = default_arms(parents)
        assert not absent & set(arms) and "parent" in arms and "ib" in arms
        for parent in parents:
            for spec in arms:
                parse_arm(spec, parent)


@pytest.mark.parametrize("command", ["compare", "sweep", "results", "demo"])
def test_every_subcommand_has_help(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and "usage: ibnorm" in capsys.readouterr().out
