"""Speed of the Beta-VAE pipeline against the machine's matmul ceiling and the pytorch/examples loop.

    python benchmarks/speed.py [--limit N] [--reps R] [--checkpoint PATH] [--skip-full-run] [--out FILE]

Prints one Markdown table (also written to --out, default benchmarks/results.md). Every timing is the median of
several repetitions with its min-max; contenders are interleaved round by round so that a neighbour process
loading the CPU slows all of them alike, and each sample records how much CPU other processes took meanwhile
(benchmarks/cpuload.py): medians use the quiet samples when there are at least two, and every row says how many
were quiet. Timings are reported, never asserted.
"""
import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cpuload  # noqa: E402  (benchmarks/ is on sys.path as the script's own folder)
import data  # noqa: E402
import demo_script  # noqa: E402
import utils  # noqa: E402
from model import BetaVAE, VAEConfig  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description="Speed benchmark of the Beta-VAE pipeline (Markdown table).")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results.md"), help="where to write the table")
    p.add_argument("--limit", type=int, default=None, help="training images per epoch (default: all 60000)")
    p.add_argument("--reps", type=int, default=7, help="timed epochs per training contender (default: 7)")
    p.add_argument("--tsne-reps", type=int, default=3, help="repetitions per t-SNE variant (default: 3)")
    p.add_argument("--checkpoint", default=None, help="model for t-SNE/evaluation (default: the one trained here)")
    p.add_argument("--skip-full-run", action="store_true", help="skip the ~3 min demo_script.py run")
    p.add_argument("--data-dir", default=str(ROOT / "data"))
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- measurement helpers


def summary(samples, unit="{:.2f}", per=None):
    """[(seconds, others' CPU share)] -> (median, 'min–max', 'n/m quiet') over the quiet samples when there are
    enough of them (see cpuload); per(seconds) converts to another quantity (a rate) first."""
    conv = per or (lambda s: s)
    med, lo, hi, note = cpuload.quiet_median([(conv(s), o) for s, o in samples])
    lo, hi = sorted((lo, hi))
    return med, f"{unit.format(lo)}–{unit.format(hi)}", note


def machine_info():
    """CPU model, logical cores, the cores this process may use, torch threads and the current load."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor() or "unknown")
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"CPU: {cpu}; {os.cpu_count()} logical cores, {len(os.sched_getaffinity(0))} usable; "
            f"torch {torch.__version__} with {torch.get_num_threads()} intra-op threads; "
            f"load average at start (1/5/15 min): {load}")


MM_N = 2048
MM_FLOPS = 2 * MM_N ** 3


def matmul_sample(reps=5):
    """One sample of the float32 matmul ceiling -> (median seconds per MM_N² torch.mm of reps, others' share)."""
    a, b = torch.randn(MM_N, MM_N), torch.randn(MM_N, MM_N)
    torch.mm(a, b)  # the first call pays for MKL's buffers

    def one():
        t0 = time.perf_counter()
        torch.mm(a, b)
        return time.perf_counter() - t0
    # measured as one block: /proc's CPU counters tick every 10 ms, too coarse for a single ~50 ms product
    _, others, ts = cpuload.measure(lambda: [one() for _ in range(reps)])
    return statistics.median(ts), others


def flops_per_image(model):
    """Analytic training FLOPs per image: multiply-adds of every Linear x 2 FLOPs x 3 (forward + backward)."""
    macs = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 6 * macs


# ----------------------------------------------------------------------------- training contenders


def new_model(args):
    torch.manual_seed(args.seed)
    return BetaVAE(VAEConfig(hidden=tuple(args.hidden), latent_dim=args.latent_dim))


def project_contender(args, train_x):
    """The project's own path: tensors preloaded once, utils.make_optimizer, utils.train_epoch."""
    model = new_model(args)
    opt = utils.make_optimizer(model, args.lr)

    def epoch(e):
        utils.train_epoch(model, opt, train_x, args, e, show_progress=False)
    return model, epoch


def conventional_contender(args, data_dir, limit, num_workers):
    """pytorch/examples/vae: torchvision MNIST + ToTensor, shuffled DataLoader, default Adam, .item() per step."""
    from torchvision import datasets, transforms
    dataset = datasets.MNIST(root=data_dir, train=True, transform=transforms.ToTensor())
    if limit:
        dataset = torch.utils.data.Subset(dataset, range(limit))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=num_workers)
    model = new_model(args)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)  # the examples' plain Adam (for-loop kernel on CPU)

    def epoch(e):
        model.train()
        train_loss = 0.0
        for i, (xb, _) in enumerate(loader):
            xb = xb.view(-1, 784)
            t = e - 1 + i / len(loader)  # same schedules as the project, so both do identical work per step
            for group in opt.param_groups:
                group["lr"] = utils.get_lr(t, args)
            opt.zero_grad()
            logits, mu, logvar = model(xb)
            loss = utils.objective(*utils.vae_terms(logits, xb, mu, logvar, args.loss, args.free_bits), t, args)
            loss.backward()
            train_loss += loss.item()
            opt.step()
        return train_loss
    return model, epoch


