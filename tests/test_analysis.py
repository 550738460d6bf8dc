import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import threadpoolctl
import torch
from hypothesis import given, settings, strategies as st

import utils
from conftest import ROOT, planted, tiny_model


@settings(max_examples=100, deadline=None)
@given(perm=st.permutations(list(range(10))), seed=st.integers(0, 2 ** 16))
def test_hungarian_relabelling_of_a_permuted_labelling_is_perfect(perm, seed):
    y = np.random.default_rng(seed).integers(0, 10, size=300)
    pred = np.array(perm)[y]
    assert utils.cluster_accuracy(y, pred) == 1.0
    assert np.array_equal(utils.hungarian_relabel(y, pred), y)


def test_cluster_accuracy_counts_the_best_matching_only():
    y = np.array([0, 0, 0, 1, 1, 1])
    pred = np.array([1, 1, 0, 0, 0, 0])  # best map 1->0, 0->1: 2 + 3 right
    assert utils.cluster_accuracy(y, pred) == pytest.approx(5 / 6)


@pytest.mark.parametrize("method", ["kmeans", "gmm"])
def test_planted_clusters_are_recovered(method):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 5)) * 20
    y = np.repeat(np.arange(10), 60)
    x = centres[y] + rng.normal(size=(600, 5))
    s = utils.clustering_scores(x, y, method, seeds=range(2))
    assert s["acc_mean"] > 0.99 and s["nmi_mean"] > 0.98 and s["ari_mean"] > 0.98
    noise = utils.clustering_scores(rng.normal(size=(600, 5)), y, method, seeds=range(2))
    assert noise["acc_mean"] < 0.3 and noise["nmi_mean"] < 0.1


@pytest.mark.parametrize("n_per_class", [30, 1000])  # 300 points take Barnes-Hut, 10,000 the FFT method
def test_tsne_keeps_planted_clusters_apart_and_is_seeded(n_per_class):
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(10), n_per_class)
    x = rng.normal(size=(10, 10))[y] * 10 + rng.normal(size=(y.size, 10))
    emb = utils.tsne_embedding(x, seed=3, max_iter=300)
    assert emb.shape == (y.size, 2) and np.isfinite(emb).all()
    assert utils.clustering_scores(emb, y, "kmeans", seeds=range(3))["acc_mean"] > 0.99
    if n_per_class == 30:  # seeding is the same code for both methods; check it where it is cheap
        assert np.array_equal(emb, utils.tsne_embedding(x, seed=3, max_iter=300))
        assert not np.allclose(emb, utils.tsne_embedding(x, seed=4, max_iter=300))


def test_active_units_on_a_synthetic_encoder_with_known_variances():
    torch.manual_seed(0)
    std = torch.tensor([0.0, 0.05, 0.09, 0.11, 0.5, 1.0])  # variances 0, .0025, .0081, .0121, .25, 1
    mu = torch.randn(20000, 6) * std
    assert utils.active_units(mu).tolist() == [False, False, False, True, True, True]


def test_evaluate_standard_error_matches_the_spread_over_seeds():
    m, x = tiny_model(), (torch.rand(300, 784) > 0.5).float()
    runs = [utils.evaluate(m, x, "bce", seed=s, draws=8) for s in range(40)]
    spread = np.std([r["neg_elbo"] for r in runs], ddof=1)
    assert np.mean([r["mc_se"] for r in runs]) == pytest.approx(spread, rel=0.35)
    one = utils.evaluate(m, x, "bce", seed=0)  # one draw: the per-epoch figure in loss.txt, no error estimate
    mean = np.mean([r["neg_elbo"] for r in runs])
    assert np.isnan(one["mc_se"]) and one["neg_elbo"] == pytest.approx(mean, abs=4 * np.sqrt(8) * spread)


