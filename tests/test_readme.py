"""The README's results are the committed runs: its tables must equal loss.txt, metrics.json, the grid's runs and
tables in beta_sweep/, and the binarized runs' likelihood/*/metrics.json.

`python tests/test_readme.py` prints the tables as they belong in the README.
"""
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import f as f_dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import demo_script  # noqa: E402
import measures  # noqa: E402
import utils  # noqa: E402

# benchmarks/ stays off sys.path: its grid.py (the throughput benchmark) would shadow the project's grid module in
# every process that the tests spawn afterwards.
_spec = importlib.util.spec_from_file_location("beta_study", ROOT / "benchmarks" / "beta_study.py")
beta_study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(beta_study)

EPOCHS = (1, 5, 10, 15, 20, 25, 30)
# The original project's README, "Training Results": Total Loss per listed epoch.
PUBLISHED_TOTAL = {1: 135.11, 5: 106.31, 10: 102.74, 15: 101.04, 20: 99.98, 25: 99.17, 30: 98.64}
METHODS = {"kmeans_latent": "KMeans on μ", "gmm_latent": "Gaussian mixture on μ", "kmeans_tsne": "KMeans on t-SNE",
           "gmm_tsne": "Gaussian mixture on t-SNE", "umap_gmm": "UMAP → Gaussian mixture"}
PROBES = {"logistic_100": "logistic, 100 labels", "logistic_1000": "logistic, 1,000 labels",
          "logistic_all": "logistic, 60,000 labels", "knn_all": "5-NN, 60,000 labels"}
DISENTANGLEMENT = {"mig": "MIG", "sap": "SAP", "dci_d": "DCI D", "dci_i": "DCI I"}  # on Morpho-MNIST's factors
# Burda et al. 2016, Table 1 (VAE, one stochastic layer of 50 units; IWAE k = 50), and Pythae's benchmark: test NLL.
PUBLISHED_NLL = [("VAE, 1 stochastic layer, 50 units (Burda et al. 2016)", 86.76),
                 ("IWAE, k = 50 (Burda et al. 2016)", 84.78), ("VAE (Pythae benchmark)", 89.78)]
SWEEP = ROOT / "beta_sweep"  # python demo_script.py --beta-sweep ... --out-dir beta_sweep (README)
SEEDS_DIR = SWEEP / "grid" / "beta_1"
LIKELIHOOD_RUNS = {"z50": "50-d latent, 300 epochs", "z10": "10-d latent (the default model), 30 epochs"}


def training_table(rows):
    """loss.txt rows -> the README's training table, in the published columns plus test -ELBO and the published total."""
    by_epoch = {r["epoch"]: r for r in rows}
    lines = ["| Epoch | β | Total Loss | Recon Loss | KL Divergence | Grad Norm | Test -ELBO | Published Total |",
             "|---|---|---|---|---|---|---|---|"]
    for e in EPOCHS:
        r = by_epoch[e]
        lines.append(f"| {e} | {r['beta']:.3f} | {r['total']:.2f} | {r['recon']:.2f} | {r['kl']:.2f} | "
                     f"{r['grad_norm']:.2f} | {r['test_neg_elbo']:.2f} | {PUBLISHED_TOTAL[e]:.2f} |")
    return "\n".join(lines)


def errors(m, key, prefix):
    """'value ± MC ± test' for a metrics.json number whose errors are <prefix>_mc_se and <prefix>_test_se."""
    return f"{m[key]:.2f} ± {m[prefix + '_mc_se']:.2f} ± {m[prefix + '_test_se']:.2f}"


def number(m, path):
    """A dotted path into metrics.json -> its value; None where it, or a measure above it, is null (not computable)."""
    for key in path.split("."):
        m = None if m is None else m[key]
    return m


def cell(value, fmt):
    """A metrics.json number as the README prints it; a null one as '—'."""
    return "—" if value is None else format(value, fmt)