def run_training(args, opts, train_x):
    """Round-robin epochs of every contender; the ceiling is sampled just before and after each project epoch, so
    that each share of the ceiling compares the same minute of this drifting VM -> (times, ceilings, model)."""
    project_model, project_epoch = project_contender(args, train_x)
    contenders = {"project": project_epoch}
    for w in (0, 1):
        contenders[f"conv{w}"] = conventional_contender(args, opts.data_dir, opts.limit, w)[1]
    for fn in contenders.values():  # warm-up epoch, untimed: allocator, Adam state, worker start-up
        fn(1)
    times, ceilings = {k: [] for k in contenders}, []
    for r in range(opts.reps):
        order = list(contenders)
        random.Random(r).shuffle(order)  # no contender always runs right after another
        for k in order:
            before = matmul_sample() if k == "project" else None
            times[k].append(cpuload.measure(contenders[k], 2 + r)[:2])
            if before:
                after = matmul_sample()
                ceilings.append(((before[0] + after[0]) / 2, max(before[1], after[1])))
    return times, ceilings, project_model


# ----------------------------------------------------------------------------- analysis on a trained model


def load_model(path):
    state = utils.load_checkpoint(path)
    model = BetaVAE(demo_script.model_config(state["config"]))
    model.load_state_dict(state["model"])
    return model, f"checkpoint {path} (epoch {state['epoch']})"


def sklearn_tsne(features, seed, max_iter=500):
    """The alternative the project used before: scikit-learn's Barnes-Hut t-SNE with the same budget."""
    from sklearn.manifold import TSNE
    return TSNE(init="pca", random_state=seed, max_iter=max_iter, n_jobs=-1).fit_transform(features)


def tsne_variants():
    return {"openTSNE FFT, 500 it (project)": lambda f, s: utils.tsne_embedding(f, s, 500),
            "openTSNE FFT, 1000 it": lambda f, s: utils.tsne_embedding(f, s, 1000),
            "sklearn BH, 500 it": sklearn_tsne}


def run_tsne(mu, y, args, reps):
    """Interleaved t-SNE repetitions -> {variant: (times, KMeans scores of the first embedding)}."""
    seeds = range(args.seed, args.seed + args.kmeans_seeds)
    variants, out = tsne_variants(), {}
    for r in range(reps):
        for name, fn in variants.items():
            dt, others, emb = cpuload.measure(fn, mu, args.seed)
            if name not in out:
                out[name] = ([], utils.clustering_scores(emb, y, "kmeans", seeds))
            out[name][0].append((dt, others))
    return out


def run_evaluation(model, test_x, test_y, args, reps):
    """Test -ELBO, IW log-likelihood and KMeans on latent means, each timed `reps` times -> {name: (times, value)}."""
    seeds = range(args.seed, args.seed + args.kmeans_seeds)
    mu = utils.encode_means(model, test_x)[0].numpy()
    jobs = {"evaluate": lambda: utils.evaluate(model, test_x, args.loss)["neg_elbo"],
            "evaluate10": lambda: utils.evaluate(model, test_x, args.loss, draws=10)["neg_elbo"],
            "iw": lambda: utils.iw_log_likelihood(model, test_x, args.iw_samples, args.loss).mean().item(),
            "kmeans": lambda: utils.clustering_scores(mu, test_y.numpy(), "kmeans", seeds)["acc_mean"]}
    out = {k: ([], None) for k in jobs}
    for _ in range(reps):
        for k, fn in jobs.items():
            dt, others, value = cpuload.measure(fn)
            out[k] = (out[k][0] + [(dt, others)], value)
    return out, mu


