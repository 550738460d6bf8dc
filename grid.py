"""The β × training-seed grid: members, executors (in-process, process pool, Dask), aggregation and its tables."""
import concurrent.futures as cf
import copy
import json
import math
import multiprocessing
import os
import signal
import statistics
import sys
import threading
import time
from contextlib import contextmanager, nullcontext, redirect_stdout, suppress
from pathlib import Path

import data
import utils

# Each member is an ordinary run in OUT_DIR/grid/beta_<b>/seed_<s>/, with its own loss.txt, metrics.json,
# checkpoint.pt and samples/. A concurrent.futures executor runs them: in this process one after another
# (InlineExecutor), in a pool of spawned processes (--workers), or on a Dask cluster (--scheduler).

# What the grid averages over training seeds: dotted paths into a member's metrics.json (add a key here and it is
# aggregated into grid.json and seeds_summary.txt); headline_numbers adds every clustering method's ACC, NMI, ARI.
HEADLINE = ("test_recon", "test_kl", "test_neg_elbo", "test_iw_log_likelihood", "active_units", "kl_decomposition.mi",
            "kl_decomposition.tc", "kl_decomposition.dim_kl", "probes.logistic_100.mean", "probes.logistic_1000.mean",
            "probes.logistic_all.mean", "probes.knn_all.mean", "disentanglement.mig", "disentanglement.sap",
            "disentanglement.dci_d", "disentanglement.dci_c", "disentanglement.dci_i")


# beta_sweep.txt's columns before each clustering method's ACC and NMI: (headline key, header, format).
SWEEP_COLUMNS = (("test_recon", "Test Recon", ".2f"), ("test_kl", "Test KL", ".2f"),
                 ("test_neg_elbo", "Test -ELBO", ".2f"), ("test_iw_log_likelihood", "IW log p(x)", ".2f"),
                 ("active_units", "Active Units", ".1f"), ("kl_decomposition.mi", "MI", ".2f"),
                 ("kl_decomposition.tc", "TC", ".2f"), ("kl_decomposition.dim_kl", "Dim-wise KL", ".2f"),
                 ("probes.logistic_100.mean", "Probe 100 labels", ".3f"),
                 ("probes.logistic_1000.mean", "Probe 1000 labels", ".3f"),
                 ("probes.logistic_all.mean", "Probe all labels", ".3f"), ("probes.knn_all.mean", "kNN", ".3f"),
                 ("disentanglement.mig", "MIG", ".3f"), ("disentanglement.sap", "SAP", ".3f"),
                 ("disentanglement.dci_d", "DCI D", ".3f"), ("disentanglement.dci_i", "DCI I", ".3f"))


# samples/beta_sweep.png's numbers: utils.plot_beta_sweep's name -> headline key.
PLOT_KEYS = {"recon": "test_recon", "kl": "test_kl", "acc": "kmeans_latent_acc", "nmi": "kmeans_latent_nmi",
             "active_units": "active_units", "mi": "kl_decomposition.mi", "tc": "kl_decomposition.tc",
             "dim_kl": "kl_decomposition.dim_kl", "mig": "disentanglement.mig", "sap": "disentanglement.sap",
             "dci_d": "disentanglement.dci_d"}
# ... of which a β may lack these (a grid run before they existed, or a null): the plot then leaves them out.
PLOT_OPTIONAL = ("mig", "sap", "dci_d")


POOL_ATTEMPTS = 3  # a member whose pool process is killed while it runs is resumed in a fresh pool, this many times


class GridError(RuntimeError):
    """The grid could not reach its Dask scheduler, a Dask worker would run members in threads, or one failed."""


class InlineExecutor(cf.Executor):
    """The concurrent.futures interface, each call run at submit in this process: the sequential grid."""

    def submit(self, fn, /, *args, **kwargs):
        future = cf.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as e:  # reported like a pool's failure; Ctrl-C is no Exception and stops the grid
            future.set_exception(e)
        return future


