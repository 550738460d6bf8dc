"""What a trained model's code holds, beyond the training loss: likelihood bounds, KL decomposition, probes, Morpho-MNIST
factors and disentanglement against them, and the explorer that shows it live. Clustering stays in utils (design card)."""
import base64
import concurrent.futures as cf
import contextlib
import ctypes
import functools
import io
import math
import multiprocessing
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.stats import entropy, rankdata, spearmanr
import skimage
from skimage import measure, morphology, transform
from sklearn.ensemble import GradientBoostingRegressor
from sklearn.metrics import mutual_info_score
from tqdm.auto import tqdm

import data
import utils
from utils import LOG_2PI, batched, class_examples, decoded_images, kl_per_dim, log_normal, recon_per_image

try:  # skimage's own medial-axis kernel, so that its two 512-entry tables are built once, not once per image
    from skimage.morphology._skeletonize import _skeletonize_loop, _table_lookup
except ImportError:  # another skimage layout: the public medial_axis, about 10x slower
    _skeletonize_loop = _table_lookup = None

# ----------------------------------------------------------------------------- likelihood: ELBO and IW bound, both errors


def likelihood_metrics(model, test_x, args):
    """-> test -ELBO (10 z per image) and, for BCE, the IW bound, each with its Monte Carlo and test-set std errors."""
    draws = 10  # z per image: with one, the reference model's test -ELBO has a Monte Carlo std error of ~0.04 nats
    test = utils.evaluate(model, test_x, args.loss, draws=draws)
    m = dict(test_neg_elbo=test["neg_elbo"], test_neg_elbo_mc_se=test["mc_se"], test_neg_elbo_test_se=test["test_se"],
             test_eval_draws=draws, test_recon=test["recon"], test_kl=test["kl"], iw_samples=args.iw_samples,
             test_iw_log_likelihood=None)
    if args.loss == "bce":  # an MSE decoder has no normalised likelihood, so an IW "log p(x)" would mean nothing
        log_px, mc_var = iw_log_likelihood(model, test_x, args.iw_samples, args.loss,
                                                 show_progress=not args.no_progress)
        mc_se, test_se = utils.standard_errors(log_px, mc_var)
        m.update(test_iw_log_likelihood=float(log_px.mean()), test_iw_mc_se=mc_se, test_iw_test_se=test_se)
    return m


def iw_log_weights(model, xb, mu, logvar, k, kind, generator):
    """xb: (B, 784), mu, logvar: (B, z) -> (k, B) log p(x, z_k) - log q(z_k | x) for k draws z_k ~ q(z | x)."""
    mu_k, logvar_k = mu.expand(k, *mu.shape), logvar.expand(k, *logvar.shape)
    z = model.reparameterize(mu_k, logvar_k, generator=generator)
    logits = model.decode(z)
    # Bernoulli log p(x|z) = x.l - softplus(l): two passes over (k, B, 784) where BCE-with-logits makes five.
    log_px_z = (torch.linalg.vecdot(logits, xb) - F.softplus(logits).sum(-1) if kind == "bce"
                else -recon_per_image(logits, xb.expand(k, *xb.shape), kind))
    log_pz = -0.5 * (z.pow(2) + LOG_2PI).sum(-1)
    return log_px_z + log_pz - log_normal(z, mu_k, logvar_k).sum(-1)


def return_large_frees_to_the_os():
    """glibc only: allocations over 4 MB always by mmap, so a freed large tensor goes back to the OS at once."""
    # After training, glibc's adaptive threshold had moved 15 MB tensors onto the heap, which then fragmented: the IW
    # bound at K=5000 grew by ~3 MB per test image until the kernel killed the run (24 GB). Fixing the threshold
    # (mallopt M_MMAP_THRESHOLD = -3) stops that; training allocates nothing that large, so it is not slowed.
    # Pinning it also pins the trim threshold at 128 kB, and trimming the heap's top on every free made the IW bound
    # at K=100 36% slower (10.8 s against 7.9 s); a 128 MB trim threshold (M_TRIM_THRESHOLD = -1) gives 8.3 s.
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 4 << 20)
        libc.mallopt(-1, 128 << 20)
    except (OSError, AttributeError):
        pass  # not glibc (macOS, Windows, musl): their allocators have no such threshold to pin


