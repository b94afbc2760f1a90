"""Model runtimes: load a model from bytes in memory and score a matrix."""

from guarded_serving.runtimes.base import Runtime, load_runtime

__all__ = ["Runtime", "load_runtime"]
