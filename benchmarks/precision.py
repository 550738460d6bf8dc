"""bf16 against fp32 training: test -ELBO over training seeds, and epoch seconds measured interleaved.

python benchmarks/precision.py                      # 3 seeds x 30 epochs at each precision (the accuracy check)
python benchmarks/precision.py --seeds 20 --epochs 4  # a quick look
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import demo_script  # noqa: E402
import utils  # noqa: E402
from model import BetaVAE  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def parse(argv=None):
    p = argparse.ArgumentParser(description="bf16 against fp32: accuracy over seeds and interleaved epoch times.")
    p.add_argument("--seeds", type=int, nargs="+", default=[20, 21, 22], help="training seeds (default: 20 21 22)")
    p.add_argument("--epochs", type=int, default=30, help="epochs per run (default: 30)")
    p.add_argument("--data-dir", default=str(ROOT / "data"), help="MNIST (default: ROOT/data)")
    return p.parse_args(argv)


def new_run(seed, precision, epochs, data_dir, out):
    """-> (args, model, optimizer) of a default run at this seed and precision, seeded as demo_script.run seeds it."""
    args = demo_script.parse_args(["--seed", str(seed), "--precision", precision, "--epochs", str(epochs),
                                   "--data-dir", data_dir, "--out-dir", out, "--no-progress"])
    utils.set_seed(seed)
    model = BetaVAE(demo_script.model_config(vars(args)))
    return args, model, utils.make_optimizer(model, args.lr)


def interleaved_runs(opts, train_x, test_x):
    """Every (seed, precision) run trained one epoch at a time in turn -> {(seed, precision): (epoch seconds, test)}."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs, rng = {}, {}
        for key in [(s, p) for s in opts.seeds for p in PRECISIONS]:
            runs[key] = new_run(*key, opts.epochs, opts.data_dir, str(Path(tmp, "-".join(map(str, key)))))
            rng[key] = torch.get_rng_state()  # each run keeps its own stream: as if it ran alone
        seconds = {k: [] for k in runs}
        for epoch in range(1, opts.epochs + 1):  # round robin: a drifting VM slows every contender alike
            for key, (args, model, opt) in runs.items():
                torch.set_rng_state(rng[key])
                t0 = time.perf_counter()
                utils.train_epoch(model, opt, train_x, args, epoch, show_progress=False)
                seconds[key].append(time.perf_counter() - t0)
                rng[key] = torch.get_rng_state()
        for key, (args, model, _) in runs.items():
            results[key] = (seconds[key], utils.evaluate(model, test_x, args.loss, draws=10)["neg_elbo"])
    return results


def table(results, opts):
    """-> the Markdown table: per precision, test -ELBO mean ± sample std over seeds, median epoch seconds, ratio."""
    lines = ["| precision | test −ELBO, mean ± std over seeds | per seed | median s/epoch |", "|---|---|---|---|"]
    medians = {}
    for p in PRECISIONS:
        elbos = [results[(s, p)][1] for s in opts.seeds]
        medians[p] = statistics.median(t for s in opts.seeds for t in results[(s, p)][0][1:])  # epoch 1 warms up
        spread = f" ± {statistics.stdev(elbos):.2f}" if len(elbos) > 1 else ""
        lines.append(f"| {p} | {statistics.fmean(elbos):.2f}{spread} | {', '.join(f'{e:.2f}' for e in elbos)} | "
                     f"{medians[p]:.2f} |")
    lines.append(f"\nfp32 / bf16 epoch time: {medians['fp32'] / medians['bf16']:.2f}x")
    return "\n".join(lines)


def main(argv=None):
    utils.flush_denormals()  # as demo_script.main, before torch starts its threads
    opts = parse(argv)
    train_x, _, test_x, _ = data.load_mnist(opts.data_dir)
    print(f"{len(opts.seeds)} seeds x {opts.epochs} epochs at {', '.join(PRECISIONS)}, interleaved", flush=True)
    print(table(interleaved_runs(opts, train_x, test_x), opts))


if __name__ == "__main__":
    main()
