"""Speed of the Beta-VAE pipeline against the machine's matmul ceiling: python benchmarks/speed.py [--help]

Prints one Markdown table (a run of all sections also writes benchmarks/results.md); benchmarks/README.md says what
each row measures. Each timing is a median over repetitions, interleaved, with the share of the CPU that other
processes took meanwhile; only quiet samples count when there are enough. Timings are reported, never asserted.
"""
import argparse
import contextlib
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil  # installed with ipykernel and distributed
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import demo_script  # noqa: E402
import measures  # noqa: E402
import utils  # noqa: E402
from model import BetaVAE, VAEConfig  # noqa: E402

SECTIONS = ("train", "tsne", "eval", "iw", "warm", "first")
QUIET = 0.05  # a sample is quiet when other processes and hypervisor steal used under 5% of all cores
MM_N = 2048  # the matmul ceiling: MM_N² float32 torch.mm
MM_FLOPS = 2 * MM_N ** 3


def parse(argv=None):
    p = argparse.ArgumentParser(description="Speed benchmark of the Beta-VAE pipeline (Markdown table).")
    a = p.add_argument
    a("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS),
      help="train (rows 1-3), tsne (4), eval (5), iw (6), warm and first (7: the demo with MNIST in --data-dir, "
           "and a first run that provisions it into an empty folder) (default: all)")
    a("--out", default=None, help="also write the table here (default: benchmarks/results.md if all sections run)")
    a("--limit", type=int, default=None, help="training images per epoch (default: all 60000)")
    a("--reps", type=int, default=7, help="timed epochs per training contender (default: 7)")
    a("--tsne-reps", type=int, default=3, help="repetitions of the t-SNE (default: 3)")
    a("--eval-reps", type=int, default=3, help="repetitions of each row 5 and 6 measurement (default: 3)")
    a("--iw-k", type=int, default=5000, help="importance samples K in row 6 (default: 5000)")
    a("--iw-images", type=int, default=500, help="row 6 uses the first N test images (default: 500)")
    a("--checkpoint", default=None, help="model for rows 4-6 (default: the one trained in row 2)")
    a("--demo-args", default="", help="extra demo_script.py flags for row 7, e.g. '--epochs 1' (default: none)")
    a("--data-dir", default=str(ROOT / "data"), help="MNIST for all but the first run (default: ROOT/data)")
    opts = p.parse_args(argv)
    if "train" not in opts.only and not opts.checkpoint and {"tsne", "eval", "iw"} & set(opts.only):
        p.error("rows 4-6 need --checkpoint when the train section does not run")
    return opts


# ----------------------------------------------------------------------------- measurement helpers
def cpu_seconds():
    """-> (busy CPU-seconds of the whole machine, CPU-seconds of this process tree with its reaped children)."""
    t, me, mine = psutil.cpu_times(), psutil.Process(), 0.0
    for proc in [me, *me.children(recursive=True)]:  # DataLoader workers, the demo run
        with contextlib.suppress(psutil.NoSuchProcess):  # it exited meanwhile
            mine += sum(proc.cpu_times()[:4])  # user, system, children_user, children_system
    return t.user + t.nice + t.system + t.irq + t.softirq + t.steal, mine  # guest time is inside user


def measure(fn, *a, **kw):
    """-> (wall seconds, share of all cores that other processes used meanwhile, fn's result)."""
    (busy0, mine0), t0 = cpu_seconds(), time.perf_counter()
    out = fn(*a, **kw)
    wall = time.perf_counter() - t0
    busy1, mine1 = cpu_seconds()
    return wall, max(0.0, (busy1 - busy0 - mine1 + mine0) / (wall * os.cpu_count())), out


