"""The quick preset behind ``make demo`` / ``ibnorm demo``: the verdict in a few minutes.

Two tasks, each with the parent norm, the library default (``ib``) and the best ``centered``
variant of the committed validation sweep for that grouping (``docs/results/sweep-*``, read
with :func:`ibnorm.experiments.campaign.best_variants`; where the sweep is not available the
demo says so and uses the fallback below): MNIST-1D CNN (BatchNorm, 5 seeds) and a
character-level GPT-2 on Python's own documentation (LayerNorm, 3 seeds). Equal budgets,
seed-paired Δ with 95% intervals and Holm-adjusted p; the report opens with one line per
task: what is ahead, by how much, at what cost. The full evidence is ``make results``.
"""

from __future__ import annotations

from pathlib import Path

from .campaign import best_variants
from .compare import make_plans, read_results, run_plans
from .report import write_report

SWEEPS = {"mnist1d-cnn": Path("docs/results/sweep-mnist1d-cnn"), "pydoc-gpt2": Path("docs/results/sweep-mnist1d-mlp")}
FALLBACK_CENTERED = "ib:S:0.1:centered"  # used only where the sweep folder is missing or unfinished


def centered_arm(task: str) -> str:
    """The best ``centered`` variant on validation in ``task``'s grouping sweep, else the fallback."""
    try:
        return best_variants(read_results(SWEEPS[task]))["centered"][0]
    except (LookupError, KeyError) as exc:
        print(f"demo: {task}: no finished sweep at {SWEEPS[task]} ({exc}); using {FALLBACK_CENTERED}")
        return FALLBACK_CENTERED


def run_demo(out: Path, progress: bool = True) -> Path:
    plans = make_plans(
        ["mnist1d-cnn"], ["parent", "ib", centered_arm("mnist1d-cnn")], seeds=5, steps=1500, eval_every=250
    ) + make_plans(
        ["pydoc-gpt2"],
        ["parent", "ib", centered_arm("pydoc-gpt2")],
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