def thread_count(args, runs=None):
    """-> threads per run: --threads, else cores // the pool's processes (--workers, or fewer: `runs`, the models left
    to train), 1 on Dask, or None: each library's default, all cores."""
    if args.threads:
        return args.threads
    if args.workers:  # the pool starts no more processes than there are models to train (grid_executor)
        return max(1, utils.usable_cores() // min(args.workers, runs or args.workers))
    return 1 if args.scheduler else None


def member_name(sub):
    """A member's Namespace -> 'beta=<b> seed=<s>', how the grid names it on the terminal."""
    return f"beta={sub.beta_max:g} seed={sub.seed}"


def grid_members(args):
    """-> one Namespace per (β, training seed): an ordinary run into OUT_DIR/grid/beta_<b>/seed_<s>/."""
    out, parallel, members = Path(args.out_dir).absolute(), bool(args.workers or args.scheduler), []
    for beta in args.beta_sweep or [args.beta_max]:
        for seed in args.train_seeds or [args.seed]:
            sub = copy.copy(args)
            sub.beta_max, sub.seed, sub.beta_sweep, sub.train_seeds = beta, seed, None, None
            sub.out_dir = str(out / "grid" / f"beta_{beta:g}" / f"seed_{seed}")
            sub.data_dir = str(Path(args.data_dir).absolute())  # a Dask worker may run in another folder
            sub.no_progress = args.no_progress or parallel  # several processes' bars would garble one terminal
            members.append(sub)
    return members


# What a finished member measured with: averaging members measured on other test sets or seed counts would mix them.
MEASURE_FIELDS = ("test_limit", "tsne_points", "iw_samples", "kmeans_seeds", "umap_seeds")


def finished_metrics(sub, defaults):
    """A member's metrics.json if it finished with this config, else None; CheckpointError if its folder holds another
    configuration's metrics.json or (stopped) checkpoint.pt. defaults: the parser's, for flags added since."""
    path, checkpoint = Path(sub.out_dir) / "metrics.json", Path(sub.out_dir) / "checkpoint.pt"
    if path.is_file():
        try:  # a copy cut short, a hand edit: named in one line, not a traceback
            metrics, fields = json.loads(path.read_text(encoding="utf-8")), utils.RUN_FIELDS + MEASURE_FIELDS
            saved = dict(metrics["config"])
        except (ValueError, KeyError, TypeError) as e:
            raise utils.CheckpointError(f"{path} is damaged or not this project's ({type(e).__name__}); delete it "
                                        "and the grid measures that member again") from None
    elif checkpoint.is_file():  # stopped: checked now, not when the pool reaches it after the others have trained
        metrics, fields, path = None, utils.RESUME_FIELDS, checkpoint
        saved = utils.load_checkpoint(checkpoint)["config"]
    else:
        return None
    saved = {**defaults, **saved}
    # --precision auto on Dask is the worker's to resolve (member_precision): any precision a member recorded fits it
    requested = {**vars(sub), "precision": saved["precision"]} if sub.precision == "auto" else vars(sub)
    mismatch = utils.config_mismatch(saved, requested, fields, holder="it")
    if mismatch:
        raise utils.CheckpointError(f"{path}: {mismatch}; use another --out-dir")
    return metrics


def dask_worker_threads():
    """-> how many tasks the Dask worker running this code runs at once, or None outside a Dask worker."""
    if "distributed" not in sys.modules:  # a Dask worker has imported it; a pool process or this one need not
        return None
    try:
        return sys.modules["distributed"].get_worker().state.nthreads
    except ValueError:  # "No worker found": Dask imported, this process no worker (a client, a test)
        return None


def member_precision(sub):
    """-> the precision a member trains in here: --precision, or for auto the one its checkpoint.pt recorded, else
    what this machine's hardware supports (utils.resolve_precision); ValueError where it cannot run here."""
    checkpoint, name = Path(sub.out_dir) / "checkpoint.pt", sub.precision
    if name == "auto" and checkpoint.is_file():  # a resumed member continues as it began, whichever worker began it
        name = utils.load_checkpoint(checkpoint)["config"].get("precision", "fp32")
    return utils.resolve_precision(name, utils.resolve_device(sub.device))


@contextmanager
def sigint_handled(handler):
    """Ctrl-C goes to `handler` in the block: default_int_handler raises KeyboardInterrupt, also in a pool process that
    ignores it between members; SIG_IGN also holds for every process started in the block (exec keeps an ignore)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # a Dask task's thread: only the main thread can set a handler; None: one set outside Python
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def grid_member(sub, run, defaults, log_to_file=False, wait=True):
    """One member through run(sub), in whatever process the executor chose -> its metrics; a finished one read back, a
    started one resumed from its checkpoint.pt. It holds its folder's lock throughout: a copy of it already running (a
    second grid command, Dask re-running a member it thought lost) raises data.FolderBusy, or with wait is waited for,
    then read back or resumed; Ctrl-C and SIGTERM stop it, waiting or not. log_to_file: its stdout goes to its
    stdout.txt, not the terminal."""
    threads = dask_worker_threads() or 1
    if threads > 1:  # torch's random generator is one per process, which threads would share
        raise GridError(f"this Dask worker runs {threads} tasks at once; members in threads of one process would "
                        "draw from one random stream: start workers with dask worker --nthreads 1")
    utils.flush_denormals()  # a pool or Dask worker's own thread, before its torch threads start (on Dask it stays set)
    utils.limit_threads(sub.threads)
    with sigint_handled(signal.default_int_handler), data.sigterm_raises(), data.folder_lock(sub.out_dir, wait=wait):
        metrics = finished_metrics(sub, defaults)  # here too: Dask re-runs a member whose worker died after it finished
        if metrics:
            return metrics
        out, sub = Path(sub.out_dir), copy.copy(sub)
        sub.precision = member_precision(sub)  # on Dask, here: the worker's hardware, not the client's, decides
        sub.resume = (out / "checkpoint.pt").is_file()
        log = open(out / "stdout.txt", "a", encoding="utf-8") if log_to_file else nullcontext(sys.stdout)
        with log as stream, redirect_stdout(stream):
            return run(sub)  # run() takes no lock itself: a second flock here, even in this process, waits forever


def ship_modules(client):
    """Copy this project's modules to the Dask scheduler, which unpickles the tasks, and to every worker, now or later."""
    from distributed.diagnostics.plugin import SchedulerUploadFile, UploadFile
    for name in ("model.py", "utils.py", "data.py", "measures.py", "grid.py", "demo_script.py"):  # in import order
        path = str(Path(__file__).with_name(name))
        client.register_plugin(SchedulerUploadFile(path, load=False), name=f"beta-vae-scheduler-{name}")
        client.register_plugin(UploadFile(path), name=f"beta-vae-{name}")  # a plugin: restarted workers get it too