@torch.no_grad()
def iw_log_likelihood(model, x, k, kind, seed=0, chunk=1000, show_progress=False):
    """x: (N, 784) -> log p(x) estimates with k importance samples (Burda et al. 2016, Eq. 8) and their MC variances, (N,) each."""
    # chunk = decoded samples per pass: memory stays at chunk x 784 floats for any K, and a running logsumexp carries
    # large K across passes. At 1000 a pass's tensors (3 MB) stay under the 4 MB mmap threshold: at K=5000, passes
    # of 5000 (mmapped, page-faulted afresh each time) ran at 44% of the matmul ceiling, passes of 1000 at 68-79%.
    model.eval()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    per_pass, step = min(k, chunk), max(1, chunk // k)
    # Filled in place: a small tensor kept per image split the heap's freed 3 MB blocks, and at K=5000 the process
    # grew by ~1 MB per image.
    out = torch.empty(2, x.shape[0], device=x.device, dtype=x.dtype)
    with tqdm(total=x.shape[0], desc=f"IW bound, K={k}", leave=False, disable=not show_progress) as bar:
        for i, xb in zip(range(0, x.shape[0], step), batched(x, step)):
            mu, logvar = model.encode(xb)
            lse, even, odd = torch.full((3, xb.shape[0]), -math.inf, device=x.device, dtype=mu.dtype)
            for start in range(0, k, per_pass):
                log_w = iw_log_weights(model, xb, mu, logvar, min(per_pass, k - start), kind, gen)
                lse = lse.logaddexp(log_w.logsumexp(0))
                # the draws numbered even and odd over all passes: two independent bounds of half the draws each
                even = even.logaddexp(log_w[start % 2::2].logsumexp(0))
                odd = odd.logaddexp(log_w[1 - start % 2::2].logsumexp(0))
            out[0, i:i + len(xb)] = lse - math.log(k)
            out[1, i:i + len(xb)] = half_split_variance(even, odd, k)
            bar.update(xb.shape[0])
    log_px, mc_var = out.cpu().double()  # float64 on the CPU only: MPS has none
    return log_px, mc_var


def half_split_variance(lse_even, lse_odd, k):
    """(B,) logsumexps of the even and odd of k draws' log-weights -> (B,) Var of the k-draw bound; nan for k = 1."""
    # Two independent replicates, log mean w over ceil(k/2) and floor(k/2) draws: (L_a - L_b)^2 estimates Var L_a +
    # Var L_b, taken down to k draws at the 1/k rate of Var[log mean w] (Owen 2013, Monte Carlo theory, methods and
    # examples, Ch. 9). The delta method, Var(w) / (K E[w]^2), needs Var(w), which heavy-tailed weights leave
    # underestimated in most runs: on the committed models it gave 0.5-0.9 of the spread over seeds, the halves
    # 0.7-1.3 (benchmarks/README.md).
    ka, kb = (k + 1) // 2, k // 2
    if kb == 0:
        return torch.full_like(lse_even, math.nan)  # one weight: no second replicate to compare it with
    return (lse_even - math.log(ka) - lse_odd + math.log(kb)).pow(2) * (ka * kb / k ** 2)


# ----------------------------------------------------------------------------- KL decomposition (β-TCVAE)


EXP_FLOOR = -87.0  # exp(-87) = 1.6e-38: fp32's normal numbers end at exp(-87.3)


def max_over_last(per_dim):
    """per_dim: (B, d, N), stored as (B, N, d) -> (B, d, 1) its max over N, exactly amax's."""
    # amax over N, whose neighbour in memory holds only d = 10 floats, ran a scalar loop: 1.4 ms a 4 MB block. Folding
    # k of N's rows into one of k * d floats lets it vectorise (0.08 ms at k = 16); a max is exact, so no bit changes.
    b, d, n = per_dim.shape
    k = math.gcd(n, 16)
    folded = per_dim.transpose(1, 2).reshape(b, n // k, k * d).amax(1)  # (B, k * d): a view when stored (B, N, d)
    return folded.view(b, k, d).amax(1)[:, :, None]


def log_sum_exp(x, top):
    """x: (..., N), top: (..., 1) its max over N -> (...,) torch.logsumexp(x, -1), without exp's slow underflow."""
    # torch.logsumexp's own steps (ATen's ReduceOps.cpp), with each x - max floored at -87: exp into the denormals or
    # to zero ran 10-25x slower than in range on this AVX-512 CPU, and a block of the KL decomposition had a quarter
    # of its terms there. A term under 1.6e-38 cannot move a sum that holds exp(0) = 1, whose ulp is 1.2e-7: on the
    # reference model's codes no bit changed (benchmarks/README.md).
    shift = top.masked_fill(top.abs() == math.inf, 0)
    total = x.sub(shift).clamp_(min=EXP_FLOOR).exp_().sum(-1).log_().add_(shift.squeeze(-1))
    return total.masked_fill_(top.squeeze(-1) == -math.inf, -math.inf)  # log 0, not the log of N floored terms


def aggregate_log_densities(z, mu, logvar):
    """z: (B, d), posteriors mu, logvar: (N, d) -> log q(z) (B,) and log q(z_j) (B, d) under q(z) = mean_m q(z | x_m)."""
    # log_normal's terms, in place on one (B, d, N) buffer: the O(N^2 d) part of the estimator. Fresh temporaries for
    # each term made it 3x slower (page faults on large allocations). It is stored as (B, N, d), mu's own layout.
    per_dim = z[:, :, None] - mu.T[None]
    per_dim.square_().mul_((-logvar.T).exp()[None]).add_((logvar.T + LOG_2PI)[None]).mul_(-0.5)
    joint = per_dim.sum(1)
    log_n = math.log(mu.shape[0])
    return (log_sum_exp(joint, joint.amax(-1, keepdim=True)) - log_n,
            log_sum_exp(per_dim, max_over_last(per_dim)) - log_n)


def kl_decomposition_terms(mu, logvar, generator=None, max_elements=2 ** 20):
    """mu, logvar: (N, d) -> (N, 4) log q(z_n|x_n), log q(z_n), sum_j log q(z_nj), log p(z_n) at one z_n ~ q(z|x_n)."""
    # The full-dataset estimator of rtqichen/beta-tcvae's elbo_decomposition.py, batched so that memory stays at
    # max_elements floats whatever N is. At 4 MB a block and its temporaries stay in the L3 cache: 64 MB blocks went
    # through DRAM and took 8.3-9.2 s against 5.9-6.4 s on the reference model, for the same bits (benchmarks/README.md).
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    z = mu + eps * torch.exp(0.5 * logvar)
    step = max(1, max_elements // mu.numel())
    # Filled in place, as iw_log_likelihood's: a small result kept per block split the heap's freed 4 MB blocks.
    out = torch.empty(len(z), 4, device=mu.device, dtype=mu.dtype)
    for i in range(0, len(z), step):
        zb, mub, logvarb = z[i:i + step], mu[i:i + step], logvar[i:i + step]
        log_qz, log_qz_j = aggregate_log_densities(zb, mu, logvar)
        log_pz = -0.5 * (zb.pow(2) + LOG_2PI).sum(-1)
        out[i:i + len(zb)] = torch.stack([log_normal(zb, mub, logvarb).sum(-1), log_qz, log_qz_j.sum(-1), log_pz], 1)
    return out


def kl_decomposition(mu, logvar, seed=0):
    """mu, logvar: (N, d) -> dict of nats: mi, tc, dim_kl, their sum (with its MC std error), the closed-form KL, log N."""
    gen = torch.Generator(device=mu.device).manual_seed(seed)
    log_qzx, log_qz, log_qz_prod, log_pz = kl_decomposition_terms(mu, logvar, gen).cpu().double().T
    # Chen et al. 2018 (beta-TCVAE), Eq. 2: E_x KL(q(z|x) || p(z)) = I_q(x; z) + TC(q(z)) + sum_j KL(q(z_j) || p(z_j))
    terms = dict(mi=log_qzx - log_qz, tc=log_qz - log_qz_prod, dim_kl=log_qz_prod - log_pz)
    total, kl = log_qzx - log_pz, kl_per_dim(mu, logvar).sum(-1)
    n = mu.shape[0]
    # The sum is checked against the closed form on the same images, so its error is the z draw's alone: the spread
    # of total_n - KL_n, whose mean is 0, not of total_n, which adds how much KL_n varies from image to image.
    mc_se = float((total - kl.cpu().double()).std()) / math.sqrt(n)
    # log q(z_n) >= log q(z_n | x_n) - log N, so the MI estimate can never exceed log N, whatever the true MI is.
    out = {**{k: float(v.mean()) for k, v in terms.items()}, "sum": float(total.mean()), "sum_mc_se": mc_se,
           "kl_closed_form": float(kl.mean()), "mi_bound": math.log(n)}
    # A posterior std below float32's resolution of its mean (log sigma^2 of -40 and less) makes z - mu round to 0:
    # the terms then come out NaN, or their sum drifts many standard errors from the closed form (1.9 at most on
    # the 33 committed models).
    if not all(map(math.isfinite, out.values())) or abs(out["sum"] - out["kl_closed_form"]) > 6 * mc_se:
        raise FloatingPointError(f"the terms' sum {out['sum']:.4g} is not the closed-form KL {out['kl_closed_form']:.4g}"
                                 f" (MC error {mc_se:.2g}): posterior variances beyond float32's resolution")
    return out


# ----------------------------------------------------------------------------- probes: what a read-out with labels finds


def balanced_subset(y, n, rng):
    """y: (N,) labels -> indices of n examples, n / classes of each class, drawn without replacement."""
    classes = np.unique(y)
    return np.concatenate([rng.choice(np.flatnonzero(y == c), n // len(classes), replace=False) for c in classes])


def logistic_probe(seed):
    """-> an unfitted standardise-then-logistic-regression pipeline."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))


def few_label_accuracy(train_mu, train_y, test_mu, test_y, n, draws, seed):
    """-> test accuracy of logistic probes on `draws` class-balanced draws of n training labels: mean, sample std."""
    counts = np.unique(train_y, return_counts=True)[1]
    if counts.min() < n // len(counts):  # a small --limit holds too few examples of some class
        raise ValueError(f"{n} balanced labels need {n // len(counts)} of each class; the rarest has {counts.min()}")
    subsets = [balanced_subset(train_y, n, np.random.default_rng(seed + d)) for d in range(draws)]
    accs = [logistic_probe(seed).fit(train_mu[i], train_y[i]).score(test_mu, test_y) for i in subsets]
    return dict(mean=float(np.mean(accs)), std=float(np.std(accs, ddof=1)), labels=len(subsets[0]), draws=draws)


def all_label_accuracy(train_mu, train_y, test_mu, test_y, model):
    """-> test accuracy of `model` fitted once on every training label (no spread to report)."""
    acc = float(model.fit(train_mu, train_y).score(test_mu, test_y))
    return dict(mean=acc, std=None, labels=len(train_y), draws=1)


def probe_accuracies(train_mu, train_y, test_mu, test_y, unavailable, sizes=(100, 1000), draws=5, seed=0):
    """(n, d) train and (m, d) test latent means with labels -> test accuracy of logistic probes and kNN, by label
    count; a probe this data cannot fit (too few labels of a class, one class) is null, its reason in unavailable."""
    from sklearn.neighbors import KNeighborsClassifier
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    split = (train_mu, train_y, test_mu, test_y)
    # several draws of n labels each: few-label accuracy varies with the draw
    out = {f"logistic_{n}": measure_or_null(unavailable, f"probes.logistic_{n}", few_label_accuracy, *split, n,
                                            draws, seed) for n in sizes}
    for name, model in [("logistic_all", logistic_probe(seed)), ("knn_all", KNeighborsClassifier(n_neighbors=5))]:
        out[name] = measure_or_null(unavailable, f"probes.{name}", all_label_accuracy, *split, model)
    return out


# ----------------------------------------------------------------------------- morphometrics (Morpho-MNIST)
# Castro, Tan, Kainz, Konukoglu & Glocker, "Morpho-MNIST", JMLR 2019: six measures of a handwritten digit that
# serve as its ground-truth factors of variation.

FACTORS = ("area", "length", "thickness", "slant", "width", "height")
SCALE = 4  # Castro et al. measure on a 4x upscaled image and report in the original pixels
TRIM = 0.01  # mass trimmed from each side of the bounding parallelogram (their bound_frac = 0.02, two-sided)
MORPHO_VERSION = 2  # of the definitions below: raise it when they change, and every cache is measured again
IN_PROCESS_BELOW = 2000  # fewer images are measured in-process: spawned workers take seconds to import torch
# 8-neighbour steps, each skeleton pixel pair counted once: right, down, down-right, down-left
HALF_NEIGHBOURHOOD = ((0, 1, 1.0), (1, 0, 1.0), (1, 1, math.sqrt(2)), (1, -1, math.sqrt(2)))


@functools.cache
def medial_axis_tables():
    """-> (512,) uint8 deletion table and (512,) int cornerness table of skimage's medial_axis, over 3x3 patterns."""
    patterns = (np.arange(512)[:, None] >> np.arange(9) & 1).astype(bool).reshape(512, 3, 3)
    cut = patterns.copy()
    cut[:, 1, 1] = False
    # skimage's rule: a foreground centre stays if removing it changes the 8-connected components, or has < 3 pixels
    eight = np.ones((3, 3), bool)
    changes = np.array([ndimage.label(p, eight)[1] != ndimage.label(c, eight)[1] for p, c in zip(patterns, cut)])
    keep = patterns[:, 1, 1] & (changes | (patterns.sum(axis=(1, 2)) < 3))
    return keep.astype(np.uint8), 9 - patterns.sum(axis=(1, 2))


def medial_axis(binary):
    """binary: (H, W) bool -> skimage's medial axis (H, W) bool, ties broken by seed 0, and distance map (H, W)."""
    if _skeletonize_loop is None:
        return morphology.medial_axis(binary, return_distance=True, rng=0)
    # skimage.morphology.medial_axis step for step, less the ~18 ms of table building it repeats on every call; a
    # test holds the two equal pixel for pixel, should a later skimage change its internals
    table, cornerness = medial_axis_tables()
    distance = ndimage.distance_transform_edt(binary)
    corner_score = _table_lookup(binary, cornerness)
    i, j = np.nonzero(binary)
    tiebreaker = np.random.default_rng(0).permutation(np.arange(len(i)))  # same image, same skeleton, every run
    order = np.lexsort((tiebreaker, corner_score[i, j], distance[i, j]))
    result = np.ascontiguousarray(binary, dtype=np.uint8)
    _skeletonize_loop(result, i.astype(np.intp), j.astype(np.intp), order.astype(np.int32), table)
    return result.astype(bool), distance


def upscaled(image):
    """image: (28, 28) uint8 or [0, 1] -> (112, 112) uint8, cubic pyramid upscale."""
    image = np.asarray(image)
    x = image / 255.0 if image.dtype == np.uint8 else image.astype(np.float64)
    up = transform.pyramid_expand(x, upscale=SCALE, order=3, channel_axis=None)
    # truncated, not rounded, as Castro et al.'s (255. * up_img).astype(uint8); rounding grew the binarised digit
    return (np.clip(up, 0.0, 1.0) * 255).astype(np.uint8)


def skeleton_length(skeleton):
    """skeleton: (H, W) bool -> path length in pixels, each 8-connected neighbour pair counted once."""
    s, total = skeleton, 0.0
    for dy, dx, step in HALF_NEIGHBOURHOOD:  # the pixel at (y, x) and its neighbour at (y + dy, x + dx)
        top = s[:s.shape[0] - dy]
        pairs = top[:, :s.shape[1] - dx] & s[dy:, dx:] if dx >= 0 else top[:, -dx:] & s[dy:, :dx]
        total += step * np.count_nonzero(pairs)
    return total


def mass_extent(coords, mass):
    """coords, mass: (M,) pixel positions and grey levels -> distance between the TRIM and 1 - TRIM mass points."""
    # unit bins on the pixel grid: the cumulative mass curve is a weighted histogram's cumsum, linear within a bin
    edges = np.arange(np.floor(coords.min()) - 0.5, coords.max() + 1.5)
    cdf = np.concatenate(([0.0], np.cumsum(np.histogram(coords, edges, weights=mass)[0])))
    lo, hi = np.interp([TRIM * cdf[-1], (1 - TRIM) * cdf[-1]], cdf, edges)
    return hi - lo


def slant_and_extents(grey):
    """grey: (H, W) upscaled image -> slant (radians), width, height (upscaled pixels) of its sheared mass."""
    grey = grey.astype(np.float64)
    mu = measure.moments_central(grey, order=2)  # mu[p, q] = sum (row - row_c)^p (col - col_c)^q grey
    shear = mu[1, 1] / mu[2, 0]  # u11 / u02 with x = column, y = row
    rows, cols = np.nonzero(grey)
    # x' = x - (u11/u02)(y - y_c) stands a slanted digit upright: its width, not its bounding box's
    sheared = cols - shear * (rows - measure.centroid(grey)[0])
    # Castro et al. 2019, slant = arctan(-u11 / u02): positive leans right (rows grow downwards)
    return np.arctan(-shear), mass_extent(sheared, grey[rows, cols]), mass_extent(rows.astype(float), grey[rows, cols])


def image_morphometrics(image):
    """image: (28, 28) uint8 or [0, 1] -> (6,) float64 area, length, thickness, slant, width, height; NaN if blank."""
    grey = upscaled(image)
    lo, hi = int(grey.min()), int(grey.max())
    if hi == lo:
        return np.array([0.0, 0.0, np.nan, np.nan, np.nan, np.nan])
    # >= as in Castro et al.'s code: with > an even (hi - lo) drops the threshold's own grey level, which alone moved
    # MNIST training image 0's length from 2% to 8.5% off their released value
    binary = grey >= lo + 0.5 * (hi - lo)
    skeleton, distance = medial_axis(binary)
    slant, width, height = slant_and_extents(grey)
    thickness = 2 * distance[skeleton].mean() / SCALE  # the distance to the background is half the stroke's width
    return np.array([np.count_nonzero(binary) / SCALE ** 2, skeleton_length(skeleton) / SCALE, thickness, slant,
                     width / SCALE, height / SCALE])


def morphometrics(images, workers=None):
    """images: (N, 28, 28) uint8 or [0, 1] -> (N, 6) float64 area, length, thickness, slant, width, height."""
    workers = workers or utils.usable_cores()
    # A Dask nanny's worker process is a daemon, which may not start processes of its own
    if workers == 1 or len(images) < IN_PROCESS_BELOW or multiprocessing.current_process().daemon:
        rows = [image_morphometrics(image) for image in images]
    else:  # spawn, not fork: a forked child of a process holding torch's or BLAS's threads can deadlock
        with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(image_morphometrics, images, chunksize=max(1, len(images) // (4 * workers))))
    return np.array(rows, dtype=np.float64).reshape(len(images), len(FACTORS))


def cache_prefix(md5):
    """-> a cache's first line up to its row count: the definitions' version, skimage's (whose skeleton moves length and
    thickness by up to 6%) and the md5 of the image file measured."""
    return f"# morphometrics v{MORPHO_VERSION} skimage={skimage.__version__} md5={md5} n="


def read_morphometrics_cache(path, md5, n):
    """-> the first n rows (n, 6) of a cache written for the image file with this md5, or None if unusable."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        cached = int(lines[0].removeprefix(cache_prefix(md5)))
        table = np.array([ln.split(",") for ln in lines[2:2 + n]], dtype=np.float64).reshape(-1, 1 + len(FACTORS))
    except (OSError, ValueError, IndexError, UnicodeDecodeError):  # missing, foreign (another md5) or mangled
        return None
    ok = (lines[1] == ",".join(("index",) + FACTORS) and cached >= n == len(table)
          and np.array_equal(table[:, 0], np.arange(n)) and np.isfinite(table).all())
    return table[:, 1:] if ok else None


def cached_morphometrics(images, image_file, cache_path, workers=None):
    """images: the first N (N, 28, 28) of the IDX file image_file -> (N, 6), measured once per machine."""
    md5 = data.file_digest(image_file)
    values = read_morphometrics_cache(cache_path, md5, len(images))
    if values is None:
        values = morphometrics(images, workers)
        table = np.column_stack([np.arange(len(values)), values])
        csv = io.StringIO()  # Morpho-MNIST's columns, under the md5 of the images measured
        header = f"{cache_prefix(md5)}{len(values)}\n" + ",".join(("index",) + FACTORS)
        np.savetxt(csv, table, fmt=["%d"] + ["%.17g"] * len(FACTORS), delimiter=",", comments="", header=header)
        with contextlib.suppress(OSError):  # a read-only data folder costs a re-measurement next time, nothing else
            data.write_text(cache_path, csv.getvalue())
    return values


def test_set_morphometrics(data_dir, dataset, n, workers=None):
    """-> (n, 6) morphometrics of the first n real test images (grey, whatever --binarize), from the cache."""
    folder = data.raw_dir(data_dir, dataset)
    images = data.read_idx(folder / "t10k-images-idx3-ubyte")[:n]
    return cached_morphometrics(images, folder / "t10k-images-idx3-ubyte", folder / "morpho-test.csv", workers)


# ----------------------------------------------------------------------------- disentanglement against the factors

BINS = 20
AVERAGED = ("length", "thickness", "slant", "width", "height")  # area ~ length x thickness: reported, not averaged


def equal_width_bins(x, bins=BINS):
    """x: (N,) -> (N,) int bin of `bins` equal-width bins over [min, max]; a constant x is all in bin 0."""
    span = x.max() - x.min()
    if span == 0:
        return np.zeros(len(x), dtype=np.int64)
    return np.minimum(np.floor((x - x.min()) / span * bins), bins - 1).astype(np.int64)


def equal_frequency_bins(x, bins=BINS):
    """x: (N,) -> (N,) int bin of `bins` equal-frequency bins; ties share a bin."""
    return ((rankdata(x, method="min") - 1) * bins // len(x)).astype(np.int64)  # ranks: any monotone map invariant


def top_two_gaps(scores):
    """scores: (d, k) -> (k,) per column the largest minus the second largest (0 for the second when d = 1)."""
    ordered = -np.sort(-scores, axis=0)
    return ordered[0] - (ordered[1] if len(ordered) > 1 else 0.0)


def mig(codes, factors, bins=BINS):
    """codes: (N, d), factors: (N, k) -> (k,) mutual information gaps, (d, k) mutual information in nats."""
    # Codes at equal width, as disentanglement_lib's histogram_discretize, so that scores compare with the literature's;
    # this caps MIG below 1 by the code's shape: a Gaussian-shaped copy of a factor scores 0.68, exp of it 0.18
    # (equal-frequency code bins: 0.99 for both; benchmarks/README.md). Factors, continuous here, at equal frequency.
    code_bins = [equal_width_bins(c, bins) for c in np.asarray(codes, np.float64).T]
    factor_bins = [equal_frequency_bins(f, bins) for f in np.asarray(factors, np.float64).T]
    mi = np.array([[mutual_info_score(f, c) for f in factor_bins] for c in code_bins]).reshape(len(code_bins), -1)
    h = np.array([entropy(np.bincount(f)) for f in factor_bins])
    with np.errstate(invalid="ignore", divide="ignore"):  # a constant factor (H = 0) gives NaN
        return top_two_gaps(mi) / h, mi  # Chen et al. 2018, Eq. 5: (I(z_top; v) - I(z_second; v)) / H(v)


def sap(codes, factors):
    """codes: (N, d), factors: (N, k) -> (k,) SAP gaps, (d, k) squared Pearson correlations (0 for a constant)."""
    a, b = (np.asarray(x, np.float64) for x in (codes, factors))
    za, zb = a - a.mean(axis=0), b - b.mean(axis=0)
    # a constant column correlates 0: normalising it would blow its rounding residue up to a unit vector
    na = np.where(np.ptp(a, axis=0) > 0, np.sqrt((za ** 2).sum(axis=0)), np.inf)
    nb = np.where(np.ptp(b, axis=0) > 0, np.sqrt((zb ** 2).sum(axis=0)), np.inf)
    r2 = ((za / na).T @ (zb / nb)) ** 2
    return top_two_gaps(r2), r2  # Kumar et al. 2018, SAP for continuous factors: top minus second R^2


def dci_importances(codes, factors, n_train, threads=None):
    """codes: (N, d), factors: (N, k), rows [:n_train] train -> (d, k) GBT importances, (k,) test R^2; threads
    (None: every usable core) fit the factors' regressors side by side."""
    if n_train < 10 or len(codes) - n_train < 2:
        raise ValueError(f"DCI needs >= 10 training and >= 2 test rows, got {n_train} and {len(codes) - n_train}")
    codes, factors = np.asarray(codes, np.float64), np.asarray(factors, np.float64)

    def fit(y):  # one regressor per factor, as disentanglement_lib's compute_importance_gbt
        model = GradientBoostingRegressor(random_state=0).fit(codes[:n_train], y[:n_train])
        return np.abs(model.feature_importances_), model.score(codes[n_train:], y[n_train:])

    # threads: scikit-learn builds each tree without the GIL, and one regressor alone leaves the other cores idle
    with cf.ThreadPoolExecutor(threads or utils.usable_cores()) as pool:
        importance, r2 = zip(*pool.map(fit, factors.T))
    return np.stack(importance, axis=1), np.array(r2)


def one_minus_entropy(p, axis, base):
    """p: non-negative array -> 1 - entropy of p normalised along axis, log base `base` (1 if base is 1)."""
    if base == 1:
        return np.ones(np.delete(p.shape, axis))
    return 1.0 - entropy(p + 1e-11, base=base, axis=axis)  # + 1e-11 as disentanglement_lib: a dead row scores 0


def dci_scores(importance):
    """importance: (d, k) -> disentanglement D and completeness C, as disentanglement_lib's dci.py."""
    d, k = importance.shape
    weights = importance if importance.sum() > 0 else np.ones_like(importance)
    # Eastwood & Williams 2018: D = sum_i rho_i (1 - H_k(P_i.)), rho_i = code i's share of all importance
    disentanglement = np.sum(one_minus_entropy(importance, 1, k) * weights.sum(axis=1) / weights.sum())
    # C = sum_j rho_j (1 - H_d(P_.j)): disentanglement_lib weights completeness by factor importance too
    completeness = np.sum(one_minus_entropy(importance, 0, d) * weights.sum(axis=0) / weights.sum())
    return float(disentanglement), float(completeness)


def disentanglement(codes, factors, n_train, threads=None, seed=0):
    """codes: (N, d) encoder means, factors: (N, 6) FACTORS -> dict of MIG, SAP, DCI, per-factor scores, protocol;
    DCI trains on n_train rows drawn at random with seed and scores on the rest."""
    averaged = [FACTORS.index(name) for name in AVERAGED]
    gaps, mi = mig(codes, factors)
    if np.isnan(gaps).any():  # a constant factor: the block is null with this reason, not a NaN in metrics.json
        raise ValueError(f"factor {FACTORS[int(np.argmax(np.isnan(gaps)))]} is constant on these images: no MIG")
    sap_gaps, _ = sap(codes, factors)
    # at random, not in order: MNIST's first 5,000 test digits are NIST's training writers, cleaner than the last
    # 5,000 (LeCun et al.'s MNIST page), so an ordered split would score the trees on another population
    rows = np.random.default_rng(seed).permutation(len(codes))
    importance, r2 = dci_importances(np.asarray(codes)[rows], np.asarray(factors)[rows], n_train, threads)
    dci_d, dci_c = dci_scores(importance[:, averaged])
    per_factor = {name: dict(top_dim=int(np.argmax(mi[:, j])), mig=float(gaps[j]), sap=float(sap_gaps[j]),
                             r2=float(r2[j])) for j, name in enumerate(FACTORS)}
    return dict(mig=float(gaps[averaged].mean()), sap=float(sap_gaps[averaged].mean()), dci_d=dci_d, dci_c=dci_c,
                dci_i=float(r2[averaged].mean()), per_factor=per_factor, mi=mi.tolist(),
                protocol=dict(representation="encoder means of the test images", factors=list(FACTORS),
                              averaged=list(AVERAGED), bins=BINS, code_binning="equal-width",
                              factor_binning="equal-frequency", mi="sklearn mutual_info_score, nats",
                              sap="squared Pearson correlation", dci="GradientBoostingRegressor(random_state=0)",
                              dci_split=f"rows by numpy default_rng({seed}).permutation", n_train=int(n_train),
                              n_test=int(len(codes) - n_train)))


# ----------------------------------------------------------------------------- what each dimension does: the atlas


def traversal_effects(dims, values, factors, test_std):
    """dims: (D,) latent ids, values: (V,), factors: (D, bases, V, 6) of decoded traversals, test_std: (6,) -> per
    dim {dim, factor, rho, effect_sd}: the factor moved furthest and most steadily (largest |mean change in test
    stds| x |mean Spearman rho|), its rho and its change."""
    factors, test_std = np.asarray(factors, np.float64), np.asarray(test_std)
    with warnings.catch_warnings():  # a constant or blank series has no rank correlation: nan, taken as 0 below
        warnings.simplefilter("ignore")
        rho = np.array([[[spearmanr(values, s).statistic for s in base.T] for base in dim] for dim in factors])
        # a factor that moves less than 1e-6 of its test std along a series has not moved: ranking rounding noise
        # (a stroke slid by whole pixels keeps its width but for 1e-15) would otherwise give it a confident rho
        moved = np.nanmax(factors, axis=2) - np.nanmin(factors, axis=2) > 1e-6 * test_std  # nan (blank) -> False
        change = np.nan_to_num(np.nanmean(factors[:, :, -1] - factors[:, :, 0], axis=1) / test_std)  # (D, 6)
    rho = np.where(moved, np.nan_to_num(rho), 0.0).mean(axis=1)  # (D, 6), over base digits
    # |rho| alone is 1 for any monotone series, however small; |change| alone favours a factor that moves far for one
    # digit and not for the others (which lowers its mean rho)
    score = np.abs(change * rho)
    # area ~ length x thickness moves with either and names neither: named only when the others all score 0
    averaged, area = np.array([FACTORS.index(name) for name in AVERAGED]), FACTORS.index("area")
    top = np.where(score[:, averaged].max(axis=1) > 0, averaged[np.argmax(score[:, averaged], axis=1)], area)
    return [dict(dim=int(d), factor=FACTORS[j] if score[i, j] else None, rho=float(rho[i, j]) if score[i, j] else 0.0,
                 effect_sd=float(change[i, j]) if score[i, j] else 0.0) for i, (d, j) in enumerate(zip(dims, top))]


def atlas_label(entry):
    """{dim, factor, effect_sd} -> a traversal row's label, e.g. 'z4: slant +1.8 sd', or 'z4: no factor moves'."""
    if entry["factor"] is None:
        return f"z{entry['dim']}: no factor moves"
    return f"z{entry['dim']}: {entry['factor']} {entry['effect_sd']:+.1f} sd"


def factor_report(mu, traversals, dims, values, args):
    """mu: (N, z) test codes, traversals: (D, bases, V, 784) decoded along dims -> metrics.json's disentanglement."""
    if args.dataset != "mnist":
        raise ValueError("Morpho-MNIST's morphometrics describe handwritten digits, not this data set's images")
    if mu.shape[1] < 2:  # MIG's and SAP's gap to a second dimension would be a gap to 0, and DCI C would be 1
        raise ValueError("MIG, SAP and DCI compare a factor's code dimensions: a 1-d code has one")
    # --threads caps the cores: in a grid of --workers members each gets its share, not every core
    factors = test_set_morphometrics(args.data_dir, args.dataset, len(mu), workers=args.threads)
    report = disentanglement(mu, factors, len(mu) // 2, args.threads, args.seed)
    decoded = morphometrics(traversals.reshape(-1, 28, 28).cpu().numpy(), workers=1)
    report["atlas"] = traversal_effects(dims, values, decoded.reshape(*traversals.shape[:3], 6), factors.std(0))
    return report


# ----------------------------------------------------------------------------- a run's analysis: every measure and figure


# How sklearn, scipy, numpy, openTSNE and umap-learn say that a method cannot be computed on this model's codes (a
# collapsed code, too few dimensions or images for the method): its measure is then null, not the run lost.
UNCOMPUTABLE = (ValueError, ArithmeticError, np.linalg.LinAlgError)  # ArithmeticError: FloatingPointError and kin


def measure_or_null(unavailable, name, step, *args, **kwargs):
    """-> step(*args, **kwargs), or None when it raises UNCOMPUTABLE: then unavailable[name] = its one-line reason, and
    one warning line on stderr names it. name: the measure's dotted path in metrics.json, e.g. "clustering.umap_gmm"."""
    try:
        return step(*args, **kwargs)
    except UNCOMPUTABLE as e:
        unavailable[name] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        print(f"warning: {name} is null in metrics.json, not computable on this model: {unavailable[name]}",
              file=sys.stderr, flush=True)
        return None


def clustering_metrics(mu, emb, y, args, timings, unavailable):
    """mu: (N, z) test latent means, emb: (n, 2) their t-SNE map or None -> (scores over seeds per method, None where
    not computable (reason in unavailable); (N,) KMeans clusters of mu for --seed, or None). Labels only score."""
    seeds, out, cores = range(args.seed, args.seed + args.kmeans_seeds), {}, args.threads or utils.usable_cores()
    with utils.timed(timings, "clustering"):
        kmeans = measure_or_null(unavailable, "kmeans_single_seed_acc", utils.cluster_labels, mu, "kmeans", args.seed)
        for name, f, method in [("kmeans_latent", mu, "kmeans"), ("gmm_latent", mu, "gmm"),
                                ("kmeans_tsne", emb, "kmeans"), ("gmm_tsne", emb, "gmm")]:
            if f is None:
                out[name], unavailable[f"clustering.{name}"] = None, "no t-SNE map (see tsne)"
            else:
                # A mixture's EM leaves cores idle (small BLAS calls, Python between them), so its seeds run side by
                # side; KMeans's own OpenMP loop keeps them busy (benchmarks/README.md, the analysis's phases).
                out[name] = measure_or_null(unavailable, f"clustering.{name}", utils.clustering_scores, f, y[:len(f)],
                                            method, seeds, kmeans if name == "kmeans_latent" else None,
                                            cores if method == "gmm" else 1)
    if args.umap_seeds:
        with utils.timed(timings, "umap"):  # each UMAP keeps one core busy: its seeds too run side by side
            out["umap_gmm"] = measure_or_null(unavailable, "clustering.umap_gmm", utils.clustering_scores, mu, y,
                                              "umap_gmm", range(args.seed, args.seed + args.umap_seeds),
                                              threads=cores)
    return out, kmeans


def analyze(model, split, args, samples, classes):
    """Every test-set metric and figure after training; split = (train_x, train_y, test_x, test_y) -> (metrics, timings).
    A measure this model makes uncomputable is null, its reason in metrics["unavailable"] (measure_or_null)."""
    (train_x, train_y, test_x, test_y), timings, unavailable = split, {}, {}
    y = test_y.numpy()
    with utils.timed(timings, "evaluate"):
        metrics = likelihood_metrics(model, test_x, args)
    mu, logvar = utils.encode_means(model, test_x)
    kl, active = utils.kl_per_dim(mu, logvar).mean(0), utils.active_units(mu)
    with utils.timed(timings, "kl_decomposition"):
        decomposition = measure_or_null(unavailable, "kl_decomposition", kl_decomposition, mu.to(test_x.device),
                                        logvar.to(test_x.device), seed=args.seed)
    with utils.timed(timings, "probes"):  # labels used by design: what a linear read-out of the code can do
        probe_x = data.binarized(train_x.cpu(), data.BINARIZE_SEED) if args.binarize else train_x
        probes = probe_accuracies(utils.encode_means(model, probe_x.to(test_x.device))[0].numpy(), train_y.numpy(),
                                  mu.numpy(), y, unavailable, seed=args.seed)
    with utils.timed(timings, "tsne"):  # not in metrics.json, but the clustering on it and two figures are
        emb = measure_or_null(unavailable, "tsne", utils.tsne_embedding, mu[:args.tsne_points].numpy(), args.seed,
                              n_jobs=args.threads or -1)
    clustering, labels = clustering_metrics(mu.numpy(), emb, y, args, timings, unavailable)
    pred = None if labels is None else utils.hungarian_relabel(y, labels)
    dims, values = kl.argsort(descending=True).tolist(), torch.linspace(-3, 3, 9, device="cpu").tolist()
    traversal = (utils.traversal_images(model, mu[utils.class_examples(y, (0, 3, 7))].to(test_x.device), dims, values),
                 dims, values)
    with utils.timed(timings, "disentanglement"):
        factors = measure_or_null(unavailable, "disentanglement", factor_report, mu.numpy(), *traversal, args)
    with utils.timed(timings, "figures"):
        analysis_figures(model, test_x, y, mu, (kl, active), emb, pred, traversal, factors, args, samples, classes)
    if decomposition:
        decomposition["mi_near_bound"] = decomposition["mi"] > decomposition["mi_bound"] - 0.3
    metrics.update(active_units=int(active.sum()), active_dims=active.nonzero().flatten().tolist(),
                   kl_per_dim=kl.tolist(), kl_decomposition=decomposition, probes=probes, clustering=clustering,
                   disentanglement=factors,
                   kmeans_single_seed_acc=None if pred is None else float((pred == y).mean()),
                   test_set=dict(images=len(y), binarized=args.binarize, md5=data.tensor_md5(test_x)),
                   unavailable=unavailable)
    return metrics, timings


def analysis_figures(model, test_x, y, mu, kl_active, emb, pred, traversal, factors, args, samples, classes):
    """Every figure after training into samples/; mu: (N, z) test latent means, kl_active: (z,) KL and active flags,
    emb: (n, 2) t-SNE map, pred: (N,) relabelled KMeans clusters, traversal: (images, dims, values), factors: the
    disentanglement block; emb, pred and factors are None when not computable (then their figures are not drawn)."""
    kl, active = kl_active
    utils.plot_latent_distribution(mu, y, samples / "latent_dist_after_train.png", "Test latent means after training",
                                   classes)
    if emb is not None:
        utils.plot_embedding(emb, y[:len(emb)], samples / "tsne.png",
                             f"t-SNE of {len(emb)} test latent means, coloured by class", classes)
    if emb is not None and pred is not None:
        utils.plot_embedding(emb, pred[:len(emb)], samples / "kmean.png", "KMeans (k=10) on latent means, "
                             "Hungarian-relabelled clusters, drawn on the t-SNE map", [f"cluster→{c}" for c in classes])
    if pred is not None:
        utils.plot_confusion(y, pred, samples / "confusion.png", classes, "KMeans on latent means")
    gen = torch.Generator(device=test_x.device).manual_seed(args.seed)
    utils.image_grid(model.sample(100, generator=gen), samples / "generated_num.png", nrow=10)
    x_hat = utils.reconstruct(model, test_x[:50])
    utils.image_grid(utils.reconstruction_pairs(test_x[:50], x_hat), samples / "reconstructions.png", nrow=10)
    utils.plot_kl_per_dim(kl, active, samples / "kl_per_dim.png")
    images, dims, values = traversal
    atlas = {e["dim"]: atlas_label(e) for e in (factors or {}).get("atlas", [])}
    utils.plot_traversals(images, dims, kl, active, values, samples / "traversals.png", atlas)
    if factors is not None:
        utils.plot_factors(np.array(factors["mi"]), FACTORS, samples / "factors.png")
    a, b = utils.class_examples(y, range(10)), utils.class_examples(y, [(c + 1) % 10 for c in range(10)], nth=1)
    pairs = utils.interpolation_images(model, mu[a].to(test_x.device), mu[b].to(test_x.device), 10)
    utils.image_grid(pairs.reshape(-1, 784), samples / "interpolations.png", nrow=10)


def print_summary(metrics, timings, title):
    """The headline numbers of metrics.json, as a short report on stdout; a null measure shows as "null"."""
    m, d, c = metrics, metrics["kl_decomposition"], metrics["clustering"]
    print(f"\n== {title} ==  ({m['test_set']['images']} test images{', binarized' if m['test_set']['binarized'] else ''};"
          f" ± MC = Monte Carlo std error, ± test = test-set std error)")
    name, unit = ("test -ELBO (beta=1)", "nats") if metrics["config"]["loss"] == "bce" else ("test MSE + KL", "")
    print(f"{name:26s} {m['test_neg_elbo']:8.2f} ± {m['test_neg_elbo_mc_se']:.2f} MC ± {m['test_neg_elbo_test_se']:.2f} "
          f"test {unit} (mean of {m['test_eval_draws']} z per image)")
    if m["test_iw_log_likelihood"] is not None:
        print(f"test log p(x), IW K={m['iw_samples']:<5d} {m['test_iw_log_likelihood']:8.2f} ± {m['test_iw_mc_se']:.2f} MC "
              f"± {m['test_iw_test_se']:.2f} test nats")
    print(f"active units               {m['active_units']:5d} of {len(m['kl_per_dim'])}")
    print("KL = MI + TC + dim-wise KL  null" if d is None else
          f"KL = MI + TC + dim-wise KL  {d['kl_closed_form']:.2f} = {d['mi']:.2f} + {d['tc']:.2f} + {d['dim_kl']:.2f} "
          f"(sum {d['sum']:.2f} ± {d['sum_mc_se']:.2f}; MI cannot exceed log N = {d['mi_bound']:.2f}"
          + (", and is within 0.3 of it: the true MI may be larger)" if d["mi_near_bound"] else ")"))
    print("probes (labels; ± std over label draws) " + ", ".join(
        f"{k} null" if v is None else f"{k} {v['mean']:.3f}" + ("" if v["std"] is None else f" ± {v['std']:.3f}")
        for k, v in m["probes"].items()))
    print(f"{'clustering (no labels)':26s} {'ACC':>13s} {'NMI':>13s} {'ARI':>13s}  (± std over clustering seeds)")
    for name, s in c.items():
        print(f"{name:26s} " + ("null" if s is None else " ".join(f"{s[k + '_mean']:.3f} ± {s[k + '_std']:.3f}"
                                                                  for k in ("acc", "nmi", "ari"))))
    f = m.get("disentanglement")
    if f:
        print(f"disentanglement (Morpho-MNIST) MIG {f['mig']:.3f}, SAP {f['sap']:.3f}, DCI D {f['dci_d']:.3f} "
              f"C {f['dci_c']:.3f} I {f['dci_i']:.3f}; " + ", ".join(atlas_label(e) for e in f["atlas"][:4]) + ", ...")
    if m.get("unavailable"):
        print("null, not computable on this model: " + "; ".join(f"{k} ({v})" for k, v in m["unavailable"].items()))
    print("time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))


# ----------------------------------------------------------------------------- the latent explorer (notebook)


def digit_png(pixels, scale=8):
    """pixels: (28, 28) in [0, 1] -> PNG bytes, each pixel a scale x scale block (sharp at any zoom)."""
    from torchvision.utils import save_image  # here, not at the top: torchvision adds ~1.4 s to every start-up
    big = torch.as_tensor(pixels).repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    buf = io.BytesIO()
    save_image(big[None], buf, format="png")
    return buf.getvalue()


def latent_explorer(model, mu, y, kl, class_names):
    """mu: (N, z) codes, y: (N,), kl: (z,) -> dict panel (ipywidgets), sliders (by KL), image, its morphometrics
    (an HTML line, redrawn with the image) and png (the first image)."""
    import ipywidgets as w  # only the notebook needs it: utils imports without it
    mu, kl = np.asarray(mu), np.asarray(kl)
    dims, starts = np.argsort(-kl), class_examples(y, range(len(class_names)))
    digit = w.Dropdown(options=[(f"{n} (test image {i})", i) for n, i in zip(class_names, starts)],
                       description="start")
    reset = w.Button(description="reset to its μ")
    lim = np.maximum(3.0, np.ceil(np.abs(mu).max(0)))  # every test code fits: no slider clips a μ
    sliders = [w.FloatSlider(value=mu[starts[0], d], min=-lim[d], max=lim[d], step=0.05,
                             description=f"z{d} (KL {kl[d]:.2f})", style={"description_width": "initial"})
               for d in dims]
    # HTML with a data-URI PNG, not widgets.Image, whose binary comm buffers Colab has not always carried
    image, measured = w.HTML(), w.HTML()

    def draw(_=None):
        z = np.zeros((1, len(kl)), dtype=np.float32)
        z[0, dims] = [s.value for s in sliders]
        pixels = decoded_images(model, z)[0]
        png = digit_png(pixels)
        image.value = f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="decoded z">'
        # the decoded digit's Morpho-MNIST factors (~5 ms): what moving a slider changes, in the atlas's terms
        measured.value = "<br>".join(f"{n} {v:.2f}" for n, v in zip(FACTORS, image_morphometrics(pixels)))
        return png

    def to_digit(_=None):
        for s, d in zip(sliders, dims):
            s.value = float(mu[digit.value, d])

    for s in sliders:
        s.observe(draw, names="value")
    digit.observe(to_digit, names="value")
    reset.on_click(to_digit)
    panel = w.VBox([w.HBox([digit, reset]), w.HBox([w.VBox(sliders), image, measured])])
    return dict(panel=panel, sliders=sliders, image=image, morphometrics=measured, png=draw())


def widget_with_png(widget, png):
    """-> raw display bundle: the live widget where widgets run, the PNG where they do not (GitHub, nbviewer)."""
    # Frontends draw the richest type they know: JupyterLab ranks the widget view first, static renderers skip it.
    view = {"version_major": 2, "version_minor": 0, "model_id": widget.model_id}  # ipywidgets 7 and 8 alike
    return {"application/vnd.jupyter.widget-view+json": view, "image/png": base64.b64encode(png).decode(),
            "text/plain": f"{type(widget).__name__} widget: run the cell in Jupyter or Colab"}
