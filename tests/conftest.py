import os

from hypothesis import settings

import ibnorm

# Deterministic property tests: the same examples on every run and in CI.
settings.register_profile("ibnorm", derandomize=True, deadline=None)
settings.load_profile("ibnorm")

# Layers run on the analytic-backward Function without compilation unless a test asks for
# another backend; IBNORM_TEST_BACKEND=compiled|reference reruns the suite on another one.
ibnorm.set_backend(os.environ.get("IBNORM_TEST_BACKEND", "eager"))
