"""A fit killed with SIGKILL in the middle of an analysis resumes from its last checkpoint, history intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")

ROOT = Path(__file__).resolve().parents[2]

# The child fits for 6 epochs, checkpointing every epoch. From epoch 3 on, the probe's forward writes a marker
# file and sleeps, so the parent can kill it while an analysis runs, after a checkpoint and a history write.
SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader
    from lightning_anomaly import AnomalyFilterCallback
    from tests.helpers import FAST, Net, make_data

    out, resume, slow_from = Path(sys.argv[1]), sys.argv[2] == "resume", int(sys.argv[3])

    def forward(model, x):
        if model.trainer.current_epoch >= slow_from:
            (out / "in_analysis").write_text(str(model.trainer.current_epoch))
            time.sleep(60)
        return model(x)

    seed_everything(0)
    monitor = AnomalyFilterCallback(probe_size=32, seed=0, forward_fn=forward)
    ckpt = ModelCheckpoint(dirpath=out / "ckpt", save_last=True, every_n_epochs=1, save_top_k=-1)
    trainer = Trainer(
        default_root_dir=out, max_epochs=6, callbacks=[monitor, ckpt], logger=CSVLogger(out, name="", version=0),
        **{**FAST, "limit_train_batches": 2, "limit_val_batches": 1},
    )
    data = make_data(64)
    trainer.fit(
        Net(), DataLoader(data, batch_size=16), DataLoader(data, batch_size=32),
        ckpt_path=str(out / "ckpt" / "last.ckpt") if resume else None,
    )
    print("history epochs", [h["epoch"] for h in monitor.history])
    """
)


def test_sigkill_during_an_analysis_resumes_with_the_history_intact(tmp_path):
    script = tmp_path / "fit.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), "fresh", "3"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    marker = tmp_path / "in_analysis"
    deadline = time.monotonic() + 240
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if not marker.exists():
        child.kill()
        pytest.fail("the child never reached the slow analysis:\n" + child.communicate()[0].decode()[-3000:])
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    # What the killed run left: a valid JSON history with every analysis before the kill (epochs 0-2).
    (history_file,) = tmp_path.rglob("anomaly_history.json")
    doc = json.loads(history_file.read_text())
    assert [h["epoch"] for h in doc["history"]] == [0, 1, 2]
    assert not list(tmp_path.rglob("*.tmp"))  # no half-written file beside it
    assert (tmp_path / "ckpt" / "last.ckpt").exists()

    # Resume from the last checkpoint (end of epoch 2), without the slow forward this time.
    marker.unlink()
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "resume", "99"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "history epochs [0, 1, 2, 3, 4, 5]" in done.stdout
    resumed = json.loads(history_file.read_text())
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2, 3, 4, 5]
    assert resumed["history"][:3] == doc["history"][:3]  # the analyses before the kill, unchanged
