"""Per-row explanation cost of the stored reference networks, to size time budgets.

    python benchmarks/explain_latency.py [pneumonia engine_failure] [--rows 16]

Opens the newest stored version of each named model (decrypting it into memory with
the configured master key, as the server does), explains ``--rows`` held-out test
inputs one request at a time after one warm-up row, and prints per model: the
explainer, its steps and background rows, the median and largest time per row, the
largest completeness gap against the stated tolerance, and how many rows one request
explains within the policy's time budget at the median cost. Run it after
``guarded-serving demo`` (or ``guarded-serving train``) has put the models in the store.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from guarded_serving.recipes import load_recipe  # noqa: E402
from guarded_serving.registry import open_model  # noqa: E402
from guarded_serving.runtimes.base import ModelInput  # noqa: E402
from guarded_serving.server import resolve_key_provider  # noqa: E402
from guarded_serving.settings import GuardedServingSettings  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=["pneumonia", "engine_failure"])
    parser.add_argument("--rows", type=int, default=16, help="test inputs to explain")
    args = parser.parse_args(argv)

    provider = resolve_key_provider(GuardedServingSettings())
    if provider is None:
        print("no master key configured; run guarded-serving demo first", file=sys.stderr)
        return 1
    print(
        "| model | version | method | steps | background | median ms/row | max ms/row "
        "| max gap / tolerance | rows within the budget |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for name in args.models:
        print(measure(name, provider, args.rows))
    return 0


def measure(name: str, provider: object, rows: int) -> str:
    model = open_model(f"{name}:latest", provider)  # type: ignore[arg-type]
    explainer = model.explainer
    x, _ = load_recipe(name).test_data()
    explainer.explain(ModelInput([x[0]], model.encoder))  # warm-up

    seconds, gaps = [], []
    for row in x[1 : rows + 1]:
        started = time.perf_counter()
        [explanation] = explainer.explain(ModelInput([row], model.encoder))
        seconds.append(time.perf_counter() - started)
        gaps.append(abs(explanation.details.get("completeness_gap", 0.0)))

    median_ms = statistics.median(seconds) * 1000
    gradient = model.policy.explanation.gradient
    batch = model.policy.limits.max_batch_rows
    fit = int(gradient.time_budget_ms // median_ms)
    within = f"all {batch}" if fit >= batch else f"{fit} of {batch}"
    steps = getattr(explainer, "steps", "-")
    background = explainer.background["rows"] if hasattr(explainer, "background") else "-"
    return (
        f"| {name} | {model.version} | {explainer.method} | {steps} | {background} "
        f"| {median_ms:.0f} | {max(seconds) * 1000:.0f} "
        f"| {max(gaps):.4f} / {gradient.tolerance:g} "
        f"| {within} |"
    )


if __name__ == "__main__":
    sys.exit(main())