@contextmanager
def dask_executor(address):
    """-> the executor of a running Dask scheduler; this project's modules are shipped to its workers."""
    from distributed import Client  # imported only here: --scheduler is the one user of Dask
    try:
        client = Client(address, timeout="10s")
    except (OSError, TimeoutError, ValueError) as e:  # ValueError: a malformed address (a port that is no number)
        raise GridError(f"--scheduler {address}: {e}") from None
    with client:
        try:
            ship_modules(client)
        except Exception as e:  # e.g. a worker without torch: one line, not a traceback
            raise GridError(f"--scheduler {address}: {type(e).__name__}: {e}") from None
        executor = client.get_executor(pure=False)
        try:
            yield executor
        except BaseException:
            executor.shutdown(wait=False)  # cancels every member not finished; a running task ends on its own
            raise


@contextmanager
def pool_executor(workers):
    """-> a pool of `workers` spawned processes, which ignore Ctrl-C except while a member runs (grid_member)."""
    before = set(multiprocessing.active_children())
    # spawn, not fork: a forked child would inherit torch's and OpenMP's thread pools in an undefined state
    pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))
    try:
        # The pool starts a process per submit while it has fewer than `workers`: started here, with Ctrl-C ignored,
        # they ignore it from their first instruction, not only from the initializer on. A Ctrl-C while they import
        # the project (seconds) would otherwise print a KeyboardInterrupt traceback from each.
        with sigint_handled(signal.SIG_IGN):
            for _ in range(workers):
                pool.submit(int)
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        # SIGTERM ends at once a process that ignores Ctrl-C, idle or still importing, and a running member takes it as
        # Ctrl-C (data.sigterm_raises), unless SIGTERM is ignored here and so in the pool: then Ctrl-C, as before.
        stop = signal.SIGINT if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN else signal.SIGTERM
        for child in set(multiprocessing.active_children()) - before:
            with suppress(ProcessLookupError):  # ended meanwhile
                os.kill(child.pid, stop)
        raise
    finally:
        pool.shutdown(wait=True)


