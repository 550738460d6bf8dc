"""Loss, schedules, training, evaluation, clustering and plots for the Beta-VAE. Plain functions, no state."""
import io
import math
import os
import random
import sys
import time
import types
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from unittest import mock

import matplotlib.patches
import numpy as np
import threadpoolctl
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from scipy.optimize import linear_sum_assignment
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score, confusion_matrix, normalized_mutual_info_score
from tqdm.auto import tqdm

import data

# ----------------------------------------------------------------------------- setup & files


def set_seed(seed):
    """The one place that seeds python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def usable_cores():
    """-> how many cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def limit_threads(n):
    """Cap this process's torch, BLAS/OpenMP (threadpoolctl) and numba (umap-learn) thread pools at n; None: no cap."""
    if n is None:
        return
    try:  # numba first: starting its OpenMP pool resets torch's to every core once torch has computed anything
        import numba  # imported here, not at the top: only UMAP needs it, and it costs ~0.6 s
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    torch.set_num_threads(n)
    threadpoolctl.threadpool_limits(n)  # sklearn's KMeans/GMM and numpy's BLAS: every such library loaded by now


def flush_denormals():
    """Treat denormal floats (float64 too) as 0, x86's DAZ/FTZ, here and in threads started later -> whether set."""
    # Adam's first moment for the weights that rarely lit pixels feed decays into the denormal range (~30% of its
    # entries after 10 epochs), and on Intel CPUs an operation on a denormal can take a microcode assist: on a Xeon
    # with AMX a bf16 epoch took 4.3 s, flushed 2.6 s (AMD's Zen 4: no difference). Such values move no weight by an
    # ulp: a default run wrote the same weights, loss.txt, metrics and figures, bit for bit, its float64 analysis
    # (numpy, scikit-learn) included (benchmarks/README.md).
    # Threads copy the flag when they start, so this comes before torch's first parallel op starts its OpenMP pool
    # (importing the project starts none); BLAS threads that numpy started at import keep denormals.
    return torch.set_flush_denormal(True)


def has_mps():
    """-> whether this machine has an MPS (Apple GPU) device."""
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


DEVICES = ("auto", "cpu", "cuda", "mps")  # what resolve_device takes


def resolve_device(name):
    """'auto' | 'cpu' | 'cuda' | 'mps' -> torch.device; ValueError when the device is not there."""
    has = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": has_mps()}
    if name == "auto":
        name = "cuda" if has["cuda"] else "mps" if has["mps"] else "cpu"
    if name not in has:
        raise ValueError(f"unknown device {name!r}; choose auto, cpu, cuda or mps")
    if not has[name]:
        raise ValueError(f"device {name!r} is not available on this machine")
    return torch.device(name)


def resolve_precision(name, device):
    """'auto' | 'fp32' | 'bf16' -> the training precision on torch.device `device`; ValueError where bf16 cannot run."""
    # Native units only: oneDNN's AVX512-BF16 or AMX, and CUDA from Ampere (compute 8.0) on; before it bf16 is emulated.
    hardware = {"cpu": torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                "cuda": device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)}
    if name == "auto":
        return "bf16" if hardware.get(device.type) else "fp32"
    if name == "bf16" and device.type not in hardware:
        raise ValueError(f"bf16 autocast is not supported on {device.type}; use fp32")
    return name  # bf16 on a CPU without bf16 units is allowed when asked for: correct, only slower


@contextmanager
def timed(timings, phase):
    """Record the wall seconds of the with-block in timings[phase]."""
    t0 = time.time()
    yield
    timings[phase] = round(time.time() - t0, 2)


# ----------------------------------------------------------------------------- loss & schedules


def kl_per_dim(mu, logvar):
    """mu, logvar: (B, z) -> (B, z) KL(q(z|x) || N(0, I)) per dimension."""
    # Kingma & Welling 2014, App. B: -KL = 1/2 * sum(1 + log sigma^2 - mu^2 - sigma^2)
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def recon_per_image(logits, x, kind):
    """logits, x: (..., 784) -> (...,) per-image loss summed over pixels: BCE = -log Bernoulli p(x|z), or MSE."""
    # MSE is a Gaussian -log p(x|z) only up to a scale and a constant: its "ELBO" and IW numbers are not likelihoods.
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
    return F.mse_loss(torch.sigmoid(logits), x, reduction="none").sum(-1)


def vae_terms(logits, x, mu, logvar, kind, free_bits):
    """-> batch means of recon, KL and free-bits KL, each a scalar tensor."""
    kl_dims = kl_per_dim(mu, logvar).mean(0)
    # Free bits (Kingma et al. 2016): no pressure on a dimension whose batch-mean KL is under lambda.
    return recon_per_image(logits, x, kind).mean(), kl_dims.sum(), kl_dims.clamp(min=free_bits).sum()


def objective(recon, kl, kl_free_bits, t, args):
    """The loss to minimise at fractional epoch t: recon + beta * KL_fb, or recon + gamma * |KL - C(t)|."""
    if args.schedule == "capacity":
        return recon + args.gamma * (kl - get_capacity(t, args)).abs()  # Burgess et al. 2018, Eq. 8
    return recon + get_beta(t, args) * kl_free_bits  # Higgins et al. 2017, Eq. 4


