"""Known answers for the likelihood, its error bars, binarization, the KL decomposition, probes and UMAP clustering."""
import argparse
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import data
import demo_script
import measures
import utils
from conftest import planted, tiny_model
from model import BetaVAE, VAEConfig


# ----------------------------------------------------------------------------- the IW estimator against quadrature

def one_d_model():
    """A 1-d latent and a tiny decoder over 20 pixels: log p(x) is then a 1-d integral."""
    torch.manual_seed(3)
    return BetaVAE(VAEConfig(input_dim=20, hidden=(16,), latent_dim=1)).double()


def log_px_by_quadrature(model, x, points=4000):
    """x: (N, 20) -> (N,) log p(x) = log integral p(x|z) p(z) dz by the rectangle rule on [-10, 10]."""
    z = torch.linspace(-10, 10, points, dtype=torch.float64)[:, None]
    with torch.no_grad():
        logits = model.decode(z).expand(len(x), points, x.shape[1])
        log_px_z = -utils.recon_per_image(logits, x[:, None].expand_as(logits), "bce")  # (N, points)
    log_pz = -0.5 * (z[:, 0] ** 2 + math.log(2 * math.pi))
    return torch.logsumexp(log_px_z + log_pz, dim=1) + math.log(20 / (points - 1))


def test_iw_estimate_converges_to_the_quadrature_log_likelihood():
    m = one_d_model()
    with torch.no_grad():
        x = torch.bernoulli(torch.sigmoid(m.decode(torch.randn(12, 1, dtype=torch.float64))))
    exact = log_px_by_quadrature(m, x)
    # chunk=1000 streams K=5000 through five passes per image: the running logsumexp is what is checked here
    est, mc_var = measures.iw_log_likelihood(m, x, 5000, "bce", chunk=1000)
    assert est.mean().item() == pytest.approx(exact.mean().item(), abs=0.02)
    assert (est - exact).abs().max() < 5 * mc_var.sqrt().max() + 0.01
    recon, kl, _ = utils.neg_elbo_per_image(m, x, "bce", draws=2000)
    assert (-(recon + kl) < exact).all()  # the ELBO lies below log p(x), image by image
    means = [measures.iw_log_likelihood(m, x, k, "bce", seed=1)[0].mean().item() for k in (1, 10, 100, 5000)]
    assert means == sorted(means) and means[-1] <= exact.mean().item() + 0.02


def heavy_tailed_model():
    """one_d_model with q(z|x) 7x narrower than it was (log-variance - 4): importance weights with heavy tails."""
    m = one_d_model()
    with torch.no_grad():
        m.encoder[-1].bias[1] -= 4.0
    return m


def delta_method_variance(log_w):
    """log_w: (K, N) -> (N,) the delta method's Var[log mean w] ~ Var(w) / (K E[w]^2), with Var(w) unbiased."""
    w, k = (log_w - log_w.max(0).values).exp(), log_w.shape[0]
    return (w.pow(2).sum(0) / w.sum(0).pow(2) - 1 / k) * k / (k - 1)


@pytest.mark.parametrize("make_model, low", [(one_d_model, 0.65), (heavy_tailed_model, 0.7)])
def test_iw_monte_carlo_error_matches_the_spread_over_seeds(make_model, low):
    m = make_model()
    x = (torch.rand(200, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) > 0.5).double()
    runs = [measures.iw_log_likelihood(m, x, 20, "bce", seed=s) for s in range(100)]
    spread = np.std([ll.mean().item() for ll, _ in runs], ddof=1)
    predicted = np.mean([utils.standard_errors(ll, var)[0] for ll, var in runs])
    assert low * spread < predicted < 1.35 * spread
    if make_model is heavy_tailed_model:  # where the delta method, the estimator used before, understates it more
        with torch.no_grad():
            log_w = measures.iw_log_weights(m, x, *m.encode(x), 20, "bce", torch.Generator().manual_seed(0))
        assert utils.standard_errors(runs[0][0], delta_method_variance(log_w))[0] < 0.65 * spread


