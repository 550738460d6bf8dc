"""Denormal floats in Adam's state slow training: python benchmarks/denormals.py [--pairs 3] [--epochs 6]

Inputs near MNIST's border are almost always 0, so the first-layer weights they feed get a gradient only now
and then; in between, Adam's exp_avg decays by beta1 = 0.9 per step through the float32 denormal range
(< 1.2e-38), where x86 arithmetic takes a slow path. After two epochs about a sixth of exp_avg is denormal.

Flush-to-zero / denormals-are-zero (torch.set_flush_denormal) is a per-thread CPU flag, and a thread takes it
from its creator only at creation. Each mode below trains a fresh model for --epochs epochs in its own process:
  off     torch's default
  thread  flag set on the calling thread after torch's OpenMP pool exists (what train_epoch can do)
  all     flag set before the pool exists, so every worker inherits it
Modes run interleaved, --pairs times each; the table gives the median seconds of epochs 3.. over the quiet runs.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cpuload  # noqa: E402

CHILD = r'''
import json, sys, time, torch
mode, epochs, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if mode == "all":
    torch.set_flush_denormal(True)  # before any parallel region: the OpenMP workers are created with it
sys.path.insert(0, root)
import data, demo_script, utils
from model import BetaVAE, VAEConfig
args = demo_script.parse_args([])
x = data.load_mnist(root + "/data")[0]
torch.mm(torch.randn(512, 512), torch.randn(512, 512))  # the pool exists from here on
if mode == "thread":
    torch.set_flush_denormal(True)
torch.manual_seed(0)
model = BetaVAE(VAEConfig())
opt = utils.make_optimizer(model, args.lr)
times = []
for e in range(1, epochs + 1):
    t0 = time.perf_counter()
    utils.train_epoch(model, opt, x, args, e, show_progress=False)
    times.append(time.perf_counter() - t0)
tiny = sum(int(((s["exp_avg"] != 0) & (s["exp_avg"].abs() < 1.1754943508222875e-38)).sum())
           for s in opt.state.values())
print(json.dumps(dict(times=times, denormal=tiny, total=sum(p.numel() for p in model.parameters()))))
'''


def run_mode(mode, epochs):
    cmd = [sys.executable, "-c", CHILD, mode, str(epochs), str(ROOT)]
    _, others, res = cpuload.measure(subprocess.run, cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout), others


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6)
    a = p.parse_args(argv)
    modes = ["off", "thread", "all"]
    runs = {m: [] for m in modes}
    for r in range(a.pairs):
        for m in modes[r % 3:] + modes[:r % 3]:  # rotate the order every round
            runs[m].append(run_mode(m, a.epochs))
    print(f"| mode | s/epoch, epochs 3-{a.epochs} | min-max | denormal exp_avg entries | runs |\n|---|---|---|---|---|")
    for m in modes:
        samples = [(statistics.median(out["times"][2:]), others) for out, others in runs[m]]
        med, lo, hi, note = cpuload.quiet_median(samples)
        out = runs[m][-1][0]
        print(f"| {m} | {med:.2f} | {lo:.2f}-{hi:.2f} | {out['denormal']:,} of {out['total']:,} | {note} |")


if __name__ == "__main__":
    main()