# ----------------------------------------------------------------------------- full run


# A fresh interpreter whose only child is the demo run, so RUSAGE_CHILDREN is that run's alone
# (DataLoader workers forked by this script would otherwise count too).
RSS_WRAPPER = ("import resource, subprocess, sys, time; t0 = time.perf_counter(); "
               "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
               "print(rc, time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def full_run(data_dir):
    """python demo_script.py with its defaults -> (exit code, wall s, peak RSS MiB, its phase timings, others)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "demo_script.py"), "--out-dir", tmp, "--no-progress", "--data-dir", data_dir]
        _, others, res = cpuload.measure(subprocess.run, [sys.executable, "-c", RSS_WRAPPER, *cmd],
                                         capture_output=True, text=True, check=True)
        rc, wall, rss_kib = res.stdout.split()
        metrics = Path(tmp, "metrics.json")
        phases = json.loads(metrics.read_text())["timings"] if metrics.is_file() else {}
    return int(rc), float(wall), int(rss_kib) / 1024, phases, others


# ----------------------------------------------------------------------------- table


def paired(a, b, f):
    """Median over the rounds where both samples were quiet (else over all) of f(a_seconds, b_seconds): a
    per-round ratio cancels slow drifts of the machine's speed that separate medians keep."""
    both = [(x, y) for (x, ox), (y, oy) in zip(a, b) if max(ox, oy) < cpuload.QUIET]
    if len(both) < 2:
        both = [(x, y) for (x, _), (y, _) in zip(a, b)]
    return statistics.median(f(x, y) for x, y in both)


def training_rows(times, ceilings, n, fpi, bs):
    """Rows for the ceiling, the project's epoch and the conventional loops."""
    ceil, ceil_spread, ceil_note = summary(ceilings, "{:.1f}", per=lambda s: MM_FLOPS / s / 1e9)
    proj, proj_spread, proj_note = summary(times["project"])
    gflops, gf_spread, _ = summary(times["project"], "{:.1f}", per=lambda s: n * fpi / s / 1e9)
    ips, ips_spread, _ = summary(times["project"], "{:,.0f}", per=lambda s: n / s)
    share = paired(times["project"], ceilings, lambda t, mm: (n * fpi / t) / (MM_FLOPS / mm))
    rows = [("1", f"float32 matmul ceiling ({MM_N}² torch.mm)", f"{ceil:.1f} GFLOP/s", ceil_spread,
             f"mean of the medians of 5 mm just before and after each project epoch; {ceil_note}"),
            ("2", f"project `utils.train_epoch`, batch {bs}", f"{proj:.2f} s/epoch", proj_spread,
             f"{n} images/epoch, preloaded tensors, `utils.make_optimizer`; {proj_note}"),
            ("2", "… images/s", f"{ips:,.0f}", ips_spread, ""),
            ("2", "… achieved GFLOP/s (% of ceiling)", f"{gflops:.1f} (**{100 * share:.0f}%**)", gf_spread,
             f"{fpi / 1e6:.2f} MFLOP/image = 6 × multiply-adds of the Linear layers; % = median per-round ratio")]
    for w in (0, 1):
        t, t_spread, t_note = summary(times[f"conv{w}"])
        ratio = paired(times[f"conv{w}"], times["project"], lambda c, p: c / p)
        default = " (DataLoader's default)" if w == 0 else " (the examples' CUDA kwargs)"
        rows.append(("3", f"pytorch/examples loop, num_workers={w}{default}", f"{t:.2f} s/epoch", t_spread,
                     f"**(3)/(2) = {ratio:.2f}×** (median per-round ratio); {t_note}"))
    return rows


def tsne_rows(tsne, n):
    rows = []
    for name, (samples, sc) in tsne.items():
        t, t_spread, note = summary(samples, "{:.1f}")
        rows.append(("4", f"t-SNE of {n} test μ: {name}", f"{t:.1f} s", t_spread,
                     f"KMeans ACC on its (first) embedding {sc['acc_mean']:.3f} ± {sc['acc_std']:.3f}, "
                     f"NMI {sc['nmi_mean']:.3f} ({len(sc['seeds'])} seeds); {note}"))
    return rows


def evaluation_rows(ev, args):
    names = {"evaluate": ("test −ELBO, `utils.evaluate` (10k, 1 z each: after every epoch)", "−ELBO {:.2f} nats"),
             "evaluate10": ("test −ELBO, `utils.evaluate` (10k, 10 z each: the final one)", "−ELBO {:.2f} nats"),
             "iw": (f"`utils.iw_log_likelihood`, K={args.iw_samples} (10k)", "IW estimate of log p(x) {:.2f} nats"),
             "kmeans": (f"KMeans on test μ, `clustering_scores`, {args.kmeans_seeds} seeds", "ACC {:.3f}")}
    rows = []
    for k, (label, value_fmt) in names.items():
        samples, value = ev[k]
        t, t_spread, note = summary(samples)
        rows.append(("5", label, f"{t:.2f} s", t_spread, f"{value_fmt.format(value)}; {note}"))
    return rows


def full_run_rows(result):
    rc, wall, rss, phases, others = result
    detail = ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
    quiet = "quiet" if others < cpuload.QUIET else f"CONTENDED: others used {100 * others:.0f}% of the cores"
    return [("6", "`demo_script.py` defaults, wall time", f"{wall:.0f} s", "1 run",
             f"exit {rc}; {quiet}; its phases (s): {detail}"),
            ("6", "… peak resident memory (ru_maxrss)", f"{rss:,.0f} MiB", "1 run",
             "`getrusage(RUSAGE_CHILDREN)` in a wrapper whose only child is the run")]


FOOTNOTES = [
    "- Medians and min–max are over the *quiet* repetitions (other processes and hypervisor steal took under "
    f"{100 * cpuload.QUIET:.0f}% of the cores meanwhile) when at least two were quiet, otherwise over all of them "
    "and the row says CONTENDED. Contenders run interleaved, one round at a time, in a shuffled order.",
    "- GFLOP/s of training count 6 FLOPs per multiply-add of every Linear layer per image (forward, and twice that "
    "for backward); the first layer's input gradient is not actually computed, so this slightly overstates the work.",
    "- (3) runs the same model, `utils.vae_terms` + `utils.objective`, schedules and batch size as (2), but with "
    "torchvision's MNIST + `ToTensor()`, a shuffled `DataLoader`, `torch.optim.Adam` with default settings and "
    "`loss.item()` every step, as pytorch/examples/vae does.",
]


def markdown(rows, header_lines):
    lines = [*header_lines, "", "| # | measurement | median | spread (min–max) | notes |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines + [""] + FOOTNOTES) + "\n"


# ----------------------------------------------------------------------------- main


def main(argv=None):
    opts = parse(argv)
    args = demo_script.parse_args([])  # the project's defaults: batch size, model, loss, schedules, K, seeds
    header = [f"# Beta-VAE speed benchmark ({time.strftime('%Y-%m-%d %H:%M')})", "", machine_info()]
    print("\n".join(header), flush=True)
    train_x, _, test_x, test_y = data.load_mnist(opts.data_dir)
    train_x = train_x[:opts.limit].contiguous()
    print(f"1-3: training, {opts.reps} interleaved rounds after a warm-up epoch", flush=True)
    times, ceilings, model = run_training(args, opts, train_x)
    rows = training_rows(times, ceilings, train_x.shape[0], flops_per_image(model), args.batch_size)
    source = f"the project model trained {opts.reps + 1} epochs above (default schedules)"
    if opts.checkpoint:
        model, source = load_model(opts.checkpoint)
    print("5: evaluation; 4: t-SNE", flush=True)
    ev, mu = run_evaluation(model, test_x, test_y, args, reps=3)
    tsne = run_tsne(mu, test_y.numpy(), args, opts.tsne_reps)
    rows += tsne_rows(tsne, len(mu)) + evaluation_rows(ev, args)
    if not opts.skip_full_run:
        print("6: full demo_script.py run", flush=True)
        rows += full_run_rows(full_run(opts.data_dir))
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    header += [f"Model for rows 4–5: {source}. Load average at end: {load}."]
    table = markdown(rows, header)
    print(table)
    Path(opts.out).write_text(table)
    print(f"written to {opts.out}")


if __name__ == "__main__":
    main()
