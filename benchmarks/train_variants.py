"""A/B variants of utils.train_epoch, timed interleaved: python benchmarks/train_variants.py [--only SUBSTR ...]

Every variant is `epoch(model, opt, x, args, epoch)` doing the same forward, loss, backward and Adam step as
utils.train_epoch; they differ only in the per-step extras (grad norm, statistics, NaN check, batch gather,
threads, Adam kernel), in compiling forward and loss, or in stepping Adam from backward hooks. Each round runs
every variant once in a shuffled order, so a neighbour process loading the CPU hits all of them alike; the table
gives the median seconds per 60k-image epoch with min-max. This is the evidence behind the choices in
utils.train_epoch and utils.make_optimizer.
"""
import argparse
import math
import random
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cpuload  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)
import data  # noqa: E402
import demo_script  # noqa: E402
import utils  # noqa: E402
from model import BetaVAE, VAEConfig  # noqa: E402


def clip_norm(params):
    # max_norm=inf still runs _clip_grads_with_norm_, which multiplies every gradient by 1.0: an extra pass.
    return torch.nn.utils.clip_grad_norm_(params, float("inf"))


def total_norm(params):
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def foreach_norm(params):
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params])))


NORMS = {"none": None, "clip": clip_norm, "total": total_norm, "foreach": foreach_norm}


def stacked_stats(state, i, recon, kl, gnorm, loss, b):
    """The bookkeeping utils.train_epoch had: ~10 small tensor ops per step, no host sync."""
    step = torch.stack([recon * b, kl * b, gnorm])
    state["sums"] += step
    bad = (state["first_bad"] < 0) & ~torch.isfinite(step.sum() + loss)
    state["first_bad"] = torch.where(bad, i, state["first_bad"])


def listed_stats(state, i, recon, kl, gnorm, loss, b):
    """No tensor op per step: keep the 0-d results, stack them every 50 steps (as utils.train_epoch does now)."""
    state["rows"].append((recon, kl, gnorm, loss))


def make_variant(norm="total", stats=listed_stats, gather="index", threads=None):
    """-> epoch function with the chosen grad norm, bookkeeping, batch gather and thread count."""
    def epoch_fn(model, opt, x, args, epoch):
        old = torch.get_num_threads()
        torch.set_num_threads(threads or old)
        try:
            return run_epoch(model, opt, x, args, epoch, NORMS[norm], stats, gather)
        finally:
            torch.set_num_threads(old)
    return epoch_fn


