"""The ``guarded-serving`` subcommands, one module each: ``register(subparsers)`` adds
the parser, whose ``func`` runs the command and returns an exit status."""
