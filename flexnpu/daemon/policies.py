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

    def __str__(self) -> str:
        return self.value


DESCRIPTIONS: dict[PolicyName, str] = {
    PolicyName.FIFO: "arrival order (passthrough)",
    PolicyName.PRIORITY: "strict stream priority",
    PolicyName.FLEX: "prefill/decode co-location: decode streams keep their time-per-token budget, "
                     "prefill fills the rest (docs/scheduling.md)",
}

POLICY_NAMES: tuple[str, ...] = tuple(p.value for p in PolicyName)
DEFAULT_POLICY: str = PolicyName.FIFO.value


def describe() -> str:
    """One line for --help: every policy with what it does."""
    return "; ".join(f"{p.value} = {DESCRIPTIONS[p]}" for p in PolicyName)