@pytest.mark.parametrize("k, chunk", [(7, 3), (8, 4), (4, 10), (5, 10), (6, 6)])  # passes odd, even; images per pass
def test_iw_monte_carlo_variance_compares_the_bounds_of_the_even_and_the_odd_draws(k, chunk):
    m, x = one_d_model(), (torch.rand(5, 20, dtype=torch.float64) > 0.5).double()
    log_px, mc_var = measures.iw_log_likelihood(m, x, k, "bce", seed=4, chunk=chunk)
    gen, per_pass, step = torch.Generator().manual_seed(4), min(k, chunk), max(1, chunk // k)
    for i in range(0, len(x), step):  # the same draws again: the same images and draws per pass
        xb = x[i:i + step]
        with torch.no_grad():
            log_w = torch.cat([measures.iw_log_weights(m, xb, *m.encode(xb), min(per_pass, k - start), "bce", gen)
                               for start in range(0, k, per_pass)])  # (k, images), in draw order
        for j in range(len(xb)):
            w = log_w[:, j].exp()
            assert log_px[i + j].item() == pytest.approx(math.log(w.mean()), abs=1e-9)
            a, b = math.log(w[0::2].mean()), math.log(w[1::2].mean())  # two independent bounds, ceil and floor k/2
            ka, kb = (k + 1) // 2, k // 2
            assert mc_var[i + j].item() == pytest.approx((a - b) ** 2 * ka * kb / k ** 2, rel=1e-6)  # to k at 1/k
    assert measures.iw_log_likelihood(m, x, 1, "bce")[1].isnan().all()  # one weight: no spread to measure


def test_test_set_error_is_the_std_over_images_divided_by_root_n():
    rng = np.random.default_rng(0)
    values = torch.from_numpy(rng.normal(100.0, 8.0, size=10000))
    mc_se, test_se = utils.standard_errors(values, torch.full((10000,), 0.04))
    assert test_se == pytest.approx(values.std().item() / 100) and test_se == pytest.approx(0.08, rel=0.03)
    assert mc_se == pytest.approx(math.sqrt(10000 * 0.04) / 10000)
    # and it is what it claims to be: the spread of the mean over fresh test sets of the same size
    means = [rng.normal(100.0, 8.0, size=10000).mean() for _ in range(300)]
    assert np.std(means, ddof=1) == pytest.approx(test_se, rel=0.15)


def test_iw_bound_with_one_sample_matches_the_elbo_in_expectation():
    m, x = tiny_model(), (torch.rand(400, 784) > 0.5).float()
    elbo = -utils.evaluate(m, x, "bce")["neg_elbo"]
    iw1 = torch.stack([measures.iw_log_likelihood(m, x, 1, "bce", seed=s)[0] for s in range(30)]).mean()
    assert iw1.item() == pytest.approx(elbo, abs=0.5)

def test_iw_bound_never_decreases_with_k():
    m, x = tiny_model(), (torch.rand(100, 784) > 0.5).float()
    ll = [measures.iw_log_likelihood(m, x, k, "bce", seed=1)[0].mean().item() for k in (1, 5, 50, 500)]
    assert all(b >= a - 0.05 for a, b in zip(ll, ll[1:]))
    assert ll[-1] > ll[0]

def test_iw_bound_is_stable_in_log_space():
    m = tiny_model()
    x = torch.ones(3, 784)  # log-weights near -500 would underflow exp() without logsumexp
    ll, _ = measures.iw_log_likelihood(m, x, 20, "bce")
    assert torch.isfinite(ll).all() and (ll < -100).all()


# ----------------------------------------------------------------------------- binarization

def test_training_batches_are_fresh_bernoulli_draws_reproducible_under_a_seed():
    model = BetaVAE(VAEConfig(hidden=(8,), latent_dim=2))
    seen = []
    model.encoder.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].clone()))
    x = torch.full((64, 784), 0.3)  # every image the same grey: batches can only differ by their draws
    args = argparse.Namespace(batch_size=64, epochs=2, schedule="constant", beta_max=1.0, free_bits=0.0, loss="bce",
                              lr=1e-3, lr_schedule="constant", binarize=True, precision="fp32")
    opt = utils.make_optimizer(model, 1e-3)
    for seed in (0, 0):
        torch.manual_seed(seed)
        for epoch in (1, 2):
            utils.train_epoch(model, opt, x, args, epoch, show_progress=False)
    first, second, again = seen[0], seen[1], seen[2]
    assert set(first.unique().tolist()) == {0.0, 1.0} and first.mean().item() == pytest.approx(0.3, abs=0.01)
    assert not torch.equal(first, second) and torch.equal(first, again)


def test_binarized_test_set_is_the_same_for_every_run_and_seed(mnist_dir):
    digests = set()
    for seed in (1, 20):
        args = demo_script.parse_args(["--binarize", "--seed", str(seed), "--data-dir", str(mnist_dir)])
        torch.manual_seed(seed)  # the global generator must not matter
        _, _, test_x, _ = demo_script.experiment_data(args)
        digests.add(data.tensor_md5(test_x))
    assert len(digests) == 1
    assert set(test_x.unique().tolist()) == {0.0, 1.0}
    grey = data.load_dataset(mnist_dir)[2]
    assert test_x.mean().item() == pytest.approx(grey.mean().item(), abs=0.002)


