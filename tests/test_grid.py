"""The β × training-seed grid through each executor: in-process, a process pool, a Dask cluster; faults and tables."""
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import demo_script
import grid
import utils
from conftest import QUICK, ROOT, default_signals, run_cli, thread_limits_restored, wait_for

# β from the first step: the βs train different models; a small network, since what is checked is the grid around it
BASE = QUICK + ["--epochs", "2", "--warmup-epochs", "0", "--test-limit", "500", "--tsne-points", "300",
                "--umap-seeds", "0", "--latent-dim", "4", "--hidden", "128", "64"]
GRID = BASE + ["--beta-sweep", "0.5", "2", "--train-seeds", "1", "2"]
MEMBERS = [(b, s) for b in ("0.5", "2") for s in (1, 2)]
COLUMNS = {"Test Recon": "test_recon", "Test KL": "test_kl", "Test -ELBO": "test_neg_elbo",
           "IW log p(x)": "test_iw_log_likelihood", "Active Units": "active_units"}


def member(out, beta, seed):
    return out / "grid" / f"beta_{beta}" / f"seed_{seed}"


def loss_rows(out, beta, seed):
    rows = utils.parse_loss_table((member(out, beta, seed) / "loss.txt").read_text())
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def metrics(out, beta, seed):
    return json.loads((member(out, beta, seed) / "metrics.json").read_text())


def table(out):
    return (out / "beta_sweep.txt").read_text()


def copy_grid(reference, dst, drop=(), keep_checkpoint=()):
    """The reference grid's members in dst, less the `drop` ones and the metrics.json of the `keep_checkpoint` ones."""
    shutil.copytree(reference / "grid", dst / "grid")
    for b, s in drop:
        shutil.rmtree(member(dst, b, s))
    for b, s in keep_checkpoint:
        (member(dst, b, s) / "metrics.json").unlink()


@pytest.fixture(scope="module")
def reference(mnist_dir, tmp_path_factory):
    """The 2 β × 2 seed grid, one model after another in this process at one thread each: the grid to match."""
    out = tmp_path_factory.mktemp("sequential")
    with thread_limits_restored():
        # with TensorBoard: members trained again without it must match, so logging reads no training randomness
        assert run_cli(GRID + ["--threads", "1", "--tensorboard", "--out-dir", out]) == 0
    return out


def test_sequential_grid_writes_every_member_and_the_tables(reference):
    for b, s in MEMBERS:
        m = metrics(reference, b, s)
        assert (m["config"]["beta_max"], m["config"]["seed"], m["config"]["threads"]) == (float(b), s, 1)
        assert [r["epoch"] for r in loss_rows(reference, b, s)] == [1, 2]
        assert (member(reference, b, s) / "checkpoint.pt").is_file()
        assert (member(reference, b, s) / "samples" / "tsne.png").is_file()
    assert loss_rows(reference, "0.5", 1) != loss_rows(reference, "0.5", 2)  # the training seed is used
    assert all(metrics(reference, "0.5", s)["test_kl"] > metrics(reference, "2", s)["test_kl"] for s in (1, 2))
    lines = table(reference).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| 0.5 | 2 | ") and lines[3].startswith("| 2 | 2 | ")
    assert (reference / "samples" / "beta_sweep.png").is_file() and (reference / "grid.json").is_file()


def test_tensorboard_shows_every_member_with_its_beta_and_seed(reference):
    from test_tensorboard import hparams_logged, scalars, events
    runs = sorted(p.parent.relative_to(reference / "grid") for p in (reference / "grid").rglob("tensorboard"))
    assert [str(r) for r in runs] == [f"beta_{b}/seed_{s}" for b, s in MEMBERS]  # `--logdir OUT_DIR/grid` sees four
    for b, s in MEMBERS:
        h = hparams_logged(member(reference, b, s))
        assert (h["beta_max"], h["seed"]) == (float(b), s)  # what the hparams view filters by
        logged = scalars(events(member(reference, b, s)))
        assert [v for _, v in logged["loss/kl"]] == pytest.approx([r["kl"] for r in loss_rows(reference, b, s)],
                                                                abs=0.0051)