def headline_rows(m):
    """metrics.json -> [(name, dotted path, format)] of the README's headline table, after the training totals."""
    rows = [(f"Test −ELBO, β = 1 ({m['test_eval_draws']} z)", "test_neg_elbo", ".2f"),
            (f"Test log p(x), IW, K = {m['iw_samples']}", "test_iw_log_likelihood", ".2f"),
            ("KL, closed form", "kl_decomposition.kl_closed_form", ".2f"), ("… MI (at most 9.21)", "kl_decomposition.mi", ".2f"),
            ("… total correlation", "kl_decomposition.tc", ".2f"), ("… dim-wise KL", "kl_decomposition.dim_kl", ".2f"),
            ("Active units", "active_units", ".0f")]
    rows += [(f"Probe: {name}", f"probes.{key}.mean", ".3f") for key, name in PROBES.items()]
    rows += [(f"ACC: {name}", f"clustering.{key}.acc_mean", ".3f") for key, name in METHODS.items()]
    return rows + [(f"Factors: {name}", f"disentanglement.{key}", ".3f") for key, name in DISENTANGLEMENT.items()]


def spread(values, fmt):
    """Values over training seeds -> 'mean ± sample std' of those not null ('—' for none, the value alone for one)."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return cell(values[0] if values else None, fmt)
    return f"{statistics.fmean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def headline_table(m, loss_rows, seeds):
    """The reference run's metrics.json and loss.txt rows, and {seed: (metrics.json, loss.txt rows)} of the seed runs
    -> the README's headline table: the reference beside the mean ± sample std over training seeds."""
    lines = [f"| Number (nats; accuracies) | Reference (seed {m['config']['seed']}) | {len(seeds)} seeds: mean ± std | "
             "Published |", "|---|---|---|---|"]
    by_epoch = {r["epoch"]: r for r in loss_rows}
    for e in (10, 20, 30):
        totals = [next(r["total"] for r in rows if r["epoch"] == e) for _, rows in seeds.values()]
        lines.append(f"| Train total, epoch {e} | {by_epoch[e]['total']:.2f} | {spread(totals, '.2f')} | "
                     f"{PUBLISHED_TOTAL[e]:.2f} |")
    ref = {"test_neg_elbo": errors(m, "test_neg_elbo", "test_neg_elbo"),
           "test_iw_log_likelihood": errors(m, "test_iw_log_likelihood", "test_iw")}
    for name, path, fmt in headline_rows(m):
        values = [number(sm, path) for sm, _ in seeds.values()]
        lines.append(f"| {name} | {ref.get(path, cell(number(m, path), fmt))} | {spread(values, fmt)} | |")
    return "\n".join(lines)


def seed_runs():
    """{seed: (metrics.json, loss.txt rows)} of the committed β = 1 training-seed runs."""
    runs = {}
    for d in sorted(SEEDS_DIR.glob("seed_*")):
        rows = utils.parse_loss_table((d / "loss.txt").read_text())
        runs[int(d.name[5:])] = json.loads((d / "metrics.json").read_text()), rows
    return runs


def likelihood_table(runs):
    """{name: metrics.json} of the binarized runs -> the README's table beside the published test NLLs."""
    lines = ["| Model (binarized MNIST) | Test NLL, nats | Our −ELBO | Train time |", "|---|---|---|---|"]
    lines += [f"| {name} | {nll:.2f} | | |" for name, nll in PUBLISHED_NLL]
    for key, name in LIKELIHOOD_RUNS.items():
        m = runs[key]
        lines.append(f"| This repo, {name}: IS, K = {m['iw_samples']} | {-m['test_iw_log_likelihood']:.2f} ± "
                     f"{m['test_iw_mc_se']:.2f} ± {m['test_iw_test_se']:.2f} | {m['test_neg_elbo']:.2f} | "
                     f"{train_minutes(key):.0f} min |")
    return "\n".join(lines)


def train_minutes(key):
    """A binarized run's training time: the Seconds column of its loss.txt (its metrics.json may be analysis-only)."""
    return sum(r["seconds"] for r in utils.parse_loss_table((ROOT / "likelihood" / key / "loss.txt").read_text())) / 60


