"""Training recipes for the reference models. They train, then wrap like any user."""

from __future__ import annotations

import importlib
from types import ModuleType

RECIPES = ("credit_risk", "pneumonia", "engine_failure")


def load_recipe(name: str) -> ModuleType:
    """The recipe module.

    Each has ``run(provider, *, echo=print, name=None)``, which trains, wraps and
    registers, returning the tag it registered (``credit_risk``) or its tags with the
    version to serve last (the networks: standard, then hardened). The networks'
    ``test_data()`` gives the held-out inputs and labels their figures are measured on.
    """
    if name not in RECIPES:
        raise KeyError(name)
    return importlib.import_module(f"guarded_serving.recipes.{name}")
