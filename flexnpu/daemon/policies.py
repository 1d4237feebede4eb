"""The scheduling policies a daemon can run, by name: the one list that `flexnpu daemon`,
`flexnpu run`, `flexnpu service` and the daemon's scheduler factory (scheduling.make_scheduler)
offer and accept.

Each name is implemented by the policy class of the same name in flexnpu.sched.policy.POLICIES
(a test checks that the two agree). This module imports nothing heavy, so command-line parsers
can offer the choices without loading the scheduler.
"""

from __future__ import annotations

import enum
import math


class PolicyName(str, enum.Enum):
    FIFO = "fifo"
    PRIORITY = "priority"
    FLEX = "flex"
    PARTITION = "partition"

    def __str__(self) -> str:
        return self.value


DESCRIPTIONS: dict[PolicyName, str] = {
    PolicyName.FIFO: "arrival order (passthrough)",
    PolicyName.PRIORITY: "strict stream priority",
    PolicyName.FLEX: "prefill/decode co-location: decode streams keep their time-per-token budget, "
    "prefill fills the rest, with core shares changed at operator boundaries where the "
    "backend can partition; flex:SLACK keeps decode's core share at least what keeps its "
    "iteration within 1+SLACK of its whole-device time (docs/scheduling.md)",
    PolicyName.PARTITION: "partition[:ALPHA], a static core split: prefill-phase streams on ALPHA "
    "(default 0.5) of the cores, the others on the rest",
}

POLICY_NAMES: tuple[str, ...] = tuple(p.value for p in PolicyName)
DEFAULT_POLICY: str = PolicyName.FIFO.value


def describe() -> str:
    """One line for --help: every policy with what it does."""
    return "; ".join(f"{p.value} = {DESCRIPTIONS[p]}" for p in PolicyName)


def parse_policy(spec: str) -> tuple[str, float | None]:
    """`fifo|priority|flex[:SLACK]|partition[:ALPHA]` -> (name, argument). partition:ALPHA is
    the static core split: prefill-phase streams on ALPHA of the cores, the others on 1 - ALPHA.
    flex:SLACK is the TPOT-keeping flex variant (FlexPolicy.tpot_slack, SLACK >= 0)."""
    name, _, arg = spec.partition(":")
    if name not in POLICY_NAMES:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")
    if arg and name not in (PolicyName.PARTITION.value, PolicyName.FLEX.value):
        raise ValueError(f"policy {name} takes no argument")
    value = None
    if arg:
        what = "partition:ALPHA" if name == PolicyName.PARTITION.value else "flex:SLACK"
        try:
            value = float(arg)
        except ValueError:
            raise ValueError(f"{what} needs a number, not {arg!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"{what} needs a finite number, not {arg!r}")
        if name == PolicyName.PARTITION.value and not 0 < value < 1:
            raise ValueError(f"partition alpha must be in (0, 1), not {value}")
        if name == PolicyName.FLEX.value and value < 0:
            raise ValueError(f"flex slack must be >= 0, not {value}")
    return name, value


def policy_arg(spec: str) -> str:
    """argparse type= for a --policy option: the spec itself once it parses."""
    import argparse

    try:
        parse_policy(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec
