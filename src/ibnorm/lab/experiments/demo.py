"""The quick preset behind ``make demo`` / ``ibnorm demo``: the verdict in a few minutes.

Two tasks, each with the parent norm, the library default (``ib``) and the best ``centered``
variant of the committed validation sweep for that grouping (the best ``standardized`` one
where the default is already that variant) (``docs/results/sweep-*``, read
with :func:`ibnorm.lab.experiments.campaign.best_variants`; where the sweep is not available the
demo says so and uses the fallback below): MNIST-1D CNN (BatchNorm, 5 seeds) and a
character-level GPT-2 on Python's own documentation (LayerNorm, 3 seeds). Equal budgets,
seed-paired Δ with 95% intervals and Holm-adjusted p; the report opens with one line per
task: what is ahead, by how much, at what cost. The full evidence is ``make results``.
"""

from __future__ import annotations

from pathlib import Path

from .arms import parse_arm
from .campaign import DEFAULT_PLAN, best_variants, load_plan, sweep_grid
from .compare import make_plans, run_plans
from .report import write_report
from .results_file import read_results
from .tasks import get_task

SWEEPS = {"mnist1d-cnn": "sweep-mnist1d-cnn", "pydoc-gpt2": "sweep-mnist1d-mlp"}  # plan entries per grouping
FALLBACK_CENTERED = "ib:S:0.1:centered"  # used only where the sweep folder is missing or unfinished


def demo_arms(task: str) -> list[str]:
    """The parent, the library default and the best ``centered`` variant on validation in
    ``task``'s grouping sweep (the fallback where that sweep is missing); where the default
    is that very variant, the best ``standardized`` one takes the third place."""
    try:
        entry = next(e for e in load_plan(DEFAULT_PLAN) if e.name == SWEEPS[task])
        best = best_variants(read_results(entry.out(DEFAULT_PLAN.parent)), sweep_grid(entry))
        if "centered" not in best:
            raise LookupError("no centered variant finished without diverging")
    except (LookupError, StopIteration, FileNotFoundError) as exc:
        print(f"demo: {task}: no finished sweep {SWEEPS[task]} with a centered choice ({exc!r}); using {FALLBACK_CENTERED}")
        best = {"centered": (FALLBACK_CENTERED,)}
    parent = get_task(task).parent
    default = parse_arm("ib", parent)
    centered = parse_arm(best["centered"][0], parent)
    same = (centered.compression, centered.lam, centered.placement) == (default.compression, default.lam, default.placement)
    third = best["standardized"][0] if same and "standardized" in best else best["centered"][0]
    return ["parent", "ib", third]


def run_demo(out: Path, progress: bool = True) -> Path:
    """Train (or resume) the demo's runs in ``out``, write ``out/report.md`` and ``.html``, print
    the report and return its path."""
    plans = make_plans(
        ["mnist1d-cnn"], demo_arms("mnist1d-cnn"), seeds=5, steps=1500, eval_every=250
    ) + make_plans(
        ["pydoc-gpt2"],
        demo_arms("pydoc-gpt2"),
        seeds=3,
        steps=150,
        batch_size=16,
        eval_every=50,
        eval_items=4096,
        final_items=32_768,
    )
    run_plans(plans, out, progress=progress, command="ibnorm demo")
    report = write_report(out, "ibnorm demo: parent vs the library default vs the best centered variant")
    print((Path(out) / "report.md").read_text())
    print(f"report: {report} and {report.with_suffix('.html')}")
    return report
