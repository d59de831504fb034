"""Triton's CPU interpreter for the tests.

``@triton.jit`` decides when a function is decorated whether it is interpreted, so
``TRITON_INTERPRET=1`` must be set while triton (whose library is jitted too) and
:mod:`ibnorm.ops.triton` are first imported. It is set only for that import, so the rest of
the suite still sees a CPU without Triton. Where triton was imported earlier without it (in a
whole-suite run, importing ``torch._dynamo`` imports triton), the kernels cannot be
interpreted in this process.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import Iterator, Optional


@contextlib.contextmanager
def interpreter_on() -> Iterator[None]:
    """``TRITON_INTERPRET=1`` while the block runs; functions jitted in it are interpreted."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def import_interpreted_kernels() -> Optional[str]:
    """Import triton and :mod:`ibnorm.ops.triton` with the interpreter on; ``None`` where the
    kernels run interpreted in this process, else why they do not."""
    with interpreter_on():
        try:
            standard = importlib.import_module("triton.language.standard")
            from triton.runtime.interpreter import InterpretedFunction
        except ImportError as exc:
            return f"triton is not importable ({exc})"
        rows = importlib.import_module("ibnorm.ops.triton.rows")
    if not (isinstance(standard.sum, InterpretedFunction) and isinstance(rows._forward_kernel, InterpretedFunction)):
        return "triton was imported before TRITON_INTERPRET=1 could be set"
    return None
