"""Is an epoch-time change the code or the machine? python benchmarks/drift.py [--epochs 12]

Trains the default model and, just before and after every epoch, times a probe whose work never changes: a fresh,
identically seeded model and optimiser trained on the first 15,000 images (scaled x4 to a 60k epoch), plus the
2048² matmul ceiling. If the probe and the ceiling speed up and slow down together with the epoch, the change is
the machine's, not the training's.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import demo_script  # noqa: E402
import speed  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)
import utils  # noqa: E402


def timed(fn, *a):
    t0 = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=12, help="epochs to train (default: 12)")
    a = p.parse_args(argv)
    args = demo_script.parse_args([])
    x = data.load_mnist(ROOT / "data")[0]
    model = speed.new_model(args)
    opt = utils.make_optimizer(model, args.lr)

    def probe():
        m = speed.new_model(args)  # seeded: the training model's initial weights, every time
        return 4 * timed(utils.train_epoch, m, utils.make_optimizer(m, args.lr), x[:15000], args, 1, False)

    def ceiling():
        return speed.MM_FLOPS / speed.matmul_sample()[0] / 1e9

    print(f"| epoch | epoch s | probe s before, after | ceiling GFLOP/s before, after |  ({torch.get_num_threads()} "
          "threads)\n|---|---|---|---|", flush=True)
    for e in range(1, a.epochs + 1):
        p0, c0 = probe(), ceiling()
        t = timed(utils.train_epoch, model, opt, x, args, e, False)
        c1, p1 = ceiling(), probe()
        print(f"| {e} | {t:.2f} | {p0:.2f}, {p1:.2f} | {c0:.0f}, {c1:.0f} |", flush=True)


if __name__ == "__main__":
    main()
