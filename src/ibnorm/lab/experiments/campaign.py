"""``ibnorm results`` (``make results``): the evidence campaign, run from a recorded plan.

The plan (``docs/results/plan.json``) is a list of entries, each an ``ibnorm compare`` or
``ibnorm sweep`` command line and the folder it writes (``docs/results/<name>``). Running
the campaign runs every entry in order; each entry resumes from the ``results.jsonl`` already
in its folder (finished runs are skipped, an interrupted run resumes from its checkpoint), so
a campaign can be stopped at any point and continued in a later session. Every results row
records the command that made it.

An entry's arms may name ``best:<placement>``: the variant of that placement (family and
λ) with the best mean *validation* metric in the sweep folder named by ``best_from``; the
test split is never used to choose. ``rank:<k>`` names the k-th best fixed-λ variant of any
placement (``rank:-1`` the worst that did not diverge): a ``check`` entry reruns a spread of
ranks at the final budget, and the summary states how well the screen's ranking held
(Spearman's ρ over the arms both ran). An entry whose sweep is not finished yet is skipped
with a message, and the next call picks it up.
"""

from __future__ import annotations

import json
import math
import shlex
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ibnorm.analysis.significance import MIN_PAIRED_SEEDS

from .._io import atomic_write_bytes, atomic_write_text
from .arms import SPEC_PLACEMENT, parse_arm
from .compare import Shard, sweep_arms
from .groups import run_device
from .report import at_a_glance, comparison_table_md, evidence_table, plot_evidence, summarize, verdict, write_report
from .results_file import read_results
from .tasks import get_task
from .timing import measure_step_times, read_timing, write_timing

DEFAULT_PLAN = Path("docs/results/plan.json")
BEST_PREFIX = "best:"
RANK_PREFIX = "rank:"
SWEEP_FLAGS = ("--families", "--lams", "--placements", "--seeds")


@dataclass(frozen=True)
class Entry:
    """One recorded command of the plan."""

    name: str
    stage: str
    argv: tuple[str, ...]
    best_from: Optional[str] = None
    note: str = ""

    def out(self, root: Path) -> Path:
        return root / self.name


