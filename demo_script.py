"""Train a Beta-VAE on MNIST and analyse its latent space: python demo_script.py --help"""
import argparse
import errno
import importlib
import math
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import data
import grid
import measures
import utils
from model import BetaVAE, VAEConfig

# What --analyze-only takes from the command line; everything else comes from the checkpoint it analyses.
ANALYSIS_FIELDS = ("tsne_points", "iw_samples", "kmeans_seeds", "umap_seeds", "test_limit", "device", "data_dir",
                   "out_dir", "no_progress", "quick", "tensorboard",
                   "analyze_only", "resume", "beta_sweep", "train_seeds", "workers", "scheduler", "threads")


# --quick, in the spirit of Lightning's fast_dev_run; its own folder, so that it never overwrites the reference run.
QUICK = dict(epochs=3, limit=6000, test_limit=1000, tsne_points=300, iw_samples=10, kmeans_seeds=2, umap_seeds=0,
             out_dir="runs/quick")
# TensorBoard's tag for each loss.txt column it logs every epoch.
TB_SCALARS = {"loss/total": "total", "loss/recon": "recon", "loss/kl": "kl", "schedule/beta": "beta",
              "train/grad_norm": "grad_norm", "test/neg_elbo": "test_neg_elbo"}


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line, without the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_model_flags(a):
    """The network, its loss and its optimiser, through add_argument `a`."""
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
    a("--free-bits", type=float, default=0.5,
      help="free-bits floor per latent dimension, nats; capacity ignores it (default: 0.5)")
    a("--lr", type=float, default=2e-3, help="peak learning rate (default: 2e-3)")
    a("--lr-schedule", choices=["constant", "cosine"], default="cosine",
      help="learning-rate schedule over the run (default: cosine)")


def add_run_flags(a):
    """Seed, hardware, data, files, resuming and output, through add_argument `a`."""
    a("--seed", type=int, default=20, help="random seed: training, z draws, clustering, DCI's split (default: 20)")
    a("--precision", choices=["auto", "fp32", "bf16"], default="auto",
      help="training precision; bf16 autocasts the network's matrix products, and evaluation and analysis stay fp32; "
           "auto: bf16 where the CPU (oneDNN) or GPU supports it, else fp32 (default: auto)")
    a("--device", default="auto", help=f"{', '.join(utils.DEVICES)} (default: auto)")
    a("--threads", type=int, default=None, metavar="N",
      help="threads per model for torch, BLAS/OpenMP, numba, t-SNE and clustering seeds side by side (default: all "
           "cores when sequential, cores // N with --workers N (N at most the models left to train), 1 per model with "
           "--scheduler)")
    a("--dataset", choices=list(data.DATASETS), default="mnist", help="data set (default: mnist)")
    a("--data-dir", default="./data", help="where the IDX files live or are provisioned (default: ./data)")
    a("--out-dir", default=None, help="where loss.txt, samples/, metrics.json and checkpoint.pt go (default: ., "
                                      "runs/quick with --quick, else the checkpoint's own folder with --analyze-only)")
    a("--limit", type=int, default=None, help="train on the first N images only (default: all)")
    a("--binarize", action="store_true", help="dynamically binarized MNIST (Burda et al. 2016): each training batch "
                                              "re-sampled as Bernoulli(x), one fixed binary test set (default: off)")
    a("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt (default: off)")
    a("--no-progress", action="store_true", help="hide the tqdm bars (default: shown)")
    a("--tensorboard", action="store_true", help="also log scalars, digit grids and hparams to OUT_DIR/tensorboard "
                                                 "(default: off)")
    a("--quick", action="store_true", help="the real pipeline at small sizes: " + " ".join(
        f"--{k.replace('_', '-')} {v}" + (" (at most --test-limit)" if k == "tsne_points" else "")
        for k, v in QUICK.items()) + "; flags given explicitly win (default: off)")


