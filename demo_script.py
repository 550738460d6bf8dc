"""Train a Beta-VAE on MNIST and analyse its latent space: python demo_script.py --help"""
import argparse
import copy
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import data
import utils
from model import BetaVAE, VAEConfig

# Flags that define the trained model: a checkpoint resumed with any of them changed would not be the same run.
RUN_FIELDS = ("dataset", "latent_dim", "hidden", "loss", "epochs", "batch_size", "limit", "beta_max", "schedule",
              "warmup_epochs", "cycles", "cycle_ratio", "gamma", "capacity_max", "free_bits", "lr", "lr_schedule",
              "seed")
# What --analyze-only takes from the command line; everything else comes from the checkpoint it analyses.
ANALYSIS_FIELDS = ("tsne_points", "iw_samples", "kmeans_seeds", "device", "data_dir", "out_dir", "no_progress",
                   "analyze_only", "resume", "beta_sweep")


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
    a("--tsne-points", type=int, default=10000, help="t-SNE on the first N test images (default: 10000)")
    a("--iw-samples", type=int, default=100, help="importance samples K for log p(x) (default: 100)")
    a("--kmeans-seeds", type=int, default=10, help="clustering runs per method, at least 2 (default: 10)")
    a("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt (default: off)")
    a("--analyze-only", metavar="PATH", default=None,
      help="load a checkpoint and only run the analysis; model and data set come from it (default: off)")
    a("--beta-sweep", type=float, nargs="+", default=None, metavar="BETA",
      help="train one model per beta into OUT_DIR/beta_sweep/beta_<b>/ and compare them (default: off)")
    a("--no-progress", action="store_true", help="hide the tqdm bars (default: shown)")
    return p


