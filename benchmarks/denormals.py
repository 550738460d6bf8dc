"""Does flushing denormal floats speed up training? python benchmarks/denormals.py [--epochs 12]

Inputs near MNIST's border are almost always 0, so the first-layer weights they feed get a gradient only now and
then; in between, Adam's exp_avg decays by beta1 = 0.9 per step into the float32 denormal range (< 1.2e-38), where
some CPUs take a slow path. torch.set_flush_denormal(True) avoids it, but it is a per-thread flag that OpenMP workers
inherit only when they are created, so it must be set before torch's first parallel region.

Two long-lived processes train the default model, one with the flag set at start-up ("flush") and one without
("default"). They take turns, one epoch each, so both see the same state of the machine: on a shared virtual
machine epoch times drift by tens of percent over minutes, far more than the effect looked for. The table gives
every epoch's time and the median per-turn ratio flush / default over epochs 3.. (denormals appear in epoch 2).
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import json, sys, time, torch
if sys.argv[1] == "flush":
    torch.set_flush_denormal(True)  # before any parallel region: the OpenMP workers are created with it
sys.path.insert(0, sys.argv[2])
import data, demo_script, utils
from model import BetaVAE, VAEConfig
args = demo_script.parse_args([])
x = data.load_mnist(sys.argv[2] + "/data")[0]
torch.manual_seed(args.seed)
model = BetaVAE(VAEConfig())
opt = utils.make_optimizer(model, args.lr)
for epoch, _ in enumerate(sys.stdin, start=1):  # one line from the parent = one epoch
    t0 = time.perf_counter()
    utils.train_epoch(model, opt, x, args, epoch, show_progress=False)
    dt = time.perf_counter() - t0
    tiny = sum(int(((s["exp_avg"] != 0) & (s["exp_avg"].abs() < 1.1754943508222875e-38)).sum())
               for s in opt.state.values())
    print(json.dumps([dt, tiny]), flush=True)
'''


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=12, help="epochs per process (default: 12)")
    a = p.parse_args(argv)
    modes = ("default", "flush")
    procs = {m: subprocess.Popen([sys.executable, "-c", CHILD, m, str(ROOT)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True) for m in modes}
    res = {m: [] for m in modes}
    for e in range(a.epochs):
        for m in (modes if e % 2 == 0 else modes[::-1]):  # alternate who goes first
            procs[m].stdin.write("go\n")
            procs[m].stdin.flush()
            res[m].append(json.loads(procs[m].stdout.readline()))  # [seconds, denormal count]
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    print("| epoch | " + " | ".join(str(e + 1) for e in range(a.epochs)) + " |\n|---|" + "---|" * a.epochs)
    for m in modes:
        print(f"| {m} s | " + " | ".join(f"{t:.2f}" for t, _ in res[m]) + " |")
    ratio = [f / d for (f, _), (d, _) in zip(res["flush"][2:], res["default"][2:])]
    print(f"\nflush / default, median per-turn ratio over epochs 3-{a.epochs}: {statistics.median(ratio):.3f} "
          f"(range {min(ratio):.2f}-{max(ratio):.2f}); denormal exp_avg entries after the last epoch: "
          f"default {res['default'][-1][1]:,}, flush {res['flush'][-1][1]:,}")


if __name__ == "__main__":
    main()
