"""TensorRef (a tensor argument on the wire), re-exported from flexnpu.protocol so the hook and the
backend executor share one class for isinstance checks."""
from flexnpu.protocol import TensorRef

__all__ = ["TensorRef"]