# ----------------------------------------------------------------------------- KL decomposition

def gaussian_population(n, cov, sigma, seed=100):  # not kl_decomposition's default seed 0: its noise must differ
    """Posteriors N(mu_n, sigma^2 I) with mu_n ~ N(0, cov): q(z) is close to N(0, cov + sigma^2 I)."""
    g = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(torch.tensor(cov, dtype=torch.float64))
    mu = torch.randn(n, len(cov), generator=g, dtype=torch.float64) @ chol.T
    return mu, torch.full_like(mu, 2 * math.log(sigma))


def test_identical_posteriors_have_no_mutual_information_and_no_total_correlation():
    mu, logvar = torch.tensor([[0.5, -1.0, 2.0]]).expand(500, 3), torch.tensor([[0.1, -0.3, 0.0]]).expand(500, 3)
    d = measures.kl_decomposition(mu.contiguous(), logvar.contiguous())
    assert abs(d["mi"]) < 1e-5 and abs(d["tc"]) < 1e-5
    assert d["dim_kl"] == pytest.approx(d["kl_closed_form"], abs=0.2)


def test_independent_dimensions_have_no_total_correlation():
    d = measures.kl_decomposition(*gaussian_population(4000, [[1.0, 0.0], [0.0, 1.0]], 0.5))
    assert abs(d["tc"]) < 0.03


def test_correlated_gaussian_aggregate_matches_its_closed_form():
    rho, var = 0.8, 0.25
    d = measures.kl_decomposition(*gaussian_population(4000, [[1.0, rho], [rho, 1.0]], math.sqrt(var)))
    c = 1 + var  # q(z) = N(0, C), C = [[c, rho], [rho, c]]
    tc = -0.5 * math.log(1 - (rho / c) ** 2)  # Gaussian TC: (sum_j log C_jj - log det C) / 2
    mi = 0.5 * math.log((c ** 2 - rho ** 2) / var ** 2)  # h(z) - h(z | x)
    dim_kl = 2 * 0.5 * (c - 1 - math.log(c))  # KL(N(0, c) || N(0, 1)) per dimension
    assert d["tc"] == pytest.approx(tc, abs=0.04)
    assert d["mi"] == pytest.approx(mi, abs=0.06) and d["dim_kl"] == pytest.approx(dim_kl, abs=0.03)


def test_mutual_information_estimate_cannot_exceed_log_n():
    d = measures.kl_decomposition(*gaussian_population(1000, [[100.0, 0.0], [0.0, 100.0]], 0.01))
    assert d["mi"] <= d["mi_bound"] + 1e-9 and d["mi"] == pytest.approx(math.log(1000), abs=0.01)


@pytest.mark.parametrize("logvar", [-100.0, -40.0, 100.0])  # NaN terms; a sum 29 MC errors off; an inf KL
def test_posterior_variances_beyond_float32_null_the_decomposition_rather_than_skew_it(logvar):
    mu = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(FloatingPointError, match="not the closed-form KL"):
        measures.kl_decomposition(mu, torch.full_like(mu, logvar))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10 ** 6), d=st.integers(1, 6))
def test_the_three_terms_add_up_to_the_closed_form_kl(seed, d):
    g = torch.Generator().manual_seed(seed)
    mu, logvar = torch.randn(800, d, generator=g) * 1.5, torch.randn(800, d, generator=g) * 0.5 - 1
    r = measures.kl_decomposition(mu, logvar, seed=seed + 1)  # its own noise, not the draw that made mu
    assert r["mi"] + r["tc"] + r["dim_kl"] == pytest.approx(r["sum"], abs=1e-6)
    assert r["sum"] == pytest.approx(r["kl_closed_form"], abs=5 * r["sum_mc_se"])


def test_the_sums_monte_carlo_error_matches_its_spread_over_draws_of_z():
    # Broad posterior means vary KL_n from image to image: an error that counted that spread would be ~3.5x too large.
    g = torch.Generator().manual_seed(5)
    mu, logvar = torch.randn(400, 3, generator=g) * 3, torch.randn(400, 3, generator=g) * 0.3 - 1
    runs = [measures.kl_decomposition(mu, logvar, seed=s) for s in range(100, 140)]  # not 5: eps would be mu / 3
    spread = np.std([r["sum"] for r in runs], ddof=1)
    assert np.mean([r["sum_mc_se"] for r in runs]) == pytest.approx(spread, rel=0.3)