def summary(samples, fmt="{:.2f}", per=None):
    """[(seconds, others)] -> (median, 'min–max', 'n/m quiet') over the quiet samples when at least two are, else
    over all; per(seconds) converts to another quantity (a rate) first."""
    quiet = [s for s, o in samples if o < QUIET]
    use = quiet if len(quiet) >= 2 else [s for s, _ in samples]
    vals = sorted(map(per or (lambda s: s), use))
    note = f"{len(quiet)}/{len(samples)} quiet" + ("" if use is quiet else ", CONTENDED: median of all")
    return statistics.median(vals), f"{fmt.format(vals[0])}–{fmt.format(vals[-1])}", note


def paired(a, b, f):
    """Median of f(a_seconds, b_seconds) over the rounds where both were quiet (else all): a per-round ratio
    cancels the slow drifts of a shared VM's speed that separate medians keep."""
    both = [(x, y) for (x, ox), (y, oy) in zip(a, b) if max(ox, oy) < QUIET]
    both = both if len(both) >= 2 else [(x, y) for (x, _), (y, _) in zip(a, b)]
    return statistics.median(f(x, y) for x, y in both)


def machine_info():
    """CPU model, cores, torch threads, the load and the commit."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown")
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    return (f"CPU: {cpu}; {os.cpu_count()} logical cores, {len(os.sched_getaffinity(0))} usable; torch "
            f"{torch.__version__} with {torch.get_num_threads()} intra-op threads; commit {commit}; load average "
            f"at start (1/5/15 min): {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


def with_ceiling(fn, *a, dtype=torch.float32):
    """measure(fn) between two samples of the matmul ceiling in dtype, each the median of 5 MM_N² torch.mm
    -> (wall, others), fn's result, (mean ceiling seconds, the worse others)."""
    m = torch.randn(MM_N, MM_N, dtype=dtype)
    torch.mm(m, m)  # the first call pays for MKL's buffers
    # 5 products as one block: the CPU counters tick every 10 ms, too coarse for one ~50 ms product
    ceiling = lambda: measure(lambda: statistics.median(measure(torch.mm, m, m)[0] for _ in range(5)))
    before, (wall, others, out), after = ceiling(), measure(fn, *a), ceiling()
    return (wall, others), out, ((before[2] + after[2]) / 2, max(before[1], after[1]))


def macs(module):
    """Multiply-adds per input row of every Linear in module."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


def train_flops(model):
    """FLOP per training image: 2 per multiply-add forward, 4 backward (weight and input gradients), less the first
    layer's input gradient, which no step computes (the images need none)."""
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 6 * macs(model) - 2 * first.in_features * first.out_features


# ----------------------------------------------------------------------------- rows 1-3: training
def new_model(args):
    torch.manual_seed(args.seed)
    return BetaVAE(VAEConfig(hidden=tuple(args.hidden), latent_dim=args.latent_dim))


def conventional_epoch(args, data_dir, limit, num_workers):
    """pytorch/examples/vae: torchvision MNIST + ToTensor, shuffled DataLoader, default Adam, .item() per step."""
    from torchvision import datasets, transforms
    dataset = datasets.MNIST(root=data_dir, train=True, transform=transforms.ToTensor())
    dataset = torch.utils.data.Subset(dataset, range(limit)) if limit else dataset
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=num_workers)
    model = new_model(args)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)  # the examples' plain Adam (for-loop kernel on CPU)

    def epoch(e):
        model.train()
        for i, (xb, _) in enumerate(loader):
            xb = xb.view(-1, 784)
            t = e - 1 + i / len(loader)  # the project's schedules, so that both do identical work per step
            for group in opt.param_groups:
                group["lr"] = utils.get_lr(t, args)
            opt.zero_grad()
            logits, mu, logvar = model(xb)
            loss = utils.objective(*utils.vae_terms(logits, xb, mu, logvar, args.loss, args.free_bits), t, args)
            loss.backward()
            loss.item()  # the examples' train_loss += loss.item(): one host sync per step
            opt.step()
    return epoch


