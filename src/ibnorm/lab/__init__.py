"""The lab: the research harness built on the ibnorm library.

Experiments (tasks, data, models, training, A/B comparisons, reports, the evidence
campaign), the representation-analysis runs over experiment folders, the kernel and
model-step benchmark and the ``ibnorm`` command line. It imports the library; the library
never imports it. Its extra dependencies are the ``lab`` extra of the package
(``pip install ibnorm[lab]``).
"""
