"""Time a block and measure how much of the machine other processes took meanwhile (Linux /proc).

On a shared 2-core machine a neighbour with its own OpenMP threads can slow a PyTorch epoch by 10x or more,
so every timing carries `others`: the share of all cores that was busy outside this process tree (including
hypervisor steal) during the block. Samples with a small share are the ones to believe.
"""
import os
import statistics
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
QUIET = 0.05  # a sample is "quiet" when neighbours used under 5% of the cores


def machine_busy_seconds():
    """CPU-seconds spent busy on all cores since boot: user, nice, system, irq, softirq, steal (not idle/iowait)."""
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / TICK


def tree_pids(pid):
    """pid and all its descendants (DataLoader workers, for instance)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except OSError:  # the child exited meanwhile
                pass
    return out


def tree_seconds(pid=None):
    """CPU-seconds used so far by this process tree: threads, live descendants and the reaped ones."""
    total = 0.0
    for p in tree_pids(pid or os.getpid()):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15]) / TICK  # utime, stime, cutime, cstime
    return total


def measure(fn, *a, **kw):
    """-> (wall seconds, share of all cores used by others meanwhile, fn's result)."""
    busy0, mine0, t0 = machine_busy_seconds(), tree_seconds(), time.perf_counter()
    out = fn(*a, **kw)
    wall = time.perf_counter() - t0
    others = machine_busy_seconds() - busy0 - (tree_seconds() - mine0)
    return wall, max(0.0, others / (wall * os.cpu_count())), out


def quiet_median(samples, min_quiet=2):
    """samples: [(seconds, others)] -> (median seconds, min, max, 'n quiet of m') over the quiet samples when there
    are at least min_quiet of them, else over all (and the note says so)."""
    quiet = [s for s, o in samples if o < QUIET]
    use = quiet if len(quiet) >= min_quiet else [s for s, _ in samples]
    note = f"{len(quiet)}/{len(samples)} quiet" + ("" if use is quiet else ", CONTENDED: median of all")
    return statistics.median(use), min(use), max(use), note
