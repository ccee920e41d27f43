import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_all_writes_every_section_from_a_short_run(tmp_path):
    out = tmp_path / "docs"
    cmd = [sys.executable, str(ROOT / "experiments" / "run_all.py"), "--seeds", "1", "--epochs", "3"]
    cmd += ["--datasets", "shapes", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    text = (out / "RESULTS.md").read_text()
    for heading in ("## E1", "## E4", "## E2", "## E3", "## E5", "## Targets for the defaults"):
        assert heading in text
    assert "--datasets shapes" in text  # the command that reproduces the numbers
    assert (out / "e1_count_vs_gap.png").stat().st_size > 0
    data = json.loads((out / "results.json").read_text())
    assert sorted(data["summary"]) == ["C shapes", "G1 shapes", "G2 shapes", "G3 shapes"]
    run = data["results"][0]
    assert run["dataset"] == "shapes" and run["rows"][0]["epoch"] == 3
    # Every flagging rule and clustering variant was evaluated at the analysis.
    assert "share 20%, theta 0.5" in run["rows"][0]["variants"]
    assert "tap after ReLU" in run["rows"][0]["clustering"]


def test_run_all_rejects_an_unknown_data_set(tmp_path):
    cmd = [sys.executable, str(ROOT / "experiments" / "run_all.py"), "--datasets", "cifar", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0 and "unknown data sets ['cifar']" in done.stderr