def add_analysis_flags(a):
    """Evaluation and latent-space analysis, through add_argument `a`."""
    a("--test-limit", type=int, default=None, help="evaluate and analyse the first N test images only (default: all)")
    a("--tsne-points", type=int, default=None,
      help="t-SNE on the first N test images (default: 10000, 300 with --quick, or --test-limit when smaller)")
    a("--iw-samples", type=int, default=100, help="importance samples K for log p(x), at least 2 (default: 100)")
    a("--kmeans-seeds", type=int, default=5, help="clustering runs per method, at least 2 (default: 5)")
    a("--umap-seeds", type=int, default=2, help="UMAP + Gaussian mixture runs, ~15 s of one core each, side by side "
                                                "on the run's cores (a machine's first UMAP also compiles numba code "
                                                "once); 0 skips UMAP (default: 2)")
    a("--analyze-only", metavar="PATH", default=None,
      help="load a checkpoint and only run the analysis; model, data set and --seed come from it (default: off)")


def add_grid_flags(a):
    """The beta x training-seed grid and where it runs, through add_argument `a`."""
    a("--beta-sweep", type=float, nargs="+", default=None, metavar="BETA",
      help="one model per beta (and training seed) in OUT_DIR/grid/beta_<b>/seed_<s>/, compared in "
           "beta_sweep.txt (default: off)")
    a("--train-seeds", type=int, nargs="+", default=None, metavar="SEED",
      help="one model per training seed (for every beta), averaged in the grid's table; alone, one configuration "
           "over seeds, summarised in seeds_summary.txt (default: --seed only)")
    a("--workers", type=int, default=None, metavar="N",
      help="run the grid's models in N local processes (default: one after another in this process)")
    a("--scheduler", default=None, metavar="ADDRESS",
      help="run the grid's models on a running Dask scheduler, e.g. tcp://127.0.0.1:8786; each worker resolves "
           "--device and --precision auto for the models it runs (default: off)")


def build_parser():
    """-> the command line, pytorch/examples style: every help text states its default; --help shows four groups."""
    p = OneLineParser(prog="demo_script.py", description="Beta-VAE on MNIST with latent-space analysis")
    for title, add_flags in [("model and training", add_model_flags), ("run", add_run_flags),
                             ("evaluation and analysis", add_analysis_flags), ("beta x seed grid", add_grid_flags)]:
        add_flags(p.add_argument_group(title).add_argument)
    return p


def folder_write_error(path):
    """-> why no file can be written into folder `path`, or None; learnt by writing there, then undoing what it made."""
    path = Path(path).absolute()
    made = data.missing_folders(path)  # deepest first: the order to undo them
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:  # os.access would not do: root passes it for /proc or a read-only mount
        return os.strerror(errno.ENOTDIR) if isinstance(e, FileExistsError) else e.strerror or str(e)
    finally:
        data.remove_empty_folders(made)
    return None


# The largest β, γ, free bits and capacity: above it their products with the KL overflow float32 training into NaN.
LARGEST_WEIGHT = 1e6