def test_table_is_the_mean_and_sample_std_of_the_members_metrics(reference):
    header, _, *rows = [[c.strip() for c in line.strip("|").split("|")] for line in table(reference).splitlines()]
    methods = metrics(reference, "0.5", 1)["clustering"]
    columns = {**COLUMNS, **{f"{m} {k.upper()}": (m, k) for m in methods for k in ("acc", "nmi")}}
    assert set(columns) <= set(header)
    for row, beta in zip(rows, ("0.5", "2")):
        for name, key in columns.items():
            ms = [metrics(reference, beta, s) for s in (1, 2)]
            values = [m["clustering"][key[0]][f"{key[1]}_mean"] if isinstance(key, tuple) else m[key] for m in ms]
            mean, std = (float(x) for x in row[header.index(name)].split(" ± "))
            decimals = len(row[header.index(name)].split(" ± ")[0].split(".")[1])
            assert mean == pytest.approx(np.mean(values), abs=0.51 * 10 ** -decimals), (beta, name)
            assert std == pytest.approx(np.std(values, ddof=1), abs=0.51 * 10 ** -decimals), (beta, name)
    summary = json.loads((reference / "grid.json").read_text())["betas"][1]
    elbo = [metrics(reference, "2", s)["test_neg_elbo"] for s in (1, 2)]
    assert summary["numbers"]["test_neg_elbo"]["std"] == pytest.approx(np.std(elbo, ddof=1), rel=1e-9)
    assert summary["numbers"]["test_neg_elbo"]["n"] == 2 and summary["failed"] == []


def test_rerunning_a_finished_grid_trains_nothing(reference, tmp_path, capsys):
    copy_grid(reference, tmp_path)  # a copy: the later tests compare with reference, which a bug here would change
    stamps = {(b, s): (member(tmp_path, b, s) / "checkpoint.pt").stat().st_mtime_ns for b, s in MEMBERS}
    capsys.readouterr()
    assert run_cli(GRID + ["--workers", "2", "--out-dir", tmp_path]) == 0  # no pool is even started
    assert capsys.readouterr().out.count("finished earlier") == 4
    assert {(b, s): (member(tmp_path, b, s) / "checkpoint.pt").stat().st_mtime_ns for b, s in MEMBERS} == stamps
    assert table(tmp_path) == table(reference)


# Holds a folder's lock for 3 s, as a run writing there would, and prints the time just before it lets go.
HOLD = ("import sys, time, data\nwith data.folder_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(3)\n"
        "    print(time.time(), flush=True)\n")


