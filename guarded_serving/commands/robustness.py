"""``guarded-serving robustness MODEL``: attack each version of a model with ART.

Runs FGSM and PGD from the Adversarial Robustness Toolbox at the budget the model's
policy declares (``robustness``), against every variant of the model in the store
(the newest version per ``variant`` label, e.g. standard and hardened), on the
recipe's held-out test set or a given ``.npz`` (arrays ``x`` and ``y``), prints the
table and, with ``--write-doc``, writes it to docs/robustness.md.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import numpy as np

from guarded_serving.commands._keys import master_key

DOC = Path(__file__).resolve().parents[2] / "docs" / "robustness.md"


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("robustness", help="attack a model's versions with ART; report")
    parser.add_argument("model", help="model name in the store, e.g. pneumonia")
    parser.add_argument("--data", help=".npz with arrays x and y (default: the recipe's test set)")
    parser.add_argument("--limit", type=int, default=None, help="attack only the first N rows")
    parser.add_argument("--write-doc", action="store_true", help="update docs/robustness.md")
    parser.add_argument("--doc", type=Path, default=DOC, help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from guarded_serving.errors import ConfigError

    provider = master_key()
    x, y = _test_data(args.model, args.data)
    if args.limit:
        x, y = x[: args.limit], y[: args.limit]
    rows = []
    for variant, tag in _variants(args.model):
        rows.append((variant, tag, audit_version(tag, provider, x, y)))
    if not rows:
        raise ConfigError(f"no version of {args.model} in the model store")
    table = format_table(args.model, rows, len(y), rows[-1][2]["budget"])
    print(table)
    if args.write_doc:
        write_doc(args.model, table, args.doc)
        print(f"wrote {args.doc}")
    return 0


def audit_version(tag: str, provider: Any, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Clean accuracy and attack success rates of one stored model version, and its
    budget in words (``budget``)."""
    from guarded_serving.errors import ConfigError
    from guarded_serving.guards.tensor import TensorCheck
    from guarded_serving.registry import open_model
    from guarded_serving.robustness import evaluate_robustness

    model = open_model(tag, provider)
    policy = model.policy
    if policy.robustness is None or policy.input is None:
        raise ConfigError(f"{tag}: the policy declares no robustness budget for a tensor input")
    module = model.torch_module()
    if module is None:
        raise ConfigError(f"{tag}: no torch module to take gradients through")
    budget = policy.robustness
    epsilon = epsilon_array(policy, model.manifest, budget.epsilon)
    step = budget.pgd_step_size
    step_size = (
        epsilon_array(policy, model.manifest, step) if step else epsilon * 2.5 / budget.pgd_steps
    )
    check = TensorCheck(policy.input)
    result = evaluate_robustness(
        module,
        x,
        y,
        epsilon=epsilon,
        steps=budget.pgd_steps,
        step_size=step_size,
        clip_values=(check.low.astype(np.float32), check.high.astype(np.float32)),
    )
    result["budget"] = describe_budget(budget)
    return result


def epsilon_array(policy: Any, manifest: dict, value: float) -> np.ndarray:
    """The budget as an array of the input's shape, in input units."""
    spec = policy.input
    shape = tuple(spec.shape)
    if policy.robustness.epsilon_unit == "absolute":
        return np.full(shape, value, dtype=np.float32)
    std = np.asarray(manifest["data"]["channel_std"], dtype=np.float64)
    if spec.range_axis is None:
        return np.full(shape, value * float(std[0]), dtype=np.float32)
    view = [1] * len(shape)
    view[spec.range_axis] = -1
    return np.broadcast_to(value * std.reshape(view), shape).astype(np.float32)


def format_table(model: str, rows: list[tuple[str, str, dict]], n: int, budget: str) -> str:
    """A Markdown table, one row per version."""
    head = (
        f"{model}: {n} held-out test inputs; {budget}\n\n"
        "| variant | version | clean accuracy | correctly classified | FGSM success "
        "| PGD success | accuracy under PGD |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |"
    )
    lines = [
        f"| {variant} | {tag.split(':')[1]} | {r['clean_accuracy']:.3f} | {r['correct']} "
        f"| {r['fgsm_success_rate']:.3f} | {r['pgd_success_rate']:.3f} "
        f"| {r['pgd_accuracy']:.3f} |"
        for variant, tag, r in rows
    ]
    return "\n".join([head, *lines])


def describe_budget(budget: Any) -> str:
    """The policy's attack budget in words."""
    absolute = budget.epsilon_unit == "absolute"
    unit = "on the input scale" if absolute else "of each channel's sd"
    step = budget.pgd_step_size or 2.5 * budget.epsilon / budget.pgd_steps
    return (
        f"L-inf epsilon {budget.epsilon:g} {unit}; PGD {budget.pgd_steps} steps of "
        f"{step:g}{'' if absolute else ' sd'}, one random start"
    )


def write_doc(model: str, table: str, path: Path = DOC) -> None:
    begin, end = f"<!-- {model}:begin -->", f"<!-- {model}:end -->"
    block = f"{begin}\n{table}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else _DOC_HEAD
    if begin in text:
        text = re.sub(
            re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S
        )
    else:
        text = text.rstrip() + f"\n\n## {model}\n\n{block}\n"
    path.write_text(text, encoding="utf-8")


_DOC_HEAD = """# Robustness

Written by `guarded-serving robustness MODEL --write-doc` (which reruns the attacks).
Success rate: the share of correctly classified held-out inputs whose prediction the
attack flips, at the L-infinity budget of the model's policy (`robustness`).
"""


def _variants(name: str) -> list[tuple[str, str]]:
    """(variant, tag) of the newest version per ``variant`` label; else the newest one."""
    import bentoml

    try:
        models = sorted(bentoml.models.list(name), key=lambda m: m.info.creation_time)
    except bentoml.exceptions.NotFound:
        return []
    newest: dict[str, str] = {}
    for model in models:
        newest[model.info.labels.get("variant", "latest")] = str(model.tag)
    if len(newest) > 1:
        newest.pop("latest", None)
    return sorted(newest.items(), key=lambda kv: (kv[0] != "standard", kv[0]))


def _test_data(name: str, path: str | None) -> tuple[np.ndarray, np.ndarray]:
    if path:
        with np.load(path, allow_pickle=False) as data:
            return data["x"].astype(np.float32), data["y"].astype(np.int64)
    from guarded_serving.errors import ConfigError
    from guarded_serving.recipes import RECIPES, load_recipe

    recipe = load_recipe(name) if name in RECIPES else None
    if recipe is None or not hasattr(recipe, "test_data"):
        raise ConfigError(f"{name} has no recipe test set: give one with --data")
    return recipe.test_data()