def grid_executor(args, members):
    """-> a context manager giving this command line's executor for `members` runs: in-process, a pool or Dask's."""
    if args.scheduler:
        return dask_executor(args.scheduler)
    return pool_executor(min(args.workers, members)) if args.workers else nullcontext(InlineExecutor())


def killed_while_running(members, since):
    """-> those members whose folder lock was taken at or after time `since` and is still there, held by no one: their
    process was killed while it ran them (a member that ends, or stops on a signal, removes its lock; a pool that
    breaks stops its other processes with SIGTERM)."""
    def left(m):
        path = Path(m.out_dir) / data.LOCK_FILE
        try:  # the lock file is written when taken; 0.05 s: file times lag time.time() by a clock tick
            fresh = path.stat().st_mtime >= since - 0.05
        except FileNotFoundError:
            return False
        # held: another command's live run, which this member was waiting for, not a kill
        return fresh and not data.lock_is_held(path)
    return [m for m in members if left(m)]


def ended(executor, members, slots, *args):
    """Yield (member, its future) as each ends, no more than `slots` handed to the executor at a time: a process pool
    queues one member more than it runs, and a queued member cannot be cancelled, so it would train after a Ctrl-C."""
    waiting, futures = list(members), {}
    while waiting or futures:
        while waiting and len(futures) < slots:
            m = waiting.pop(0)
            try:
                futures[executor.submit(grid_member, m, *args)] = m
            except cf.BrokenExecutor as e:  # the pool broke meanwhile: this member is reported as the ones it held
                failed = cf.Future()
                failed.set_exception(e)
                futures[failed] = m
        future = next(cf.as_completed(futures))
        yield futures.pop(future), future


def run_members(members, args, run, defaults):
    """Every member through the executor -> ({name: metrics}, {name: one-line error}); a member that another command
    holds is passed over, then waited for once the rest are done; a broken pool is replaced, and a member whose
    process is killed POOL_ATTEMPTS times (out of memory, say) fails alone."""
    # Passing over held members lets two grid commands on one folder train different members side by side; waiting
    # on them in turn would have made the second command idle until the first had done the member it wanted.
    results, errors, todo, wait, kills, blind = {}, {}, list(members), False, {}, 0
    while todo and blind < POOL_ATTEMPTS:
        finished = len(results)
        with grid_executor(args, len(todo)) as executor:
            start, pending, todo, broken = time.time(), todo, [], []
            # Dask cancels what it queued; in-process a member runs at submit, so one at a time reports each as it ends
            slots = args.workers or (len(pending) if args.scheduler else 1)
            for m, future in ended(executor, pending, slots, run, defaults, bool(args.workers), wait):
                name = member_name(m)
                try:
                    results[name] = future.result()
                    print(f"{name}: done ({len(results)} of {len(members)})", flush=True)
                except data.FolderBusy:
                    todo.append(m)
                    print(f"{name}: another run holds it; it is waited for after the others", flush=True)
                except cf.BrokenExecutor:  # a pool process died, and with it every member the pool still held
                    broken.append(m)
                except Exception as e:
                    errors[name] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
                    print(f"{name}: failed: {errors[name]}", file=sys.stderr, flush=True)
        killed = killed_while_running(broken, start)  # only these count: the rest merely shared the pool
        for m in killed:
            kills[member_name(m)] = kills.get(member_name(m), 0) + 1
        for m in broken:  # resumed in a fresh pool
            if kills.get(member_name(m), 0) < POOL_ATTEMPTS:
                todo.append(m)
            else:
                errors[member_name(m)] = (f"its process was killed each time it ran ({kills[member_name(m)]}x; "
                                          "out of memory?)")
        # broken with none running: the pool cannot start, unless members still finish in it
        blind = 0 if len(results) > finished else blind + bool(broken and not killed)
        wait = True
    errors.update({member_name(m): f"the process pool broke {POOL_ATTEMPTS} times before it ran" for m in todo})
    return results, errors