@settings(max_examples=8, deadline=None)
@given(rows=st.integers(1, 120))
def test_the_block_size_changes_no_bit_of_the_decomposition(rows):
    # Blocks only bound memory and keep it in cache (max_elements); each row's sums are the same whatever the block,
    # so the committed numbers do not depend on it. 97 rows: most block sizes leave a shorter last block.
    g = torch.Generator().manual_seed(7)
    mu, logvar = torch.randn(97, 3, generator=g), torch.randn(97, 3, generator=g) * 0.3 - 1
    terms = lambda elements: measures.kl_decomposition_terms(mu, logvar, torch.Generator().manual_seed(1), elements)
    assert torch.equal(terms(rows * mu.numel()), terms(2 ** 24))


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 4), d=st.integers(1, 12), n=st.integers(1, 200))
def test_the_folded_max_over_n_is_amax_exactly(b, d, n):
    mu = torch.randn(n, d, generator=torch.Generator().manual_seed(n))
    per_dim = torch.randn(b, d, 1) - mu.T[None]  # stored (B, N, d), as aggregate_log_densities builds it
    for x in (per_dim, per_dim.contiguous()):  # any n: gcd(n, 16) from 1 (primes) to 16
        assert torch.equal(measures.max_over_last(x), x.amax(-1, keepdim=True))


def test_the_floored_log_sum_exp_is_torchs_on_special_rows():
    inf, nan = math.inf, math.nan
    x = torch.tensor([[-inf, -inf, -inf], [0.0, inf, 1.0], [nan, 0.0, 1.0], [0.0, -200.0, -1e30], [5.0, 5.0, -inf]])
    got = measures.log_sum_exp(x, x.amax(-1, keepdim=True))
    assert torch.equal(got.isnan(), torch.tensor([False, False, True, False, False]))
    assert torch.equal(got.nan_to_num(), torch.logsumexp(x, -1).nan_to_num())  # -inf and inf rows included


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10 ** 6), scale=st.floats(1.0, 1e4))
def test_the_floored_log_sum_exp_is_within_float_rounding_of_the_exact_one(seed, scale):
    x = torch.randn(6, 300, generator=torch.Generator().manual_seed(seed)) * scale  # most terms floored at scale 1e4
    exact = torch.logsumexp(x.double(), -1)
    assert torch.allclose(measures.log_sum_exp(x, x.amax(-1, keepdim=True)).double(), exact, rtol=1e-6, atol=1e-6)


def test_flooring_exp_changes_no_bit_of_a_decomposition_with_many_underflowing_terms(monkeypatch):
    # Sharp posteriors far apart: most terms of q(z_j) = mean_m q(z_j | x_m) sit below exp(-87) relative to the largest.
    mu, logvar = gaussian_population(1500, (9 * torch.eye(6)).tolist(), 0.05)
    mu, logvar = mu.float(), logvar.float()
    per_dim = mu[:100, :, None] - mu.T[None]
    per_dim = -0.5 * (per_dim.square() / logvar.T.exp()[None] + logvar.T[None] + measures.LOG_2PI)
    assert (per_dim - per_dim.amax(-1, keepdim=True) < measures.EXP_FLOOR).float().mean() > 0.3
    floored = measures.kl_decomposition_terms(mu, logvar, torch.Generator().manual_seed(1))
    monkeypatch.setattr(measures, "log_sum_exp", lambda x, top: torch.logsumexp(x, -1))
    assert torch.equal(floored, measures.kl_decomposition_terms(mu, logvar, torch.Generator().manual_seed(1)))


# ----------------------------------------------------------------------------- probes and UMAP clustering


def test_probes_read_planted_classes_and_nothing_from_noise():
    x_all, y_all = planted(350, 10, 6.0)  # every 7th point is held out as the test set
    train, test = np.arange(len(y_all)) % 7 != 0, np.arange(len(y_all)) % 7 == 0
    unavailable = {}
    p = measures.probe_accuracies(x_all[train], y_all[train], x_all[test], y_all[test], unavailable, draws=3)
    assert all(v["mean"] > 0.98 for v in p.values()) and len(p) == 4 and unavailable == {}
    noise = np.random.default_rng(2).normal(size=x_all.shape)
    q = measures.probe_accuracies(noise[train], y_all[train], noise[test], y_all[test], unavailable, draws=3)
    assert all(abs(v["mean"] - 0.1) < 0.06 for v in q.values())
    assert q["logistic_100"]["draws"] == 3 and q["logistic_100"]["std"] >= 0 and q["logistic_100"]["labels"] == 100


