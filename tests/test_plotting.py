"""Report plots are made without touching the user's matplotlib backend or pyplot state."""

import subprocess
import sys

import pytest

SCRIPT = """
import matplotlib
matplotlib.use("pdf")
import matplotlib.pyplot as plt
from ibnorm.lab._plotting import figure_png, pyplot
fig, ax = pyplot().subplots(figsize=(3, 2))
ax.plot([1, 2], [3, 4])
png = figure_png(fig)
assert png.startswith(b"\\x89PNG"), png[:8]
assert matplotlib.get_backend() == "pdf", matplotlib.get_backend()
assert plt.get_fignums() == [], plt.get_fignums()
"""


@pytest.mark.slow
def test_plots_leave_the_backend_and_pyplot_alone():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