def headline_names(metrics):
    """-> the name of every number headline_numbers can give a run with these flags, null ones included."""
    methods = metrics.get("clustering") or {}
    return [*HEADLINE, *(f"{method}_{k}" for method in methods for k in ("acc", "nmi", "ari"))]


def headline_numbers(metrics):
    """A member's metrics.json -> {name: float}: HEADLINE's keys, then every clustering method's ACC, NMI and ARI
    (means over clustering seeds) as <method>_acc etc.; keys this member lacks, or holds as null, are left out."""
    numbers = {}
    for path in HEADLINE:
        value = metrics
        for key in path.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            numbers[path] = float(value)
    for method, s in (metrics.get("clustering") or {}).items():
        if isinstance(s, dict):  # None: not computable on this member's model
            numbers.update({f"{method}_{k}": float(s[f"{k}_mean"]) for k in ("acc", "nmi", "ari") if f"{k}_mean" in s})
    return numbers


def seed_stats(values):
    """Values over training seeds -> dict mean, sample std (ddof=1; None for one seed), n and the values."""
    return dict(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else None,
                n=len(values), values=values)


def beta_summaries(members, results, errors):
    """-> one dict per β: its seeds, the failed ones with their errors, and seed_stats of every headline number."""
    summaries = []
    for beta in dict.fromkeys(m.beta_max for m in members):
        group = [m for m in members if m.beta_max == beta]
        numbers = [headline_numbers(results[member_name(m)]) for m in group if member_name(m) in results]
        failed = [dict(seed=m.seed, error=errors[member_name(m)]) for m in group if member_name(m) in errors]
        stats = {k: seed_stats([n[k] for n in numbers if k in n]) for k in dict.fromkeys(k for n in numbers for k in n)}
        summaries.append(dict(beta=beta, seeds=[m.seed for m in group], failed=failed, numbers=stats))
    return summaries


def stats_cell(stats, fmt):
    """seed_stats -> 'mean ± std', the mean alone for one seed, '—' when no seed has the number."""
    if stats is None:
        return "—"
    return f"{stats['mean']:{fmt}}" + ("" if stats["std"] is None else f" ± {stats['std']:{fmt}}")


def failure_lines(summaries):
    """-> one 'failed: beta=<b> seed=<s>: <error>' line per failed member."""
    return [f"failed: beta={s['beta']:g} seed={f['seed']}: {f['error']}" for s in summaries for f in s["failed"]]


