"""Model runtimes: load a model from bytes in memory and score validated rows."""

from guarded_serving.runtimes.base import ModelInput, Runtime, load_runtime

__all__ = ["ModelInput", "Runtime", "load_runtime"]
