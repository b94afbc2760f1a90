"""Training recipes for the reference models. They train, then wrap like any user."""

from __future__ import annotations

import importlib
from types import ModuleType

RECIPES = ("credit_risk",)


def load_recipe(name: str) -> ModuleType:
    """The recipe module; each has ``run(provider, *, echo=print) -> tag``."""
    if name not in RECIPES:
        raise KeyError(name)
    return importlib.import_module(f"guarded_serving.recipes.{name}")
