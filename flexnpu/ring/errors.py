"""Exceptions of the ring layer."""


class RingError(Exception):
    """Base class of every ring error."""


class RingCorrupt(RingError):
    """The peer scribbled on shared memory (indices, header, arena offsets). Never followed."""


class PeerDead(RingError):
    """The peer process died (detected while waiting, within LIVENESS_INTERVAL_S)."""


class PeerClosed(RingError):
    """The peer marked the segment closed (orderly shutdown)."""