def value_checks(args):
    """-> [(ok, message)] for each flag's own value: finite, within bounds (some bounds are other flags), distinct."""
    n_train, n_test = data.DATASETS[args.dataset]["n_train"], 10000
    floats = ["beta_max", "free_bits", "lr", "cycle_ratio", "gamma", "capacity_max"]
    checks = [(math.isfinite(getattr(args, f)), f"--{f.replace('_', '-')} must be a finite number") for f in floats]
    checks += [(0 <= getattr(args, f) <= LARGEST_WEIGHT, f"--{f.replace('_', '-')} must be between 0 and "
                f"{LARGEST_WEIGHT:,.0f}") for f in ("beta_max", "free_bits", "gamma", "capacity_max")]
    return checks + [
        (args.epochs >= 1, "--epochs must be >= 1"), (args.batch_size >= 1, "--batch-size must be >= 1"),
        (args.latent_dim >= 1, "--latent-dim must be >= 1"), (min(args.hidden) >= 1, "--hidden sizes must be >= 1"),
        (args.lr > 0, "--lr must be > 0"), (args.warmup_epochs >= 0, "--warmup-epochs must be >= 0"),
        (args.cycles >= 1, "--cycles must be >= 1"), (0 < args.cycle_ratio <= 1, "--cycle-ratio must be in (0, 1]"),
        (args.limit is None or args.batch_size <= args.limit <= n_train,
         f"--limit ({args.limit}) must be between --batch-size ({args.batch_size}) and {n_train}"),
        (args.test_limit is None or 100 <= args.test_limit <= n_test, f"--test-limit must be between 100 and {n_test}"),
        (100 <= args.tsne_points <= (args.test_limit or n_test),
         f"--tsne-points must be between 100 and --test-limit ({args.test_limit or n_test})"),
        (2 <= args.iw_samples <= 10000, "--iw-samples must be between 2 and 10000: one has no MC error"),
        (args.kmeans_seeds >= 2, "--kmeans-seeds must be >= 2: the spread needs two runs"),
        (args.umap_seeds == 0 or args.umap_seeds >= 2, "--umap-seeds must be 0 (no UMAP) or >= 2"),
        (0 <= args.seed < 2 ** 32, "--seed must be in [0, 2^32)"),
        (args.beta_sweep is None or all(0 <= b <= LARGEST_WEIGHT for b in args.beta_sweep),
         f"--beta-sweep values must be between 0 and {LARGEST_WEIGHT:,.0f}"),
        (args.beta_sweep is None or len({f"{b:g}" for b in args.beta_sweep}) == len(args.beta_sweep),
         "--beta-sweep values must be distinct"),
        (args.train_seeds is None or all(0 <= s < 2 ** 32 for s in args.train_seeds),
         "--train-seeds must be in [0, 2^32)"),
        (args.train_seeds is None or len(set(args.train_seeds)) == len(args.train_seeds),
         "--train-seeds must be distinct"),
        # the name only: whether the device is there is this machine's to say, or on Dask each worker's
        (args.device in utils.DEVICES, f"--device must be one of {', '.join(utils.DEVICES)}"),
        (args.workers is None or args.workers >= 1, "--workers must be >= 1"),
        (args.threads is None or args.threads >= 1, "--threads must be >= 1"),
    ]


def combination_checks(args):
    """-> [(ok, message)], one per set of flags that cannot go together."""
    grid_run = args.beta_sweep or args.train_seeds
    return [
        (not (grid_run and (args.resume or args.analyze_only)),
         "--beta-sweep and --train-seeds resume by themselves and cannot be combined with --resume or --analyze-only"),
        (not (args.beta_sweep and args.schedule == "capacity"),
         "--beta-sweep sets --beta-max, which --schedule capacity does not use: its models would all be the same"),
        (not (args.workers and args.scheduler), "--workers and --scheduler cannot be combined"),
        (not ((args.workers or args.scheduler) and not grid_run),
         "--workers and --scheduler run a grid: give --beta-sweep or --train-seeds"),
        (not (args.resume and args.analyze_only), "--resume and --analyze-only cannot be combined"),
    ]


def invalid_flag(args):
    """-> a message naming the first invalid flag (its value, its company, the device, checkpoint or --out-dir), or None."""
    problem = next((msg for ok, msg in value_checks(args) + combination_checks(args) if not ok), None)
    if problem:
        return problem
    try:
        if not args.scheduler:  # on Dask the workers' hardware decides, not this machine's (grid.grid_member)
            utils.resolve_precision(args.precision, utils.resolve_device(args.device))
    except ValueError as e:
        return f"--device or --precision: {e}"
    if args.analyze_only and not Path(args.analyze_only).is_file():
        return f"--analyze-only: no checkpoint file at {args.analyze_only}"
    problem = folder_write_error(args.out_dir)
    if problem:
        return f"--out-dir {args.out_dir} cannot be written to ({problem})"
    return None  # and no file left behind: folder_write_error undoes what it made


