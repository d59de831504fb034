r"""Mean and variance from pieces: block moments, their merge, and the finalize kernel.

A block contributes (count n_b, mean m_b, M2_b = Σ(t − m_b)²), computed in registers from
one load. Two pieces merge exactly (Chan et al.): with n = n_a + n_b and δ = m_b − m_a,

    m = m_a + δ·n_b/n,      M2 = M2_a + M2_b + δ²·n_a·n_b/n,

so a group's variance M2/n never forms the cancelling difference mean(t²) − mean(t)².
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def block_moments(t, mask):
    """(count, mean, M2) of the elements of ``t`` (any shape) where ``mask`` holds."""
    count = tl.sum(mask.to(tl.float32))
    mean = tl.sum(tl.where(mask, t, 0.0)) / count
    centered = tl.where(mask, t - mean, 0.0)
    return count, mean, tl.sum(centered * centered)


@triton.jit
def merge_moments(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """The (count, mean, M2) of two disjoint pieces together."""
    count = count_a + count_b
    share_b = count_b / count
    delta = mean_b - mean_a
    return count, mean_a + delta * share_b, m2_a + m2_b + delta * delta * count_a * share_b


@triton.jit
def finalize_kernel(PARTIALS, MEAN, VAR, RSTD, n_groups, n_partials, eps, BLOCK_P: tl.constexpr):
    """One program per group: merge its ``n_partials`` pieces, laid out as PARTIALS[3, G, P]
    (counts, means, M2), into the mean, the biased variance and rsqrt(var + eps)."""
    group = tl.program_id(0)
    k = tl.arange(0, BLOCK_P)
    mask = k < n_partials
    piece = PARTIALS + group * n_partials + k
    count = tl.load(piece, mask=mask, other=0.0)
    means = tl.load(piece + n_groups * n_partials, mask=mask, other=0.0)
    m2 = tl.load(piece + 2 * n_groups * n_partials, mask=mask, other=0.0)
    total = tl.sum(count)
    mean = tl.sum(count * means) / total
    spread = means - mean
    var = (tl.sum(m2) + tl.sum(count * spread * spread)) / total
    tl.store(MEAN + group, mean)
    tl.store(VAR + group, var)
    tl.store(RSTD + group, tl.rsqrt(var + eps))