def project_epoch(args, train_x, precision):
    """The project's own `utils.train_epoch` on a fresh model and optimiser, in fp32 or bf16 -> (epoch fn, model)."""
    args = argparse.Namespace(**{**vars(args), "precision": precision})
    model = new_model(args)
    opt = utils.make_optimizer(model, args.lr)
    return lambda e: utils.train_epoch(model, opt, train_x, args, e, show_progress=False), model


def network_epoch(args, n, precision):
    """The network's own share of an epoch: forward, backward and a fused Adam step on one batch, once per batch of
    n images, with no loss terms, gradient norm or bookkeeping -> epoch fn. Its fp32/bf16 caps the project step's."""
    model = new_model(args)
    opt, xb = utils.make_optimizer(model, args.lr), torch.rand(args.batch_size, model.config.input_dim)

    def epoch(e):
        for _ in range(-(-n // args.batch_size)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits, mu, logvar = model(xb)
            (logits.float().sum() + mu.float().sum() + logvar.float().sum()).backward()  # the cheapest scalar
            opt.step()
            opt.zero_grad(set_to_none=True)
    return epoch


def matmul_epoch(args, n, precision):
    """An epoch's matrix products alone, in the precision's dtype: each Linear's forward product and its backward
    weight and input products (none for the first layer's input), once per batch of n images -> epoch fn."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    layers = [m for m in new_model(args).modules() if isinstance(m, torch.nn.Linear)]
    operands = [(torch.randn(args.batch_size, m.in_features, dtype=dtype), m.weight.detach().to(dtype),
                 m.bias.detach().to(dtype), torch.randn(args.batch_size, m.out_features, dtype=dtype)) for m in layers]

    def epoch(e):
        for _ in range(-(-n // args.batch_size)):
            for i, (x, w, b, grad_out) in enumerate(operands):
                torch.addmm(b, x, w.t())
                grad_out.t().mm(x)
                if i:
                    grad_out.mm(w)
    return epoch


# The two contenders of each ratio run back to back, their order alternating from round to round (ABBA).
PAIRS = (("project", "project_bf16"), ("network_fp32", "network_bf16"), ("matmul_fp32", "matmul_bf16"), ("conv0",),
         ("conv1",))


def round_order(r):
    """-> the contenders of round r: the PAIRS in a shuffled order (no pair always follows the same one), each pair
    back to back, fp32 first in even rounds and last in odd ones, so that neither always runs on a warmer machine."""
    return [k for pair in random.Random(r).sample(PAIRS, len(PAIRS)) for k in (pair if r % 2 == 0 else pair[::-1])]


def run_training(args, opts, train_x):
    """Round-robin epochs after an untimed warm-up, each between two ceiling samples (bf16's in bf16), so that a
    share of the ceiling compares the same minute of a drifting VM -> (times, {precision: ceilings}, fp32 model)."""
    (fp32, model), (bf16, _) = project_epoch(args, train_x, "fp32"), project_epoch(args, train_x, "bf16")
    n = train_x.shape[0]
    contenders = {"project": fp32, "project_bf16": bf16,
                  **{f"{part}_{p}": f(args, n, p) for part, f in (("network", network_epoch), ("matmul", matmul_epoch))
                     for p in ("fp32", "bf16")},
                  **{f"conv{w}": conventional_epoch(args, opts.data_dir, opts.limit, w) for w in (0, 1)}}
    for fn in contenders.values():  # warm-up: allocator, Adam state, worker start-up
        fn(1)
    times, ceilings = {k: [] for k in contenders}, {"project": [], "project_bf16": []}
    for r in range(opts.reps):
        for k in round_order(r):
            dtype = torch.bfloat16 if k == "project_bf16" else torch.float32
            sample, _, ceiling = with_ceiling(contenders[k], 2 + r, dtype=dtype)  # the project's ceilings are used
            times[k].append(sample)
            if k in ceilings:
                ceilings[k].append(ceiling)
    return times, ceilings, model


def training_rows(times, ceilings, n, fpi, bs):
    rows = []
    for k, dtype in (("project", "float32"), ("project_bf16", "bfloat16")):
        ceil, ceil_spread, ceil_note = summary(ceilings[k], "{:.1f}", per=lambda s: MM_FLOPS / s / 1e9)
        rows.append(("1", f"{dtype} matmul ceiling ({MM_N}² torch.mm)", f"{ceil:.1f} GFLOP/s", ceil_spread,
                     f"medians of 5 mm just before and after each project {dtype} epoch; {ceil_note}"))
    for k, precision in (("project", "fp32"), ("project_bf16", "bf16")):
        proj, proj_spread, proj_note = summary(times[k])
        gflops, gf_spread, _ = summary(times[k], "{:.1f}", per=lambda s: n * fpi / s / 1e9)
        share = paired(times[k], ceilings[k], lambda t, mm: (n * fpi / t) / (MM_FLOPS / mm))
        ratio = paired(times["project"], times[k], lambda a, b: a / b)
        speedup = "" if k == "project" else f"**fp32/bf16 = {ratio:.2f}×** (median per-round ratio); "
        rows += [("2", f"project `utils.train_epoch`, batch {bs}, `--precision {precision}`", f"{proj:.2f} s/epoch",
                  proj_spread, f"{n} images/epoch ({n / proj:,.0f}/s), preloaded tensors; {speedup}{proj_note}"),
                 ("2", "… achieved GFLOP/s (% of its ceiling)", f"{gflops:.1f} (**{100 * share:.0f}%**)", gf_spread,
                  f"{fpi / 1e6:.2f} MFLOP/image (`train_flops`); % = median per-round ratio")]
    for part, what, meaning in (
            ("network", "the network alone: forward, backward, fused Adam; no loss terms", "the most the project step "
             "could gain were its loss terms, gradient norm and bookkeeping free"),
            ("matmul", "its matrix products alone: each Linear's forward and backward products", "the most any step "
             "could gain were everything but the matrix products free")):
        (a, a_spread, a_note), (b, b_spread, b_note) = (summary(times[f"{part}_{p}"]) for p in ("fp32", "bf16"))
        ratio = paired(times[f"{part}_fp32"], times[f"{part}_bf16"], lambda x, y: x / y)
        rows.append(("2", f"… {what}, fp32 / bf16", f"{a:.2f} / {b:.2f} s/epoch", f"{a_spread} / {b_spread}",
                     f"**fp32/bf16 = {ratio:.2f}×** (median per-round ratio): {meaning}; {a_note} / {b_note}"))
    for w, what in ((0, "DataLoader's default"), (1, "the examples' CUDA kwargs")):
        t, t_spread, t_note = summary(times[f"conv{w}"])
        ratio = paired(times[f"conv{w}"], times["project"], lambda c, p: c / p)
        rows.append(("3", f"pytorch/examples loop, num_workers={w} ({what})", f"{t:.2f} s/epoch", t_spread,
                     f"**(3)/(2) = {ratio:.2f}×** (median per-round ratio); {t_note}"))
    return rows


# ----------------------------------------------------------------------------- rows 4-6: analysis of a model
def tsne_rows(mu, y, args, reps):
    """The project's t-SNE of the test latents (openTSNE, 500 iterations); its first map is scored with KMeans."""
    samples = [measure(utils.tsne_embedding, mu, args.seed, 500) for _ in range(reps)]
    sc = utils.clustering_scores(samples[0][2], y, "kmeans", range(args.seed, args.seed + args.kmeans_seeds))
    t, t_spread, note = summary([x[:2] for x in samples], "{:.1f}")
    return [("4", f"t-SNE of {len(mu)} test μ, `utils.tsne_embedding` (openTSNE FFT, 500 it)", f"{t:.1f} s",
             t_spread, f"KMeans ACC on its map {sc['acc_mean']:.3f} ± {sc['acc_std']:.3f}, NMI {sc['nmi_mean']:.3f} "
             f"({len(sc['seeds'])} seeds); {note}")]


def evaluation_rows(model, mu, test_x, test_y, args, reps):
    """Test −ELBO (1 and 10 z), the IW bound at the demo's K and KMeans, as a default run computes them."""
    seeds = range(args.seed, args.seed + args.kmeans_seeds)
    jobs = [("test −ELBO, `utils.evaluate` (10k, 1 z each: after every epoch)", "−ELBO {:.2f} nats",
             lambda: utils.evaluate(model, test_x, args.loss)["neg_elbo"]),
            ("test −ELBO, `utils.evaluate` (10k, 10 z each: the final one)", "−ELBO {:.2f} nats",
             lambda: utils.evaluate(model, test_x, args.loss, draws=10)["neg_elbo"]),
            (f"`measures.iw_log_likelihood`, K={args.iw_samples} (10k)", "IW estimate of log p(x) {:.2f} nats",
             lambda: measures.iw_log_likelihood(model, test_x, args.iw_samples, args.loss)[0].mean().item()),
            (f"KMeans on test μ, `clustering_scores`, {args.kmeans_seeds} seeds", "ACC {:.3f}",
             lambda: utils.clustering_scores(mu, test_y.numpy(), "kmeans", seeds)["acc_mean"])]
    samples = [[measure(fn) for _, _, fn in jobs] for _ in range(reps)]  # interleaved: one of each per round
    rows = []
    for j, (label, fmt, _) in enumerate(jobs):
        t, t_spread, note = summary([r[j][:2] for r in samples])
        rows.append(("5", label, f"{t:.2f} s", t_spread, f"{fmt.format(samples[-1][j][2])}; {note}"))
    return rows


def iw_rows(model, x, kind, k, reps):
    """The IW bound at large K (issue 15): seconds, decoder passes/s and share of the ceiling around each rep."""
    runs = [with_ceiling(measures.iw_log_likelihood, model, x, k, kind) for _ in range(reps)]
    (n, ll), times, ceilings = (x.shape[0], runs[-1][1]), [r[0] for r in runs], [r[2] for r in runs]
    dec, enc = 2 * macs(model.decoder), 2 * macs(model.encoder)  # 2 FLOP per multiply-add, forward only
    flop = n * (enc + k * dec)
    t, t_spread, note = summary(times)
    pps, pps_spread, _ = summary(times, "{:,.0f}", per=lambda s: n * k / s)
    gflops, gf_spread, _ = summary(times, "{:.1f}", per=lambda s: flop / s / 1e9)
    ceil = summary(ceilings, per=lambda s: MM_FLOPS / s / 1e9)[0]
    share = paired(times, ceilings, lambda s, mm: (flop / s) / (MM_FLOPS / mm))
    return [("6", f"`measures.iw_log_likelihood`, K={k}, first {n} test images", f"{t:.2f} s", t_spread,
             f"IW estimate of log p(x) {ll[0].mean():.2f} ± {ll[1].sum().sqrt() / n:.2f} (MC se) nats; {note}"),
            ("6", "… decoder passes/s (image × sample)", f"{pps:,.0f}", pps_spread, f"{n * k:,} passes"),
            ("6", "… achieved GFLOP/s (% of ceiling)", f"{gflops:.1f} (**{100 * share:.0f}%**)", gf_spread,
             f"{dec / 1e6:.2f} MFLOP per decoder pass + {enc / 1e6:.2f} per image for the encoder; ceiling "
             f"{ceil:.0f} GFLOP/s around each repetition; % = median per-repetition ratio")]


# ----------------------------------------------------------------------------- row 7: full runs
# A fresh interpreter whose only child is the demo run, so RUSAGE_CHILDREN is that run's alone (DataLoader
# workers forked by this script would otherwise count). ru_maxrss is the largest single descendant's peak.
RSS_WRAPPER = ("import resource, subprocess, sys, time; t0 = time.perf_counter(); "
               "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
               "print(rc, time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def full_run_row(data_dir, extra):
    """python demo_script.py [extra] in the wrapper; data_dir None = a first run that provisions an empty folder."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "demo_script.py"), "--out-dir", tmp, "--no-progress",
               "--data-dir", data_dir or str(Path(tmp, "empty-data-dir")), *shlex.split(extra)]
        _, others, res = measure(subprocess.run, [sys.executable, "-c", RSS_WRAPPER, *cmd],
                                 capture_output=True, text=True, check=True)
        rc, wall, rss_kib = res.stdout.split()
        metrics = Path(tmp, "metrics.json")
        phases = json.loads(metrics.read_text())["timings"] if metrics.is_file() else {}
    what = "MNIST in --data-dir" if data_dir else "first run, empty --data-dir (provisions MNIST)"
    quiet = "quiet" if others < QUIET else f"CONTENDED: others used {100 * others:.0f}% of the cores"
    error = "".join(f" ({line})" for line in res.stderr.strip().splitlines()[-1:] if rc != "0")  # why it failed
    return ("7", f"`demo_script.py {extra or 'defaults'}`, {what}", f"{float(wall):.0f} s, peak RSS "
            f"{int(rss_kib) / 1024:,.0f} MiB", "1 run", f"exit {rc}{error}; {quiet}; its phases (s): "
            + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))


# ----------------------------------------------------------------------------- main
def main(argv=None):
    utils.flush_denormals()  # as demo_script.main, before torch starts its threads
    opts = parse(argv)
    args = demo_script.parse_args([])  # the project's defaults: batch size, model, loss, schedules, K, seeds
    measures.return_large_frees_to_the_os()  # as demo_script.run: row 6's IW bound runs after row 2's training
    header = [f"# Beta-VAE speed benchmark ({time.strftime('%Y-%m-%d %H:%M')})", "", machine_info()]
    print("\n".join(header), flush=True)
    train_x, _, test_x, test_y = data.load_mnist(opts.data_dir)
    train_x, rows, source = train_x[:opts.limit].contiguous(), [], ""
    if "train" in opts.only:
        print(f"section train: {opts.reps} interleaved rounds after a warm-up epoch", flush=True)
        times, ceilings, model = run_training(args, opts, train_x)
        rows += training_rows(times, ceilings, train_x.shape[0], train_flops(model), args.batch_size)
        source = f"the project model trained {opts.reps + 1} epochs above (default schedules)"
    if opts.checkpoint:
        state = utils.load_checkpoint(opts.checkpoint)
        model, source = BetaVAE(demo_script.model_config(state["config"])), f"{opts.checkpoint} ({state['epoch']} ep.)"
        model.load_state_dict(state["model"])
    mu = utils.encode_means(model, test_x)[0].numpy() if {"tsne", "eval"} & set(opts.only) else None
    sections = {"tsne": lambda: tsne_rows(mu, test_y.numpy(), args, opts.tsne_reps),
                "eval": lambda: evaluation_rows(model, mu, test_x, test_y, args, opts.eval_reps),
                "iw": lambda: iw_rows(model, test_x[:opts.iw_images], args.loss, opts.iw_k, opts.eval_reps),
                "warm": lambda: [full_run_row(opts.data_dir, opts.demo_args)],
                "first": lambda: [full_run_row(None, opts.demo_args)]}
    for name in [s for s in sections if s in opts.only]:
        print(f"section {name}", flush=True)
        rows += sections[name]()
    header += [f"Model for rows 4–6: {source or 'none'}. Load average at end: "
               f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}. What each row measures: benchmarks/README.md.",
               "", "| # | measurement | median | spread (min–max) | notes |", "|---|---|---|---|---|"]
    table = "\n".join(header + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"
    print(table)
    out = opts.out or (str(ROOT / "benchmarks" / "results.md") if set(opts.only) == set(SECTIONS) else None)
    if out:
        Path(out).write_text(table)
        print(f"written to {out}")


if __name__ == "__main__":
    main()