def load_plan(path: Path) -> list[Entry]:
    """The entries of a plan file, checked: a JSON object whose ``entries`` list holds objects
    with a ``name`` and an ``argv`` list; unique names, a subcommand, known tasks, no ``--out``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"plan file {path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"plan file {path} is not JSON: {exc}") from None
    items = raw.get("entries", []) if isinstance(raw, dict) else None
    if not isinstance(items, list):
        raise ValueError(f"plan file {path} must hold a JSON object with an 'entries' list")
    entries = []
    for k, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not isinstance(item.get("argv"), list):
            raise ValueError(f"plan file {path}: entry {k} must be an object with a 'name' string and an 'argv' list, got {item!r}")
        argv = tuple(str(a) for a in item["argv"])
        if not argv or argv[0] not in ("compare", "sweep"):
            raise ValueError(f"plan entry {item.get('name')!r}: argv must start with 'compare' or 'sweep', got {argv[:1]}")
        if "--out" in argv:
            raise ValueError(f"plan entry {item['name']!r}: leave --out out; the entry's folder is docs/results/<name>")
        if item.get("stage") == "final" and argv[0] != "compare":
            # final entries get quiet timing and `analyze`, which read compare folders
            raise ValueError(f"plan entry {item['name']!r}: a 'final' entry must be a compare, got {argv[0]!r}")
        if argv[0] == "sweep":
            missing = [flag for flag in SWEEP_FLAGS if flag not in argv]
            if missing:
                raise ValueError(f"plan entry {item['name']!r}: a sweep must state {missing} (the grid defines when it is finished)")
        for task in _option(argv, "--tasks") + _option(argv, "--task"):
            try:
                get_task(task)
            except ValueError as exc:  # found before any entry runs, not after the earlier ones
                raise ValueError(f"plan entry {item['name']!r}: {exc}") from None
        entries.append(Entry(item["name"], item.get("stage", ""), argv, item.get("best_from"), item.get("note", "")))
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"plan {path}: entry names must be unique, got {names}")
    return entries


def _val_key(row: dict[str, Any]) -> str:
    return row["metric"].replace("test_", "val_")


def sweep_grid(entry: Entry) -> tuple[list[str], int]:
    """The arm specs and seeds per arm a sweep entry runs: when all have finished, it is done."""
    argv = list(entry.argv)
    lams = [float(v) for v in _option(argv, "--lams")]
    arms = sweep_arms(_option(argv, "--families"), lams, _option(argv, "--placements"))
    return arms, int(_option(argv, "--seeds")[0])


def ranked_variants(
    rows: Sequence[dict[str, Any]],
    expected: Optional[tuple[Sequence[str], int]] = None,
    min_seeds: int = MIN_PAIRED_SEEDS,
) -> list[tuple[str, float, int, str]]:
    """``(arm spec, mean validation metric, seeds, placement)`` of every fixed-λ IB arm whose
    seeds all finished without diverging, best first; equal means keep the order of
    ``expected``'s arms (the sweep's grid: placement, then family S, L, T, then λ), or of the
    rows where there is none.

    Raises ``LookupError`` while the sweep is not finished: an arm of ``expected`` (arm
    specs, seeds per arm) has fewer finished seeds, or any arm has fewer than ``min_seeds``
    or fewer seeds than another arm."""
    by_arm: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["phase"] == "final":
            by_arm[r["arm"]].append(r)
    if expected is not None:
        arms, seeds = expected
        short = [arm for arm in arms if len(by_arm.get(arm, ())) < seeds]
        if short:
            raise LookupError(f"the sweep is not finished: {len(short)} of {len(arms)} arms lack seeds")
    if not by_arm:
        raise LookupError("the sweep has no finished runs yet")
    counts = {arm: len(runs) for arm, runs in by_arm.items()}
    if min(counts.values()) < max(min_seeds, max(counts.values())):
        raise LookupError(f"the sweep is not finished: seeds per arm range {min(counts.values())}–{max(counts.values())}")
    ranked = []
    sign = 1
    for arm, runs in by_arm.items():
        spec = runs[0]["arm_spec"]
        if spec.get("kind") != "ib" or spec.get("learnable_lam"):
            continue
        values = [r["metrics"].get(_val_key(r)) for r in runs]
        if any(r.get("diverged") or v is None or not math.isfinite(v) for r, v in zip(runs, values)):
            continue  # a variant that diverged on any seed is not a candidate
        sign = 1 if runs[0]["higher_is_better"] else -1
        ranked.append((arm, statistics.fmean(values), len(values), spec.get("placement", SPEC_PLACEMENT)))
    grid = {arm: i for i, arm in enumerate(expected[0])} if expected is not None else {}
    return sorted(ranked, key=lambda item: (-sign * item[1], grid.get(item[0], len(grid))))


def best_variants(
    rows: Sequence[dict[str, Any]],
    expected: Optional[tuple[Sequence[str], int]] = None,
    min_seeds: int = MIN_PAIRED_SEEDS,
) -> dict[str, tuple[str, float, int]]:
    """Per placement, ``(arm spec, mean validation metric, seeds)`` of the first variant of
    :func:`ranked_variants` with that placement."""
    best: dict[str, tuple[str, float, int]] = {}
    for arm, mean, seeds, placement in ranked_variants(rows, expected, min_seeds):
        best.setdefault(placement, (arm, mean, seeds))
    return best


def resolve_arms(entry: Entry, root: Path, entries: Sequence[Entry]) -> list[str]:
    """The entry's argv with every ``best:<placement>`` arm replaced by the spec chosen on
    validation in the sweep ``entry.best_from`` (one of ``entries``, its folder under ``root``)."""
    argv = list(entry.argv)
    if "--arms" not in argv:
        return argv
    arms = _option(argv, "--arms")
    start = argv.index("--arms") + 1
    end = start + len(arms)
    if any(a.startswith((BEST_PREFIX, RANK_PREFIX)) for a in arms):
        if entry.best_from is None:
            raise ValueError(f"plan entry {entry.name!r} uses best:/rank: arms but names no best_from sweep")
        sweep = next((e for e in entries if e.name == entry.best_from), None)
        if sweep is None or sweep.argv[0] != "sweep":
            raise ValueError(f"plan entry {entry.name!r}: best_from={entry.best_from!r} names no sweep entry of the plan")
        ranked = ranked_variants(read_results(root / entry.best_from), sweep_grid(sweep))
        resolved = []
        for arm in arms:
            if arm.startswith(BEST_PREFIX):
                placement = arm[len(BEST_PREFIX) :]
                chosen = [spec for spec, _, _, p in ranked if p == placement]
                if not chosen:
                    raise LookupError(f"sweep {entry.best_from!r} has no finished arm with placement {placement!r}")
                arm = chosen[0]
            elif arm.startswith(RANK_PREFIX):
                k = _rank_index(entry, arm)
                if not -len(ranked) <= k < len(ranked):
                    raise LookupError(f"sweep {entry.best_from!r} ranks {len(ranked)} variants; {arm!r} is out of range")
                arm = ranked[k][0]
            if arm not in resolved:
                resolved.append(arm)
        arms = resolved
    return argv[:start] + arms + argv[end:]


class ShardsNotReady(ValueError):
    """A sharded campaign was asked for entries whose sweep is not finished."""


def run_campaign(
    run_command: Callable[[list[str]], None],
    plan: Path = DEFAULT_PLAN,
    only: Optional[Sequence[str]] = None,
    *,
    report_only: bool = False,
    progress: bool = True,
    device: Optional[str] = None,
    shard: Shard = Shard(),
) -> list[str]:
    """Run (resume) the plan's entries in order, or those named in ``only``, each through
    ``run_command(argv)`` (the ``ibnorm`` command line); returns the names of entries
    skipped because the sweep they choose from is not finished. With a ``shard`` of several,
    each entry trains only that shard's runs, and the steps that need all of them (quiet
    timing, analysis) are left to an unsharded run of the entry; a sharded campaign refuses
    entries whose sweep is not finished (shards that finished their share of the sweep at
    different times would otherwise disagree on whether to run them, and wait for each other)."""
    entries = all_entries = load_plan(plan)
    root = Path(plan).parent
    if only:
        unknown = sorted(set(only) - {e.name for e in entries})
        if unknown:
            raise ValueError(f"--only names unknown plan entries {unknown}; the plan has {[e.name for e in entries]}")
        entries = [e for e in entries if e.name in only]
    if shard.count > 1 and not report_only:
        unready = []
        for entry in entries:
            try:
                resolve_arms(entry, root, all_entries)
            except LookupError:
                unready.append(entry.name)
        if unready:
            raise ShardsNotReady(
                f"a sharded campaign needs the sweeps its entries choose from finished first; not ready: {unready} "
                "(run the sweeps first, or leave these entries out with --only)"
            )
    waiting = []
    for entry in entries:
        try:
            argv = resolve_arms(entry, root, all_entries)
        except LookupError as exc:
            print(f"[{entry.name}] waiting: {exc}")
            waiting.append(entry.name)
            continue
        argv += ["--out", str(entry.out(root))]
        if report_only:
            if not read_results(entry.out(root)):
                continue  # nothing run yet: no report to rewrite
            argv.append("--report-only")
        if not progress:
            argv.append("--no-progress")
        if device and not report_only:
            argv += ["--device", device]
        if shard.count > 1 and not report_only:
            argv += ["--shard", f"{shard.index}/{shard.count}"]
        if entry.stage == "final" and not report_only:
            # analysed while its model is here: models are not committed, and a later session's machine lacks them
            argv.append("--analyze-finals")
        print(f"[{entry.name}] ibnorm {shlex.join(argv)}", flush=True)
        run_command(argv)
        if entry.stage == "final" and not report_only and shard.count == 1:
            if not device:
                _time_arms(entry, argv, root)
            # kurtosis, sparsity, MI of the runs not analysed yet: those whose model is not on this machine
            # (trained before --analyze-finals, or on a GPU machine without its rows) are trained again
            run_command(["analyze", str(entry.out(root)), "--retrain-missing", "--no-progress"])
    write_summary(plan)
    return waiting


def _rank_index(entry: Entry, arm: str) -> int:
    """The list index of ``rank:<k>`` (k ≥ 1 counts from the best, k ≤ −1 from the worst)."""
    text = arm[len(RANK_PREFIX) :]
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k == 0:
        raise ValueError(f"plan entry {entry.name!r}: arm {arm!r} must be rank:<k> with a non-zero integer k")
    return k - 1 if k > 0 else k


def _option(argv: Sequence[str], flag: str) -> list[str]:
    if flag not in argv:
        return []
    start = argv.index(flag) + 1
    end = next((i for i in range(start, len(argv)) if argv[i].startswith("--")), len(argv))
    return list(argv[start:end])


def _time_arms(entry: Entry, argv: Sequence[str], root: Path) -> None:
    """A final entry's arms timed quietly and interleaved (``timing.json``), once: the report
    then takes its step-time overheads from there rather than from the training runs."""
    out = entry.out(root)
    tasks, arms = _option(argv, "--tasks"), _option(argv, "--arms")
    if len(tasks) != 1 or not arms:
        print(f"[{entry.name}] no quiet timing: it needs one task and explicit --arms")
        return
    (task_name,) = tasks
    if task_name in read_timing(out):
        return
    task = get_task(task_name)
    print(f"[{entry.name}] timing {arms} (quiet, interleaved)", flush=True)
    times = measure_step_times(task, task.load(None), arms, batch_size=task.defaults.batch_size)
    write_timing(out, task_name, times, batch_size=task.defaults.batch_size)
    write_report(out, f"ibnorm compare: {task_name}")


SUMMARY = "SUMMARY.md"
EVIDENCE_FIGURE = "evidence.png"


def mean_validation(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean validation metric per arm over its finished, non-diverged final runs."""
    values: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        value = r["metrics"].get(_val_key(r)) if r["phase"] == "final" else None
        if value is not None and math.isfinite(value) and not r.get("diverged"):
            values[r["arm"]].append(value)
    return {arm: statistics.fmean(v) for arm, v in values.items()}


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n of ``values`` (ascending), ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman_rho(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's ρ: the Pearson correlation of the two samples' ranks (nan below 3 pairs or
    when either side is constant)."""
    if len(a) != len(b):
        raise ValueError(f"spearman_rho needs samples of equal length, got {len(a)} and {len(b)}")
    if len(a) < 3:
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else float("nan")


def _rank_check(screen_rows: Sequence[dict[str, Any]], check_rows: Sequence[dict[str, Any]]) -> list[str]:
    """Screen vs. final-budget validation means of the arms both ran, and Spearman's ρ."""
    screen, check = mean_validation(screen_rows), mean_validation(check_rows)
    arms = [arm for arm in screen if arm in check]
    if not arms:
        return ["No arm has finished at both budgets yet."]
    higher = next(r["higher_is_better"] for r in check_rows if r["phase"] == "final")
    arms.sort(key=lambda arm: -screen[arm] if higher else screen[arm])
    rho = spearman_rho([screen[a] for a in arms], [check[a] for a in arms])
    lines = ["| arm | screen val | final-budget val |", "|---|---|---|"]
    lines += [f"| {arm} | {screen[arm]:.4f} | {check[arm]:.4f} |" for arm in arms]
    best_check = max(arms, key=lambda arm: check[arm] if higher else -check[arm])
    lines += ["", f"Ranking stability: Spearman ρ = {rho:.2f} over {len(arms)} arms; the screen's best is `{arms[0]}`, the final budget's best is `{best_check}`."]
    return lines


def _sweep_table(rows: Sequence[dict[str, Any]], split: str) -> list[str]:
    """Mean ``split`` metric over seeds per (placement, family) × λ, the parent in the title."""
    cells: dict[tuple[str, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    parent: list[float] = []
    finals = [r for r in rows if r["phase"] == "final"]
    if not finals:
        return []
    key = finals[0]["metric"].replace("test_", f"{split}_")
    for r in finals:
        value = r["metrics"].get(key)
        value = value if value is not None and math.isfinite(value) and not r.get("diverged") else float("nan")
        try:
            arm = parse_arm(r["arm"], r["parent"])
        except ValueError:  # e.g. a family registered only in the session that ran it
            continue
        if arm.kind == "parent":
            parent.append(value)
        elif arm.kind == "ib" and not arm.learnable_lam:
            cells[(arm.placement, arm.compression)][arm.lam].append(value)
    lams = sorted({lam for by_lam in cells.values() for lam in by_lam})
    seeds = max((len(v) for by_lam in cells.values() for v in by_lam.values()), default=0)
    title = f"{key}, mean of {seeds} seeds; parent {statistics.fmean(parent):.3f}" if parent else key
    lines = [f"| {title} | " + " | ".join(f"λ={lam:g}" for lam in lams) + " |", "|---|" + "---|" * len(lams)]
    for (placement, family), by_lam in sorted(cells.items()):
        values = [statistics.fmean(by_lam[lam]) if by_lam.get(lam) else float("nan") for lam in lams]
        lines.append(f"| {family}, {placement} | " + " | ".join("–" if math.isnan(v) else f"{v:.3f}" for v in values) + " |")
    return lines


EVIDENCE_SECTION = "## Final comparisons at a glance"


def write_summary(plan: Path = DEFAULT_PLAN) -> Path:
    """``SUMMARY.md`` beside the plan (:func:`summary_text`) and, where there are final
    comparisons, their figure ``evidence.png`` (:func:`~.report.plot_evidence`)."""
    finals = _final_summaries(plan)
    png = plot_evidence(finals)
    if png is not None:
        atomic_write_bytes(Path(plan).parent / EVIDENCE_FIGURE, png)
    return atomic_write_text(Path(plan).parent / SUMMARY, _summary_text(plan, finals))


def _final_summaries(plan: Path) -> list[dict[str, list[dict[str, Any]]]]:
    root = Path(plan).parent
    return [summarize(rows, read_timing(e.out(root))) for e in load_plan(plan) if e.stage == "final" and (rows := read_results(e.out(root)))]


def summary_text(plan: Path = DEFAULT_PLAN) -> str:
    """What ``SUMMARY.md`` holds: first one table of every final comparison
    (:func:`~.report.evidence_table`, which README's evidence table copies), then per sweep
    the validation and test tables and the variant chosen per placement (on validation), and
    per comparison its headline lines and table."""
    return _summary_text(plan, _final_summaries(plan))


def _summary_text(plan: Path, finals: list[dict[str, list[dict[str, Any]]]]) -> str:
    root = Path(plan).parent
    entries = load_plan(plan)
    md = ["# Evidence campaign: summary", "", f"Made by `ibnorm results` from `{plan}`; each section names its folder.", ""]
    md += [
        EVIDENCE_SECTION,
        "",
        "Final entries; seeds from 100 on (n per arm in the table); each arm at its own learning rate tuned on validation; test metric "
        "(accuracy in %, bits/char in bpc); Δ = arm − parent paired over seeds; Holm over each task's comparisons "
        "with its parent; verdict at α = 0.05 or equivalence when the Δ interval lies inside the task's margin "
        "(±0.5 pt, ±0.02 bpc); step time: overhead against the parent from the entry's quiet interleaved timing "
        "(† from the training runs, indicative); gen. gap = held-out − held-in loss in nats.",
        "",
        *evidence_table(finals),
        "",
    ]
    for entry in entries:
        rows = read_results(entry.out(root))
        md += [f"## {entry.name}", "", f"`ibnorm {shlex.join(entry.argv)}`" + (f" — {entry.note}" if entry.note else ""), ""]
        if not rows:
            md += ["Not run yet.", ""]
            continue
        hours: dict[str, float] = defaultdict(float)
        for r in rows:
            if math.isfinite(r["step_time_s"]):
                hours[run_device(r)] += r["step_time_s"] * r["config"]["steps"] / 3600
        spent = ", ".join(f"{h:.2f} h on {device}" for device, h in sorted(hours.items()))
        md += [f"{len(rows)} runs; ≈ {spent} of training steps (median step time × steps, summed).", ""]
        if entry.argv[0] == "sweep":
            for split in ("val", "test"):
                md += [*_sweep_table(rows, split), ""]
            try:
                chosen = best_variants(rows, sweep_grid(entry))
                md += [f"- chosen on validation, {p}: `{arm}` ({value:.3f}, n={n})" for p, (arm, value, n) in sorted(chosen.items())]
            except LookupError as exc:
                md.append(f"- no choice yet: {exc}")
            md.append("")
        else:
            if entry.stage == "check" and entry.best_from:
                md += [*_rank_check(read_results(root / entry.best_from), rows), ""]
            summary = summarize(rows, read_timing(entry.out(root)))
            md += [f"- {line}" for line in at_a_glance(summary)] + [""]
            for table in summary.values():
                md += [*comparison_table_md(table), ""] + [f"- {v}" for v in (verdict(r) for r in table) if v] + [""]
    return "\n".join(md) + "\n"
