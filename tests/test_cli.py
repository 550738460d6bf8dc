"""The real pipeline, run quickly: outputs, determinism, resume, NaN, bad flags, checkpoints (Ctrl-C:
tests/test_faults.py, beside SIGTERM)."""
import argparse
import json
import os
import time

import numpy as np
import pytest
import torch

import data
import demo_script
import utils
from conftest import QUICK, ROOT, run_cli

OUTPUTS = ["loss.txt", "metrics.json", "checkpoint.pt"] + [
    f"samples/{f}.png" for f in ("train_loss", "latent_dist_before_train", "latent_dist_after_train", "kmean",
                                 "confusion", "tsne", "generated_num", "reconstructions", "kl_per_dim",
                                 "traversals", "interpolations", "factors")]


# End-to-end runs whose checks need no 1,000-image analysis: the smallest sizes the flag checks accept.
SMALL = QUICK + ["--test-limit", "100", "--tsne-points", "100", "--iw-samples", "2"]


def table_without_seconds(path):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in utils.parse_loss_table(path.read_text())]


@pytest.fixture(scope="module")
def quick_run(mnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    # bf16 on any CPU (emulated where it has no bf16 units): what --precision auto gives on this project's machine
    assert run_cli(QUICK + ["--epochs", "2", "--umap-seeds", "2", "--precision", "bf16", "--out-dir", out]) == 0
    return out


def test_quick_run_writes_every_output(quick_run):
    missing = [f for f in OUTPUTS if not (quick_run / f).is_file()]
    assert not missing
    rows = utils.parse_loss_table((quick_run / "loss.txt").read_text())
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["total"] == pytest.approx(rows[0]["recon"] + rows[0]["kl"], abs=0.011)
    assert rows[1]["test_neg_elbo"] < rows[0]["test_neg_elbo"] < 550


def test_metrics_hold_every_headline_number(quick_run):
    m = json.loads((quick_run / "metrics.json").read_text())
    assert 50 < m["test_neg_elbo"] < 300
    assert -m["test_neg_elbo"] < m["test_iw_log_likelihood"] < 0  # the IW bound is tighter than the ELBO
    assert m["test_eval_draws"] == 10 and 0 < m["test_neg_elbo_mc_se"] < 0.5
    # the test-set error (10k images) dwarfs the Monte Carlo one (10 z per image), for the ELBO and the IW bound alike
    assert m["test_neg_elbo_mc_se"] < m["test_neg_elbo_test_se"] < 5 and 0 < m["test_iw_mc_se"] < m["test_iw_test_se"]
    d = m["kl_decomposition"]
    assert d["sum"] == pytest.approx(d["kl_closed_form"], abs=4 * d["sum_mc_se"] + 0.01)
    assert d["mi"] + d["tc"] + d["dim_kl"] == pytest.approx(d["sum"]) and d["mi"] <= d["mi_bound"]
    assert set(m["probes"]) == {"logistic_100", "logistic_1000", "logistic_all", "knn_all"}
    assert all(0.3 < p["mean"] <= 1 for p in m["probes"].values())  # 10 digits: chance is about 0.11
    assert m["probes"]["logistic_100"]["std"] > 0 and m["probes"]["logistic_all"]["std"] is None  # 5 draws, 1
    assert m["unavailable"] == {}  # every measure computed, UMAP's included
    assert m["test_set"]["images"] == 1000 and not m["test_set"]["binarized"] and len(m["test_set"]["md5"]) == 32
    assert m["active_units"] == len(m["active_dims"]) >= 1 and len(m["kl_per_dim"]) == 10
    for method in ("kmeans_latent", "gmm_latent", "kmeans_tsne", "gmm_tsne", "umap_gmm"):
        s = m["clustering"][method]
        assert s["acc_mean"] == pytest.approx(np.mean(s["acc_per_seed"]))
        assert s["acc_std"] == pytest.approx(np.std(s["acc_per_seed"], ddof=1))  # the sample std over seeds
        # chance after Hungarian matching on 1,000 images is about 0.15; this 2-epoch model scores 0.20-0.38
        assert 0.17 < s["acc_mean"] <= 1 and 0 < s["nmi_mean"] <= 1 and "ari_mean" in s
    assert m["kmeans_single_seed_acc"] == m["clustering"]["kmeans_latent"]["acc_per_seed"][0]  # --seed's run
    assert m["config"]["epochs"] == 2 and set(m["timings"]) >= {"data", "train", "tsne", "clustering", "total"}


def test_mse_run_reports_no_likelihood(mnist_dir, tmp_path, capsys):
    assert run_cli(SMALL + ["--loss", "mse", "--out-dir", tmp_path]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["test_iw_log_likelihood"] is None and 0 < m["test_neg_elbo"] < 100  # squared error, not nats
    out = capsys.readouterr().out
    assert "test MSE + KL" in out and "log p(x)" not in out and "ELBO (beta=1)" not in out


def test_analyze_only_rebuilds_figures_from_a_checkpoint(quick_run, tmp_path):
    # --dataset and --latent-dim here disagree with the checkpoint: the checkpoint's own config wins
    argv = QUICK + ["--analyze-only", quick_run / "checkpoint.pt", "--out-dir", tmp_path, "--latent-dim", "3",
                    "--dataset", "fashion-mnist"]
    assert run_cli(argv) == 0
    a = json.loads((tmp_path / "metrics.json").read_text())
    b = json.loads((quick_run / "metrics.json").read_text())
    assert a["test_neg_elbo"] == pytest.approx(b["test_neg_elbo"], abs=1e-4)
    rebuilt = [f for f in OUTPUTS if f.startswith("samples/") and f != "samples/latent_dist_before_train.png"]
    assert [f for f in rebuilt if not (tmp_path / f).is_file()] == [] and not (tmp_path / "loss.txt").exists()


def test_defaults_that_follow_other_flags(tmp_path):
    parse = lambda *flags: demo_script.parse_args([str(f) for f in flags])
    assert parse("--out-dir", tmp_path).tsne_points == 10000 and parse().out_dir == "."
    assert parse("--test-limit", 5000, "--out-dir", tmp_path).tsne_points == 5000  # not an error about a default
    assert parse("--test-limit", 5000, "--tsne-points", 300, "--out-dir", tmp_path).tsne_points == 300
    ckpt = tmp_path / "runs" / "a" / "checkpoint.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    assert parse("--analyze-only", ckpt).out_dir == str(ckpt.parent)  # never . , the reference run's folder
    assert parse("--analyze-only", ckpt, "--out-dir", tmp_path / "b").out_dir == str(tmp_path / "b")
    # --quick's t-SNE size follows --test-limit too; its folder is its own, never a committed run's
    assert parse("--quick", "--test-limit", 200, "--out-dir", tmp_path).tsne_points == 200
    assert parse("--quick", "--analyze-only", ckpt).out_dir == "runs/quick"


def test_nan_stops_training_and_keeps_last_good_checkpoint(mnist_dir, tmp_path, monkeypatch, capsys):
    real = utils.get_lr
    monkeypatch.setattr(utils, "get_lr", lambda t, args: float("nan") if t >= 1 else real(t, args))
    assert run_cli(QUICK + ["--epochs", "3", "--out-dir", tmp_path]) == 1
    assert "epoch 2, batch 2" in capsys.readouterr().err
    assert utils.load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    assert len(utils.parse_loss_table((tmp_path / "loss.txt").read_text())) == 1


BAD = [
    (["--epochs", "0"], "--epochs"), (["--batch-size", "0"], "--batch-size"), (["--latent-dim", "-1"], "--latent-dim"),
    (["--hidden", "512", "0"], "--hidden"), (["--beta-max", "-0.5"], "--beta-max"), (["--free-bits", "-1"], "--free-bits"),
    (["--lr=-1e-3"], "--lr must be > 0"), (["--warmup-epochs", "-1"], "--warmup-epochs"), (["--limit", "70000"], "--limit"),
    (["--limit", "100", "--batch-size", "128"], "--limit"), (["--device", "tpu"], "--device"),
    (["--device", "cuda"], "--device"), (["--tsne-points", "5"], "--tsne-points"), (["--tsne-points", "0"], "--tsne-points"),
    (["--tsne-points", "20000"], "--tsne-points"), (["--epochs", "three"], "--epochs"),
    (["--iw-samples", "1"], "--iw-samples"), (["--kmeans-seeds", "1"], "--kmeans-seeds"), (["--cycle-ratio", "0"], "--cycle-ratio"),
    (["--lr", "inf"], "--lr"), (["--beta-max", "nan"], "--beta-max"), (["--seed", "-1"], "--seed"),
    (["--beta-sweep", "1", "--resume"], "--beta-sweep"), (["--resume", "--analyze-only", "x.pt"], "--analyze-only"),
    (["--analyze-only", "missing.pt"], "--analyze-only"),
    (["--capacity-max", "-1"], "--capacity-max"), (["--gamma", "nan"], "--gamma"), (["--gamma", "2e6"], "--gamma"),
    (["--cycles", "0"], "--cycles"), (["--test-limit", "99"], "--test-limit"),
    (["--test-limit", "10001"], "--test-limit"), (["--iw-samples", "10001"], "--iw-samples"),
    (["--umap-seeds", "1"], "--umap-seeds"),
    (["--seed", "4294967296"], "--seed"), (["--beta-sweep", "2e6"], "--beta-sweep"),
]


@pytest.mark.parametrize("flags,name", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_values_exit_2_with_one_line_and_touch_nothing(flags, name, tmp_path, capsys):
    if flags == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out, data_dir = tmp_path / "out", tmp_path / "data"
    assert run_cli(["--out-dir", out, "--data-dir", data_dir, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and name in err and "Traceback" not in err
    assert not out.exists() and not data_dir.exists()


def test_unwritable_out_dir_is_refused(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run_cli(["--out-dir", blocker / "sub", "--data-dir", tmp_path / "d"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out-dir" in err and not (tmp_path / "d").exists()
    assert blocker.read_text() == "x"


def a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    return tmp_path / "file"


def read_only_dir(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    return tmp_path / "ro"


NOT_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
UNUSABLE = [  # /proc and /sys refuse a new folder even to root, for whom os.access said yes
    pytest.param(lambda tmp: "/proc/forbidden", id="under /proc"),
    pytest.param(lambda tmp: "/proc/forbidden/a/b", id="deep under /proc"),
    pytest.param(lambda tmp: "/sys/forbidden", id="under /sys"),
    pytest.param(a_file, id="a file in place of the folder"),
    pytest.param(read_only_dir, id="a read-only folder", marks=NOT_ROOT),
    pytest.param(lambda tmp: read_only_dir(tmp) / "a" / "b", id="new folders in a read-only one", marks=NOT_ROOT)]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc and /sys")
@pytest.mark.parametrize("make_out_dir", UNUSABLE)
def test_unusable_out_dir_exits_2_before_reading_data_and_leaves_nothing(make_out_dir, tmp_path, capsys):
    out = make_out_dir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert run_cli(["--out-dir", out, "--data-dir", tmp_path / "d"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out-dir" in err and "Traceback" not in err
    assert sorted(tmp_path.rglob("*")) == before  # no data folder, nothing left by the probe
    assert not str(out).startswith(("/proc", "/sys")) or not os.path.lexists(out)


def test_failed_resume_touches_nothing(tmp_path, capsys):
    assert run_cli(QUICK + ["--resume", "--out-dir", tmp_path / "out"]) == 2
    assert "no checkpoint" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_corrupt_checkpoint_gets_a_clear_error(tmp_path, quick_run, capsys):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes((quick_run / "checkpoint.pt").read_bytes()[:5000])
    assert run_cli(QUICK + ["--analyze-only", bad, "--out-dir", tmp_path / "o"]) == 2
    err = capsys.readouterr().err
    assert "truncated or corrupt" in err and "Traceback" not in err


# a resumed run's loss.txt would mix two models, or score its Test -ELBO column on two test sets
@pytest.mark.parametrize("flags, field", [(["--latent-dim", "4"], "latent_dim"), (["--test-limit", "500"], "test_limit")])
def test_resume_with_a_different_model_or_test_set_names_the_field(flags, field, tmp_path, quick_run, capsys):
    (tmp_path / "checkpoint.pt").write_bytes((quick_run / "checkpoint.pt").read_bytes())
    argv = QUICK + ["--epochs", "2", "--precision", "bf16", *flags, "--resume", "--out-dir", tmp_path]
    assert run_cli(argv) == 2
    assert f"checkpoint has {field}=" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # refused before anything was written


def test_a_stopped_analysis_says_to_run_it_again_not_to_resume():
    args = argparse.Namespace(analyze_only="runs/a/checkpoint.pt", out_dir="/tmp/b")
    message = demo_script.stop_message(args, is_grid=False, terminated=True, started=0.0)
    assert "re-run the same command to analyse runs/a/checkpoint.pt" in message and "--resume" not in message


def test_a_run_stopped_before_its_first_checkpoint_is_not_told_to_resume(tmp_path):
    args = argparse.Namespace(analyze_only=None, resume=False, out_dir=str(tmp_path))
    stopped = lambda: demo_script.stop_message(args, is_grid=False, terminated=False, started=started)
    started = time.time()
    assert "--resume" not in stopped() and "re-run the same command" in stopped()  # no checkpoint
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    started = time.time() + 60  # an earlier run's checkpoint, left in the folder: resuming would continue that run
    assert "--resume" not in stopped()
    started = time.time() - 60  # written by this run
    assert f"--resume --out-dir {tmp_path}" in stopped()
    args.resume, started = True, time.time() + 60  # a resumed run stopped before its next checkpoint
    assert "--resume" in stopped()


def test_a_bf16_run_records_it_evaluates_in_fp32_and_refuses_to_resume_in_fp32(quick_run, mnist_dir, tmp_path,
                                                                               capsys):
    m = json.loads((quick_run / "metrics.json").read_text())
    model, state = demo_script.load_for_analysis(quick_run / "checkpoint.pt", "cpu")
    assert m["config"]["precision"] == state["config"]["precision"] == "bf16"
    # evaluation is fp32 whatever the training: the bf16-trained weights scored again outside any autocast
    test_x = data.load_dataset(mnist_dir, "mnist")[2][:1000]
    assert utils.evaluate(model, test_x, "bce", draws=10)["neg_elbo"] == m["test_neg_elbo"]
    (tmp_path / "checkpoint.pt").write_bytes((quick_run / "checkpoint.pt").read_bytes())
    assert run_cli(QUICK + ["--epochs", "2", "--precision", "fp32", "--resume", "--out-dir", tmp_path]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "precision='bf16'" in err and "precision='fp32'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # refused before anything was written


@pytest.mark.parametrize("committed", ["checkpoint.pt", "likelihood/z10/checkpoint.pt", "likelihood/z50/checkpoint.pt"])
def test_resuming_a_committed_weights_only_checkpoint_exits_2_and_writes_nothing(committed, tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_bytes((ROOT / committed).read_bytes())  # weights, config, history only
    assert run_cli(["--resume", "--out-dir", tmp_path, "--data-dir", tmp_path / "data"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds no training state to resume from" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_analyze_only_takes_a_checkpoint_without_history(tmp_path):
    state = utils.load_checkpoint(ROOT / "checkpoint.pt")
    utils.save_checkpoint(tmp_path / "bare.pt", {k: state[k] for k in ("model", "config", "epoch")})  # no history
    args = demo_script.parse_args(["--analyze-only", str(tmp_path / "bare.pt")])
    bare = demo_script.checked_state(args)
    split = (None, None, torch.zeros(2, 784), torch.zeros(2, dtype=torch.long))
    model, history = demo_script.trained_model(demo_script.analysis_config(bare, args), bare, split, None, {})
    assert history == [] and torch.equal(model.state_dict()["decoder.0.weight"], state["model"]["decoder.0.weight"])


def test_a_checkpoint_whose_weights_do_not_fit_its_config_exits_2_before_reading_data(tmp_path, capsys):
    state = utils.load_checkpoint(ROOT / "checkpoint.pt")
    state["config"]["latent_dim"] = 3  # as a hand-edited or mislabelled file would say
    utils.save_checkpoint(tmp_path / "edited.pt", state)
    argv = ["--analyze-only", tmp_path / "edited.pt", "--out-dir", tmp_path / "out", "--data-dir", tmp_path / "data"]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "weights do not fit the saved config" in err and "edited.pt" in err
    assert not (tmp_path / "data").exists() and not (tmp_path / "out" / "metrics.json").exists()

def test_checkpoint_loads_with_weights_only(quick_run):
    state = torch.load(quick_run / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and state["config"]["latent_dim"] == 10 and len(state["history"]) == 2


@pytest.mark.parametrize("schedule,flags,betas", [
    ("cyclical", ["--cycles", "1", "--cycle-ratio", "0.5", "--beta-max", "2"], [0.0, 4 / 3, 2.0]),
    ("capacity", ["--gamma", "50"], [50.0, 50.0, 50.0]), ("constant", ["--beta-max", "0.5"], [0.5, 0.5, 0.5])])
def test_other_schedules_run_end_to_end(mnist_dir, tmp_path, schedule, flags, betas):
    assert run_cli(SMALL + ["--epochs", "3", "--schedule", schedule, *flags, "--out-dir", tmp_path]) == 0
    rows = utils.parse_loss_table((tmp_path / "loss.txt").read_text())
    assert [r["beta"] for r in rows] == pytest.approx(betas, abs=1e-3)
    assert all(r["total"] == pytest.approx(r["recon"] + r["kl"], abs=0.011) for r in rows)
    name = demo_script.schedule_name(demo_script.parse_args(["--schedule", schedule]))
    if schedule == "capacity":  # gamma * |KL - C| pins the rate near C(t) = 25 * t / 3, far below the free KL
        assert rows[-1]["kl"] < 20 and name == "capacity C"  # the figures' label: a curve in nats, not a β
        return
    assert name == "β"
    # train_loss.png's dashed curve: at x = e the beta column, and nothing past the last step (where a cycle restarts)
    x, curve = demo_script.schedule_curve(demo_script.parse_args(["--epochs", "3", "--schedule", schedule, *flags]))
    assert [curve[x.index(r["epoch"])] for r in rows] == pytest.approx(betas, abs=1e-3)
    assert x[-1] == pytest.approx(3.95) and curve[-1] == pytest.approx(betas[-1])


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_runs_end_to_end(tmp_path):
    assert run_cli(SMALL + ["--dataset", "fashion-mnist", "--out-dir", tmp_path]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["config"]["dataset"] == "fashion-mnist" and (tmp_path / "samples" / "tsne.png").is_file()
