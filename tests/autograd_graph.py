"""Which implementation computed a tensor, read from its autograd graph."""

from __future__ import annotations

import functools

from typing import Any, Optional

from torch import Tensor


def function_node(y: Tensor) -> Optional[Any]:
    """The first IBNormFunction or C++ IBNormNode in ``y``'s autograd graph, or None."""
    stack = [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is None:
            continue
        if "IBNormNode" in node.name() or "IBNormFunction" in type(node).__name__:
            return node
        stack.extend(n for n, _ in node.next_functions)
    return None


def implementation(y: Tensor) -> str:
    """``"cpp"`` for the C++ kernels' autograd node; for the IBNormFunction, its backward body:
    ``"compiled"`` (the compiled body behind its fallback guard), ``"eager"`` or the kernel
    package (``"triton"``); ``"reference"`` where neither made ``y`` (the composite of torch ops)."""
    node = function_node(y)
    if node is None:
        return "reference"
    if "IBNormNode" in node.name():
        return "cpp"
    body = node.backward_body
    if not isinstance(body, functools.partial):
        return "compiled"
    module = body.func.__module__
    return {"ibnorm.ops.function": "eager"}.get(module, module.split(".")[2])
