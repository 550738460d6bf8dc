"""Grid throughput: one β × seed grid run sequentially (2 threads per model), by --workers 2 (1 thread each) and on a
Dask cluster of two 1-thread workers on this machine. Prints a Markdown table of wall time and runs per hour.

    python benchmarks/grid.py                          # 2 βs x 2 seeds x 3 epochs on all images, quick analysis
    python benchmarks/grid.py --epochs 1 --limit 2000  # a smoke run

Run it on a quiet machine: other processes' load changes every number (the load average is printed with the table).
Targets: --workers 2 at least 1.2x sequential; Dask within 10% of the pool.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The analysis at small sizes, so that the grid's training and the executors dominate the time.
QUICK = ["--tsne-points", "1000", "--iw-samples", "10", "--kmeans-seeds", "2", "--umap-seeds", "0",
         "--test-limit", "2000", "--no-progress"]


def grid_seconds(argv, out):
    """Wall seconds of one `demo_script.py` grid into a fresh folder."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "demo_script.py"), *argv, "--out-dir", str(out)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def measure(grid, tmp):
    """-> [(executor, threads per model, seconds)] for the sequential loop, the process pool and Dask."""
    from distributed import LocalCluster
    rows = [("sequential", 2, grid_seconds(grid + ["--threads", "2"], tmp / "sequential")),
            ("--workers 2", 1, grid_seconds(grid + ["--workers", "2", "--threads", "1"], tmp / "pool"))]
    # Started before the clock, as a running cluster would be; process workers, like `dask worker`.
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        flags = ["--scheduler", cluster.scheduler_address, "--threads", "1"]
        rows.append(("Dask, 2 workers x 1 thread", 1, grid_seconds(grid + flags, tmp / "dask")))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--betas", nargs="+", default=["0.5", "2"], help="the grid's βs (default: 0.5 2)")
    p.add_argument("--seeds", nargs="+", default=["1", "2"], help="its training seeds (default: 1 2)")
    p.add_argument("--epochs", default="3", help="epochs per model (default: 3)")
    p.add_argument("--limit", default=None, help="training images per model (default: all)")
    o = p.parse_args()
    grid = ["--beta-sweep", *o.betas, "--train-seeds", *o.seeds, "--epochs", o.epochs, *QUICK]
    grid += ["--limit", o.limit] if o.limit else []
    runs, load = len(o.betas) * len(o.seeds), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(grid, Path(tmp))
    base, pool = rows[0][2], rows[1][2]
    print(f"{runs} runs ({len(o.betas)} βs x {len(o.seeds)} seeds, {o.epochs} epochs, limit {o.limit or 'all'}) "
          f"on {os.cpu_count()} cores; load average before: {load:.2f}\n")
    print("| executor | threads per model | wall (s) | runs per hour | vs sequential | vs pool |")
    print("|---|---|---|---|---|---|")
    for name, threads, sec in rows:
        print(f"| {name} | {threads} | {sec:.1f} | {3600 * runs / sec:.1f} | {base / sec:.2f}x | {pool / sec:.2f}x |")


if __name__ == "__main__":
    main()
