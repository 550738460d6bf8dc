"""Faults that clusters and laptops produce: two writers on one folder, Ctrl-C and SIGTERM, a full disk, no numba
cache, degenerate models. (Two grid commands on one folder: tests/test_grid.py, beside the grid they are compared
with.)"""
import argparse
import contextlib
import errno
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st
from matplotlib.figure import Figure

import data
import grid
import measures
import utils
from conftest import QUICK, ROOT, default_signals, planted, run_cli, thread_limits_restored, wait_for
from test_cli import table_without_seconds

# Four short epochs (~0.5 s): a signal sent once the first checkpoint exists lands in the middle of training. Its
# 2.5 MB checkpoint is larger than any file the run writes before it (the file-size limit below relies on that).
# One thread: a run of a few seconds otherwise spends most of them in the BLAS pools of a busy machine.
RUN = QUICK + ["--epochs", "4", "--limit", "12000", "--hidden", "128", "--test-limit", "500", "--tsne-points", "100",
               "--iw-samples", "2", "--threads", "1"]


def start(argv, preexec_fn=default_signals):
    """demo_script.py in a child process, with default Ctrl-C and SIGTERM handling whatever pytest inherited."""
    return subprocess.Popen([sys.executable, "demo_script.py", *map(str, argv)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)


def run_here(argv):
    """run_cli in this process, whose thread pools RUN's --threads 1 would otherwise leave capped for later tests."""
    with thread_limits_restored():
        return run_cli(argv)


def leftovers(folder):
    """-> the temporary files of atomic writes, and the lock, still lying in folder: none once a run has ended."""
    return sorted(p.name for p in folder.rglob(".*") if p.name.endswith(".tmp") or p.name == data.LOCK_FILE)


@pytest.fixture(scope="module")
def reference(mnist_dir, tmp_path_factory):
    """RUN, never disturbed: the loss.txt every disturbed and resumed run must reproduce."""
    out = tmp_path_factory.mktemp("undisturbed")
    assert run_here(RUN + ["--out-dir", out]) == 0
    return out


def stopped(out, sig):
    """RUN in a child sent `sig` once its first checkpoint is written -> (out, exit code, stderr)."""
    proc = start(RUN + ["--out-dir", out])
    wait_for(out / "checkpoint.pt", proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    return out, proc.returncode, stderr


@pytest.fixture(scope="module")
def terminated(mnist_dir, tmp_path_factory):
    """RUN sent SIGTERM mid-training -> (its folder, exit code, stderr); tests copy the folder."""
    return stopped(tmp_path_factory.mktemp("terminated") / "run", signal.SIGTERM)


# ----------------------------------------------------------------------------- one writer per run folder


def test_a_second_run_on_a_busy_folder_exits_2_at_once_and_the_first_is_undisturbed(reference, tmp_path, capsys):
    out = tmp_path / "run"
    proc = start(RUN + ["--out-dir", out])
    wait_for(out / "checkpoint.pt", proc)  # training: it holds the folder
    before = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert run_cli(RUN + ["--out-dir", out]) == 2  # the same command
    assert proc.poll() is None  # at once: refused while the first still trains, not after waiting for it
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and f"pid {proc.pid}" in err, err
    assert run_cli(RUN + ["--out-dir", out, "--data-dir", tmp_path / "data"]) == 2
    assert run_cli(QUICK + ["--analyze-only", reference / "checkpoint.pt", "--out-dir", out]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2
    assert not (tmp_path / "data").exists()  # refused before any data was read
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == before
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-1500:]
    assert table_without_seconds(out / "loss.txt") == table_without_seconds(reference / "loss.txt")
    assert leftovers(out) == []


def test_folder_lock_names_its_holder_is_released_and_removes_the_folders_it_made(tmp_path):
    folder = tmp_path / "a" / "b"
    with data.folder_lock(folder):
        assert (folder / data.LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with pytest.raises(data.FolderBusy, match=f"{folder}.*pid {os.getpid()}"):
            with data.folder_lock(folder):  # two opens conflict even in one process
                pass
    assert not (tmp_path / "a").exists()  # nothing was written there: the folders it made are gone again
    with data.folder_lock(folder):
        (folder / "kept.txt").write_text("x")
    assert sorted(p.name for p in folder.iterdir()) == ["kept.txt"]


def test_a_waiting_lock_is_granted_when_its_holder_lets_go(tmp_path):
    acquired = []

    def waiter():
        with data.folder_lock(tmp_path, wait=True):
            acquired.append(time.time())

    with data.folder_lock(tmp_path):
        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.3)
        assert acquired == []
        released = time.time()
    thread.join(10)
    assert len(acquired) == 1 and acquired[0] >= released


def test_text_files_are_written_in_utf8_whatever_the_locale(tmp_path):
    path = tmp_path / "loss.txt"  # its β, and beta_sweep.txt's ±, in an ASCII locale with UTF-8 mode off
    code = f"import data; data.write_text({str(path)!r}, '\\u03b2 \\u00b1')"
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    subprocess.run([sys.executable, "-X", "utf8=0", "-c", code], cwd=ROOT, env=env, check=True, capture_output=True)
    assert path.read_bytes() == "β ±".encode("utf-8")


def test_a_waiting_lock_is_granted_when_its_holder_removes_the_folder_it_left_empty(tmp_path):
    folder, outcome = tmp_path / "grid" / "member", []  # a grid member whose first holder failed before writing

    def waiter():
        try:
            with data.folder_lock(folder, wait=True):
                outcome.append("held")
        except Exception as e:  # before the fix: FileNotFoundError opening .lock in the removed folder
            outcome.append(repr(e))

    with data.folder_lock(folder):
        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.3)
    thread.join(10)
    assert outcome == ["held"] and not (tmp_path / "grid").exists()  # the folders it made again, left empty, go too


# ----------------------------------------------------------------------------- Ctrl-C, and SIGTERM like it


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                             (signal.SIGINT, 130, "interrupted")], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_mid_training_exits_then_resume_matches_uninterrupted_run(reference, terminated, tmp_path, sig,
                                                                             code, word):
    out, got, stderr = terminated if sig == signal.SIGTERM else stopped(tmp_path / "run", sig)
    assert got == code, stderr
    last = stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr and word in last and "--resume" in last
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    done = utils.load_checkpoint(cut / "checkpoint.pt")["epoch"]
    assert 1 <= done < 4 and len(utils.parse_loss_table((cut / "loss.txt").read_text())) == done
    assert leftovers(cut) == []
    assert run_here(RUN + ["--out-dir", cut, "--resume"]) == 0
    assert table_without_seconds(cut / "loss.txt") == table_without_seconds(reference / "loss.txt")


