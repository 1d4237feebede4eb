"""FlexNPU: a transparent user-space virtualization layer for AI accelerators."""
__version__ = "0.1.0"