def get_beta(t, args):
    """beta at fractional epoch t (0.0 = start of epoch 1); a pure function like nanoGPT's get_lr."""
    if args.schedule == "linear":
        # 0 at the start of epoch 1, beta_max at the start of epoch W: the published beta column.
        ramp = args.warmup_epochs - 1
        return args.beta_max * min(1.0, t / ramp) if ramp > 0 else args.beta_max
    if args.schedule == "cyclical":
        # Fu et al. 2019: M cycles over the run, beta rising over the first fraction R of each, then held.
        # The phase from t * M, not t % (epochs / M): that modulo can land just short of a cycle's start (10 epochs,
        # 6 cycles: t = 5 gave 5/3 - 2e-16), which then trained at beta_max instead of 0.
        phase = (t * args.cycles) % args.epochs / args.epochs
        return args.beta_max * min(1.0, phase / args.cycle_ratio)
    if args.schedule == "capacity":
        return args.gamma  # the constant weight on |KL - C(t)|, which is what the loss.txt β column then shows
    return args.beta_max


def get_capacity(t, args):
    """Burgess et al. 2018: target KL C(t) in nats, raised linearly from 0 to C_max over the run."""
    return args.capacity_max * min(1.0, t / args.epochs)


def get_lr(t, args):
    """Learning rate at fractional epoch t: constant, or cosine decay to 0 over the run."""
    if args.lr_schedule == "cosine":
        return args.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t / args.epochs)))
    return args.lr


# ----------------------------------------------------------------------------- training & evaluation


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or inf; the message names the epoch and batch."""


def make_optimizer(model, lr):
    """Adam, fused where this torch and device support it (one kernel for all parameters)."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(model.parameters(), lr=lr, foreach=True)


def step_weights(n, batch_size):
    """-> (steps, 3) float64 weights of each step's (recon, kl, grad norm): its batch's size twice, then 1."""
    steps = math.ceil(n / batch_size)
    weights = torch.ones(steps, 3, dtype=torch.float64, device="cpu")
    weights[:, :2] = batch_size
    weights[-1, :2] = n - (steps - 1) * batch_size
    return weights


def finite_rows(rows, epoch, done):
    """rows: list of b (recon, kl, grad_norm, loss) 0-d tensors -> (b, 4) float64 on the CPU, or NonFiniteLoss."""
    block = torch.stack([torch.stack(col) for col in zip(*rows)], dim=1).cpu().double()
    bad = (~block.isfinite().all(1)).nonzero()
    if bad.numel():  # batches count from 1, across the blocks already summed (`done` steps)
        raise NonFiniteLoss(f"non-finite loss or gradient at epoch {epoch}, batch {done + int(bad[0]) + 1}")
    return block