def likelihood_runs():
    return {k: json.loads((ROOT / "likelihood" / k / "metrics.json").read_text()) for k in LIKELIHOOD_RUNS}


def readme():
    return (ROOT / "README.md").read_text()


def test_readme_training_table_is_the_committed_loss_txt():
    rows = utils.parse_loss_table((ROOT / "loss.txt").read_text())
    assert [r["epoch"] for r in rows] == list(range(1, 31))
    assert training_table(rows) in readme()


def test_readme_headline_table_is_the_committed_runs():
    m = json.loads((ROOT / "metrics.json").read_text())
    seeds = seed_runs()
    assert len(seeds) >= 5 and all(sm["config"]["epochs"] == 30 for sm, _ in seeds.values())
    assert headline_table(m, utils.parse_loss_table((ROOT / "loss.txt").read_text()), seeds) in readme()
    # the reference run is `python demo_script.py --no-progress`: the defaults, with the progress bars hidden
    defaults = vars(demo_script.parse_args(["--no-progress"]))  # flags added since the run take their defaults
    defaults.pop("precision")  # auto: what it resolves to depends on the machine; the README names the run's
    assert {k: demo_script.with_defaults(m["config"])[k] for k in defaults} == defaults
    assert f"trained in {m['config']['precision']}" in readme()


def test_readme_prose_quotes_the_committed_metrics_json():
    m = json.loads((ROOT / "metrics.json").read_text())
    kl, iw, elbo = m["kl_per_dim"], m["test_iw_log_likelihood"], -m["test_neg_elbo"]
    quotes = [f"The IW bound ({iw:.2f}) sits {iw - elbo:.1f} nats above the ELBO ({elbo:.2f})".replace("-", "−"),
              f"(seed {m['config']['seed']}) scored {m['kmeans_single_seed_acc']:.3f}",
              f"All {m['active_units']} dimensions are active, with test KL between {min(kl):.1f} and {max(kl):.1f} nats",
              f"{m['kl_decomposition']['mi']:.2f} of a possible {m['kl_decomposition']['mi_bound']:.2f}",
              "; ".join(measures.atlas_label(e) for e in sorted(m["disentanglement"]["atlas"], key=lambda e: e["dim"]))]
    text = " ".join(readme().split())  # prose is wrapped at 120 columns
    assert [q for q in quotes if q not in text] == []


def test_hubconf_docstrings_quote_the_committed_metrics_json():
    import hubconf  # a torch.hub user reads these numbers in help(), not in the README
    m = json.loads((ROOT / "metrics.json").read_text())
    assert f"Test -ELBO {errors(m, 'test_neg_elbo', 'test_neg_elbo')} nats" in hubconf.beta_vae.__doc__
    for z in (50, 10):
        b = json.loads((ROOT / "likelihood" / f"z{z}" / "metrics.json").read_text())
        nll = f"{-b['test_iw_log_likelihood']:.2f} ± {b['test_iw_mc_se']:.2f} ± {b['test_iw_test_se']:.2f}"
        assert f"test -ELBO {errors(b, 'test_neg_elbo', 'test_neg_elbo')}, IW test NLL at K = 5000: {nll}" in \
            " ".join(hubconf.binarized_vae.__doc__.split())


def test_headline_table_prints_a_null_measure_as_a_dash():
    m = json.loads((ROOT / "metrics.json").read_text())
    m["clustering"]["umap_gmm"], m["probes"], m["disentanglement"] = None, None, None  # as such a model writes them
    seeds = seed_runs()
    table = headline_table(m, utils.parse_loss_table((ROOT / "loss.txt").read_text()), seeds)
    for name, path in [("ACC: UMAP → Gaussian mixture", "clustering.umap_gmm.acc_mean"),
                       ("Probe: 5-NN, 60,000 labels", "probes.knn_all.mean"), ("Factors: MIG", "disentanglement.mig")]:
        assert f"| {name} | — | {spread([number(sm, path) for sm, _ in seeds.values()], '.3f')} | |" in table


