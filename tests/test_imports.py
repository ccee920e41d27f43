"""The engine, the results and the command line load without Lightning (each checked in a fresh interpreter)."""

import json
import subprocess
import sys

import pytest

FRAMEWORKS = ("lightning", "pytorch_lightning")


def loaded_after(code: str) -> list[str]:
    """Top-level packages in ``sys.modules`` after running ``code`` in a new interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    "code",
    [
        "import lightning_anomaly.engine",
        "import lightning_anomaly.engine.gmm",
        "from lightning_anomaly import analyze, AnomalyCriteria, AnalysisReport",
        "import lightning_anomaly.sinks, lightning_anomaly.probe, lightning_anomaly.results",
    ],
)
def test_engine_and_results_do_not_import_lightning(code):
    loaded = loaded_after(code)
    assert "torch" in loaded  # the code did run
    assert not set(FRAMEWORKS) & set(loaded), code


def test_command_line_help_imports_neither_torch_nor_lightning():
    loaded = loaded_after(
        "from lightning_anomaly.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    )
    assert "lightning_anomaly" in loaded
    assert not {"torch", *FRAMEWORKS} & set(loaded)


def test_callbacks_still_import_from_the_package():
    loaded = loaded_after(
        "from lightning_anomaly import AnomalyFilterCallback, AnomalyPruneCallback\n"
        "from lightning.pytorch import Callback\n"
        "assert issubclass(AnomalyFilterCallback, Callback) and issubclass(AnomalyPruneCallback, Callback)"
    )
    assert "lightning" in loaded


def test_public_names_are_listed_and_resolve():
    import lightning_anomaly

    assert set(lightning_anomaly.__all__) <= set(dir(lightning_anomaly))
    for name in lightning_anomaly.__all__:
        assert getattr(lightning_anomaly, name) is not None, name
    with pytest.raises(AttributeError, match="has no attribute 'not_a_name'"):
        _ = lightning_anomaly.not_a_name


@pytest.mark.parametrize(
    ("old", "name", "new"),
    [
        ("lightning_anomaly.report", "AnalysisReport", "lightning_anomaly.results"),
        ("lightning_anomaly.report", "merge_reports", "lightning_anomaly.engine.outliers"),
        ("lightning_anomaly.viz.report", "build_report", "lightning_anomaly.viz.page"),
        ("lightning_anomaly.report", "_CLUSTERING_SETTINGS", "lightning_anomaly.results"),
    ],
)
def test_moved_names_still_resolve_with_a_deprecation_warning(old, name, new):
    import importlib

    now = name.lstrip("_")
    with pytest.warns(FutureWarning, match=rf"{old}\.{name} moved to {new}\.{now}"):
        value = getattr(importlib.import_module(old), name)
    assert value is getattr(importlib.import_module(new), now)
    with pytest.warns(FutureWarning):  # a star import still brings the public names
        namespace: dict = {}
        exec(f"from {old} import *", namespace)
    public = importlib.import_module(old).__all__
    assert public and set(public) <= set(namespace)
    with pytest.raises(AttributeError, match="has no attribute 'not_a_name'"):
        _ = importlib.import_module(old).not_a_name