def parse_args(argv=None):
    """-> validated argparse.Namespace; a bad value exits 2 with one line before anything is read or written."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:  # the quick sizes become the defaults, so that a flag given explicitly still wins
        parser.set_defaults(**{k: v for k, v in QUICK.items() if k != "tsne_points"})  # which follows --test-limit
        args = parser.parse_args(argv)
    # Defaults that follow other flags: analysing another run's checkpoint never overwrites the reference run in .
    args.out_dir = args.out_dir or (str(Path(args.analyze_only).parent) if args.analyze_only else ".")
    if args.tsne_points is None:  # not `or`: an explicit 0 is out of range, not the default
        args.tsne_points = min(QUICK["tsne_points"] if args.quick else 10000, args.test_limit or 10000)
    msg = invalid_flag(args)
    if msg:
        parser.error(msg)
    # The precision actually used, resolved once: what the checkpoint and metrics.json record and --resume checks.
    if not args.scheduler:
        args.precision = utils.resolve_precision(args.precision, utils.resolve_device(args.device))
    return args


def model_config(cfg):
    """Run config dict -> the VAEConfig of its network."""
    return VAEConfig(hidden=tuple(cfg["hidden"]), latent_dim=cfg["latent_dim"])


def schedule_name(args):
    """-> what the schedule sets, for plot labels: the capacity C(t) under --schedule capacity, else β."""
    return "capacity C" if args.schedule == "capacity" else "β"


def schedule_curve(args):
    """-> (epochs as floats, values) of the schedule the steps used, sampled 20 times per epoch; x = e is the start of
    epoch e, where loss.txt's beta column reads it."""
    ts = [i / 20 for i in range(20 * args.epochs)]  # not t = epochs: no step runs there (a cyclical run restarts at 0)
    if args.schedule == "capacity":
        return [1 + t for t in ts], [utils.get_capacity(t, args) for t in ts]
    return [1 + t for t in ts], [utils.get_beta(t, args) for t in ts]


def train(args, model, opt, train_x, test_x, out, history, start_epoch, writer=None):
    """The epoch loop: after each epoch, loss.txt and checkpoint.pt are rewritten atomically (and TensorBoard logged)."""
    for epoch in range(start_epoch, args.epochs + 1):
        t0 = time.time()
        stats = utils.train_epoch(model, opt, train_x, args, epoch, show_progress=not args.no_progress)
        test = utils.evaluate(model, test_x, args.loss)
        if not math.isfinite(test["neg_elbo"]):
            raise utils.NonFiniteLoss(f"non-finite test loss after the last step of epoch {epoch}")
        history.append(dict(epoch=epoch, beta=utils.get_beta(epoch - 1, args), **stats,
                            test_neg_elbo=test["neg_elbo"], seconds=time.time() - t0))
        if writer:  # before the checkpoint: a resumed run purges what a killed one logged past its last checkpoint
            log_epoch(writer, history[-1], args, model, test_x)
            writer.flush()  # not left to its writer thread: a run SIGKILLed after its checkpoint would lose the epoch
        # loss.txt and checkpoint.pt describe the same epoch; the checkpoint first, so that a failed write (a full
        # disk) leaves no loss.txt row that --resume would not continue from
        with data.interrupts_deferred():
            utils.save_checkpoint(out / "checkpoint.pt", utils.checkpoint_state(model, opt, epoch, vars(args), history))
            data.write_text(out / "loss.txt", utils.loss_table(history))
        h = history[-1]
        print(f"epoch {epoch:3d}  beta {h['beta']:.3f}  total {h['total']:.2f}  recon {h['recon']:.2f}  "
              f"kl {h['kl']:.2f}  grad {h['grad_norm']:.1f}  test -ELBO {h['test_neg_elbo']:.2f}  "
              f"{h['seconds']:.1f}s", flush=True)
    return history


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
    # ... except --precision: every run saved before it existed trained in fp32, whatever today's default is
    return {**vars(build_parser().parse_args([])), "precision": "fp32", **config}


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
    mismatch = utils.config_mismatch(with_defaults(state["config"]), vars(args), utils.RESUME_FIELDS)
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