def test_probes_count_the_labels_they_drew_and_null_what_cannot_be_fitted():
    x, y = planted(300, 10, 6.0)
    keep = y != 3  # a class missing: 9 classes of 11 labels each is 99, not 100
    unavailable = {}
    p = measures.probe_accuracies(x[keep], y[keep], x, y, unavailable, sizes=(100,), draws=2)
    assert p["logistic_100"]["labels"] == 99 and unavailable == {}
    p = measures.probe_accuracies(x[::10], y[::10], x, y, unavailable, sizes=(1000,), draws=2)
    # 300 training points, 30 of each class: 1,000 balanced labels cannot be drawn, and the reason says so
    assert p["logistic_1000"] is None and "the rarest has 30" in unavailable.pop("probes.logistic_1000")
    one = measures.probe_accuracies(x[:3], np.zeros(3, int), x, y, unavailable, sizes=(100,), draws=2)
    assert one == dict.fromkeys(["logistic_100", "logistic_all", "knn_all"])  # one class, 3 points: nothing fits
    assert set(unavailable) == {"probes.logistic_100", "probes.logistic_all", "probes.knn_all"}


@settings(max_examples=30, deadline=None)
@given(counts=st.lists(st.integers(10, 40), min_size=2, max_size=6), seed=st.integers(0, 1000))
def test_balanced_subsets_hold_equal_shares_of_each_class(counts, seed):
    y = np.repeat(np.arange(len(counts)), counts)
    idx = measures.balanced_subset(y, 10 * len(counts), np.random.default_rng(seed))
    assert len(set(idx)) == len(idx) and np.bincount(y[idx]).tolist() == [10] * len(counts)


def test_a_large_k_iw_bound_after_training_keeps_nothing_per_image():
    import psutil
    measures.return_large_frees_to_the_os()  # what demo_script.run does first
    torch.manual_seed(0)
    model = BetaVAE(VAEConfig())
    args = argparse.Namespace(batch_size=128, epochs=1, schedule="constant", beta_max=1.0, free_bits=0.0, loss="bce",
                              lr=1e-3, lr_schedule="constant", binarize=True, precision="fp32")
    utils.train_epoch(model, utils.make_optimizer(model, 1e-3), torch.rand(2000, 784), args, 1, show_progress=False)
    rss = psutil.Process().memory_info().rss
    measures.iw_log_likelihood(model, (torch.rand(30, 784) > 0.5).float(), 5000, "bce")
    # 0.5-6 MB here, in the suite or a fresh process (4-11 MB without the mallopt above: what pins it is the test
    # below). A small result once kept per image split the freed blocks and grew about 1 MB an image
    # (benchmarks/README.md, IW bound): 30 MB here. One 15.7 MB pass of decoded samples kept per image: 470 MB.
    assert psutil.Process().memory_info().rss - rss < 20 * 2 ** 20


def test_glibc_is_told_to_mmap_large_blocks_and_trim_late(monkeypatch):
    calls = []

    class Libc:  # glibc's mallopt, recorded: the threshold pinned once cannot be unpinned in this process to test it
        def mallopt(self, param, value):
            calls.append((param, value))

    monkeypatch.setattr(measures.ctypes, "CDLL", lambda name: Libc())
    measures.return_large_frees_to_the_os()
    assert calls == [(-3, 4 << 20), (-1, 128 << 20)]  # M_MMAP_THRESHOLD 4 MB, M_TRIM_THRESHOLD 128 MB


# ----------------------------------------------------------------------------- the latent explorer


def test_latent_explorer_sliders_follow_the_kl_order_the_digit_and_the_reset_button():
    m, mu, y = tiny_model(), torch.randn(40, 3), np.arange(40) % 10
    e = measures.latent_explorer(m, mu, y, torch.tensor([0.2, 3.0, 1.0]), [str(c) for c in range(10)])
    (digit, reset), sliders, start = e["panel"].children[0].children, e["sliders"], e["image"].value
    assert [s.description.split()[0] for s in sliders] == ["z1", "z2", "z0"]
    assert [s.value for s in sliders] == pytest.approx(mu[0, [1, 2, 0]].tolist())
    assert measures.digit_png(utils.decoded_images(m, mu[:1])[0]) == e["png"]
    assert e["morphometrics"].value == "<br>".join(
        f"{n} {v:.2f}" for n, v in zip(measures.FACTORS, measures.image_morphometrics(utils.decoded_images(m, mu[:1])[0])))
    sliders[2].value += 1.0
    assert e["image"].value != start
    reset.click()
    assert e["image"].value == start
    digit.value = 7  # the first 7 of y is image 7
    assert [s.value for s in sliders] == pytest.approx(mu[7, [1, 2, 0]].tolist())