def test_the_tables_wait_for_a_run_that_holds_the_grids_folder(reference, tmp_path, capsys):
    copy_grid(reference, tmp_path)  # finished members: the grid only reads them and writes its tables
    holder = subprocess.Popen([sys.executable, "-c", HOLD, tmp_path], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    assert run_cli(GRID + ["--out-dir", tmp_path]) == 0
    returned = time.time()
    assert float(holder.stdout.readline()) <= returned  # the tables waited for the holder to let go
    holder.wait(timeout=60)
    assert "another run holds" in capsys.readouterr().out and table(tmp_path) == table(reference)


def test_train_seeds_alone_summarises_one_configuration(reference, tmp_path):
    copy_grid(reference, tmp_path)
    assert run_cli(BASE + ["--beta-max", "0.5", "--train-seeds", "1", "2", "--out-dir", tmp_path]) == 0
    elbo = [metrics(reference, "0.5", s)["test_neg_elbo"] for s in (1, 2)]
    row = f"| test_neg_elbo | {np.mean(elbo):.2f} ± {np.std(elbo, ddof=1):.2f} | 2 |"
    assert row in (tmp_path / "seeds_summary.txt").read_text().splitlines()
    assert not (tmp_path / "beta_sweep.txt").exists()


def test_members_measured_or_stopped_with_other_flags_stop_the_grid_before_anything_trains(reference, tmp_path,
                                                                                            capsys):
    finished, stopped = tmp_path / "finished", tmp_path / "stopped"
    copy_grid(reference, finished)  # measured on 500 test images: not to be averaged with members measured on 400
    copy_grid(reference, stopped, drop=[("0.5", 1), ("0.5", 2), ("2", 1)], keep_checkpoint=[("2", 2)])
    for out, flags, name in [(finished, ["--test-limit", "400"], "test_limit"), (stopped, ["--epochs", "3"], "epochs"),
                             (stopped, ["--test-limit", "400"], "test_limit")]:  # its loss.txt scored 500 each epoch
        before = sorted(out.rglob("*"))
        capsys.readouterr()
        assert run_cli(GRID + flags + ["--out-dir", out]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"it has {name}=" in err and "another --out-dir" in err, err
        assert ("metrics.json" if out == finished else "seed_2/checkpoint.pt") in err
        assert sorted(out.rglob("*")) == before  # the stopped member is checked before the other three start
    (member(finished, "2", 2) / "metrics.json").write_text('{"test_kl": 3')  # cut short
    assert run_cli(GRID + ["--out-dir", finished]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "seed_2/metrics.json is damaged" in err and "Traceback" not in err, err


def test_process_pool_stops_on_ctrl_c_then_finishes_with_identical_results(reference, tmp_path):
    # (0.5, 2) trains from scratch; (2, 1) has its final checkpoint but no metrics.json: it resumes, analysis only
    copy_grid(reference, tmp_path, drop=[("0.5", 2)], keep_checkpoint=[("2", 1)])
    argv = [str(a) for a in GRID + ["--workers", "2", "--out-dir", tmp_path]]
    proc = subprocess.Popen([sys.executable, "demo_script.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)
    wait_for(member(tmp_path, "0.5", 2) / "checkpoint.pt", proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    # The grid's own last word. A pool process whose Ctrl-C landed inside numba's compiler or a weakref callback
    # prints an "Exception ignored" report, and may outlive the grid and print it after that word (it then finishes its
    # member, holding its folder's lock: the re-run below waits for it).
    lines = stderr.strip().splitlines()
    last = "interrupted; re-run the same command to continue the grid where it stopped"
    assert proc.returncode == 130 and last in lines, stderr[-1500:]
    assert lines[-1] == last or lines[lines.index(last) + 1].startswith("Exception ignored"), stderr[-1500:]
    assert run_cli(argv) == 0  # 1 thread per model: cores // 2 on this 2-core machine, or less
    for b, s in MEMBERS:
        assert loss_rows(tmp_path, b, s) == loss_rows(reference, b, s), (b, s)
    assert "resuming after epoch 2" in (member(tmp_path, "2", 1) / "stdout.txt").read_text()
    assert table(tmp_path) == table(reference)


def pool_processes(pid):
    """-> the pids of pid's children that are process-pool workers (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(), reason="needs Linux /proc")
def test_ctrl_c_while_the_pool_processes_start_stops_quietly(tmp_path):
    # Ctrl-C reaches the whole process group; pool processes still importing the project (seconds) must not print
    # KeyboardInterrupt tracebacks, nor train the members queued for them after the grid has stopped.
    argv = [str(a) for a in GRID + ["--workers", "2", "--out-dir", tmp_path]]
    proc = subprocess.Popen([sys.executable, "demo_script.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_signals, start_new_session=True)
    try:
        deadline = time.time() + 60
        while len(pool_processes(proc.pid)) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(0.5)  # into their imports: a signal before the interpreter sets its handlers just ends a process
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-1500:]
    assert not list(tmp_path.rglob("checkpoint.pt"))  # no member trained an epoch after the Ctrl-C


def test_ctrl_c_mid_grid_starts_no_member_after_those_running(tmp_path):
    # A process pool queues one member more than it runs, and a queued member cannot be cancelled: the grid hands
    # over no more members than it has processes, so that none trains after the Ctrl-C.
    argv = [str(a) for a in GRID + ["--workers", "2", "--out-dir", tmp_path]]
    proc = subprocess.Popen([sys.executable, "demo_script.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)
    while not list(tmp_path.rglob("checkpoint.pt")) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    started = {p.parent for p in tmp_path.glob("grid/*/*/loss.txt")} | {p.parent for p in tmp_path.rglob("checkpoint.pt")}
    assert proc.returncode == 130 and len(started) <= 2, (started, stderr[-1500:])


def run_or_be_killed(sub):
    """A member's run for the pool test, by module name in a pool process: β = 0.5, seed 1 dies of SIGKILL, as from
    the out-of-memory killer, every time it runs; the others return a stub of their metrics at once."""
    if (sub.beta_max, sub.seed) == (0.5, 1):
        with open(os.path.join(sub.out_dir, "attempts"), "a") as f:
            f.write("ran\n")
        os.kill(os.getpid(), signal.SIGKILL)
    return {"beta": sub.beta_max, "seed": sub.seed}


def test_a_member_killed_each_time_it_runs_fails_alone_and_the_others_finish(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(grid, "POOL_ATTEMPTS", 2)  # read in this process only: three pools, not four
    # One worker, the killed member first: the pool breaks with the three others still queued, and they are neither
    # charged nor given up, but run in a second pool.
    args = demo_script.parse_args([str(a) for a in GRID + ["--workers", "1", "--out-dir", tmp_path]])
    args.threads = grid.thread_count(args)
    results, errors = grid.run_members(grid.grid_members(args), args, run_or_be_killed, demo_script.with_defaults({}))
    assert sorted((r["beta"], r["seed"]) for r in results.values()) == [(0.5, 2), (2, 1), (2, 2)]
    assert errors == {"beta=0.5 seed=1": "its process was killed each time it ran (2x; out of memory?)"}
    assert (member(tmp_path, "0.5", 1) / "attempts").read_text() == "ran\n" * 2  # POOL_ATTEMPTS times, not more
    assert capsys.readouterr().out.count(": done (") == 3


def test_only_a_lock_its_holder_left_behind_counts_as_killed(tmp_path):
    args = demo_script.parse_args([str(a) for a in GRID + ["--out-dir", tmp_path]])
    members = {grid.member_name(m): m for m in grid.grid_members(args)}
    since = time.time()
    for name in ("beta=0.5 seed=1", "beta=0.5 seed=2", "beta=2 seed=1"):
        Path(members[name].out_dir).mkdir(parents=True)
        (Path(members[name].out_dir) / data.LOCK_FILE).write_text("4242\n")  # left by a process that died
    os.utime(Path(members["beta=2 seed=1"].out_dir) / data.LOCK_FILE, (since - 60, since - 60))  # before this pool
    holder = subprocess.Popen([sys.executable, "-c", HOLD, members["beta=0.5 seed=2"].out_dir], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)  # another command's live run holds this one
    assert holder.stdout.readline() == "held\n"
    killed = grid.killed_while_running(list(members.values()), since)  # beta=2 seed=2: no lock at all
    assert [grid.member_name(m) for m in killed] == ["beta=0.5 seed=1"]
    assert not Path(members["beta=2 seed=2"].out_dir).exists()  # probing made no lock file where there was none
    holder.kill()
    holder.wait(timeout=60)


def test_two_grid_commands_on_one_folder_both_finish_and_train_each_member_once(reference, tmp_path):
    # The same command twice at once: a member the other holds is passed over, then waited for and read back, never
    # trained again. Two of the reference grid's members keep it short.
    flags = BASE + ["--beta-sweep", "0.5", "2", "--train-seeds", "1", "--threads", "1", "--out-dir", tmp_path]
    procs = [subprocess.Popen([sys.executable, "demo_script.py", *map(str, flags)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-1500:] for _, err in outs]
    stdout = "".join(out for out, _ in outs)
    assert stdout.count("epoch   1  beta") == 2 and "resuming" not in stdout  # each member trained once, whole
    # side by side, one each: the command that found the first member held trained the second meanwhile
    assert [out.count("epoch   1  beta") for out, _ in outs] == [1, 1], [out for out, _ in outs]
    # the later command found the first member held; the other found the second held only if it got there in time
    assert stdout.count("another run holds it; it is waited for after the others") in (1, 2)
    for b in ("0.5", "2"):
        assert loss_rows(tmp_path, b, 1) == loss_rows(reference, b, 1), b
        assert not (member(tmp_path, b, 1) / data.LOCK_FILE).exists()
    assert [out.count(": done (") for out, _ in outs] == [2, 2]  # each command finished both members


def test_a_failing_member_is_named_and_the_others_finish(reference, tmp_path, monkeypatch, capsys):
    copy_grid(reference, tmp_path, drop=[("0.5", 2), ("2", 2)])
    real = utils.get_lr
    monkeypatch.setattr(utils, "get_lr", lambda t, a: math.nan if (a.beta_max, a.seed) == (2, 2) else real(t, a))
    with thread_limits_restored():
        assert run_cli(GRID + ["--threads", "1", "--out-dir", tmp_path]) == 1
    err = capsys.readouterr().err
    assert "beta=2 seed=2: failed: NonFiniteLoss: non-finite loss or gradient at epoch 1, batch 2" in err
    assert err.strip().splitlines()[-1].endswith("1 of 4 models failed (named above); the same command retries them")
    assert loss_rows(tmp_path, "0.5", 2) == loss_rows(reference, "0.5", 2)
    lines = table(tmp_path).splitlines()
    assert lines[3].startswith("| 2 | 1 of 2 | ") and "±" not in lines[3]  # one seed: a mean, no spread
    assert lines[-1].startswith("failed: beta=2 seed=2: NonFiniteLoss")
    assert not (member(tmp_path, "2", 2) / "metrics.json").exists()


def test_dask_grid_survives_a_killed_worker_and_equals_the_sequential_grid(reference, tmp_path):
    distributed = pytest.importorskip("distributed")
    copy_grid(reference, tmp_path, drop=[("0.5", 1), ("2", 2)])  # two members to train: one for each worker
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        argv = [str(a) for a in GRID + ["--scheduler", cluster.scheduler_address, "--out-dir", tmp_path]]
        proc = subprocess.Popen([sys.executable, str(ROOT / "demo_script.py"), *argv], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # another cwd
        wait_for(member(tmp_path, "0.5", 1) / "checkpoint.pt", proc)
        pids = client.run(os.getpid)
        busy = [w for w, keys in client.processing().items() if keys]
        os.kill(pids[busy[0]], signal.SIGKILL)  # mid-member: the scheduler gives its task to a worker again
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-1500:]
        assert pids[busy[0]] not in client.run(os.getpid).values()
        assert client.submit(grid.dask_worker_threads, pure=False).result() == 1  # what grid_member checks
    for b, s in MEMBERS:
        assert loss_rows(tmp_path, b, s) == loss_rows(reference, b, s), (b, s)
    assert table(tmp_path) == table(reference)


def test_headline_numbers_skip_what_a_member_lacks():
    m = {"test_kl": 3, "test_iw_log_likelihood": None, "probes": None,  # null: not computable on this member's model
         "clustering": {"umap_gmm": {"acc_mean": 0.5, "nmi_mean": 0.25}, "gmm_latent": None}}
    assert grid.headline_numbers(m) == {"test_kl": 3.0, "umap_gmm_acc": 0.5, "umap_gmm_nmi": 0.25}


BAD = [(["--beta-sweep", "1", "--workers", "0"], "--workers"), (["--beta-sweep", "1", "--threads", "0"], "--threads"),
       (["--workers", "2"], "--workers"), (["--scheduler", "tcp://127.0.0.1:1"], "--scheduler"),
       (["--train-seeds", "1", "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "--scheduler"),
       (["--train-seeds", "-1"], "--train-seeds"), (["--train-seeds", "3", "3"], "--train-seeds"),
       (["--beta-sweep", "1", "1.0"], "--beta-sweep"), (["--train-seeds", "1", "--resume"], "--train-seeds"),
       (["--beta-sweep", "1", "2", "--schedule", "capacity"], "--schedule capacity")]


@pytest.mark.parametrize("flags,name", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_grid_flags_exit_2_with_one_line_and_touch_nothing(flags, name, tmp_path, capsys):
    out, data_dir = tmp_path / "out", tmp_path / "data"
    assert run_cli(["--out-dir", out, "--data-dir", data_dir, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and name in err and "Traceback" not in err
    assert not out.exists() and not data_dir.exists()


@pytest.mark.parametrize("address", ["127.0.0.1:notaport", "foo://127.0.0.1:1"])
def test_a_malformed_scheduler_address_fails_in_one_line_and_touches_nothing(address, tmp_path, capsys):
    out, data_dir = tmp_path / "out", tmp_path / "data"
    assert run_cli(["--beta-sweep", "1", "--scheduler", address, "--out-dir", out, "--data-dir", data_dir]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--scheduler {address}:" in err and "Traceback" not in err
    assert not out.exists() and not data_dir.exists()


def report_running(sub):
    print(f"running {grid.member_name(sub)}", flush=True)
    return {"beta": sub.beta_max, "seed": sub.seed}


def test_the_sequential_grid_reports_each_member_as_it_ends(tmp_path, capsys):
    args = demo_script.parse_args([str(a) for a in GRID + ["--out-dir", tmp_path]])
    results, errors = grid.run_members(grid.grid_members(args), args, report_running, demo_script.with_defaults({}))
    assert len(results) == 4 and not errors
    names = [grid.member_name(m) for m in grid.grid_members(args)]
    # each "done" comes straight after its member ran, not all of them after the last
    assert capsys.readouterr().out.splitlines() == [line for i, n in enumerate(names, 1)
                                                    for line in (f"running {n}", f"{n}: done ({i} of 4)")]


def test_a_dask_worker_that_runs_members_in_threads_is_refused(tmp_path, monkeypatch):
    # Two members in threads of one process would re-seed torch's one generator under each other (training differs).
    assert grid.dask_worker_threads() is None  # outside a Dask worker
    monkeypatch.setattr(grid, "dask_worker_threads", lambda: 2)
    args = demo_script.parse_args([str(a) for a in GRID + ["--out-dir", tmp_path]])
    with pytest.raises(grid.GridError, match="--nthreads 1"):
        grid.grid_member(grid.grid_members(args)[0], report_running, demo_script.with_defaults({}))
    assert not (tmp_path / "grid").exists()


def test_on_dask_the_worker_resolves_device_and_precision(reference, tmp_path):
    # A client without a GPU may send members to workers with one: --device cuda is not refused here, and auto is
    # resolved by the worker, where a resumed or finished member keeps the precision it recorded.
    argv = GRID + ["--scheduler", "tcp://127.0.0.1:1", "--out-dir", tmp_path]
    args = demo_script.parse_args([str(a) for a in argv + ["--device", "cuda"]])
    assert args.precision == "auto" and args.device == "cuda"
    args = demo_script.parse_args([str(a) for a in argv])
    copy_grid(reference, tmp_path, drop=[("2", 1), ("2", 2)], keep_checkpoint=[("0.5", 2)])
    finished, stopped, new = grid.grid_members(args)[:3]
    here = utils.resolve_precision("auto", torch.device("cpu"))
    other = "fp32" if here == "bf16" else "bf16"  # as if another kind of worker had trained them
    state = torch.load(member(tmp_path, "0.5", 2) / "checkpoint.pt", weights_only=True)
    state["config"]["precision"] = other
    torch.save(state, member(tmp_path, "0.5", 2) / "checkpoint.pt")
    done = metrics(tmp_path, "0.5", 1)
    done["config"]["precision"] = other
    (member(tmp_path, "0.5", 1) / "metrics.json").write_text(json.dumps(done))
    assert grid.finished_metrics(finished, demo_script.with_defaults({})) == done
    assert grid.grid_member(finished, report_running, demo_script.with_defaults({})) == done  # read back, not run
    assert grid.member_precision(stopped) == other  # resumed as it began
    assert grid.member_precision(new) == here
    if not torch.cuda.is_available():
        new.device = "cuda"
        with pytest.raises(ValueError, match="not available"):
            grid.member_precision(new)


def test_pool_members_share_the_cores_among_the_processes_that_run(reference, tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "usable_cores", lambda: 16)
    copy_grid(reference, tmp_path, drop=[("2", 1), ("2", 2)])  # two of the four members left to train
    args = demo_script.parse_args([str(a) for a in GRID + ["--workers", "4", "--out-dir", tmp_path]])
    threads = {}

    def run_members(todo, *_):  # what the pool would be given, and the members' own metrics back
        threads.update({grid.member_name(m): m.threads for m in todo})
        return {grid.member_name(m): metrics(reference, f"{m.beta_max:g}", m.seed) for m in todo}, {}
    monkeypatch.setattr(grid, "run_members", run_members)
    grid.grid(args, None, demo_script.with_defaults({}))
    assert threads == {"beta=2 seed=1": 8, "beta=2 seed=2": 8}  # two processes of 8 threads, not 4 threads each
    assert table(tmp_path) == table(reference)
    assert grid.thread_count(demo_script.parse_args(["--beta-sweep", "1", "--workers", "4", "--threads", "3"]), 1) == 3