def trained_model(cfg, state, split, writer, timings):
    """A new, resumed or (--analyze-only) loaded model, trained to the end -> (model, history)."""
    train_x, _, test_x, test_y = split
    out, classes = Path(cfg.out_dir), data.DATASETS[cfg.dataset]["classes"]
    utils.set_seed(cfg.seed)
    model = BetaVAE(model_config(vars(cfg))).to(test_x.device)
    if cfg.analyze_only:
        model.load_state_dict(state["model"])
        return model, state.get("history", [])  # a checkpoint may hold no history
    opt = utils.make_optimizer(model, cfg.lr)
    history, start = resume_from(state, model, opt) if state else ([], 1)
    if state:
        print(f"resuming after epoch {start - 1} from {out / 'checkpoint.pt'}")
    else:
        mu, _ = utils.encode_means(model, test_x)
        utils.plot_latent_distribution(mu, test_y.numpy(), out / "samples" / "latent_dist_before_train.png",
                                       "Test latent means before training", classes)
    with utils.timed(timings, "train"):
        train(cfg, model, opt, train_x, test_x, out, history, start, writer)
    return model, history


def run(args):
    """One full run: data, training (or resume / analyze-only), analysis, files -> metrics dict."""
    state, timings, t_start = checked_state(args), {}, time.time()
    measures.return_large_frees_to_the_os()
    cfg = analysis_config(state, args) if args.analyze_only else args
    out, device = Path(args.out_dir), utils.resolve_device(args.device)
    with utils.timed(timings, "data"):
        train_x, train_y, test_x, test_y = experiment_data(cfg)
        split = (train_x.to(device), train_y, test_x.to(device), test_y)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    with tensorboard(cfg, state["epoch"] + 1 if state and args.resume else None) as writer:
        model, history = trained_model(cfg, state, split, writer, timings)
        utils.plot_training_curves(history, out / "samples" / "train_loss.png", schedule_name(cfg),
                                   schedule_curve(cfg))
        metrics, analysis_timings = measures.analyze(model, split, cfg, out / "samples",
                                                     data.DATASETS[cfg.dataset]["classes"])
        timings.update(analysis_timings, total=round(time.time() - t_start, 2))
        final = history[-1] if history else {}
        metrics.update(final_train={k: final.get(k) for k in ("total", "recon", "kl", "grad_norm")},
                       final_test_neg_elbo_during_training=final.get("test_neg_elbo"), config=vars(cfg),
                       timings=timings)
        data.write_json(out / "metrics.json", metrics)
        if writer:
            log_hparams(writer, vars(cfg), metrics, len(history))
    measures.print_summary(metrics, timings, f"{cfg.dataset}, beta_max={cfg.beta_max:g}, {len(history)} epochs")
    return metrics


# ----------------------------------------------------------------------------- TensorBoard (--tensorboard)


@contextmanager
def tensorboard(args, purge_step):
    """-> a SummaryWriter on OUT_DIR/tensorboard (None without --tensorboard), closed when the block ends."""
    if not args.tensorboard:
        yield None
        return
    from torch.utils.tensorboard import SummaryWriter  # only here: importing it costs about a second
    # purge_step: a run resumed at epoch E hides what a killed run logged from E on, so no step appears twice
    writer = SummaryWriter(Path(args.out_dir) / "tensorboard", purge_step=purge_step)
    try:
        yield writer
    finally:
        writer.close()