def train_epoch(model, opt, x, args, epoch, show_progress=True):
    """One pass over x: (N, 784) on the model's device -> dict of mean total, recon, kl, grad_norm."""
    model.train()
    n, bs = x.shape[0], args.batch_size
    steps = math.ceil(n / bs)
    perm = torch.randperm(n, device=x.device)
    params = list(model.parameters())
    # Each step's recon, kl, grad norm and loss stay 0-d tensors in `rows`: no tensor op, no host sync per step.
    # Every 50 steps they are stacked and copied to the host once (the NaN/inf check, which names the first bad
    # batch, syncs there anyway), then summed in float64, which MPS lacks, with weights (batch size, batch size, 1)
    # so that recon and kl average over images and the norm over steps.
    weights = step_weights(n, bs)
    rows, done, sums = [], 0, torch.zeros(3, dtype=torch.float64, device="cpu")
    bar = tqdm(range(steps), desc=f"epoch {epoch}/{args.epochs}", leave=False, disable=not show_progress)
    for i in bar:
        t = epoch - 1 + i / steps
        for group in opt.param_groups:
            group["lr"] = get_lr(t, args)
        xb = x[perm[i * bs:(i + 1) * bs]]
        if args.binarize:  # dynamic binarization (Burda et al. 2016): a fresh Bernoulli(x) draw each time x is used
            xb = torch.bernoulli(xb)
        # bf16: the network's matrix products only; the loss terms, Adam and the master weights stay fp32
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            logits, mu, logvar = model(xb)
        recon, kl, kl_fb = vae_terms(logits.float(), xb, mu.float(), logvar.float(), args.loss, args.free_bits)
        loss = objective(recon, kl, kl_fb, t, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # The norm before the step, only measured: clip_grad_norm_(max_norm=inf) measured the same value but
        # then multiplied every gradient by 1.0, a whole extra pass (benchmarks/README.md, train variants).
        gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        opt.step()
        rows.append((recon.detach(), kl.detach(), gnorm, loss.detach()))
        if i % 50 == 49 or i == steps - 1:
            sums += (finite_rows(rows, epoch, done)[:, :3] * weights[done:i + 1]).sum(0)
            rows, done = [], i + 1
            bar.set_postfix(loss=f"{(sums[0] + sums[1]).item() / min(n, done * bs):.2f}")
    recon, kl, gnorm = (sums / sums.new_tensor([n, n, steps])).tolist()
    return dict(total=recon + kl, recon=recon, kl=kl, grad_norm=gnorm)


def batched(x, batch_size):
    """x: (N, ...) -> successive (batch_size, ...) slices; views, no copies."""
    return (x[i:i + batch_size] for i in range(0, x.shape[0], batch_size))


@torch.no_grad()
def encode_means(model, x, batch_size=5000):
    """x: (N, 784) -> mu, logvar: (N, z) on the CPU."""
    model.eval()
    parts = [model.encode(xb) for xb in batched(x, batch_size)]
    return torch.cat([p[0] for p in parts]).cpu(), torch.cat([p[1] for p in parts]).cpu()


LOG_2PI = math.log(2 * math.pi)


def log_normal(z, mu, logvar):
    """z, mu, logvar: broadcastable (..., z) -> (..., z) log N(z; mu, exp(logvar)) per dimension."""
    return -0.5 * ((z - mu).pow(2) / logvar.exp() + logvar + LOG_2PI)


@torch.no_grad()
def neg_elbo_per_image(model, x, kind, seed=0, batch_size=5000, draws=1):
    """x: (N, 784) -> recon, kl, recon_var: (N,) float64 on the CPU; recon averages `draws` z, recon_var is its variance."""
    model.eval()
    gen = torch.Generator(device=x.device).manual_seed(seed)  # fixed noise: epochs compare like for like
    recon, kl, var = [], [], []
    for xb in batched(x, max(1, batch_size // draws)):
        mu, logvar = model.encode(xb)
        z = model.reparameterize(mu.expand(draws, *mu.shape), logvar.expand(draws, *logvar.shape), generator=gen)
        r = recon_per_image(model.decode(z), xb.expand(draws, *xb.shape), kind)  # (draws, b)
        recon.append(r.mean(0))
        var.append(r.var(0) / draws if draws > 1 else torch.full_like(r[0], math.nan))
        kl.append(kl_per_dim(mu, logvar).sum(-1))  # closed form: only recon carries Monte Carlo noise
    # float64 only on the CPU, where the sums over images are taken (MPS has no float64)
    return tuple(torch.cat(t).cpu().double() for t in (recon, kl, var))


def standard_errors(values, mc_var):
    """values, mc_var: (N,) per-image estimates and their Monte Carlo variances -> (Monte Carlo SE, test-set SE) of the mean."""
    # Two different errors of one mean: redrawing z (mc) and redrawing the N test images (test set, std / sqrt N).
    n = values.numel()
    return math.sqrt(float(mc_var.sum())) / n, float(values.std()) / math.sqrt(n)


def evaluate(model, x, kind, seed=0, batch_size=5000, draws=1):
    """x: (N, 784) -> dict of means neg_elbo (beta = 1, plain KL), recon, kl, and neg_elbo's mc_se and test_se."""
    recon, kl, var = neg_elbo_per_image(model, x, kind, seed, batch_size, draws)
    mc_se, test_se = standard_errors(recon + kl, var)  # mc_se is nan with one draw: no spread to measure
    return dict(neg_elbo=float((recon + kl).mean()), recon=float(recon.mean()), kl=float(kl.mean()),
                mc_se=mc_se, test_se=test_se)


def active_units(mu, threshold=0.01):
    """mu: (N, z) -> bool (z,): active if Cov_x(E[z|x]) > threshold (Burda et al. 2016, Sec. 5.2)."""
    return mu.var(dim=0) > threshold


@torch.no_grad()
def reconstruct(model, x):
    """x: (N, 784) -> (N, 784) pixel means decoded from the latent means mu(x)."""
    model.eval()
    return torch.sigmoid(model.decode(model.encode(x)[0]))


def class_examples(y, classes, nth=0):
    """y: (N,) labels -> index of the nth example of each class in `classes`, in that order."""
    return [int(np.flatnonzero(np.asarray(y) == c)[nth]) for c in classes]


def traversal_images(model, mu, dims, values):
    """mu: (D, z) anchors -> (len(dims), D, len(values), 784): each dim swept over values, the rest held."""
    z = mu.expand(len(dims), len(values), *mu.shape).clone().permute(0, 2, 1, 3)  # (dims, D, values, z)
    for row, d in enumerate(dims):
        z[row, :, :, d] = torch.as_tensor(values, dtype=mu.dtype, device=mu.device)
    with torch.no_grad():
        return torch.sigmoid(model.decode(z))


def interpolation_images(model, mu_a, mu_b, steps):
    """mu_a, mu_b: (P, z) -> (P, steps, 784) decoded along the straight line from a to b."""
    w = torch.linspace(0, 1, steps, dtype=mu_a.dtype, device=mu_a.device)[None, :, None]
    with torch.no_grad():
        return torch.sigmoid(model.decode(mu_a[:, None] * (1 - w) + mu_b[:, None] * w))


@torch.no_grad()
def decoded_images(model, z):
    """z: (B, z) codes (tensor, array or list) -> (B, 28, 28) numpy pixel means on the CPU."""
    model.eval()
    p = next(model.parameters())
    z = torch.as_tensor(z, dtype=p.dtype, device=p.device)  # the caller may hold CPU numpy (e.g. slider values)
    return torch.sigmoid(model.decode(z)).reshape(-1, 28, 28).cpu().numpy()


# ----------------------------------------------------------------------------- loss.txt & checkpoints

LOSS_COLUMNS = (("epoch", "Epoch", "{:d}"), ("beta", "β", "{:.3f}"), ("total", "Total Loss", "{:.2f}"),
                ("recon", "Recon Loss", "{:.2f}"), ("kl", "KL Divergence", "{:.2f}"),
                ("grad_norm", "Grad Norm", "{:.2f}"), ("test_neg_elbo", "Test -ELBO", "{:.2f}"),
                ("seconds", "Seconds", "{:.1f}"))


def loss_table(history):
    """Per-epoch history (list of dicts) -> the Markdown table written to loss.txt."""
    lines = ["| " + " | ".join(h for _, h, _ in LOSS_COLUMNS) + " |",
             "|" + "|".join("-" * (len(h) + 2) for _, h, _ in LOSS_COLUMNS) + "|"]
    lines += ["| " + " | ".join(f.format(row[k]) for k, _, f in LOSS_COLUMNS) + " |" for row in history]
    return "\n".join(lines) + "\n"


def parse_loss_table(text):
    """Inverse of loss_table -> list of dicts with float values (epoch as int)."""
    rows = [ln.strip().strip("|").split("|") for ln in text.splitlines() if ln.strip().startswith("|")]
    return [{k: (int(v) if k == "epoch" else float(v)) for (k, _, _), v in zip(LOSS_COLUMNS, r)}
            for r in rows[2:]]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not fit the requested run."""


def checkpoint_state(model, opt, epoch, config, history):
    """Everything needed to resume bit-for-bit: weights, optimiser, RNG states, config, history."""
    np_state = np.random.get_state()
    # CUDA's generators only once CUDA has started: asking earlier would start it (a context per process) for a CPU run
    return dict(model=model.state_dict(), optimizer=opt.state_dict(), epoch=epoch, config=config,
                history=history, torch_rng=torch.get_rng_state(),
                cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
                mps_rng=torch.mps.get_rng_state() if next(model.parameters()).device.type == "mps" else None,
                numpy_rng=[np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
                python_rng=list(random.getstate()))


def restore_rng(state):
    """Put the torch, CUDA, MPS, numpy and python RNGs back where checkpoint_state found them."""
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():  # a machine with fewer GPUs restores those it has
        for i, cuda_state in enumerate(state["cuda_rng"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, i)
    if state.get("mps_rng") is not None and has_mps():  # absent from checkpoints written before it was saved
        torch.mps.set_rng_state(state["mps_rng"])
    kind, keys, *rest = state["numpy_rng"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path, state):
    """Atomically replace a checkpoint file."""
    buffer = io.BytesIO()  # serialised here, written by Python: a full disk then says so, where torch.save's own
    torch.save(state, buffer)  # writer only reports "unexpected pos"
    data.atomic_save(path, lambda tmp: Path(tmp).write_bytes(buffer.getbuffer()))


def load_checkpoint(path):
    """-> the checkpoint dict, loaded with weights_only=True; CheckpointError with a clear message otherwise."""
    if not Path(path).is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}); "
                              f"delete it or point to another checkpoint") from None
    if not isinstance(state, dict) or not {"model", "config", "epoch"} <= set(state):
        raise CheckpointError(f"{path} is not a checkpoint written by this project")
    return state


# Flags that define the trained model: a checkpoint resumed with any of them changed would not be the same run.
RUN_FIELDS = ("dataset", "latent_dim", "hidden", "loss", "epochs", "batch_size", "limit", "beta_max", "schedule",
              "warmup_epochs", "cycles", "cycle_ratio", "gamma", "capacity_max", "free_bits", "lr", "lr_schedule",
              "seed", "binarize", "precision")
# ... and what a resumed run must keep too: the test images that loss.txt's Test -ELBO column scores every epoch.
RESUME_FIELDS = RUN_FIELDS + ("test_limit",)


def config_mismatch(saved, requested, fields, holder="checkpoint"):
    """-> the first of `fields` whose value differs between two config dicts, as a message naming the saved config's
    holder, or None."""
    for f in fields:
        a, b = saved.get(f), requested.get(f)
        if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            return f"{holder} has {f}={a!r} but this run asks for {f}={b!r}"
    return None


# ----------------------------------------------------------------------------- clustering & embedding


def hungarian_relabel(y_true, y_pred):
    """-> y_pred mapped onto y_true's labels by the one-to-one matching that maximises agreement."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    k = max(y_true.max(), y_pred.max()) + 1
    counts = confusion_matrix(y_pred, y_true, labels=np.arange(k))  # rows: cluster, cols: class
    rows, cols = linear_sum_assignment(counts, maximize=True)
    mapping = np.arange(k)
    mapping[rows] = cols
    return mapping[y_pred]


def cluster_accuracy(y_true, y_pred):
    """Unsupervised clustering accuracy: the fraction right after Hungarian relabelling."""
    return float(np.mean(hungarian_relabel(y_true, y_pred) == np.asarray(y_true)))


def cluster_labels(features, method, seed, k=10, n_init=10, knn=None):
    """features: (N, d) -> (N,) ids from 'kmeans', 'gmm' (full covariance) or 'umap_gmm' (UMAP with knn, then gmm)."""
    from sklearn.cluster import KMeans
    from sklearn.mixture import GaussianMixture
    if method == "umap_gmm":  # McConville et al. 2020 (N2D): UMAP to k dimensions, then a Gaussian mixture
        features, method = umap_embedding(features, seed, n_components=k, knn=knn), "gmm"
    # n_init restarts keep the lowest inertia or the highest likelihood: a choice that never sees a label.
    if method == "kmeans":
        return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(features)
    gmm = GaussianMixture(n_components=k, covariance_type="full", n_init=n_init, random_state=seed)
    return gmm.fit(features).predict(features)


@contextmanager
def numba_caching(on):
    """In the block numba.njit caches on disk unless a call says not to (on), or njit and vectorize never do (off);
    both are restored after the block, whatever happens in it."""
    import numba  # here, not at the top: only UMAP needs numba, and it costs ~0.6 s
    njit, vectorize = numba.njit, numba.vectorize
    if on:
        numba.njit = lambda *a, **k: njit(*a, **{"cache": True, **k})
    else:  # umap-learn and pynndescent ask for cache=True themselves, which fails where nothing can be cached
        numba.njit = lambda *a, **k: njit(*a, **{**k, "cache": False})
        numba.vectorize = lambda *a, **k: vectorize(*a, **{**k, "cache": False})
    try:
        yield
    finally:
        numba.njit, numba.vectorize = njit, vectorize


def sgd_epoch_without_gil(epoch):
    """-> umap-learn's single-threaded SGD epoch (a UMAP's ~14 s) compiled with nogil=True: UMAPs in threads then
    run side by side. Its copy gets a name of its own, because numba's cache key ignores nogil."""
    import numba
    copy = types.FunctionType(epoch.__code__, epoch.__globals__, epoch.__name__, epoch.__defaults__, epoch.__closure__)
    copy.__qualname__ = f"{epoch.__qualname__}_nogil"
    return numba.njit(copy, fastmath=True, parallel=False, nogil=True)  # umap-learn's own flags, and nogil


def import_umap():
    """Import umap-learn, with its SGD epoch swapped for sgd_epoch_without_gil's where this version has the hook."""
    import umap.layouts as layouts
    if hasattr(layouts, "_get_optimize_layout_euclidean_single_epoch_fn"):  # 0.5.7-0.5.12 have it; else one at a time
        layouts._nb_optimize_layout_euclidean_single_epoch = sgd_epoch_without_gil(
            layouts._optimize_layout_euclidean_single_epoch)


def umap_module():
    """-> umap-learn, its numba code cached on disk so that only a machine's first UMAP compiles it; where numba can
    write no cache (unwritable NUMBA_CACHE_DIR, home and install), compiled in every process, with one warning."""
    if "umap" not in sys.modules:
        # umap-learn asks numba to cache 1 of its 117 functions; compiling the rest took ~30 s of every process.
        try:
            with numba_caching(True):
                import_umap()
        except RuntimeError as e:  # numba, at import: "cannot cache function 'f': no locator available for file ..."
            if "no locator available" not in str(e):
                raise
            for name in [m for m in sys.modules if m.split(".")[0] in ("umap", "pynndescent")]:
                del sys.modules[name]  # half-imported, with functions set to cache: import them afresh
            sys.stderr.write("warning: numba has no writable cache folder (NUMBA_CACHE_DIR, home, site-packages); "
                             "UMAP's code is compiled afresh in this process (~30 s)\n")
            with numba_caching(False):
                import_umap()
    return sys.modules["umap"]


# 30 neighbours and min_dist 0 are umap-learn's advice for clustering (docs, "Using UMAP for Clustering"); N2D used 20.
UMAP_NEIGHBOURS = 30


def exact_neighbours(features, n_neighbors=UMAP_NEIGHBOURS):
    """features: (N, d) -> (indices, distances), each (N, n_neighbors): every row's exact nearest rows, nearest first."""
    from sklearn.neighbors import NearestNeighbors
    features = np.asarray(features, dtype=np.float32)
    distinct = len(np.unique(features, axis=0))
    if distinct <= n_neighbors:  # a (nearly) collapsed code: ties, in row order, would make the neighbour graph
        raise ValueError(f"{distinct} distinct codes: UMAP's {n_neighbors}-neighbour graph would be made of ties")
    # Exact neighbours, cheap for 10k points in 10-d, replace UMAP's NN-descent, whose numba code cannot be cached.
    dist, idx = NearestNeighbors(n_neighbors=n_neighbors).fit(features).kneighbors(features)
    return idx, dist


def umap_embedding(features, seed, n_components=10, n_neighbors=UMAP_NEIGHBOURS, knn=None):
    """features: (N, d) -> (N, n_components) UMAP with min_dist 0; knn: exact_neighbours(features) if already made."""
    features = np.asarray(features, dtype=np.float32)
    idx, dist = exact_neighbours(features, n_neighbors) if knn is None else knn
    # random_state makes UMAP deterministic and single-threaded; n_jobs=1 says so and silences its warning. Copies:
    # seeds share the graph, and umap-learn may write into it (it marks disconnected neighbours with -1).
    reducer = umap_module().UMAP(n_components=n_components, n_neighbors=n_neighbors, min_dist=0.0, random_state=seed,
                                 n_jobs=1, precomputed_knn=(idx.copy(), dist.copy(), None))
    with warnings.catch_warnings():  # it warns that transform() needs an NN-descent index; nothing here transforms
        warnings.filterwarnings("ignore", message="precomputed_knn", category=UserWarning)
        return reducer.fit_transform(features)


def labels_per_seed(features, method, seeds, threads=1):
    """features: (N, d) -> [(N,) cluster ids for each seed]; threads > 1: the seeds side by side, BLAS on one thread
    each, for methods that leave cores idle: UMAP (its SGD holds one core, without the GIL) and a mixture's EM."""
    # The seeds' UMAPs differ in their SGD only: one neighbour graph serves them all (~1 s each on 10k codes)
    shared = dict(knn=exact_neighbours(features)) if method == "umap_gmm" and len(seeds) > 1 else {}
    if threads <= 1 or len(seeds) < 2:
        return [cluster_labels(features, method, s, **shared) for s in seeds]
    if method == "umap_gmm":
        umap_module()  # imported here, once: it swaps numba.njit for the duration, which threads must not race on
    # One filter for all threads: warnings.catch_warnings (in umap_embedding) is not thread-safe, this outer one is
    # restored last, so the filters end as they began.
    with warnings.catch_warnings(), threadpoolctl.threadpool_limits(1), ThreadPoolExecutor(threads) as pool:
        warnings.filterwarnings("ignore", message="precomputed_knn", category=UserWarning)
        return list(pool.map(partial(one_openmp_thread, cluster_labels, features, method, **shared), seeds))


def one_openmp_thread(f, *args, **kwargs):
    """f(*args, **kwargs) with OpenMP on one thread in this thread: its limit is per thread (BLAS's is per process),
    so a thread started under threadpool_limits(1) would otherwise give sklearn's KMeans every core."""
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        return f(*args, **kwargs)


def clustering_scores(features, y, method, seeds, first_labels=None, threads=1):
    """Cluster once per seed (labels only score) -> dict of mean and std ACC, NMI, ARI and the per-seed ACC;
    first_labels: (N,) the clusters of seeds[0] when already at hand, so that they are not computed twice;
    threads: seeds run side by side (labels_per_seed)."""
    seeds, given = list(seeds), [] if first_labels is None else [first_labels]
    preds = given + labels_per_seed(features, method, seeds[len(given):], threads)
    runs = [(cluster_accuracy(y, p), normalized_mutual_info_score(y, p), adjusted_rand_score(y, p)) for p in preds]
    acc, nmi, ari = np.array(runs).T
    # Sample std (ddof=1) over seeds; numpy gives nan, with a warning, for a single seed.
    return dict(acc_mean=acc.mean(), acc_std=acc.std(ddof=1), nmi_mean=nmi.mean(), nmi_std=nmi.std(ddof=1),
                ari_mean=ari.mean(), ari_std=ari.std(ddof=1), acc_per_seed=acc.tolist(), seeds=seeds)


def tsne_embedding(features, seed, max_iter=500, n_jobs=-1):
    """features: (N, d) -> (N, 2) t-SNE map (openTSNE on n_jobs threads, -1: all; FFT from N = 10,000, else BH)."""
    # max_iter counts the 250 early-exaggeration iterations too, as sklearn's does. On the 10k test latents openTSNE
    # took 14-15 s with Annoy's neighbours (11-12 s with exact ones) and sklearn's Barnes-Hut 18-21 s, with a slightly
    # better KMeans score (benchmarks/README.md).
    if max_iter <= 250:
        raise ValueError(f"max_iter={max_iter} must exceed the 250 early-exaggeration iterations it includes")
    from openTSNE import TSNE  # here, not at the top: it costs ~1 s of every start-up, --help included
    # Exact neighbours (scikit-learn's search, a k-d tree for 10-d codes): for 10k codes they took ~1 s, Annoy's
    # approximate ones, openTSNE's default from 1,000 points, ~3.4 s (benchmarks/README.md).
    tsne = TSNE(n_components=2, initialization="pca", random_state=seed, early_exaggeration_iter=250,
                n_iter=max_iter - 250, n_jobs=n_jobs, neighbors="exact")
    # openTSNE imports pynndescent (and numba, ~1 s) to ask whether it is installed, an answer that matters only for
    # sparse data or other metrics.
    with mock.patch("openTSNE.affinity.is_package_installed", return_value=False):
        emb = np.asarray(tsne.fit(np.asarray(features, dtype=np.float32)))
    if not np.isfinite(emb).all():  # openTSNE returns NaN, without an error, for identical points (a collapsed code)
        raise FloatingPointError("t-SNE gave non-finite coordinates: the latent means are (nearly) all the same")
    return emb


# ----------------------------------------------------------------------------- plotting
# Figures are built on matplotlib.figure.Figure, not pyplot: no global state, nothing ever "shown".


def save_figure(fig, path):
    """Write the figure as PNG (atomically: a failed write leaves the previous one) and hand it back, for notebooks."""
    data.atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    return fig


def plot_training_curves(history, path, schedule_name, schedule_values=None):
    """history: one dict per epoch -> recon, KL, train total and test -ELBO, with the schedule on a second axis."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    ep = [h["epoch"] for h in history]
    for key, label in [("total", "train total (-ELBO)"), ("recon", "train recon"), ("test_neg_elbo", "test -ELBO")]:
        ax.plot(ep, [h[key] for h in history], marker=".", label=label)
    ax.set(xlabel="epoch", ylabel="nats per image")
    ax2 = ax.twinx()
    ax2.plot(ep, [h["kl"] for h in history], color="tab:red", marker=".", label="train KL")
    t, v = schedule_values if schedule_values is not None else (ep, [h["beta"] for h in history])
    ax2.plot(t, v, color="gray", ls="--", label=schedule_name)
    ax2.set_ylabel(f"KL (nats) and {schedule_name}")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    ax.set_title("Training curves")
    return save_figure(fig, path)


def plot_latent_distribution(mu, y, path, title, class_names):
    """mu: (N, z) -> histograms of up to 10 dims against N(0, 1), plus a PCA view coloured by class."""
    mu = np.asarray(mu)
    dims = np.argsort(-mu.var(0))[:10]
    fig = Figure(figsize=(15, 5.5))
    grid = fig.add_gridspec(2, 7)
    grid_x = np.linspace(-4, 4, 200)
    for j, d in enumerate(dims):
        ax = fig.add_subplot(grid[j // 5, j % 5])
        ax.hist(mu[:, d], bins=60, range=(-4, 4), density=True, histtype="stepfilled", color="tab:blue", alpha=0.7)
        ax.plot(grid_x, np.exp(-grid_x ** 2 / 2) / np.sqrt(2 * np.pi), color="k", lw=1)
        ax.set_title(f"z{d}  var {mu[:, d].var():.2f}", fontsize=8)
        # the N(0, 1) curve is the density's scale; tick layout was half the figure's drawing time
        ax.set(xticks=[-4, -2, 0, 2, 4], yticks=[])
        ax.tick_params(labelsize=6)
    ax = fig.add_subplot(grid[:, 5:])
    pc = PCA(n_components=2).fit_transform(mu) if mu.shape[1] > 1 else np.c_[mu[:, 0], np.zeros(len(mu))]
    scatter_by_class(ax, pc, y, class_names)
    ax.set_title("first two principal components of μ", fontsize=9)
    fig.suptitle(title + "  (black: N(0, 1))")
    return save_figure(fig, path)


def scatter_by_class(ax, points, labels, names):
    """points: (N, 2) drawn on ax, one colour and legend entry per class."""
    labels = np.asarray(labels)
    for c, name in enumerate(names):
        m = labels == c
        ax.scatter(points[m, 0], points[m, 1], s=2, color=f"C{c}", label=name)
    ax.legend(markerscale=5, fontsize=7, loc="best")


def plot_embedding(points, labels, path, title, names):
    """points: (N, 2) -> scatter coloured by labels (true classes or relabelled clusters)."""
    fig = Figure(figsize=(7, 6.5))
    ax = fig.subplots()
    scatter_by_class(ax, points, labels, names)
    ax.set(title=title, xticks=[], yticks=[])
    return save_figure(fig, path)


def plot_confusion(y_true, y_pred, path, names, method):
    """y_true, y_pred: (N,) -> confusion matrix of true class against `method`'s relabelled clusters, with counts."""
    cm = confusion_matrix(y_true, y_pred, labels=np.arange(len(names)))
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    ax.imshow(cm, cmap="Blues")
    for i, j in np.ndindex(cm.shape):
        ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=7,
                color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xlabel="cluster (Hungarian-relabelled)",
           ylabel="true class", title=f"{method}: ACC {np.mean(y_true == y_pred):.3f}")
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    ax.set_yticklabels(names, fontsize=7)
    return save_figure(fig, path)


def digit_grid(images, nrow):
    """images: (N, 784) in [0, 1] -> (3, H, W) torchvision grid of 28 x 28 digits, nrow a row, 2 white pixels apart."""
    from torchvision.utils import make_grid  # here, not at the top: torchvision adds ~1.4 s to every start-up
    return make_grid(images.reshape(-1, 1, 28, 28).cpu(), nrow=nrow, padding=2, pad_value=1.0)


def image_grid(images, path, nrow):
    """images: (N, 784) in [0, 1] -> saves a digit_grid PNG and returns the (3, H, W) grid."""
    from torchvision.utils import save_image
    grid = digit_grid(images, nrow)
    data.atomic_save(path, lambda tmp: save_image(grid, tmp, format="png"))
    return grid


def reconstruction_pairs(x, x_hat, per_row=10):
    """x, x_hat: (N, 784) -> (2N, 784) ordered so each row of originals sits above its reconstructions."""
    n = x.shape[0] // per_row * per_row
    rows = torch.stack([x[:n].reshape(-1, per_row, 784), x_hat[:n].reshape(-1, per_row, 784)], dim=1)
    return rows.reshape(-1, 784)


def plot_kl_per_dim(kl, active, path):
    """kl, active: (z,) -> bars sorted by KL, inactive dimensions greyed."""
    kl, active = np.asarray(kl), np.asarray(active)
    order = np.argsort(-kl)
    fig = Figure(figsize=(max(5, 0.5 * len(kl)), 3.8))
    ax = fig.subplots()
    ax.bar(range(len(kl)), kl[order], color=["tab:blue" if a else "lightgray" for a in active[order]])
    ax.set_xticks(range(len(kl)), [f"z{d}" for d in order], fontsize=8)
    ax.set(ylabel="test KL (nats)", title=f"KL per latent dimension: {active.sum()} of {len(kl)} active "
                                          f"(Cov_x E[z|x] > 0.01; grey = inactive)")
    return save_figure(fig, path)


def plot_traversals(images, dims, kl, active, values, path, labels=None):
    """images: (len(dims), D, V, 784) -> one block of rows per dimension, labelled with its KL and, where labels
    {dim: text} has one, what it does (e.g. 'z4: slant +1.8 sd')."""
    n_dims, n_digits, n_vals, _ = images.shape
    grid = digit_grid(images.reshape(-1, 784), n_vals)[0]
    fig = Figure(figsize=(n_vals * 0.55 + 1.6, n_dims * n_digits * 0.55))
    ax = fig.subplots()
    ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1)
    row_h = grid.shape[0] / (n_dims * n_digits)
    for r in range(1, n_dims):
        ax.axhline(r * n_digits * row_h, color="tab:red", lw=1.5)
    labels = labels or {}
    ax.set_yticks([(r + 0.5) * n_digits * row_h for r in range(n_dims)],
                  [labels.get(d, f"z{d}") + f"\nKL {kl[d]:.2f}" + ("" if active[d] else " (inactive)") for d in dims],
                  fontsize=7)
    ax.set_xticks([(i + 0.5) * grid.shape[1] / n_vals for i in range(n_vals)], [f"{v:+.1f}" for v in values],
                  fontsize=6)
    ax.set_title("Latent traversals of μ(x), ordered by KL", fontsize=9)
    return save_figure(fig, path)


def plot_factors(mi, factor_names, path):
    """mi: (z, k) mutual information of each latent dimension with each factor -> heat map, each factor's column
    normalised by its largest MI, the top dimension of each factor boxed."""
    mi = np.asarray(mi, dtype=float)
    share = mi / np.where(mi.max(0) > 0, mi.max(0), 1.0)
    fig = Figure(figsize=(1.1 * len(factor_names) + 2, 0.42 * len(mi) + 1.5))
    ax = fig.subplots()
    ax.imshow(share, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for j, i in enumerate(mi.argmax(0)):
        ax.add_patch(matplotlib.patches.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, color="tab:red", lw=2))
    for i, j in np.ndindex(mi.shape):
        ax.text(j, i, f"{mi[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w" if share[i, j] < 0.6 else "k")
    ax.set_xticks(range(len(factor_names)), factor_names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(mi)), [f"z{i}" for i in range(len(mi))], fontsize=8)
    ax.set_title("MI (nats) between latent means and Morpho-MNIST factors;\ncolour: share of each factor's top, "
                 "box: its top dimension", fontsize=9)
    return save_figure(fig, path)


