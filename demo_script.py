"""Train a Beta-VAE on MNIST and analyse its latent space: python demo_script.py --help"""
import argparse
import concurrent.futures as cf
import copy
import errno
import importlib
import json
import math
import multiprocessing
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext, redirect_stdout
from pathlib import Path

import torch

import data
import utils
from model import BetaVAE, VAEConfig

# Flags that define the trained model: a checkpoint resumed with any of them changed would not be the same run.
RUN_FIELDS = ("dataset", "latent_dim", "hidden", "loss", "epochs", "batch_size", "limit", "beta_max", "schedule",
              "warmup_epochs", "cycles", "cycle_ratio", "gamma", "capacity_max", "free_bits", "lr", "lr_schedule",
              "seed", "binarize")
# What --analyze-only takes from the command line; everything else comes from the checkpoint it analyses.
ANALYSIS_FIELDS = ("tsne_points", "iw_samples", "kmeans_seeds", "umap_seeds", "test_limit", "device", "data_dir",
                   "out_dir", "no_progress",
                   "analyze_only", "resume", "beta_sweep", "train_seeds", "workers", "scheduler", "threads")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line, without the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    """-> the command line, pytorch/examples style: every help text states its default."""
    p = OneLineParser(prog="demo_script.py", description="Beta-VAE on MNIST with latent-space analysis")
    a = p.add_argument
    a("--epochs", type=int, default=30, help="number of epochs to train (default: 30)")
    a("--batch-size", type=int, default=128, help="input batch size for training (default: 128)")
    a("--latent-dim", type=int, default=10, help="size of the latent code z (default: 10)")
    a("--hidden", type=int, nargs="+", default=[512, 256], help="hidden layer sizes (default: 512 256)")
    a("--loss", choices=["bce", "mse"], default="bce", help="reconstruction loss (default: bce)")
    a("--schedule", choices=["linear", "constant", "cyclical", "capacity"], default="linear",
      help="beta schedule (default: linear)")
    a("--beta-max", type=float, default=1.0, help="final beta (default: 1.0)")
    a("--warmup-epochs", type=int, default=10, help="linear: beta reaches beta-max at the start of this epoch; "
                                                    "0 means no warm-up (default: 10)")
    a("--cycles", type=int, default=4, help="cyclical: number of cycles M (default: 4)")
    a("--cycle-ratio", type=float, default=0.5, help="cyclical: fraction R of a cycle spent rising (default: 0.5)")
    a("--gamma", type=float, default=1000.0, help="capacity: weight gamma on |KL - C| (default: 1000.0)")
    a("--capacity-max", type=float, default=25.0, help="capacity: final target KL C_max in nats (default: 25.0)")
    a("--free-bits", type=float, default=0.5, help="free-bits floor per latent dimension, nats (default: 0.5)")
    a("--lr", type=float, default=2e-3, help="peak learning rate (default: 2e-3)")
    a("--lr-schedule", choices=["constant", "cosine"], default="cosine",
      help="learning-rate schedule over the run (default: cosine)")
    a("--seed", type=int, default=20, help="random seed (default: 20)")
    a("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    a("--dataset", choices=list(data.DATASETS), default="mnist", help="data set (default: mnist)")
    a("--data-dir", default="./data", help="where the IDX files live or are provisioned (default: ./data)")
    a("--out-dir", default=".", help="where loss.txt, samples/, metrics.json and checkpoint.pt go (default: .)")
    a("--limit", type=int, default=None, help="train on the first N images only (default: all)")
    a("--binarize", action="store_true", help="dynamically binarized MNIST (Burda et al. 2016): each training batch "
                                              "re-sampled as Bernoulli(x), one fixed binary test set (default: off)")
    a("--test-limit", type=int, default=None, help="evaluate and analyse the first N test images only (default: all)")
    a("--tsne-points", type=int, default=10000, help="t-SNE on the first N test images (default: 10000)")
    a("--iw-samples", type=int, default=100, help="importance samples K for log p(x) (default: 100)")
    a("--kmeans-seeds", type=int, default=5, help="clustering runs per method, at least 2 (default: 5)")
    a("--umap-seeds", type=int, default=2, help="UMAP + Gaussian mixture runs, ~15 s each (a machine's first UMAP "
                                                "also compiles numba code once); 0 skips UMAP (default: 2)")
    a("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt (default: off)")
    a("--analyze-only", metavar="PATH", default=None,
      help="load a checkpoint and only run the analysis; model and data set come from it (default: off)")
    a("--beta-sweep", type=float, nargs="+", default=None, metavar="BETA",
      help="one model per beta (and training seed) in OUT_DIR/grid/beta_<b>/seed_<s>/, compared in "
           "beta_sweep.txt (default: off)")
    a("--train-seeds", type=int, nargs="+", default=None, metavar="SEED",
      help="one model per training seed (for every beta), averaged in the grid's table; alone, one configuration "
           "over seeds, summarised in seeds_summary.txt (default: --seed only)")
    a("--workers", type=int, default=None, metavar="N",
      help="run the grid's models in N local processes (default: one after another in this process)")
    a("--scheduler", default=None, metavar="ADDRESS",
      help="run the grid's models on a running Dask scheduler, e.g. tcp://127.0.0.1:8786 (default: off)")
    a("--threads", type=int, default=None, metavar="N",
      help="threads per model for torch, BLAS/OpenMP, numba and t-SNE (default: all cores when sequential, "
           "cores // N with --workers N, 1 per model with --scheduler)")
    a("--no-progress", action="store_true", help="hide the tqdm bars (default: shown)")
    return p


def folder_write_error(path):
    """-> why no file can be written into folder `path`, or None; learnt by writing there, then undoing what it made."""
    path = Path(path).absolute()
    made = [p for p in (path, *path.parents) if not os.path.lexists(p)]  # deepest first: the order to undo them
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:  # os.access would not do: root passes it for /proc or a read-only mount
        return os.strerror(errno.ENOTDIR) if isinstance(e, FileExistsError) else e.strerror or str(e)
    finally:
        for p in made:
            if os.path.lexists(p):  # else the probe failed before it got this far down
                try:
                    p.rmdir()
                except OSError:
                    break  # not empty, so in use by someone else: leave it and everything above it
    return None


def invalid_flag(args):
    """-> a message naming the first flag outside its valid range, or None. Leaves no file behind."""
    n_train, n_test = data.DATASETS[args.dataset]["n_train"], 10000
    floats = ["beta_max", "free_bits", "lr", "cycle_ratio", "gamma", "capacity_max"]
    checks = [(math.isfinite(getattr(args, f)), f"--{f.replace('_', '-')} must be a finite number") for f in floats]
    checks += [
        (args.epochs >= 1, "--epochs must be >= 1"), (args.batch_size >= 1, "--batch-size must be >= 1"),
        (args.latent_dim >= 1, "--latent-dim must be >= 1"), (min(args.hidden) >= 1, "--hidden sizes must be >= 1"),
        (args.beta_max >= 0, "--beta-max must be >= 0"), (args.free_bits >= 0, "--free-bits must be >= 0"),
        (args.lr > 0, "--lr must be > 0"), (args.warmup_epochs >= 0, "--warmup-epochs must be >= 0"),
        (args.cycles >= 1, "--cycles must be >= 1"), (0 < args.cycle_ratio <= 1, "--cycle-ratio must be in (0, 1]"),
        (args.gamma >= 0, "--gamma must be >= 0"), (args.capacity_max >= 0, "--capacity-max must be >= 0"),
        (args.limit is None or args.batch_size <= args.limit <= n_train,
         f"--limit must be between --batch-size ({args.batch_size}) and {n_train}"),
        (args.test_limit is None or 100 <= args.test_limit <= n_test, f"--test-limit must be between 100 and {n_test}"),
        (100 <= args.tsne_points <= (args.test_limit or n_test),
         f"--tsne-points must be between 100 and --test-limit ({args.test_limit or n_test})"),
        (1 <= args.iw_samples <= 10000, "--iw-samples must be between 1 and 10000"),
        (args.kmeans_seeds >= 2, "--kmeans-seeds must be >= 2: the spread needs two runs"),
        (args.umap_seeds == 0 or args.umap_seeds >= 2, "--umap-seeds must be 0 (no UMAP) or >= 2"),
        (0 <= args.seed < 2 ** 32, "--seed must be in [0, 2^32)"),
        (args.beta_sweep is None or all(0 <= b < math.inf for b in args.beta_sweep), "--beta-sweep values must be >= 0"),
        (args.beta_sweep is None or len({f"{b:g}" for b in args.beta_sweep}) == len(args.beta_sweep),
         "--beta-sweep values must be distinct"),
        (args.train_seeds is None or all(0 <= s < 2 ** 32 for s in args.train_seeds),
         "--train-seeds must be in [0, 2^32)"),
        (args.train_seeds is None or len(set(args.train_seeds)) == len(args.train_seeds),
         "--train-seeds must be distinct"),
        (not ((args.beta_sweep or args.train_seeds) and (args.resume or args.analyze_only)),
         "--beta-sweep and --train-seeds resume by themselves and cannot be combined with --resume or --analyze-only"),
        (args.workers is None or args.workers >= 1, "--workers must be >= 1"),
        (args.threads is None or args.threads >= 1, "--threads must be >= 1"),
        (not (args.workers and args.scheduler), "--workers and --scheduler cannot be combined"),
        (not ((args.workers or args.scheduler) and not (args.beta_sweep or args.train_seeds)),
         "--workers and --scheduler run a grid: give --beta-sweep or --train-seeds"),
        (not (args.resume and args.analyze_only), "--resume and --analyze-only cannot be combined"),
    ]
    for ok, msg in checks:
        if not ok:
            return msg
    try:
        utils.resolve_device(args.device)
    except ValueError as e:
        return f"--device: {e}"
    if args.analyze_only and not Path(args.analyze_only).is_file():
        return f"--analyze-only: no checkpoint file at {args.analyze_only}"
    problem = folder_write_error(args.out_dir)
    if problem:
        return f"--out-dir {args.out_dir} cannot be written to ({problem})"
    return None


def parse_args(argv=None):
    """-> validated argparse.Namespace; a bad value exits 2 with one line before anything is read or written."""
    parser = build_parser()
    args = parser.parse_args(argv)
    msg = invalid_flag(args)
    if msg:
        parser.error(msg)
    return args


def model_config(cfg):
    """Run config dict -> the VAEConfig of its network."""
    return VAEConfig(hidden=tuple(cfg["hidden"]), latent_dim=cfg["latent_dim"])


@contextmanager
def timed(timings, phase):
    """Record the wall seconds of the with-block in timings[phase]."""
    t0 = time.time()
    yield
    timings[phase] = round(time.time() - t0, 2)


def schedule_curve(args):
    """-> (epochs as floats, values) of the schedule actually used, sampled 20 times per epoch."""
    ts = [i / 20 for i in range(20 * args.epochs + 1)]
    if args.schedule == "capacity":
        return [1 + t for t in ts], [utils.get_capacity(t, args) for t in ts]
    return [1 + t for t in ts], [utils.get_beta(t, args) for t in ts]


def train(args, model, opt, train_x, test_x, out, history, start_epoch):
    """The epoch loop: after each epoch, loss.txt and checkpoint.pt are rewritten atomically."""
    for epoch in range(start_epoch, args.epochs + 1):
        t0 = time.time()
        stats = utils.train_epoch(model, opt, train_x, args, epoch, show_progress=not args.no_progress)
        test = utils.evaluate(model, test_x, args.loss)
        if not math.isfinite(test["neg_elbo"]):
            raise utils.NonFiniteLoss(f"non-finite test loss after the last step of epoch {epoch}")
        history.append(dict(epoch=epoch, beta=utils.get_beta(epoch - 1, args), **stats,
                            test_neg_elbo=test["neg_elbo"], seconds=time.time() - t0))
        with utils.sigint_deferred():  # loss.txt and checkpoint.pt always describe the same epoch
            utils.write_text(out / "loss.txt", utils.loss_table(history))
            utils.save_checkpoint(out / "checkpoint.pt", utils.checkpoint_state(model, opt, epoch, vars(args), history))
        h = history[-1]
        print(f"epoch {epoch:3d}  beta {h['beta']:.3f}  total {h['total']:.2f}  recon {h['recon']:.2f}  "
              f"kl {h['kl']:.2f}  grad {h['grad_norm']:.1f}  test -ELBO {h['test_neg_elbo']:.2f}  "
              f"{h['seconds']:.1f}s", flush=True)
    return history


def likelihood_metrics(model, test_x, args):
    """-> test -ELBO (10 z per image) and, for BCE, the IW bound, each with its Monte Carlo and test-set std errors."""
    draws = 10  # z per image: with one, the reference model's test -ELBO has a Monte Carlo std error of ~0.04 nats
    test = utils.evaluate(model, test_x, args.loss, draws=draws)
    m = dict(test_neg_elbo=test["neg_elbo"], test_neg_elbo_mc_se=test["mc_se"], test_neg_elbo_test_se=test["test_se"],
             test_eval_draws=draws, test_recon=test["recon"], test_kl=test["kl"], iw_samples=args.iw_samples,
             test_iw_log_likelihood=None)
    if args.loss == "bce":  # an MSE decoder has no normalised likelihood, so an IW "log p(x)" would mean nothing
        log_px, mc_var = utils.iw_log_likelihood(model, test_x, args.iw_samples, args.loss,
                                                 show_progress=not args.no_progress)
        mc_se, test_se = utils.standard_errors(log_px, mc_var)
        m.update(test_iw_log_likelihood=float(log_px.mean()), test_iw_mc_se=mc_se, test_iw_test_se=test_se)
    return m


def clustering_metrics(mu, emb, y, args, timings):
    """mu: (N, z) test latent means, emb: (n, 2) their t-SNE map -> scores over seeds per method; labels only score."""
    seeds, n = range(args.seed, args.seed + args.kmeans_seeds), emb.shape[0]
    with timed(timings, "clustering"):
        out = {name: utils.clustering_scores(f, labels, method, seeds) for name, f, labels, method in [
            ("kmeans_latent", mu, y, "kmeans"), ("gmm_latent", mu, y, "gmm"), ("kmeans_tsne", emb, y[:n], "kmeans"),
            ("gmm_tsne", emb, y[:n], "gmm")]}
    if args.umap_seeds:
        with timed(timings, "umap"):
            out["umap_gmm"] = utils.clustering_scores(mu, y, "umap_gmm", range(args.seed, args.seed + args.umap_seeds))
    return out


def analyze(model, split, args, samples, classes):
    """Every test-set metric and figure after training; split = (train_x, train_y, test_x, test_y) -> (metrics, timings)."""
    (train_x, train_y, test_x, test_y), timings = split, {}
    y = test_y.numpy()
    with timed(timings, "evaluate"):
        metrics = likelihood_metrics(model, test_x, args)
    mu, logvar = utils.encode_means(model, test_x)
    kl, active = utils.kl_per_dim(mu, logvar).mean(0), utils.active_units(mu)
    with timed(timings, "kl_decomposition"):
        decomposition = utils.kl_decomposition(mu.to(test_x.device), logvar.to(test_x.device), seed=args.seed)
    with timed(timings, "probes"):  # labels used by design: what a linear read-out of the code can do
        probe_x = data.binarized(train_x.cpu(), data.BINARIZE_SEED) if args.binarize else train_x
        probes = utils.probe_accuracies(utils.encode_means(model, probe_x.to(test_x.device))[0].numpy(),
                                        train_y.numpy(), mu.numpy(), y, seed=args.seed)
    with timed(timings, "tsne"):
        emb = utils.tsne_embedding(mu[:args.tsne_points].numpy(), args.seed, n_jobs=args.threads or -1)
    clustering = clustering_metrics(mu.numpy(), emb, y, args, timings)
    pred = utils.hungarian_relabel(y, utils.cluster_labels(mu.numpy(), "kmeans", args.seed))
    with timed(timings, "figures"):
        analysis_figures(model, test_x, y, mu, kl, active, emb, pred, args, samples, classes)
    decomposition["mi_near_bound"] = decomposition["mi"] > decomposition["mi_bound"] - 0.3
    metrics.update(active_units=int(active.sum()), active_dims=active.nonzero().flatten().tolist(),
                   kl_per_dim=kl.tolist(), kl_decomposition=decomposition, probes=probes, clustering=clustering,
                   kmeans_single_seed_acc=float((pred == y).mean()),
                   test_set=dict(images=len(y), binarized=args.binarize, md5=data.tensor_md5(test_x)))
    return metrics, timings


def analysis_figures(model, test_x, y, mu, kl, active, emb, pred, args, samples, classes):
    """Every figure after training into samples/; mu: (N, z) test latent means, emb: (n, 2) their t-SNE map."""
    n = emb.shape[0]
    utils.plot_latent_distribution(mu, y, samples / "latent_dist_after_train.png", "Test latent means after training",
                                   classes)
    utils.plot_embedding(emb, y[:n], samples / "tsne.png", f"t-SNE of {n} test latent means, coloured by class",
                         classes)
    utils.plot_embedding(emb, pred[:n], samples / "kmean.png", "KMeans (k=10) on latent means, Hungarian-relabelled "
                         "clusters, drawn on the t-SNE map", [f"cluster→{c}" for c in classes])
    utils.plot_confusion(y, pred, samples / "confusion.png", classes)
    gen = torch.Generator(device=test_x.device).manual_seed(args.seed)
    utils.image_grid(model.sample(100, generator=gen), samples / "generated_num.png", nrow=10)
    x_hat = utils.reconstruct(model, test_x[:50])
    utils.image_grid(utils.reconstruction_pairs(test_x[:50], x_hat), samples / "reconstructions.png", nrow=10)
    utils.plot_kl_per_dim(kl, active, samples / "kl_per_dim.png")
    dims, values = kl.argsort(descending=True).tolist(), torch.linspace(-3, 3, 9, device="cpu").tolist()
    anchors = mu[utils.class_examples(y, (0, 3, 7))].to(test_x.device)
    utils.plot_traversals(utils.traversal_images(model, anchors, dims, values), dims, kl, active, values,
                          samples / "traversals.png")
    a, b = utils.class_examples(y, range(10)), utils.class_examples(y, [(c + 1) % 10 for c in range(10)], nth=1)
    pairs = utils.interpolation_images(model, mu[a].to(test_x.device), mu[b].to(test_x.device), 10)
    utils.image_grid(pairs.reshape(-1, 784), samples / "interpolations.png", nrow=10)


def print_summary(metrics, timings, title):
    """The headline numbers of metrics.json, as a short report on stdout."""
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
    print(f"KL = MI + TC + dim-wise KL  {d['kl_closed_form']:.2f} = {d['mi']:.2f} + {d['tc']:.2f} + {d['dim_kl']:.2f} "
          f"(sum {d['sum']:.2f} ± {d['sum_mc_se']:.2f}; MI cannot exceed log N = {d['mi_bound']:.2f}"
          + (", and is within 0.3 of it: the true MI may be larger)" if d["mi_near_bound"] else ")"))
    print("probes (use labels)        " + ", ".join(f"{k} {v['mean']:.3f}" + (f" ± {v['std']:.3f}" if v["std"] else "")
                                                   for k, v in m["probes"].items()))
    print(f"{'clustering (no labels)':26s} {'ACC':>13s} {'NMI':>13s} {'ARI':>13s}")
    for name, s in c.items():
        print(f"{name:26s} " + " ".join(f"{s[k + '_mean']:.3f} ± {s[k + '_std']:.3f}" for k in ("acc", "nmi", "ari")))
    print("time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))


def load_for_analysis(path, device):
    """Checkpoint -> (model, checkpoint dict); CheckpointError when its weights do not fit its config."""
    state = utils.load_checkpoint(path)
    try:
        model = BetaVAE(model_config(state["config"])).to(device)
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as e:
        raise utils.CheckpointError(f"{path}: weights do not fit the saved config ({str(e).splitlines()[0]})") from None
    return model, state


def with_defaults(config):
    """A saved config dict, with today's default for every flag that was added after it was saved."""
    return {**vars(build_parser().parse_args([])), **config}


def analysis_config(state, args):
    """A checkpoint's config with the analysis options of this command line -> argparse.Namespace."""
    return argparse.Namespace(**{**with_defaults(state["config"]), **{k: vars(args)[k] for k in ANALYSIS_FIELDS}})


def checked_state(args):
    """The checkpoint this run continues or analyses, verified before any file is touched (None for a new run)."""
    if args.analyze_only:
        return load_for_analysis(args.analyze_only, "cpu")[1]
    if not args.resume:
        return None
    path = Path(args.out_dir) / "checkpoint.pt"
    state = utils.load_checkpoint(path)
    if not {"optimizer", "history", "torch_rng", "numpy_rng", "python_rng"} <= set(state):
        raise utils.CheckpointError(f"{path} holds no training state to resume from")
    mismatch = utils.config_mismatch(with_defaults(state["config"]), vars(args), RUN_FIELDS)
    if mismatch:
        raise utils.CheckpointError(mismatch)
    return state


def resume_from(state, model, opt):
    """Load weights, optimiser and RNG states -> (history, first epoch to train)."""
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        utils.restore_rng(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise utils.CheckpointError(f"checkpoint cannot be resumed: {str(e).splitlines()[0]}") from None
    return state["history"], state["epoch"] + 1


def experiment_data(cfg):
    """-> train_x, train_y (the first --limit), test_x, test_y (the first --test-limit) on the CPU, binarized if asked."""
    train_x, train_y, test_x, test_y = data.load_dataset(cfg.data_dir, cfg.dataset)
    if cfg.binarize:  # one fixed draw whatever --seed is, so every run and every model scores the same binary images
        test_x = data.binarized(test_x, data.BINARIZE_SEED)
    return train_x[:cfg.limit], train_y[:cfg.limit], test_x[:cfg.test_limit], test_y[:cfg.test_limit]


def run(args):
    """One full run: data, training (or resume / analyze-only), analysis, files -> metrics dict."""
    state, timings, t_start = checked_state(args), {}, time.time()
    utils.return_large_frees_to_the_os()
    cfg = analysis_config(state, args) if args.analyze_only else args
    config, out, device = vars(cfg), Path(args.out_dir), utils.resolve_device(args.device)
    samples = out / "samples"
    with timed(timings, "data"):
        train_x, train_y, test_x, test_y = experiment_data(cfg)
        train_x, test_x = train_x.to(device), test_x.to(device)
    classes = data.DATASETS[cfg.dataset]["classes"]
    samples.mkdir(parents=True, exist_ok=True)
    utils.set_seed(cfg.seed)
    model = BetaVAE(model_config(config)).to(device)
    if args.analyze_only:
        model.load_state_dict(state["model"])
        history = state["history"]
    else:
        opt = utils.make_optimizer(model, cfg.lr)
        history, start = resume_from(state, model, opt) if state else ([], 1)
        if state:
            print(f"resuming after epoch {start - 1} from {out / 'checkpoint.pt'}")
        else:
            mu, _ = utils.encode_means(model, test_x)
            utils.plot_latent_distribution(mu, test_y.numpy(), samples / "latent_dist_before_train.png",
                                           "Test latent means before training", classes)
        with timed(timings, "train"):
            train(cfg, model, opt, train_x, test_x, out, history, start)
    utils.plot_training_curves(history, samples / "train_loss.png",
                               "capacity C" if cfg.schedule == "capacity" else "β", schedule_curve(cfg))
    metrics, analysis_timings = analyze(model, (train_x, train_y, test_x, test_y), cfg, samples, classes)
    timings.update(analysis_timings, total=round(time.time() - t_start, 2))
    final = history[-1] if history else {}
    metrics.update(final_train={k: final.get(k) for k in ("total", "recon", "kl", "grad_norm")},
                   final_test_neg_elbo_during_training=final.get("test_neg_elbo"), config=config, timings=timings)
    utils.write_json(out / "metrics.json", metrics)
    print_summary(metrics, timings, f"{cfg.dataset}, beta_max={cfg.beta_max:g}, {len(history)} epochs")
    return metrics


# ----------------------------------------------------------------------------- the β × training-seed grid
# Each member is an ordinary run in OUT_DIR/grid/beta_<b>/seed_<s>/, with its own loss.txt, metrics.json,
# checkpoint.pt and samples/. A concurrent.futures executor runs them: in this process one after another
# (InlineExecutor), in a pool of spawned processes (--workers), or on a Dask cluster (--scheduler).

# What the grid averages over training seeds: dotted paths into a member's metrics.json (add a key here and it is
# aggregated into grid.json and seeds_summary.txt); headline_numbers adds every clustering method's ACC, NMI, ARI.
HEADLINE = ("test_recon", "test_kl", "test_neg_elbo", "test_iw_log_likelihood", "active_units", "kl_decomposition.mi",
            "kl_decomposition.tc", "kl_decomposition.dim_kl", "probes.logistic_100.mean", "probes.logistic_1000.mean",
            "probes.logistic_all.mean", "probes.knn_all.mean")
# beta_sweep.txt's columns before each clustering method's ACC and NMI: (headline key, header, format).
SWEEP_COLUMNS = (("test_recon", "Test Recon", ".2f"), ("test_kl", "Test KL", ".2f"),
                 ("test_neg_elbo", "Test -ELBO", ".2f"), ("test_iw_log_likelihood", "IW log p(x)", ".2f"),
                 ("active_units", "Active Units", ".1f"), ("kl_decomposition.mi", "MI", ".2f"),
                 ("kl_decomposition.tc", "TC", ".2f"), ("kl_decomposition.dim_kl", "Dim-wise KL", ".2f"),
                 ("probes.logistic_100.mean", "Probe 100 labels", ".3f"),
                 ("probes.logistic_1000.mean", "Probe 1000 labels", ".3f"),
                 ("probes.logistic_all.mean", "Probe all labels", ".3f"), ("probes.knn_all.mean", "kNN", ".3f"))
# samples/beta_sweep.png's numbers: utils.plot_beta_sweep's name -> headline key.
PLOT_KEYS = {"recon": "test_recon", "kl": "test_kl", "acc": "kmeans_latent_acc", "nmi": "kmeans_latent_nmi",
             "active_units": "active_units", "mi": "kl_decomposition.mi", "tc": "kl_decomposition.tc",
             "dim_kl": "kl_decomposition.dim_kl"}
POOL_ATTEMPTS = 3  # a member whose pool process died is resumed in a fresh pool, this many times in all


class GridError(RuntimeError):
    """The grid could not reach its Dask scheduler, or some member failed for good."""


class InlineExecutor(cf.Executor):
    """The concurrent.futures interface, each call run at submit in this process: the sequential grid."""

    def submit(self, fn, /, *args, **kwargs):
        future = cf.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as e:  # reported like a pool's failure; Ctrl-C is no Exception and stops the grid
            future.set_exception(e)
        return future


def thread_count(args):
    """-> threads per run: --threads, else cores // --workers, 1 on Dask, or None: each library's default, all cores."""
    if args.threads:
        return args.threads
    if args.workers:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, cores // args.workers)
    return 1 if args.scheduler else None


def member_name(sub):
    """A member's Namespace -> 'beta=<b> seed=<s>', how the grid names it on the terminal."""
    return f"beta={sub.beta_max:g} seed={sub.seed}"


def grid_members(args):
    """-> one Namespace per (β, training seed): an ordinary run into OUT_DIR/grid/beta_<b>/seed_<s>/."""
    out, parallel, members = Path(args.out_dir).absolute(), bool(args.workers or args.scheduler), []
    for beta in args.beta_sweep or [args.beta_max]:
        for seed in args.train_seeds or [args.seed]:
            sub = copy.copy(args)
            sub.beta_max, sub.seed, sub.beta_sweep, sub.train_seeds = beta, seed, None, None
            sub.out_dir = str(out / "grid" / f"beta_{beta:g}" / f"seed_{seed}")
            sub.data_dir = str(Path(args.data_dir).absolute())  # a Dask worker may run in another folder
            sub.no_progress = args.no_progress or parallel  # several processes' bars would garble one terminal
            members.append(sub)
    return members


def finished_metrics(sub):
    """A member's metrics.json if it finished with this config, else None; CheckpointError if another run's."""
    path = Path(sub.out_dir) / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    mismatch = utils.config_mismatch(with_defaults(metrics["config"]), vars(sub), RUN_FIELDS)
    if mismatch:
        raise utils.CheckpointError(f"{path}: {mismatch}; use another --out-dir")
    return metrics


@contextmanager
def sigint_raises():
    """Ctrl-C raises KeyboardInterrupt in the block, also in a pool process that ignores it between members."""
    if threading.current_thread() is not threading.main_thread():
        yield  # a Dask task's thread: only the main thread can set a handler, and Dask owns it
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def grid_member(sub, log_to_file=False):
    """One member, in whatever process the executor chose -> its metrics; a finished one read back, a started one
    resumed from its checkpoint.pt. log_to_file: its stdout goes to its stdout.txt, not the shared terminal."""
    utils.limit_threads(sub.threads)
    metrics = finished_metrics(sub)  # here too: Dask re-runs a member whose worker died after it had finished
    if metrics:
        return metrics
    out = Path(sub.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sub = copy.copy(sub)
    sub.resume = (out / "checkpoint.pt").is_file()
    log = open(out / "stdout.txt", "a") if log_to_file else nullcontext(sys.stdout)
    with sigint_raises(), log as stream, redirect_stdout(stream):
        return run(sub)


def ship_modules(client):
    """Copy this project's modules to the Dask scheduler, which unpickles the tasks, and to every worker, now or later."""
    from distributed.diagnostics.plugin import SchedulerUploadFile, UploadFile
    for name in ("model.py", "utils.py", "data.py", "demo_script.py"):  # import order: each imports only earlier ones
        path = str(Path(__file__).with_name(name))
        client.register_plugin(SchedulerUploadFile(path, load=False), name=f"beta-vae-scheduler-{name}")
        client.register_plugin(UploadFile(path), name=f"beta-vae-{name}")  # a plugin: restarted workers get it too


@contextmanager
def dask_executor(address):
    """-> the executor of a running Dask scheduler; this project's modules are shipped to its workers."""
    from distributed import Client  # imported only here: --scheduler is the one user of Dask
    try:
        client = Client(address, timeout="10s")
    except (OSError, TimeoutError) as e:
        raise GridError(f"--scheduler {address}: {e}") from None
    with client:
        try:
            ship_modules(client)
        except Exception as e:  # e.g. a worker without torch: one line, not a traceback
            raise GridError(f"--scheduler {address}: {type(e).__name__}: {e}") from None
        executor = client.get_executor(pure=False)
        try:
            yield executor
        except BaseException:
            executor.shutdown(wait=False)  # cancels every member not finished; a running task ends on its own
            raise


@contextmanager
def pool_executor(workers):
    """-> a pool of `workers` spawned processes, which ignore Ctrl-C except while a member runs (sigint_raises)."""
    # spawn, not fork: a forked child would inherit torch's and OpenMP's thread pools in an undefined state
    pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        for child in multiprocessing.active_children():  # the pool's processes: each stops its member cleanly
            os.kill(child.pid, signal.SIGINT)
        raise
    finally:
        pool.shutdown(wait=True)


def grid_executor(args):
    """-> a context manager giving this command line's executor: in-process, a process pool, or Dask's."""
    if args.scheduler:
        return dask_executor(args.scheduler)
    return pool_executor(args.workers) if args.workers else nullcontext(InlineExecutor())


def run_members(members, args):
    """Every member through the executor -> ({name: metrics}, {name: one-line error}); a broken pool is replaced."""
    member = importlib.import_module("demo_script").grid_member  # by module name: what a worker process can import
    results, errors, todo = {}, {}, list(members)
    for _ in range(POOL_ATTEMPTS):
        with grid_executor(args) as executor:
            futures = {executor.submit(member, m, bool(args.workers)): m for m in todo}
            todo = []
            for future in cf.as_completed(futures):
                name = member_name(futures[future])
                try:
                    results[name] = future.result()
                    print(f"{name}: done ({len(results)} of {len(members)})", flush=True)
                except cf.BrokenExecutor:  # its process died (killed, out of memory): resume it in a fresh pool
                    todo.append(futures[future])
                except Exception as e:
                    errors[name] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
                    print(f"{name}: failed: {errors[name]}", file=sys.stderr, flush=True)
        if not todo:
            break
    errors.update({member_name(m): f"its worker process died {POOL_ATTEMPTS} times" for m in todo})
    return results, errors


def headline_numbers(metrics):
    """A member's metrics.json -> {name: float}: HEADLINE's keys, then every clustering method's ACC, NMI and ARI
    (means over clustering seeds) as <method>_acc etc.; keys this member lacks, or holds as null, are left out."""
    numbers = {}
    for path in HEADLINE:
        value = metrics
        for key in path.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            numbers[path] = float(value)
    for method, s in metrics.get("clustering", {}).items():
        numbers.update({f"{method}_{k}": float(s[f"{k}_mean"]) for k in ("acc", "nmi", "ari") if f"{k}_mean" in s})
    return numbers


def seed_stats(values):
    """Values over training seeds -> dict mean, sample std (ddof=1; None for one seed), n and the values."""
    return dict(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else None,
                n=len(values), values=values)


def beta_summaries(members, results, errors):
    """-> one dict per β: its seeds, the failed ones with their errors, and seed_stats of every headline number."""
    summaries = []
    for beta in dict.fromkeys(m.beta_max for m in members):
        group = [m for m in members if m.beta_max == beta]
        numbers = [headline_numbers(results[member_name(m)]) for m in group if member_name(m) in results]
        failed = [dict(seed=m.seed, error=errors[member_name(m)]) for m in group if member_name(m) in errors]
        stats = {k: seed_stats([n[k] for n in numbers if k in n]) for k in dict.fromkeys(k for n in numbers for k in n)}
        summaries.append(dict(beta=beta, seeds=[m.seed for m in group], failed=failed, numbers=stats))
    return summaries


def stats_cell(stats, fmt):
    """seed_stats -> 'mean ± std', the mean alone for one seed, '—' when no seed has the number."""
    if stats is None:
        return "—"
    return f"{stats['mean']:{fmt}}" + ("" if stats["std"] is None else f" ± {stats['std']:{fmt}}")


def failure_lines(summaries):
    """-> one 'failed: beta=<b> seed=<s>: <error>' line per failed member."""
    return [f"failed: beta={s['beta']:g} seed={f['seed']}: {f['error']}" for s in summaries for f in s["failed"]]


def sweep_table(summaries):
    """Per-β summaries -> beta_sweep.txt: one row per β, mean ± sample std over its finished training seeds."""
    methods = dict.fromkeys(k[:-4] for s in summaries for k in s["numbers"] if k.endswith("_acc"))
    cols = SWEEP_COLUMNS + tuple((f"{m}_{k}", f"{m} {k.upper()}", ".3f") for m in methods for k in ("acc", "nmi"))
    lines = ["| β | Seeds | " + " | ".join(h for _, h, _ in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for s in summaries:
        done = len(s["seeds"]) - len(s["failed"])
        cells = [f"{s['beta']:g}", f"{done} of {len(s['seeds'])}" if s["failed"] else f"{done}"]
        lines.append("| " + " | ".join(cells + [stats_cell(s["numbers"].get(k), f) for k, _, f in cols]) + " |")
    failed = failure_lines(summaries)
    return "\n".join(lines + ([""] + failed if failed else [])) + "\n"


def seeds_table(summaries):
    """One configuration's summary -> seeds_summary.txt: every headline number, mean ± sample std over seeds."""
    s, formats = summaries[0], {k: f for k, _, f in SWEEP_COLUMNS}
    lines = [f"beta_max={s['beta']:g}, training seeds {' '.join(map(str, s['seeds']))}: mean ± sample std (ddof=1)",
             "", "| Number | Mean ± std | Seeds |", "|---|---|---|"]
    lines += [f"| {k} | {stats_cell(st, formats.get(k, '.4f'))} | {st['n']} |" for k, st in s["numbers"].items()]
    failed = failure_lines(summaries)
    return "\n".join(lines + ([""] + failed if failed else [])) + "\n"


def sweep_plot_rows(summaries):
    """-> utils.plot_beta_sweep's rows: PLOT_KEYS' mean and std (nan for one seed); a β lacking one is left out."""
    rows = []
    for s in summaries:
        if all(k in s["numbers"] for k in PLOT_KEYS.values()):
            row = dict(beta=s["beta"], seeds=s["numbers"]["test_recon"]["n"])
            for name, key in PLOT_KEYS.items():
                st = s["numbers"][key]
                row.update({f"{name}_mean": st["mean"], f"{name}_std": math.nan if st["std"] is None else st["std"]})
            rows.append(row)
    return rows


def write_grid_outputs(args, summaries):
    """grid.json always; beta_sweep.txt and samples/beta_sweep.png for a β sweep, else seeds_summary.txt."""
    out = Path(args.out_dir)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    utils.write_json(out / "grid.json", dict(layout="grid/beta_<b>/seed_<s>", betas=summaries))
    name, table = ("beta_sweep.txt", sweep_table) if args.beta_sweep else ("seeds_summary.txt", seeds_table)
    utils.write_text(out / name, table(summaries))
    rows = sweep_plot_rows(summaries)
    if args.beta_sweep and rows:
        utils.plot_beta_sweep(rows, out / "samples" / "beta_sweep.png")
    print("\n" + table(summaries), end="")


def grid(args):
    """The β × training-seed grid: every unfinished member through the executor, then its tables -> summaries."""
    members, results, todo = grid_members(args), {}, []
    for m in members:  # all checked first: a folder holding another configuration stops the grid before it starts
        metrics = finished_metrics(m)
        if metrics:
            print(f"{member_name(m)}: finished earlier, reading {Path(m.out_dir) / 'metrics.json'}")
            results[member_name(m)] = metrics
        else:
            todo.append(m)
    new, errors = run_members(todo, args) if todo else ({}, {})
    summaries = beta_summaries(members, {**results, **new}, errors)
    write_grid_outputs(args, summaries)
    if errors:
        raise GridError(f"{len(errors)} of {len(members)} models failed (named above); the same command retries them")
    return summaries


def main(argv=None):
    """Entry point: a bad flag exits 2, a NaN 1, Ctrl-C 130 with the command that resumes; no tracebacks."""
    args = parse_args(argv)
    args.threads, is_grid = thread_count(args), bool(args.beta_sweep or args.train_seeds)
    try:
        if is_grid:
            return grid(args)
        utils.limit_threads(args.threads)
        return run(args)
    except KeyboardInterrupt:
        if is_grid:
            sys.stderr.write("\ninterrupted; re-run the same command to continue the grid where it stopped\n")
            sys.exit(130)
        ckpt = Path(args.out_dir) / "checkpoint.pt"
        where = f"last complete checkpoint: {ckpt}" if ckpt.is_file() else "no checkpoint was written yet"
        sys.stderr.write(f"\ninterrupted; {where}. Resume with: python demo_script.py --resume "
                         f"--out-dir {args.out_dir} (plus the same flags)\n")
        sys.exit(130)
    except (utils.NonFiniteLoss, utils.CheckpointError, data.DataError) as e:
        sys.stderr.write(f"demo_script.py: error: {e}\n")
        sys.exit(1 if isinstance(e, utils.NonFiniteLoss) else 2)
    except GridError as e:
        sys.stderr.write(f"demo_script.py: error: {e}\n")
        sys.exit(1)
    except OSError as e:  # a full disk or a vanished folder: say which file, not a traceback
        sys.stderr.write(f"demo_script.py: error: {e.strerror or e}: {e.filename or ''}\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