def test_readme_likelihood_table_is_the_committed_binarized_runs():
    runs = likelihood_runs()
    assert likelihood_table(runs) in readme()
    assert all(m["config"]["binarize"] and m["iw_samples"] == 5000 for m in runs.values())
    assert {m["test_set"]["md5"] for m in runs.values()} == {"4b677d582c22a81cb1406ab0f33e15f7"}  # the one fixed binary test set


def sweep_columns(text, headers):
    """beta_sweep.txt -> the same table with only the named columns, in their order."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.strip().splitlines() if line.startswith("|")]
    keep = [rows[0].index(h) for h in headers]
    lines = ["| " + " | ".join(rows[0][i] for i in keep) + " |", "|---" * len(keep) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r[i] for i in keep) + " |" for r in rows[2:]])


SWEEP_README = ("β", "Seeds", "Test -ELBO", "TC", "Probe 100 labels", "umap_gmm ACC", "MIG", "SAP", "DCI D", "DCI I")


def test_readme_beta_study_is_the_committed_beta_sweep():
    assert sweep_columns((SWEEP / "beta_sweep.txt").read_text(), SWEEP_README) in readme()
    assert "[beta_sweep/beta_sweep.txt](beta_sweep/beta_sweep.txt)" in readme()  # every column, linked


def test_beta_study_answer_is_the_committed_sweep():
    runs, seeds = beta_study.study_runs(SWEEP)
    assert [len(r) for r in runs.values()] == [5] * 6  # 6 βs × 5 seeds, every run with its disentanglement block
    assert all(s == [20, 21, 22, 23, 24] for s in seeds.values())  # crossed: the two-way split applies
    bench = (ROOT / "benchmarks" / "README.md").read_text()
    assert beta_study.metric_table(runs, seeds) in bench and beta_study.factor_table(runs) in bench


def test_variance_shares_are_nested_least_squares_fits():
    # the two-way split against its definition: what adding β's (or the seed's) indicator columns to a least-squares
    # fit of the other explains, and the F test on it
    table = np.random.default_rng(0).normal(size=(4, 3)) + 2.0 * np.arange(4)[:, None]  # a β effect planted
    (b, n), y = table.shape, table.ravel()
    beta_cols, seed_cols = np.kron(np.eye(b), np.ones((n, 1))), np.kron(np.ones((b, 1)), np.eye(n))

    def rss(*cols):
        x = np.hstack(cols)
        r = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
        return r @ r

    full, total, df = rss(beta_cols, seed_cols), rss(np.ones((b * n, 1))), (b - 1) * (n - 1)
    explained = {"beta": rss(seed_cols) - full, "seed": rss(beta_cols) - full}
    p = {k: f_dist.sf(v / d / (full / df), d, df) for k, v, d in zip(explained, explained.values(), (b - 1, n - 1))}
    eta, omega, p_beta, seed_eta, p_seed = beta_study.variance_shares(table)
    assert eta == pytest.approx(explained["beta"] / total) and seed_eta == pytest.approx(explained["seed"] / total)
    assert p_beta == pytest.approx(p["beta"]) and p_seed == pytest.approx(p["seed"]) and p_beta < 0.01
    assert omega == pytest.approx((explained["beta"] - (b - 1) * full / df) / (total + full / df)) and omega < eta


def test_committed_figures_exist():
    names = ["train_loss", "latent_dist_before_train", "latent_dist_after_train", "kmean", "confusion", "tsne",
             "generated_num", "reconstructions", "kl_per_dim", "traversals", "interpolations", "beta_sweep", "factors"]
    assert [n for n in names if not (ROOT / "samples" / f"{n}.png").is_file()] == []


if __name__ == "__main__":
    print(training_table(utils.parse_loss_table((ROOT / "loss.txt").read_text())) + "\n")
    print(headline_table(json.loads((ROOT / "metrics.json").read_text()),
                         utils.parse_loss_table((ROOT / "loss.txt").read_text()), seed_runs()) + "\n")
    print(sweep_columns((SWEEP / "beta_sweep.txt").read_text(), SWEEP_README) + "\n")
    print(likelihood_table(likelihood_runs()))