def test_clustering_std_is_the_sample_std_over_seeds():
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(4), 50)
    x = rng.normal(size=(4, 3))[y] * 1.5 + rng.normal(size=(200, 3))  # overlapping: seeds disagree
    s = utils.clustering_scores(x, y, "kmeans", seeds=range(5))
    assert s["acc_std"] == pytest.approx(np.std(s["acc_per_seed"], ddof=1)) and s["acc_std"] > 0
    assert np.isnan(utils.clustering_scores(x, y, "kmeans", seeds=[0])["acc_std"])  # undefined for one run


def test_tsne_rejects_fewer_iterations_than_early_exaggeration():
    with pytest.raises(ValueError, match="250"):
        utils.tsne_embedding(np.zeros((50, 3)), seed=0, max_iter=250)


def test_traversal_changes_only_the_swept_dimension():
    m = tiny_model()
    anchors = torch.randn(2, 3)
    values = [-3.0, 0.0, 3.0]
    dims = [2, 0]
    imgs = utils.traversal_images(m, anchors, dims=dims, values=values)
    assert imgs.shape == (2, 2, 3, 784)
    for row, d in enumerate(dims):
        for a in range(2):
            for v, value in enumerate(values):
                z = anchors[a].clone()  # the swept dimension set, every other one held at the anchor
                z[d] = value
                with torch.no_grad():
                    torch.testing.assert_close(imgs[row, a, v], torch.sigmoid(m.decode(z)))
    assert not torch.allclose(imgs[0, 0, 0], imgs[0, 0, 2])


def test_interpolation_endpoints_are_the_two_codes():
    m = tiny_model()
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    imgs = utils.interpolation_images(m, a, b, 5)
    assert imgs.shape == (4, 5, 784)
    with torch.no_grad():
        torch.testing.assert_close(imgs[:, 0], torch.sigmoid(m.decode(a)))
        torch.testing.assert_close(imgs[:, -1], torch.sigmoid(m.decode(b)))


def test_reconstruction_pairs_put_originals_above_reconstructions():
    x, x_hat = torch.zeros(20, 784), torch.ones(20, 784)
    rows = utils.reconstruction_pairs(x, x_hat, per_row=10).reshape(4, 10, 784)
    assert rows[0].sum() == 0 and rows[1].min() == 1 and rows[2].sum() == 0 and rows[3].min() == 1


def test_loss_table_round_trips():
    hist = [dict(epoch=1, beta=0.0, total=135.114, recon=121.17, kl=13.93, grad_norm=67.79, test_neg_elbo=120.5,
                 seconds=3.21)]
    row = utils.parse_loss_table(utils.loss_table(hist))[0]
    assert row == dict(epoch=1, beta=0.0, total=135.11, recon=121.17, kl=13.93, grad_norm=67.79,
                       test_neg_elbo=120.5, seconds=3.2)


@pytest.mark.parametrize("position", [37, 555])  # in the first block of 50 steps, and in the second
def test_train_epoch_stops_on_non_finite_loss_naming_epoch_and_batch(position):
    import argparse
    m = tiny_model()
    args = argparse.Namespace(batch_size=10, epochs=1, schedule="constant", beta_max=1.0, free_bits=0.0,
                              loss="bce", lr=1e-3, lr_schedule="constant", binarize=False, precision="fp32")
    x = torch.rand(600, 784)
    torch.manual_seed(0)
    x[torch.randperm(600)[position]] = float("nan")  # the image that the epoch's permutation puts at `position`
    torch.manual_seed(0)
    with pytest.raises(utils.NonFiniteLoss, match=f"epoch 1, batch {position // 10 + 1}$"):
        utils.train_epoch(m, utils.make_optimizer(m, 1e-3), x, args, epoch=1, show_progress=False)


def test_decoded_images_are_the_decoder_pixel_means_in_the_models_dtype():
    m = tiny_model().double()
    z = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)  # e.g. slider values: float32 numpy
    got = utils.decoded_images(m, z)
    with torch.no_grad():
        want = torch.sigmoid(m.decode(torch.from_numpy(z).double())).reshape(5, 28, 28).numpy()
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_umap_then_gaussian_mixture_recovers_planted_clusters():
    x, y = planted(60, 20, 4.0)
    s = utils.clustering_scores(x, y, "umap_gmm", seeds=[0, 1])
    assert s["acc_mean"] == 1.0