def nearest_existing(path):
    """The closest existing ancestor of path: where a not-yet-created --out-dir would be made."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def invalid_flag(args):
    """-> a message naming the first flag outside its valid range, or None. Touches no file."""
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
        (100 <= args.tsne_points <= n_test, f"--tsne-points must be between 100 and {n_test}"),
        (1 <= args.iw_samples <= 10000, "--iw-samples must be between 1 and 10000"),
        (args.kmeans_seeds >= 2, "--kmeans-seeds must be >= 2: the spread needs two runs"),
        (0 <= args.seed < 2 ** 32, "--seed must be in [0, 2^32)"),
        (args.beta_sweep is None or all(0 <= b < math.inf for b in args.beta_sweep), "--beta-sweep values must be >= 0"),
        (not (args.beta_sweep and (args.resume or args.analyze_only)),
         "--beta-sweep resumes by itself and cannot be combined with --resume or --analyze-only"),
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
    base = nearest_existing(args.out_dir)
    if not base.is_dir() or not os.access(base, os.W_OK):
        return f"--out-dir {args.out_dir} is not writable"
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


def analyze(model, test_x, test_y, args, samples, classes):
    """Every test-set metric and figure after training -> (metrics dict, timings dict)."""
    timings, y = {}, test_y.numpy()
    with timed(timings, "evaluate"):
        draws = 10  # z per image: with one, the reference model's test -ELBO has a Monte Carlo std error of ~0.04 nats
        test = utils.evaluate(model, test_x, args.loss, draws=draws)
        iw = None  # an MSE decoder has no normalised likelihood, so an IW "log p(x)" would mean nothing
        if args.loss == "bce":
            iw = utils.iw_log_likelihood(model, test_x, args.iw_samples, args.loss).mean().item()
    mu, logvar = utils.encode_means(model, test_x)
    kl = utils.kl_per_dim(mu, logvar).mean(0)
    active = utils.active_units(mu)
    seeds = range(args.seed, args.seed + args.kmeans_seeds)
    with timed(timings, "tsne"):
        n = args.tsne_points
        emb = utils.tsne_embedding(mu[:n].numpy(), args.seed)
    with timed(timings, "clustering"):
        clustering = {"kmeans_latent": utils.clustering_scores(mu.numpy(), y, "kmeans", seeds),
                      "gmm_latent": utils.clustering_scores(mu.numpy(), y, "gmm", seeds),
                      "kmeans_tsne": utils.clustering_scores(emb, y[:n], "kmeans", seeds)}
        pred = utils.hungarian_relabel(y, utils.cluster_labels(mu.numpy(), "kmeans", args.seed))
    with timed(timings, "figures"):
        analysis_figures(model, test_x, y, mu, kl, active, emb, pred, args, samples, classes)
    metrics = dict(test_neg_elbo=test["neg_elbo"], test_neg_elbo_se=test["neg_elbo_se"], test_eval_draws=draws,
                   test_recon=test["recon"], test_kl=test["kl"], test_iw_log_likelihood=iw,
                   iw_samples=args.iw_samples, active_units=int(active.sum()),
                   active_dims=active.nonzero().flatten().tolist(), kl_per_dim=kl.tolist(),
                   clustering=clustering, kmeans_single_seed_acc=float((pred == y).mean()))
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
    dims, values = kl.argsort(descending=True).tolist(), torch.linspace(-3, 3, 9).tolist()
    anchors = mu[utils.class_examples(y, (0, 3, 7))].to(test_x.device)
    utils.plot_traversals(utils.traversal_images(model, anchors, dims, values).cpu(), dims, kl, active, values,
                          samples / "traversals.png")
    a, b = utils.class_examples(y, range(10)), utils.class_examples(y, [(c + 1) % 10 for c in range(10)], nth=1)
    pairs = utils.interpolation_images(model, mu[a].to(test_x.device), mu[b].to(test_x.device), 10)
    utils.image_grid(pairs.reshape(-1, 784), samples / "interpolations.png", nrow=10)


def print_summary(metrics, timings, title):
    """The headline numbers of metrics.json, as a short report on stdout."""
    c = metrics["clustering"]
    print(f"\n== {title} ==")
    name, unit = ("test -ELBO (beta=1)", "nats") if metrics["config"]["loss"] == "bce" else ("test MSE + KL", "")
    print(f"{name:26s} {metrics['test_neg_elbo']:8.2f} ± {metrics['test_neg_elbo_se']:.2f} {unit} "
          f"(mean of {metrics['test_eval_draws']} z per image ± Monte Carlo std error)")
    if metrics["test_iw_log_likelihood"] is not None:
        print(f"test log p(x), IW K={metrics['iw_samples']:<5d} {metrics['test_iw_log_likelihood']:8.2f} nats")
    print(f"active units               {metrics['active_units']:5d} of {len(metrics['kl_per_dim'])}")
    print(f"{'clustering':26s} {'ACC':>13s} {'NMI':>13s} {'ARI':>13s}")
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


def analysis_config(state, args):
    """A checkpoint's config with the analysis options of this command line -> argparse.Namespace."""
    return argparse.Namespace(**{**state["config"], **{k: vars(args)[k] for k in ANALYSIS_FIELDS}})


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
    mismatch = utils.config_mismatch(state["config"], vars(args), RUN_FIELDS)
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


def run(args):
    """One full run: data, training (or resume / analyze-only), analysis, files -> metrics dict."""
    state, timings, t_start = checked_state(args), {}, time.time()
    cfg = analysis_config(state, args) if args.analyze_only else args
    config, out, device = vars(cfg), Path(args.out_dir), utils.resolve_device(args.device)
    samples = out / "samples"
    with timed(timings, "data"):
        train_x, _, test_x, test_y = data.load_dataset(cfg.data_dir, cfg.dataset)
        train_x, test_x = train_x[:cfg.limit].to(device), test_x.to(device)
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
    metrics, analysis_timings = analyze(model, test_x, test_y, cfg, samples, classes)
    timings.update(analysis_timings, total=round(time.time() - t_start, 2))
    final = history[-1] if history else {}
    metrics.update(final_train={k: final.get(k) for k in ("total", "recon", "kl", "grad_norm")},
                   final_test_neg_elbo_during_training=final.get("test_neg_elbo"), config=config, timings=timings)
    utils.write_json(out / "metrics.json", metrics)
    print_summary(metrics, timings, f"{cfg.dataset}, beta_max={cfg.beta_max:g}, {len(history)} epochs")
    return metrics