def run_epoch(model, opt, x, args, epoch, norm_fn, stats, gather, terms=None):
    model.train()
    n, bs = x.shape[0], args.batch_size
    steps, perm = math.ceil(n / bs), torch.randperm(n)
    xs = x[perm] if gather == "prepermute" else x  # one big gather per epoch, then contiguous slices
    params = list(model.parameters())
    norm_fn = getattr(opt, "grad_norm", norm_fn)  # AdamInBackward measures the norm in its hooks
    state = dict(sums=torch.zeros(3), first_bad=torch.full((), -1), rows=[])
    for i in range(steps):
        t = epoch - 1 + i / steps
        for group in opt.param_groups:
            group["lr"] = utils.get_lr(t, args)
        xb = xs[i * bs:(i + 1) * bs] if gather == "prepermute" else x[perm[i * bs:(i + 1) * bs]]
        if terms:
            recon, kl, kl_fb = terms(xb)
        else:
            logits, mu, logvar = model(xb)
            recon, kl, kl_fb = utils.vae_terms(logits, xb, mu, logvar, args.loss, args.free_bits)
        loss = utils.objective(recon, kl, kl_fb, t, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = norm_fn(params) if norm_fn else torch.zeros(())
        opt.step()
        if stats:
            stats(state, i, recon.detach(), kl.detach(), gnorm, loss.detach(), xb.shape[0])


def current(model, opt, x, args, epoch):
    return utils.train_epoch(model, opt, x, args, epoch, show_progress=False)


def foreach_adam(model, lr):
    return torch.optim.Adam(model.parameters(), lr=lr, foreach=True)


def compiled_epoch(model, opt, x, args, epoch):
    """Forward and loss through torch.compile, which fuses the element-wise kernels into C++ loops."""
    # The first call, in the untimed warm-up epoch, pays the compilation.
    if not hasattr(model, "_compiled_terms"):
        def terms(xb):
            logits, mu, logvar = model(xb)
            return utils.vae_terms(logits, xb, mu, logvar, args.loss, args.free_bits)
        model._compiled_terms = torch.compile(terms, dynamic=False)
    return run_epoch(model, opt, x, args, epoch, total_norm, listed_stats, "index", terms=model._compiled_terms)


class AdamInBackward:
    """One fused Adam per parameter, stepped from backward as soon as its gradient is final (optimizer-in-backward)."""
    # The idea: update each weight while its gradient is still in cache. The hook records the gradient's norm first.

    def __init__(self, model, lr):
        self.opts = {p: torch.optim.Adam([p], lr=lr, fused=True) for p in model.parameters()}
        self.norms = []
        for p in self.opts:
            p.register_post_accumulate_grad_hook(self.step_one)
        self.param_groups = [o.param_groups[0] for o in self.opts.values()]  # run_epoch sets lr through these

    def step_one(self, p):
        self.norms.append(torch.linalg.vector_norm(p.grad))
        self.opts[p].step()
        p.grad = None

    def zero_grad(self, set_to_none=True):
        self.norms = []

    def step(self):
        pass  # done in backward

    def grad_norm(self, params):
        return torch.linalg.vector_norm(torch.stack(self.norms))


# name -> (epoch function, optimiser factory)
VARIANTS = {
    "utils.train_epoch (current file)": (current, utils.make_optimizer),
    "before: clip_grad_norm_ + stacked stats": (make_variant("clip", stacked_stats), utils.make_optimizer),
    "get_total_norm + stacked stats": (make_variant("total", stacked_stats), utils.make_optimizer),
    "get_total_norm + listed stats": (make_variant("total", listed_stats), utils.make_optimizer),
    "_foreach_norm + listed stats": (make_variant("foreach", listed_stats), utils.make_optimizer),
    "bare step (no norm, no stats)": (make_variant("none", None), utils.make_optimizer),
    "listed, pre-permuted x": (make_variant(gather="prepermute"), utils.make_optimizer),
    "listed, 1 thread": (make_variant(threads=1), utils.make_optimizer),
    "listed, foreach Adam": (make_variant(), foreach_adam),
    "listed, torch.compile forward + loss": (compiled_epoch, utils.make_optimizer),
    "listed, Adam in backward (per-parameter hooks)": (make_variant(), AdamInBackward),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="quiet samples wanted per variant (default: 5)")
    p.add_argument("--max-rounds", type=int, default=15, help="give up waiting for quiet after this many")
    p.add_argument("--limit", type=int, default=60000, help="training images per epoch (default: all 60000)")
    p.add_argument("--only", nargs="*", default=None, help="substrings of the variant names to run")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    args = demo_script.parse_args([])
    x = data.load_mnist(ROOT / "data")[0][:a.limit].contiguous()
    names = [k for k in VARIANTS if a.only is None or any(s in k for s in a.only)]
    runs, samples = {}, {k: [] for k in names}
    for k in names:  # own model and optimiser per variant, warmed by one untimed epoch (allocator, Adam state)
        torch.manual_seed(0)
        model = BetaVAE(VAEConfig(hidden=tuple(args.hidden), latent_dim=args.latent_dim))
        runs[k] = (VARIANTS[k][0], model, VARIANTS[k][1](model, args.lr))
        runs[k][0](*runs[k][1:], x, args, 1)
    for r in range(a.max_rounds):
        random.Random(r).shuffle(names)
        for k in names:
            fn, model, opt = runs[k]
            wall, others, _ = cpuload.measure(fn, model, opt, x, args, 2 + r)
            samples[k].append((wall * 60000 / a.limit, others))
        if r + 1 >= a.rounds and all(sum(o < cpuload.QUIET for _, o in v) >= a.rounds for v in samples.values()):
            break
    report(samples, a.limit)


def report(samples, limit):
    """Median s/epoch over quiet samples, and the median per-round ratio to the first variant: rounds take
    about a second, so the ratio cancels drifts of the machine's speed that a plain median cannot."""
    names = [k for k in VARIANTS if k in samples]
    base = samples[names[0]]
    print(f"| variant | s per 60k epoch, median | min-max | per-round ratio to first row (IQR) | samples |  "
          f"({limit} images per call, {torch.get_num_threads()} threads)\n|---|---|---|---|---|")
    for k in names:
        m, lo, hi, note = cpuload.quiet_median(samples[k])
        ratios = [s / b for (s, o), (b, ob) in zip(samples[k], base) if max(o, ob) < cpuload.QUIET]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [float("nan")] * 3
        print(f"| {k} | {m:.2f} | {lo:.2f}-{hi:.2f} | {q[1]:.3f} ({q[0]:.3f}-{q[2]:.3f}) | {note} |")


if __name__ == "__main__":
    main()
