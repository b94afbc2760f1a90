"""``guarded-serving policy init``: draft a policy from a model and a data sample."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    policy = sub.add_parser("policy", help="model policies")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    init = policy_sub.add_parser("init", help="draft a policy for a model and its data")
    init.add_argument("model", help="the model file")
    init.add_argument("--data", required=True, help="training sample, .csv or .parquet")
    init.add_argument("--name", required=True, help="model name (lower case, digits, _ . -)")
    init.add_argument("--target", help="label column in the data, left out of the features")
    init.add_argument(
        "--ignore", action="append", default=[], help="another column to leave out (repeatable)"
    )
    init.add_argument(
        "--protected",
        action="append",
        default=[],
        help="a column holding a protected attribute: monitored, never a model input "
        "(repeatable; its groups are read from the data)",
    )
    init.add_argument("--output", "-o", help="write here instead of standard output")
    init.add_argument("--trust", action="store_true", help="see 'wrap --trust'")
    init.set_defaults(func=_init)


def _init(args: argparse.Namespace) -> int:
    from guarded_serving.drafting import draft_policy_text

    text = draft_policy_text(
        Path(args.model),
        Path(args.data),
        name=args.name,
        exclude=[c for c in [args.target, *args.ignore] if c],
        protected=args.protected,
        trust=args.trust,
    )
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}; review it, then wrap")
    else:
        sys.stdout.write(text)
    return 0
