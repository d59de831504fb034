"""The quick preset behind ``make demo`` / ``ibnorm demo``: a real but small A/B.

MNIST-1D CNN (BatchNorm parent, 3 seeds) and a character-level GPT-2 on Python's own
documentation text (LayerNorm parent, 2 seeds), each parent vs IBNorm-L and IBNorm-T, with
equal budgets. A few minutes on 2 CPU cores; too few steps and seeds to settle anything,
which the report's p-values show.
"""

from __future__ import annotations

from pathlib import Path

from .compare import make_plans, run_plans
from .report import write_report

ARMS = ("parent", "ib-L", "ib-T")


def run_demo(out: Path, progress: bool = True) -> Path:
    plans = make_plans(["mnist1d-cnn"], ARMS, seeds=3, steps=1500, eval_every=250) + make_plans(
        ["pydoc-gpt2"], ARMS, seeds=2, steps=150, batch_size=16, eval_every=50, eval_items=4096
    )
    run_plans(plans, out, progress=progress)
    report = write_report(out, "ibnorm demo: parent vs IBNorm-L/T")
    print((Path(out) / "report.md").read_text())
    print(f"report: {report} and {report.with_suffix('.html')}")
    return report