def plot_beta_sweep(rows, path):
    """rows: one dict per beta: beta, seeds and <key>_mean, <key>_std (nan for one seed) over training seeds for recon,
    kl, acc, nmi, active_units, mi, tc, dim_kl, mig, sap and dci_d -> rate-distortion, KL decomposition, ACC/NMI,
    active units, disentanglement."""
    b, col = [r["beta"] for r in rows], lambda key: np.array([r[key] for r in rows], dtype=float)
    fig = Figure(figsize=(25, 4.2))
    ax1, ax4, ax2, ax3, ax5 = fig.subplots(1, 5)
    ax1.errorbar(col("kl_mean"), col("recon_mean"), xerr=col("kl_std"), yerr=col("recon_std"), marker="o", capsize=3)
    for r in rows:
        ax1.annotate(f"β={r['beta']:g}", (r["kl_mean"], r["recon_mean"]), fontsize=8, xytext=(4, 4),
                     textcoords="offset points")
    ax1.set(xlabel="rate: test KL (nats)", ylabel="distortion: test recon (nats)", title="Rate-distortion")
    ax1.margins(x=0.12, y=0.08)  # room for the β labels at the ends of the curve
    for key, label in [("acc", "ACC"), ("nmi", "NMI")]:
        ax2.errorbar(b, col(f"{key}_mean"), yerr=col(f"{key}_std"), marker="o", capsize=3, label=label)
    ax2.set(xlabel="β", ylabel="score", title="KMeans on latent means")
    for key, label in [("mi", "index-code MI"), ("tc", "total correlation"), ("dim_kl", "dimension-wise KL")]:
        ax4.errorbar(b, col(f"{key}_mean"), yerr=col(f"{key}_std"), marker="o", capsize=3, label=label)
    ax4.set(xlabel="β", ylabel="nats", title="Where the KL goes (Chen et al. 2018)")
    ax4.legend()
    ax2.legend()
    ax3.errorbar(b, col("active_units_mean"), yerr=col("active_units_std"), marker="o", capsize=3)
    ax3.set(xlabel="β", ylabel="active units", title="Active units")
    ax3.set_ylim(0, np.nanmax(col("active_units_mean") + np.nan_to_num(col("active_units_std"))) + 1)
    for key, label in [("mig", "MIG"), ("sap", "SAP"), ("dci_d", "DCI disentanglement")]:
        ax5.errorbar(b, col(f"{key}_mean"), yerr=col(f"{key}_std"), marker="o", capsize=3, label=label)
    ax5.set(xlabel="β", ylabel="score", title="Disentanglement of Morpho-MNIST factors")
    ax5.legend()
    seeds = sorted({r["seeds"] for r in rows})
    fig.suptitle(f"mean ± sample std over {'/'.join(map(str, seeds))} training seeds per β (no bar: one seed)",
                 fontsize=10)
    for ax in (ax2, ax3, ax4, ax5):  # symlog: log-spaced betas, and beta = 0 still has a place
        ax.set_xscale("symlog", linthresh=min([x for x in b if x > 0] or [1]))
        ax.set_xticks(b, [f"{x:g}" for x in b])
        ax.set_xlim(min(b) * 0.8 if min(b) > 0 else -0.1, max(b) * 1.25)
    return save_figure(fig, path)
