import os

from hypothesis import settings

import ibnorm

# Deterministic property tests: the same examples on every run and in CI.
settings.register_profile("ibnorm", derandomize=True, deadline=None)
settings.load_profile("ibnorm")

# The suite runs on the backend users get by default (``auto``, or $IBNORM_BACKEND) unless a
# test asks for another; IBNORM_TEST_BACKEND=eager|compiled|reference|... reruns it on another.
if "IBNORM_TEST_BACKEND" in os.environ:
    ibnorm.set_backend(os.environ["IBNORM_TEST_BACKEND"])
