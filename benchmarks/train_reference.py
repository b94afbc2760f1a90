"""Train the reference networks from scratch, print every figure, check the floors.

    python benchmarks/train_reference.py [--fast] [--json PATH] [--quiet]

Trains both variants (standard, hardened with PGD adversarial training) of the
pneumonia CNN and of the engine-failure GRU from the vendored data, exactly as
their recipes do, and prints for each: clean test figures (accuracy, F1, ROC AUC),
ART's FGSM and PGD success rates at the declared budget, the epoch chosen on
validation, and the wall time. Exits with status 1 if a floor is missed:

- pneumonia: standard test accuracy >= 0.84; hardened PGD success <= half the
  standard's; hardened test accuracy at most 0.05 below the standard's;
- engine_failure: standard F1 >= 0.82 on the test engines' last windows; hardened
  PGD success on them <= half the standard's;
- both models, both variants, trained in under 600 s in all.

``--fast`` runs the recipes' test mode (few epochs, small samples); it checks no
floor. Nothing is registered in a model store.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="gs-train-"))
sys.path.insert(0, str(REPO))

from guarded_serving.recipes import engine_failure, pneumonia  # noqa: E402

TIME_LIMIT_S = 600.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="test mode; no floors checked")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    args = parser.parse_args(argv)

    def echo(line: str) -> None:
        if not (args.quiet and line.startswith("    epoch")):
            print(line, flush=True)

    start = time.perf_counter()
    results = {}
    for name, recipe in (("pneumonia", pneumonia), ("engine_failure", engine_failure)):
        began = time.perf_counter()
        trained = recipe.train_all(fast=args.fast, echo=echo)
        results[name] = {
            "seconds": round(time.perf_counter() - began, 1),
            **{v: trained[v]["metrics"] for v in recipe.VARIANTS},
        }
    total_s = time.perf_counter() - start

    print()
    print(pneumonia_table(results["pneumonia"]))
    print()
    print(engine_table(results["engine_failure"]))
    print()
    print(noise_table())
    print()
    print(
        f"wall time: {total_s:.1f} s in all (pneumonia {results['pneumonia']['seconds']:.1f} s, "
        f"engine_failure {results['engine_failure']['seconds']:.1f} s; both variants each, "
        f"from scratch, torch threads {torch_threads()})"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({**results, "total_seconds": round(total_s, 1)}, indent=2, default=float)
        )
    if args.fast:
        print("fast mode: floors not checked")
        return 0
    failures = check_floors(results, total_s)
    print()
    for line in failures or ["all floors met"]:
        print(line)
    return 1 if failures else 0


def pneumonia_table(result: dict[str, Any]) -> str:
    lines = [
        f"pneumonia: PneumoniaMNIST, test {result['standard']['rows']['test']} images; "
        f"attacks at epsilon {pneumonia.EPSILON} (L-inf, 0-1 scale), PGD "
        f"{pneumonia.PGD_STEPS} steps of {pneumonia.PGD_STEP_SIZE:g}, one random start",
        "",
        "| variant | best epoch | train s | test accuracy | test F1 | test ROC AUC "
        "| validation accuracy | attacked | FGSM success | PGD success |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for variant in pneumonia.VARIANTS:
        m = result[variant]
        fit, test, attack = m["training"], m["test"], m["robustness"]
        lines.append(
            f"| {variant} | {fit['best_epoch']}/{fit['epochs']} | {fit['train_seconds']:.1f} "
            f"| {test['accuracy']:.4f} | {test['f1']:.4f} | {test['roc_auc']:.4f} "
            f"| {m['validation']['accuracy']:.4f} | {attack['rows']} "
            f"| {attack['fgsm_success_rate']:.3f} | {attack['pgd_success_rate']:.3f} |"
        )
    return "\n".join(lines)


def engine_table(result: dict[str, Any]) -> str:
    rows = result["standard"]["rows"]
    lines = [
        f"engine_failure: C-MAPSS FD001, {rows['train_engines']} training engines "
        f"({rows['train_windows']} windows), {rows['validation_engines']} validation engines "
        f"({rows['validation_windows']} windows), {rows['test_engines']} test engines; "
        f"attacks at epsilon {engine_failure.EPSILON_STD_FRACTION} sd per sensor (L-inf), "
        f"PGD {engine_failure.PGD_STEPS} steps of "
        f"{engine_failure.PGD_STEP_SIZE_STD_FRACTION:g} sd, one random start",
        "",
        "| variant | best epoch | train s | set | rows | positives | F1 | ROC AUC | accuracy "
        "| attacked | FGSM success | PGD success |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    sets = (
        ("test engines, last window", "test", "robustness"),
        ("test engines, all windows", "test_all_windows", "robustness_all_windows"),
        ("validation engines, all windows", "validation", None),
    )
    for variant in engine_failure.VARIANTS:
        m = result[variant]
        fit = m["training"]
        for label, key, attack_key in sets:
            f = m[key]
            attack = m[attack_key] if attack_key else None
            attacked = (
                f"| {attack['rows']} | {attack['fgsm_success_rate']:.3f} "
                f"| {attack['pgd_success_rate']:.3f} |"
                if attack
                else "| - | - | - |"
            )
            lines.append(
                f"| {variant} | {fit['best_epoch']}/{fit['epochs']} "
                f"| {fit['train_seconds']:.1f} | {label} | {f['rows']} | {f['positives']} "
                f"| {f['f1']:.4f} | {f['roc_auc']:.4f} | {f['accuracy']:.4f} {attacked}"
            )
    return "\n".join(lines)


def noise_table() -> str:
    """The engine budget against each sensor's measurement noise, both in physical units."""
    splits = engine_failure.load_splits()
    noise = engine_failure.measurement_noise(engine_failure.load_frame("train"))
    budget = engine_failure.epsilon(splits)
    ratio = budget / noise
    cells = ", ".join(
        f"{name} {r:.2f}" for name, r in zip(engine_failure.FEATURES, ratio, strict=True)
    )
    return (
        f"engine_failure budget / cycle-to-cycle measurement noise per sensor "
        f"(largest {ratio.max():.2f}): {cells}"
    )


