"""The scheduling policies a daemon can run, by name: the one list that `flexnpu daemon`,
`flexnpu run`, `flexnpu service` and the daemon's scheduler factory (scheduling.make_scheduler)
offer and accept.

Each name is implemented by the policy class of the same name in flexnpu.sched.policy.POLICIES
(a test checks that the two agree). This module imports nothing heavy, so command-line parsers
can offer the choices without loading the scheduler.
"""

from __future__ import annotations

import enum


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
    "backend can partition (docs/scheduling.md)",
    PolicyName.PARTITION: "partition[:ALPHA], a static core split: prefill-phase streams on ALPHA "
    "(default 0.5) of the cores, the others on the rest",
}

POLICY_NAMES: tuple[str, ...] = tuple(p.value for p in PolicyName)
DEFAULT_POLICY: str = PolicyName.FIFO.value


def describe() -> str:
    """One line for --help: every policy with what it does."""
    return "; ".join(f"{p.value} = {DESCRIPTIONS[p]}" for p in PolicyName)


def parse_policy(spec: str) -> tuple[str, float | None]:
    """`fifo|priority|flex|partition[:ALPHA]` -> (name, alpha). partition:ALPHA is the static
    core split: prefill-phase streams on ALPHA of the cores, the others on 1 - ALPHA."""
    name, _, arg = spec.partition(":")
    if name not in POLICY_NAMES:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")
    if arg and name != PolicyName.PARTITION.value:
        raise ValueError(f"policy {name} takes no argument")
    alpha = None
    if arg:
        try:
            alpha = float(arg)
        except ValueError:
            raise ValueError(f"partition:ALPHA needs a number, not {arg!r}") from None
        if not 0 < alpha < 1:
            raise ValueError(f"partition alpha must be in (0, 1), not {alpha}")
    return name, alpha


def policy_arg(spec: str) -> str:
    """argparse type= for a --policy option: the spec itself once it parses."""
    import argparse

    try:
        parse_policy(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec
