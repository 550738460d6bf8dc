"""TensorBoard events read back with TensorBoard's own EventAccumulator, against loss.txt; --quick's sizes."""
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.utils.tensorboard import SummaryWriter

import demo_script
import utils
from conftest import QUICK, ROOT, run_cli

RUN = QUICK + ["--epochs", "2", "--limit", "1000", "--test-limit", "500", "--tsne-points", "200", "--tensorboard"]


def events(folder):
    """-> EventAccumulator of folder/tensorboard, every event kept."""
    acc = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc):
    """-> {tag: [(step, value), ...]} of every scalar."""
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def hparams_logged(folder):
    """-> the hparams plugin's session-start hparams of a run, as {name: value}."""
    acc = events(folder)
    for tag in acc.summary_metadata:
        content = acc.SummaryMetadata(tag).plugin_data.content
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
                    for k, v in data.session_start_info.hparams.items()}
    return {}


def assert_events_equal_loss_txt(folder):
    rows = utils.parse_loss_table((folder / "loss.txt").read_text())
    logged = scalars(events(folder))
    for tag, key in demo_script.TB_SCALARS.items():
        steps, values = zip(*logged[tag])
        assert list(steps) == [r["epoch"] for r in rows], tag  # every epoch once, none twice
        assert list(values) == pytest.approx([r[key] for r in rows], abs=0.0051), tag  # loss.txt rounds to 2 places
    return logged


def test_events_hold_loss_txt_epoch_by_epoch_digit_grids_and_hparams(mnist_dir, tmp_path):
    assert run_cli(RUN + ["--out-dir", tmp_path / "tb"]) == 0
    logged = assert_events_equal_loss_txt(tmp_path / "tb")
    assert [v for _, v in logged["schedule/lr"]] == pytest.approx([2e-3, 1e-3])  # cosine, at each epoch's start
    acc = events(tmp_path / "tb")
    assert {e.step for e in acc.Images("digits/generated")} == {1, 2}
    assert acc.Images("digits/reconstructions")[-1].width == 10 * 30 + 2  # 10 digits a row, 2-pixel padding
    metrics = json.loads((tmp_path / "tb" / "metrics.json").read_text())
    assert logged["hparams/test_neg_elbo"] == [(2, pytest.approx(metrics["test_neg_elbo"], rel=1e-6))]
    h = hparams_logged(tmp_path / "tb")
    assert h["beta_max"] == 1.0 and h["seed"] == 20 and h["epochs"] == 2 and h["limit"] == 1000
    # That logging reads no training randomness is tests/test_grid.py's: its reference grid logs, the members it
    # trains again do not, and their loss.txt must match.


def test_a_resumed_run_continues_its_curves_without_duplicated_steps(mnist_dir, tmp_path, monkeypatch):
    out, save, on_disk = tmp_path / "tb", utils.save_checkpoint, []

    def killed_at_second_checkpoint(path, state):  # epoch 2 is logged, then the run dies before its checkpoint
        # what a SIGKILL here would leave: the events on disk before the writer is closed
        on_disk.append([s for s, _ in scalars(events(out)).get("loss/total", [])])
        if len(on_disk) == 2:
            raise KeyboardInterrupt
        save(path, state)

    monkeypatch.setattr(utils, "save_checkpoint", killed_at_second_checkpoint)
    assert run_cli(RUN + ["--out-dir", out]) == 130
    assert on_disk == [[1], [1, 2]]  # each epoch on disk before its checkpoint: a resume leaves no gap
    assert [s for s, _ in scalars(events(out))["loss/total"]] == [1, 2]  # the orphan epoch 2 is on disk
    monkeypatch.setattr(utils, "save_checkpoint", save)
    assert run_cli(RUN + ["--out-dir", out, "--resume"]) == 0
    assert_events_equal_loss_txt(out)  # epoch 2 once, with the resumed run's values


def test_the_hparams_view_names_every_headline_metric_even_one_this_run_lacks(tmp_path):
    # TensorBoard takes one run's metric names for a whole grid: a member with a null measure must not drop its column
    m = json.loads((ROOT / "metrics.json").read_text())
    m["clustering"]["umap_gmm"], m["kl_decomposition"] = None, None
    with SummaryWriter(tmp_path / "tensorboard") as writer:
        demo_script.log_hparams(writer, m["config"], m, 30)
    acc = events(tmp_path)
    experiments = [plugin_data_pb2.HParamsPluginData.FromString(acc.SummaryMetadata(t).plugin_data.content)
                   for t in acc.summary_metadata]
    names = {i.name.tag for e in experiments if e.HasField("experiment") for i in e.experiment.metric_infos}
    assert {"hparams/umap_gmm_acc", "hparams/kl_decomposition.mi", "hparams/test_neg_elbo"} <= names
    logged = scalars(acc)
    assert "hparams/test_neg_elbo" in logged and "hparams/umap_gmm_acc" not in logged  # no number for a null one
    assert "hparams/kl_decomposition.mi" not in logged


def test_quick_is_the_readme_sizes_and_explicit_flags_win():
    args = demo_script.parse_args(["--quick"])
    assert (args.epochs, args.limit, args.test_limit, args.tsne_points, args.iw_samples, args.kmeans_seeds,
            args.umap_seeds, args.out_dir) == (3, 6000, 1000, 300, 10, 2, 0, "runs/quick")
    args = demo_script.parse_args(["--quick", "--epochs", "5", "--out-dir", "/tmp/q"])
    assert (args.epochs, args.limit, args.out_dir) == (5, 6000, "/tmp/q")
    assert demo_script.parse_args([]).epochs == 30  # and without --quick, nothing changes