def sweep_table(summaries):
    """Per-β summaries -> beta_sweep.txt: one row per β, mean ± sample std over its finished training seeds."""
    methods = dict.fromkeys(k[:-4] for s in summaries for k in s["numbers"] if k.endswith("_acc"))
    cols = SWEEP_COLUMNS + tuple((f"{m}_{k}", f"{m} {k.upper()}", ".3f") for m in methods for k in ("acc", "nmi"))
    lines = ["| β | Seeds | " + " | ".join(h for _, h, _ in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for s in summaries:
        done = len(s["seeds"]) - len(s["failed"])
        cells = [f"{s['beta']:g}", f"{done} of {len(s['seeds'])}" if s["failed"] else f"{done}"]
        lines.append("| " + " | ".join(cells + [stats_cell(s["numbers"].get(k), f) for k, _, f in cols]) + " |")
    failed = failure_lines(summaries)
    return "\n".join(lines + ([""] + failed if failed else [])) + "\n"


def seeds_table(summaries):
    """One configuration's summary -> seeds_summary.txt: every headline number, mean ± sample std over seeds."""
    s, formats = summaries[0], {k: f for k, _, f in SWEEP_COLUMNS}
    lines = [f"beta_max={s['beta']:g}, training seeds {' '.join(map(str, s['seeds']))}: mean ± sample std (ddof=1)",
             "", "| Number | Mean ± std | Seeds |", "|---|---|---|"]
    lines += [f"| {k} | {stats_cell(st, formats.get(k, '.4f'))} | {st['n']} |" for k, st in s["numbers"].items()]
    failed = failure_lines(summaries)
    return "\n".join(lines + ([""] + failed if failed else [])) + "\n"


def sweep_plot_rows(summaries):
    """-> utils.plot_beta_sweep's rows: PLOT_KEYS' mean and std (nan for one seed, or for a missing PLOT_OPTIONAL
    number); a β lacking any other one is left out."""
    rows, missing = [], dict(mean=math.nan, std=None)
    for s in summaries:
        if all(k in s["numbers"] for name, k in PLOT_KEYS.items() if name not in PLOT_OPTIONAL):
            row = dict(beta=s["beta"], seeds=s["numbers"]["test_recon"]["n"])
            for name, key in PLOT_KEYS.items():
                st = s["numbers"].get(key, missing)
                row.update({f"{name}_mean": st["mean"], f"{name}_std": math.nan if st["std"] is None else st["std"]})
            rows.append(row)
    return rows


def write_grid_outputs(args, summaries):
    """grid.json always; beta_sweep.txt and samples/beta_sweep.png for a β sweep, else seeds_summary.txt."""
    out = Path(args.out_dir)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    data.write_json(out / "grid.json", dict(layout="grid/beta_<b>/seed_<s>", betas=summaries))
    name, table = ("beta_sweep.txt", sweep_table) if args.beta_sweep else ("seeds_summary.txt", seeds_table)
    data.write_text(out / name, table(summaries))
    rows = sweep_plot_rows(summaries)
    if args.beta_sweep and rows:
        utils.plot_beta_sweep(rows, out / "samples" / "beta_sweep.png")
    print("\n" + table(summaries), end="")


def write_grid_outputs_locked(args, summaries):
    """write_grid_outputs as OUT_DIR's one writer: after a run there, or another grid's tables, has finished."""
    try:
        with data.folder_lock(args.out_dir):
            return write_grid_outputs(args, summaries)
    except data.FolderBusy:
        print(f"another run holds {args.out_dir}; the grid's tables are written when it ends", flush=True)
    with data.folder_lock(args.out_dir, wait=True):
        return write_grid_outputs(args, summaries)


def grid(args, run, defaults):
    """The β × training-seed grid: every unfinished member through run(member) on the executor, then its tables ->
    summaries. run must be importable by module name (a worker unpickles it); defaults: the parser's defaults."""
    members, results, todo = grid_members(args), {}, []
    for m in members:  # all checked first: a folder holding another configuration stops the grid before it starts
        metrics = finished_metrics(m, defaults)
        if metrics:
            print(f"{member_name(m)}: finished earlier, reading {Path(m.out_dir) / 'metrics.json'}")
            results[member_name(m)] = metrics
        else:
            todo.append(m)
    for m in todo:  # the cores are shared by the processes that train, as many as there are members left
        m.threads = thread_count(args, len(todo))
    new, errors = run_members(todo, args, run, defaults) if todo else ({}, {})
    summaries = beta_summaries(members, {**results, **new}, errors)
    write_grid_outputs_locked(args, summaries)
    if errors:
        raise GridError(f"{len(errors)} of {len(members)} models failed (named above); the same command retries them")
    return summaries