def test_seeds_side_by_side_run_openmp_on_one_thread_each(monkeypatch):
    # threadpoolctl's OpenMP limit is per thread: a seed's thread must set its own, or its KMeans takes every core
    def openmp_threads(features, method, seed):
        return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "openmp"]

    monkeypatch.setattr(utils, "cluster_labels", openmp_threads)
    seen = utils.labels_per_seed(np.zeros((10, 2)), "gmm", [0, 1, 2], threads=2)
    assert seen and all(s == [1] * len(s) and s for s in seen), seen


def test_limit_threads_holds_torch_to_n_after_torch_has_computed():
    # a fresh process (this one's pools are warm): torch runs first, as in the notebook, then the cap; numba's first
    # OpenMP pool used to reset torch's to every core behind it
    code = ("import torch, utils; torch.rand(1000, 1000).exp().sum(); utils.limit_threads(1); "  # starts torch's pool
            "import numba; print(torch.get_num_threads(), numba.get_num_threads())")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})  # 2 whatever the machine: the reset shows
    assert done.stdout.split() == ["1", "1"]


def test_umap_refuses_a_collapsed_code_whose_neighbours_are_ties():
    # 20 distinct codes for 30 neighbours: the graph would follow row order, and sorted labels would score above chance
    x = np.repeat(np.random.default_rng(0).normal(size=(20, 4)), 10, axis=0)
    with pytest.raises(ValueError, match="20 distinct codes"):
        utils.umap_embedding(x, seed=0)


# threads 1: the seeds in turn on the shared neighbour graph, as a grid member with --threads 1 runs them
@pytest.mark.parametrize("method, threads", [("umap_gmm", 1), ("umap_gmm", 2), ("gmm", 2)])
def test_seeds_side_by_side_give_the_labels_of_seeds_in_turn(method, threads):
    x, y = planted(30, 8, 1.5)  # overlapping clusters: labels that depend on the seed
    filters = list(warnings.filters)
    together = utils.labels_per_seed(x, method, [0, 1, 2], threads=threads)  # UMAP: one neighbour graph for all
    assert warnings.filters == filters  # UMAP's warning filter, set in threads, is undone
    assert len({labels.tobytes() for labels in together}) == 3  # so a swap of two seeds' results would show
    for seed, labels in zip([0, 1, 2], together):
        assert np.array_equal(labels, utils.cluster_labels(x, method, seed))


def test_the_seeds_umaps_share_one_neighbour_graph(monkeypatch):  # searched before the seeds split, in turn or not
    x, _ = planted(30, 8, 1.5)
    graphs, exact = [], utils.exact_neighbours
    monkeypatch.setattr(utils, "exact_neighbours", lambda *a, **k: graphs.append(a) or exact(*a, **k))
    assert len(utils.labels_per_seed(x, "umap_gmm", [0, 1, 2], threads=2)) == 3 and len(graphs) == 1


def test_umap_seeds_refuse_a_collapsed_code_before_searching_its_neighbours():
    x = np.repeat(np.random.default_rng(0).normal(size=(20, 4)), 10, axis=0)
    with pytest.raises(ValueError, match="20 distinct codes"):
        utils.labels_per_seed(x, "umap_gmm", [0, 1], threads=2)


def test_umaps_sgd_epoch_runs_without_the_gil_and_caches_under_its_own_name():
    layouts = utils.umap_module().layouts
    swapped = layouts._get_optimize_layout_euclidean_single_epoch_fn(False)  # what an embedding with a seed calls
    original = layouts._nb_optimize_layout_euclidean_single_epoch_parallel  # umap-learn's own njit, parallel twin
    assert swapped.targetoptions["nogil"] and not original.targetoptions.get("nogil", False)
    assert swapped.py_func.__code__ is layouts._optimize_layout_euclidean_single_epoch.__code__
    # numba keys its cache by name and bytecode, not by nogil: one name would load umap-learn's GIL-holding copy
    assert swapped.py_func.__qualname__ != original.py_func.__qualname__