def test_sigterm_during_a_write_is_delivered_once_the_file_is_complete(tmp_path):
    path = tmp_path / "f.txt"

    def write(tmp):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the write
        time.sleep(0.05)
        with open(tmp, "w") as f:
            f.write("complete")

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not whatever pytest inherited
    try:
        with pytest.raises(data.Terminated), data.sigterm_raises():
            data.atomic_save(path, write)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # put back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert path.read_text() == "complete" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_an_ignored_sigterm_stays_ignored(tmp_path):
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as under `nohup`: the shell's convention
    try:
        with data.sigterm_raises(), data.interrupts_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------- a full disk


def limit_file_size(limit):
    """-> a preexec_fn: default signals, and no file written beyond `limit` bytes (Python ignores SIGXFSZ: EFBIG)."""
    def preexec():
        default_signals()
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return preexec


def test_a_checkpoint_over_the_file_size_limit_keeps_the_last_one_and_resume_finishes(reference, terminated,
                                                                                       tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(terminated[0], cut)
    done = utils.load_checkpoint(cut / "checkpoint.pt")["epoch"]
    # The next checkpoint holds one more history row: one byte over the last one's size is already too large.
    proc = start(RUN + ["--out-dir", cut, "--resume"], limit_file_size((cut / "checkpoint.pt").stat().st_size))
    _, stderr = proc.communicate(timeout=300)
    lines = stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, stderr[-1500:]
    assert "File too large" in lines[0] and str(cut / "checkpoint.pt") in lines[0]
    assert utils.load_checkpoint(cut / "checkpoint.pt")["epoch"] == done and leftovers(cut) == []
    assert run_here(RUN + ["--out-dir", cut, "--resume"]) == 0  # the limit lifted: on from the last checkpoint
    assert table_without_seconds(cut / "loss.txt") == table_without_seconds(reference / "loss.txt")


@contextlib.contextmanager
def tmpfs(path, size):
    """A tmpfs of `size` bytes mounted at path for the block; skips the test where it cannot be mounted."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); the file-size limit "
                    "test covers a failed write")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def resize(path, size):
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def test_a_full_disk_keeps_the_last_checkpoint_and_loss_txt_byte_for_byte(terminated, tmp_path, capsys):
    # resuming from them once the write can succeed: the file-size limit's test, whose failed write leaves the same
    size = (terminated[0] / "checkpoint.pt").stat().st_size
    with tmpfs(tmp_path / "disk", 4 * size) as disk:
        cut = disk / "cut"
        shutil.copytree(terminated[0], cut)
        before = {name: (cut / name).read_bytes() for name in ("checkpoint.pt", "loss.txt")}
        resize(disk, shutil.disk_usage(disk).used + size // 2)  # room for loss.txt, not for a second checkpoint
        capsys.readouterr()
        assert run_here(RUN + ["--out-dir", cut, "--resume"]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "No space left on device" in err and str(cut / "checkpoint.pt") in err
        assert {name: (cut / name).read_bytes() for name in before} == before and leftovers(cut) == []


def test_a_full_disk_at_the_lock_file_names_it(tmp_path, monkeypatch, capsys):
    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what os.write raises: no file name

    monkeypatch.setattr(os, "write", full_disk)
    assert run_here(RUN + ["--out-dir", tmp_path / "run"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"demo_script.py: error: No space left on device: {tmp_path / 'run' / data.LOCK_FILE}"
    assert not (tmp_path / "run").exists()  # the folder made for the lock is gone again


def test_a_figure_that_cannot_be_written_leaves_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "f.png"
    utils.save_figure(Figure(), path)
    before = path.read_bytes()

    def full_disk(self, fname, **kwargs):
        open(fname, "wb").write(b"half a PNG")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", full_disk)
    with pytest.raises(OSError) as e:
        utils.save_figure(Figure(), path)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path) and path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.png"]


def test_a_write_failing_with_a_runtime_error_becomes_an_os_error_naming_the_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"old")

    def torch_like(tmp):  # torch.save's own writer reports a failed write so
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    with pytest.raises(OSError) as e:
        data.atomic_save(path, torch_like)
    assert e.value.filename == str(path) and "unexpected pos" in e.value.strerror and path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_image_grids_are_written_atomically(tmp_path):
    path = tmp_path / "grid.png"
    utils.image_grid(torch.rand(4, 784), path, nrow=2)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]


# ----------------------------------------------------------------------------- no numba cache


def test_umap_clustering_completes_without_any_writable_numba_cache(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("a file, so nothing can be made below it, even by root")
    # Root writes anywhere chmod forbids, so: a cache folder below a file, a home below /proc, and numba's other
    # locators (site-packages' __pycache__, IPython's) taken away, as on a node with a read-only install.
    env = {**os.environ, "NUMBA_CACHE_DIR": str(blocker / "cache"), "HOME": "/proc/no-home",
           "NUMBA_CACHE_LOCATOR_CLASSES": "UserProvidedCacheLocator,UserWideCacheLocator",
           "MPLCONFIGDIR": str(tmp_path / "mpl")}
    env.pop("XDG_CACHE_HOME", None)
    code = ("import numba, utils; from conftest import planted; njit = numba.njit; x, y = planted(30, 5, 8.0); "
            "s = utils.clustering_scores(x, y, 'umap_gmm', [0, 1]); "
            "print(s['acc_mean'], numba.njit is njit, numba.vectorize.__module__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-1500:]
    acc, restored, vectorize_module = done.stdout.split()
    assert float(acc) == 1.0 and restored == "True" and vectorize_module.startswith("numba")
    assert done.stderr.count("warning: numba has no writable cache folder") == 1 and "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- degenerate models: a null, not a crash


def test_a_mixture_that_cannot_be_fitted_is_null_with_its_reason_and_the_rest_is_computed(capsys):
    x, y = planted(20, 10, 1.0)
    x = (x * 1e4).astype(np.float32)  # float32 at this scale: sklearn finds ill-defined covariances
    args = argparse.Namespace(seed=0, kmeans_seeds=2, umap_seeds=0, threads=None)  # None: mixtures side by side
    unavailable, timings = {}, {}
    out, kmeans = measures.clustering_metrics(x, None, y, args, timings, unavailable)
    assert utils.cluster_accuracy(y, kmeans) == out["kmeans_latent"]["acc_per_seed"][0]  # one clustering, not two
    assert out["gmm_latent"] is None and "ill-defined empirical covariance" in unavailable["clustering.gmm_latent"]
    assert 0.5 < out["kmeans_latent"]["acc_mean"] <= 1 and out["kmeans_tsne"] is None and "clustering" in timings
    assert set(unavailable) == {"clustering.gmm_latent", "clustering.kmeans_tsne", "clustering.gmm_tsne"}
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning: clustering.gmm_latent is null in metrics.json")


def test_measure_or_null_lets_a_bug_through():
    with pytest.raises(TypeError):
        measures.measure_or_null({}, "x", lambda: None + 1)


TINY = ["--epochs", "1", "--batch-size", "128", "--test-limit", "200", "--tsne-points", "100", "--iw-samples", "2",
        "--hidden", "16", "--no-progress", "--threads", "1", "--data-dir", ROOT / "data"]
FLAGS = st.fixed_dictionaries({
    "--latent-dim": st.integers(0, 12), "--schedule": st.sampled_from(["linear", "constant", "cyclical", "capacity"]),
    "--loss": st.sampled_from(["bce", "mse"]), "--beta-max": st.sampled_from([0, 0.25, 4, 1e3, 1e6, 1e7]),
    "--free-bits": st.sampled_from([0, 0.5, 8, 1e6]), "--gamma": st.sampled_from([0, 1000, 1e6]),
    "--batch-size": st.sampled_from([1, 128]), "--limit": st.sampled_from([1, 64, 128, 300]),
    "--seed": st.integers(0, 2 ** 32 - 1), "--kmeans-seeds": st.integers(1, 3), "--umap-seeds": st.sampled_from([0, 0, 2]),
    "--binarize": st.booleans()})


def argv_of(flags):
    return TINY + [x for k, v in flags.items() for x in ([k] if v is True else [] if v is False else [k, v])]


def null_paths(metrics):
    """-> the dotted paths of metrics.json whose value is null, among those `unavailable` names."""
    out = set()
    for path in metrics["unavailable"]:
        value, keys = metrics, path.split(".")
        for key in keys[:-1]:
            value = value.get(key, {})
        if keys[-1] in value and value[keys[-1]] is None:
            out.add(path)
    return out


BASE_EXAMPLE = {"--latent-dim": 10, "--schedule": "linear", "--loss": "bce", "--beta-max": 1.0, "--free-bits": 0.5,
                "--gamma": 1000, "--batch-size": 128, "--limit": 300, "--seed": 20, "--kmeans-seeds": 2,
                "--umap-seeds": 0, "--binarize": False}


@settings(max_examples=3, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@example({**BASE_EXAMPLE, "--schedule": "capacity", "--umap-seeds": 2})  # the run, in miniature
@example({**BASE_EXAMPLE, "--latent-dim": 1})  # t-SNE's PCA start needs two dimensions
@example({**BASE_EXAMPLE, "--batch-size": 1, "--limit": 1})  # one training image: one class for the probes
@example({**BASE_EXAMPLE, "--schedule": "constant", "--beta-max": 1e6, "--free-bits": 0, "--loss": "mse",
          "--binarize": True})  # a collapsed code
@given(flags=FLAGS)
def test_every_accepted_flag_combination_completes_or_is_refused_in_one_line(mnist_dir, tmp_path_factory, flags):
    out = tmp_path_factory.mktemp("example") / "run"
    err = io.StringIO()
    with thread_limits_restored(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = run_cli(argv_of(flags) + ["--out-dir", out])
    err = err.getvalue()
    assert "Traceback" not in err and code in (0, 2), (code, err)
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and not out.exists(), err
        return
    # strict JSON: Python's json would write and read back a bare NaN, which other readers refuse
    m = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))
    assert null_paths(m) == {p for p in m["unavailable"] if p != "tsne"}  # each named null is null, and named
    # ... and every headline measure is a number or named: none silently left out
    by_design = {"test_iw_log_likelihood"} if flags["--loss"] == "mse" else set()  # MSE has no likelihood
    silent = [p for p in grid.HEADLINE if p not in grid.headline_numbers(m) and p not in by_design
              and not any(p == u or p.startswith(u + ".") for u in m["unavailable"])]
    assert silent == [], silent
    warned = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warned) == len([r for r in m["unavailable"].values() if not r.startswith("no t-SNE map")])
    assert all(line.split()[1] in m["unavailable"] for line in warned) and len(err.splitlines()) == len(warned)
