"""Headless matplotlib: figures become PNG bytes (written atomically by the caller).

Figures are built from :class:`matplotlib.figure.Figure` directly, never through
``matplotlib.pyplot``'s global state, so making a report neither switches the user's
backend nor opens windows nor leaks figures.
"""

from __future__ import annotations

import io
from types import SimpleNamespace
from typing import Any


def _subplots(*args: Any, figsize: Any = None, **kwargs: Any) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def pyplot() -> Any:
    """The one part of ``pyplot`` the plots use, ``subplots(...) -> (fig, axes)``, on
    standalone figures (raises ImportError if matplotlib is absent)."""
    import matplotlib  # noqa: F401  (fail early and clearly when matplotlib is missing)

    return SimpleNamespace(subplots=_subplots)


def figure_png(fig: Any, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (Agg renderer)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attaches an Agg canvas to this figure only
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
