"""The serving systems the study compares: one registry, used by the simulator (sim.py), the
real-time runs through daemons (bench/_realtime.py) and `flexnpu bench serve`.

A `System` is a `str` (its value is the name in JSON, on the command line and in the docs), so
`System.FLEXNPU == "flexnpu"` and results written by earlier versions still read back.
"""

from __future__ import annotations

import enum

__all__ = ["System", "parse_system"]


class System(str, enum.Enum):
    STATIC_PARTITION = "static-partition"
    NAIVE_COLOC = "naive-coloc"
    STATIC_COLOC = "static-coloc"
    DECODE_FIRST = "decode-first"
    STATIC_DISAGG = "static-disagg"
    FLEXNPU = "flexnpu"
    FLEXNPU_TPOT = "flexnpu-tpot"

    # the value, not "System.FLEXNPU", wherever a name is printed or formatted
    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]

    @property
    def colocated(self) -> bool:
        """A prefill and a decode instance on every device, sharing it under a device policy."""
        return self in (System.FLEXNPU, System.FLEXNPU_TPOT, System.STATIC_PARTITION, System.NAIVE_COLOC)


_DESCRIPTIONS = {
    System.STATIC_PARTITION: "P and D instances on every device with a fixed core split alpha (the paper's baseline)",
    System.NAIVE_COLOC: "P and D processes on one device, fifo, no partition (no virtualization layer)",
    System.STATIC_COLOC: "one engine per device, chunked prefill batched with decode (vLLM-style)",
    System.DECODE_FIRST: "one engine per device, decode first, new requests wait (TTFT explodes)",
    System.STATIC_DISAGG: "prefill and decode on separate devices, KV cache copied over the link",
    System.FLEXNPU: "P and D instances on every device, the flex policy moves core shares per operator",
    System.FLEXNPU_TPOT: "flexnpu keeping decode's share at its TPOT floor (flex:SLACK)",
}

# names earlier versions used
_ALIASES = {"static-coloc-decode-first": System.DECODE_FIRST}


def parse_system(name: str) -> System:
    """The system called `name`; ValueError naming the choices for anything else."""
    if name in _ALIASES:
        return _ALIASES[name]
    try:
        return System(name)
    except ValueError:
        raise ValueError(
            f"unknown serving system {name!r}; choose from {', '.join(s.value for s in System)}"
        ) from None