def sweep_row(beta, m):
    """One β's metrics.json -> its row of beta_sweep.txt."""
    km = m["clustering"]["kmeans_latent"]
    return dict(beta=beta, recon=m["test_recon"], kl=m["test_kl"], test_neg_elbo=m["test_neg_elbo"],
                active_units=m["active_units"], **{k: km[k] for k in ("acc_mean", "acc_std", "nmi_mean", "nmi_std")})


def beta_sweep(args):
    """Train one model per beta (a finished one is read back, a started one resumed) -> list of table rows."""
    rows, out = [], Path(args.out_dir)
    for beta in args.beta_sweep:
        sub = copy.copy(args)
        sub.beta_max, sub.beta_sweep, sub.out_dir = beta, None, str(out / "beta_sweep" / f"beta_{beta:g}")
        done = Path(sub.out_dir) / "metrics.json"
        if done.is_file():
            metrics = json.loads(done.read_text())
            mismatch = utils.config_mismatch(metrics["config"], vars(sub), RUN_FIELDS)
            if mismatch:
                raise utils.CheckpointError(f"{done}: {mismatch}; use another --out-dir")
            print(f"beta={beta:g}: finished earlier, reading {done}")
            rows.append(sweep_row(beta, metrics))
            continue
        sub.resume = (Path(sub.out_dir) / "checkpoint.pt").is_file()
        rows.append(sweep_row(beta, run(sub)))
    lines = ["| β | Test Recon | Test KL | Test -ELBO | Active Units | ACC | NMI |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['beta']:g} | {r['recon']:.2f} | {r['kl']:.2f} | {r['test_neg_elbo']:.2f} | {r['active_units']} "
              f"| {r['acc_mean']:.3f} ± {r['acc_std']:.3f} | {r['nmi_mean']:.3f} ± {r['nmi_std']:.3f} |" for r in rows]
    utils.write_text(out / "beta_sweep.txt", "\n".join(lines) + "\n")
    (out / "samples").mkdir(parents=True, exist_ok=True)
    utils.plot_beta_sweep(rows, out / "samples" / "beta_sweep.png")
    print("\n".join(lines))
    return rows


def main(argv=None):
    """Entry point: a bad flag exits 2, a NaN 1, Ctrl-C 130 with the command that resumes; no tracebacks."""
    args = parse_args(argv)
    try:
        return beta_sweep(args) if args.beta_sweep else run(args)
    except KeyboardInterrupt:
        if args.beta_sweep:
            sys.stderr.write("\ninterrupted; re-run the same --beta-sweep command to continue where it stopped\n")
            sys.exit(130)
        ckpt = Path(args.out_dir) / "checkpoint.pt"
        where = f"last complete checkpoint: {ckpt}" if ckpt.is_file() else "no checkpoint was written yet"
        sys.stderr.write(f"\ninterrupted; {where}. Resume with: python demo_script.py --resume "
                         f"--out-dir {args.out_dir} (plus the same flags)\n")
        sys.exit(130)
    except (utils.NonFiniteLoss, utils.CheckpointError, data.DataError) as e:
        sys.stderr.write(f"demo_script.py: error: {e}\n")
        sys.exit(1 if isinstance(e, utils.NonFiniteLoss) else 2)
    except OSError as e:  # a full disk or a vanished folder: say which file, not a traceback
        sys.stderr.write(f"demo_script.py: error: {e.strerror or e}: {e.filename or ''}\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
