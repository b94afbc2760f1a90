"""The request-path guards, one module per stage."""
