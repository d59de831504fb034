"""Arms of an A/B comparison: what each arm does to the task's parent model.

Spec strings: ``parent``; ``ib`` (the library default family, λ and placement of the task's
parent grouping, :data:`ibnorm.DEFAULT_VARIANTS`; the arm is named by its canonical spec, e.g.
``ib:S:0.1:centered``); ``ib-S`` /
``ib-L`` / ``ib-T`` (that family at λ = 1, standardized); ``ib-learnable`` (family L,
learnable λ from 1, standardized); ``ib:<family>:<λ>[:<placement>][:learnable]`` for any
registered family, λ and placement (``standardized``, the meaning when none is named, or
``centered``), e.g. ``ib:L:1:centered``; ``normalnorm``; ``dyt`` (LayerNorm and RMSNorm tasks). Every arm starts from the same initial weights: converters keep
the parent's Parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from ibnorm.baselines import DYT_GROUPINGS, NORMALNORM_GROUPINGS, convert_to_dyt, convert_to_normalnorm
from ibnorm.compression import check_lam, check_placement, get_compression
from ibnorm.defaults import with_defaults
from ibnorm.convert import convert_norms

# The placement an arm spec means when it names none. Fixed, not the library default, so that
# a spec in a results file keeps its meaning when the default changes.
SPEC_PLACEMENT = "standardized"

# λ of the family arms ib-S/ib-L/ib-T and the starting λ of ib-learnable (family L).
FAMILY_ARM_LAM = 1.0
_BASELINE_GROUPINGS = {"normalnorm": NORMALNORM_GROUPINGS, "dyt": DYT_GROUPINGS}
DEFAULT_ARMS = ("parent", "ib", "ib-S", "ib-L", "ib-T", "ib-learnable", "normalnorm", "dyt")


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str  # parent | ib | normalnorm | dyt
    compression: Optional[str] = None
    lam: Optional[float] = None
    learnable_lam: bool = False
    placement: str = SPEC_PLACEMENT

    def apply(self, model: nn.Module) -> nn.Module:
        if self.kind == "ib":
            model, _ = convert_norms(
                model, self.compression, self.lam, learnable_lam=self.learnable_lam, placement=self.placement
            )
        elif self.kind == "normalnorm":
            model, _ = convert_to_normalnorm(model)
        elif self.kind == "dyt":
            model, _ = convert_to_dyt(model)
        return model


def ib_spec(family: str, lam: float, placement: str = SPEC_PLACEMENT, learnable: bool = False) -> str:
    """The canonical spec ``ib:<family>:<λ>[:centered][:learnable]``; λ is written short and
    parses back to exactly the same float."""
    short = f"{lam:g}"
    text = short if float(short) == lam else repr(float(lam))
    return f"ib:{family}:{text}" + ("" if placement == SPEC_PLACEMENT else f":{placement}") + (":learnable" if learnable else "")


def default_arms(parents: set[str]) -> list[str]:
    """The arms of :data:`DEFAULT_ARMS` that apply to every one of the tasks' parent norms."""
    usable = []
    for spec in DEFAULT_ARMS:
        try:
            for parent in parents:
                parse_arm(spec, parent)
        except ValueError:
            continue
        usable.append(spec)
    return usable


def _family(spec: str, name: str) -> str:
    """The registered family ``name`` of arm ``spec``, or a ValueError naming the arm."""
    try:
        return get_compression(name).name
    except ValueError as exc:
        raise ValueError(f"arm {spec!r}: {exc}") from None


def parse_arm(spec: str, parent: str) -> Arm:
    """An :class:`Arm` from its spec string, checked against the task's parent grouping."""
    if not isinstance(spec, str):
        raise TypeError(f"arm must be a str, got {type(spec).__name__}")
    if spec == "parent":
        return Arm("parent", "parent")
    if spec in _BASELINE_GROUPINGS:
        if parent not in _BASELINE_GROUPINGS[spec]:
            raise ValueError(
                f"arm {spec!r} replaces {' and '.join(_BASELINE_GROUPINGS[spec])} norms only; this task's parent norm is {parent!r}"
            )
        return Arm(spec, spec)
    if spec == "ib":
        # named by what it is, so results keep their meaning when the library default changes
        family, lam, placement = with_defaults(parent)
        return Arm(ib_spec(family, lam, placement), "ib", family, lam, placement=placement)
    if spec == "ib-learnable":
        return Arm(spec, "ib", "L", FAMILY_ARM_LAM, True)
    if spec.startswith("ib-") and len(spec) > 3:
        family = _family(spec, spec[3:])
        return Arm(spec, "ib", family, FAMILY_ARM_LAM)
    if spec.startswith("ib:"):
        parts = spec.split(":")
        options = parts[3:]
        learnable = options[-1:] == ["learnable"]
        if learnable:
            options = options[:-1]
        if len(parts) >= 3 and len(options) <= 1:
            family = _family(spec, parts[1])
            try:
                lam = float(parts[2])
            except ValueError:
                raise ValueError(f"arm {spec!r}: lam {parts[2]!r} is not a number") from None
            try:
                lam = check_lam(lam)
            except ValueError as exc:
                raise ValueError(f"arm {spec!r}: {exc}") from None
            placement = check_placement(options[0], f"arm {spec!r}: placement") if options else SPEC_PLACEMENT
            if learnable and lam <= 0:
                raise ValueError(f"arm {spec!r}: a learnable lam needs an initial value > 0")
            return Arm(spec, "ib", family, lam, learnable, placement)
    raise ValueError(
        f"arm={spec!r} is not known; accepted: 'parent', 'ib', 'ib-S', 'ib-L', 'ib-T', 'ib-learnable', "
        "'ib:<family>:<lam>[:<placement>][:learnable]', 'normalnorm', 'dyt'"
    )
