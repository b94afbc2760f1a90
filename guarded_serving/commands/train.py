"""``guarded-serving train RECIPE``: train a reference model, then wrap it."""

from __future__ import annotations

import argparse
import sys

from guarded_serving.commands._keys import master_key


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("train", help="train a reference model and wrap it")
    parser.add_argument("model", help="recipe name, e.g. credit_risk")
    parser.add_argument(
        "--create-key", action="store_true", help="create the master key file if there is none"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from guarded_serving.recipes import RECIPES, load_recipe

    if args.model not in RECIPES:
        print(f"unknown recipe {args.model!r}; known: {', '.join(RECIPES)}", file=sys.stderr)
        return 2
    load_recipe(args.model).run(master_key(create=args.create_key))
    return 0