def log_epoch(writer, row, args, model, test_x):
    """loss.txt's row of one epoch as scalars, and digit grids on a few epochs and the last; nothing per step."""
    epoch = row["epoch"]
    for tag, key in TB_SCALARS.items():
        writer.add_scalar(tag, row[key], epoch)
    writer.add_scalar("schedule/lr", utils.get_lr(epoch - 1, args), epoch)  # at the epoch's start, like β
    if epoch % max(1, args.epochs // 4) == 0 or epoch in (1, args.epochs):
        gen = torch.Generator(device=test_x.device).manual_seed(args.seed)  # its own generator: training's RNG untouched
        pairs = utils.reconstruction_pairs(test_x[:40], utils.reconstruct(model, test_x[:40]))
        for tag, images, nrow in [("digits/reconstructions", pairs, 10), ("digits/generated", model.sample(64, gen), 8)]:
            writer.add_image(tag, utils.digit_grid(images, nrow), epoch)


def log_hparams(writer, config, metrics, step):
    """The run's model flags and headline numbers for TensorBoard's hparams view (a grid filters by β and seed)."""
    from torch.utils.tensorboard.summary import hparams
    flags = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()
             if k in utils.RUN_FIELDS}
    numbers = grid.headline_numbers(metrics)
    accs = [v for k, v in numbers.items() if k.endswith("_acc")]
    if accs:
        numbers["best_clustering_acc"] = max(accs)
    # The view's columns are the metric names of the first run TensorBoard reads, for every run of a grid: so every
    # name, a null measure's too (hparams takes names only; the values are the scalars below).
    names = [*grid.headline_names(metrics), "best_clustering_acc"]
    # Written into this run's own event file, not add_hparams' sub-folder: the view then links to its curves.
    for summary in hparams(flags, {f"hparams/{k}": 0.0 for k in names}):
        writer.file_writer.add_summary(summary, step)
    for k, v in numbers.items():
        writer.add_scalar(f"hparams/{k}", v, step)


def stop_message(args, is_grid, terminated, started):
    """-> what stopping on Ctrl-C or SIGTERM prints: where the run stands, and the command that continues it.
    started: the run's time.time() at its start."""
    what = "terminated (SIGTERM)" if terminated else "interrupted"
    if is_grid:
        return f"\n{what}; re-run the same command to continue the grid where it stopped\n"
    if args.analyze_only:  # nothing to resume: the checkpoint analysed is unchanged
        return f"\n{what}; re-run the same command to analyse {args.analyze_only} again\n"
    ckpt = Path(args.out_dir) / "checkpoint.pt"
    # a new run's own checkpoint only: one left in the folder by an earlier run is not where this one stands
    if ckpt.is_file() and (args.resume or ckpt.stat().st_mtime >= started):
        return (f"\n{what}; last complete checkpoint: {ckpt}. Resume with: python demo_script.py --resume "
                f"--out-dir {args.out_dir} (plus the same flags)\n")
    return f"\n{what} before its first checkpoint; re-run the same command to start again\n"


def main(argv=None):
    """Entry point: a bad flag or a folder another run holds exits 2, a NaN or a failed write 1, Ctrl-C 130 and
    SIGTERM 143 with the command that resumes; no tracebacks."""
    utils.flush_denormals()  # before torch starts its threads, which copy the flag
    args, started = parse_args(argv), time.time()
    is_grid = bool(args.beta_sweep or args.train_seeds)  # a grid sets its members' threads (grid.thread_count)
    try:
        with data.sigterm_raises():
            if is_grid:  # run by module name, not __main__'s: what a pool or Dask worker can import and unpickle
                # Each member locks its own folder (grid.grid_member): two grid commands on one folder share its members.
                return grid.grid(args, importlib.import_module("demo_script").run, with_defaults({}))
            with data.folder_lock(args.out_dir):  # one writer per folder, before any data is read; run() takes none
                utils.limit_threads(args.threads)
                return run(args)
    except KeyboardInterrupt as e:  # SIGTERM too: data.Terminated is one
        terminated = isinstance(e, data.Terminated)
        sys.stderr.write(stop_message(args, is_grid, terminated, started))
        sys.exit(143 if terminated else 130)
    except (data.FolderBusy, utils.CheckpointError, data.DataError) as e:
        sys.stderr.write(f"demo_script.py: error: {e}\n")
        sys.exit(2)
    except (utils.NonFiniteLoss, grid.GridError) as e:
        sys.stderr.write(f"demo_script.py: error: {e}\n")
        sys.exit(1)
    except OSError as e:  # a full disk or a vanished folder: say which file, not a traceback
        sys.stderr.write(f"demo_script.py: error: {e.strerror or e}: {e.filename or ''}\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
