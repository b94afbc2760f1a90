"""Training recipes for the reference models. They train, then wrap like any user."""

RECIPES = ("credit_risk",)