def check_floors(results: dict[str, Any], total_s: float) -> list[str]:
    failures = []
    pn_std, pn_hard = results["pneumonia"]["standard"], results["pneumonia"]["hardened"]
    en_std, en_hard = results["engine_failure"]["standard"], results["engine_failure"]["hardened"]
    checks = [
        ("pneumonia standard test accuracy >= 0.84", pn_std["test"]["accuracy"] >= 0.84),
        (
            "pneumonia hardened PGD success <= half the standard's",
            pn_hard["robustness"]["pgd_success_rate"]
            <= 0.5 * pn_std["robustness"]["pgd_success_rate"],
        ),
        (
            "pneumonia hardened test accuracy >= standard's - 0.05",
            pn_hard["test"]["accuracy"] >= pn_std["test"]["accuracy"] - 0.05,
        ),
        ("engine_failure standard test F1 >= 0.82", en_std["test"]["f1"] >= 0.82),
        (
            "engine_failure hardened PGD success <= half the standard's",
            en_hard["robustness"]["pgd_success_rate"]
            <= 0.5 * en_std["robustness"]["pgd_success_rate"],
        ),
        (f"training both models under {TIME_LIMIT_S:.0f} s", total_s < TIME_LIMIT_S),
    ]
    for text, ok in checks:
        if not ok:
            failures.append(f"FLOOR MISSED: {text}")
    return failures


def torch_threads() -> int:
    from guarded_serving.recipes._networks import TORCH_THREADS

    return TORCH_THREADS


if __name__ == "__main__":
    sys.exit(main())
