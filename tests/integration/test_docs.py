"""Every shell block of docs/wrap-your-model.md, run in order in a fresh folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from guarded_serving.local_server import free_port
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DOC = REPO_ROOT / "docs" / "wrap-your-model.md"


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M)


def test_the_walkthrough_runs_as_written(tmp_path, bentoml_home):
    blocks = shell_blocks(DOC.read_text())
    assert len(blocks) >= 8
    script = "set -euo pipefail\ntrap 'kill $SERVER 2>/dev/null || true' EXIT\nSERVER=\n"
    script += "\n".join(blocks)
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "BENTOML_HOME": str(bentoml_home),
        "PORT": str(free_port()),
        "SAMPLE_DIR": str(REPO_ROOT / "tests" / "data" / "adult"),
    }
    run = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    log = (tmp_path / "server.log").read_text() if (tmp_path / "server.log").exists() else ""
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{log[-3000:]}"

    answer = json.loads((tmp_path / "answer.json").read_text())
    (prediction,) = answer["predictions"]
    assert prediction["label"] in ("over_50k", "up_to_50k")
    explanation = prediction["explanation"]
    assert explanation["method"] == "tree_shap"
    total = explanation["base_value"] + sum(explanation["attributions"].values())
    assert abs(total - explanation["output"]) <= explanation["tolerance"]
    assert "score" in prediction["guards"]["anomaly"]

    refused = json.loads((tmp_path / "refused.json").read_text())
    assert refused["code"] in ("unknown_category", "missing_field")
    assert refused["field"].startswith("records[0].")

    fairness = json.loads((tmp_path / "fairness.json").read_text())
    sex = fairness["models"]["adult_income"]["attributes"]["sex"]["groups"]
    assert sex["Male"]["labelled"] == 1

    policy = (tmp_path / "policy.yaml").read_text()
    assert "name: sex" in policy and "- name: sex\n  type" not in policy
    key_text = (tmp_path / "master.key").read_text().strip()
    assert key_text not in run.stdout + run.stderr + log
