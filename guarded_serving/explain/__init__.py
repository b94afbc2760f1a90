"""Per-response explanations."""
