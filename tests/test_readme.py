"""The README's results are the committed runs: its tables must equal loss.txt, metrics.json, beta_sweep.txt and the
binarized runs' likelihood/*/metrics.json.

`python tests/test_readme.py` prints the tables as they belong in the README.
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import demo_script  # noqa: E402
import utils  # noqa: E402

EPOCHS = (1, 5, 10, 15, 20, 25, 30)
# The original project's README, "Training Results": Total Loss per listed epoch.
PUBLISHED_TOTAL = {1: 135.11, 5: 106.31, 10: 102.74, 15: 101.04, 20: 99.98, 25: 99.17, 30: 98.64}
METHODS = {"kmeans_latent": "KMeans on latent means", "gmm_latent": "Gaussian mixture on latent means",
           "kmeans_tsne": "KMeans on the t-SNE map", "gmm_tsne": "Gaussian mixture on the t-SNE map",
           "umap_gmm": "UMAP, then a Gaussian mixture (N2D)"}
PROBES = {"logistic_100": "Logistic regression, 100 labels", "logistic_1000": "Logistic regression, 1,000 labels",
          "logistic_all": "Logistic regression, all 60,000 labels", "knn_all": "5-nearest neighbours, all labels"}
# Burda et al. 2016, Table 1 (VAE, one stochastic layer of 50 units; IWAE k = 50), and Pythae's benchmark: test NLL.
PUBLISHED_NLL = [("VAE, 1 stochastic layer, 50 units (Burda et al. 2016)", 86.76),
                 ("IWAE, k = 50 (Burda et al. 2016)", 84.78), ("VAE (Pythae benchmark)", 89.78)]
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


def metrics_tables(m):
    """metrics.json -> the README's headline, probe and clustering tables."""
    d = m["kl_decomposition"]
    lines = ["| Metric (10k test images) | Value |", "|---|---|",
             f"| Test −ELBO at β = 1, nats ({m['test_eval_draws']} z per image) | {errors(m, 'test_neg_elbo', 'test_neg_elbo')} |",
             f"| Test log p(x), IW bound, K = {m['iw_samples']}, nats | {errors(m, 'test_iw_log_likelihood', 'test_iw')} |",
             f"| Active units | {m['active_units']} of {len(m['kl_per_dim'])} |",
             f"| KL = MI + TC + dimension-wise KL, nats | {d['kl_closed_form']:.2f} = {d['mi']:.2f} + {d['tc']:.2f} + "
             f"{d['dim_kl']:.2f} |", "",
             "| Probe on the latent means (uses labels) | Test accuracy |", "|---|---|"]
    for key, name in PROBES.items():
        p = m["probes"][key]
        spread = f" ± {p['std']:.3f} ({p['draws']} draws)" if p["std"] is not None else ""
        lines.append(f"| {name} | {p['mean']:.3f}{spread} |")
    lines += ["", "| Clustering (no labels; labels only score) | ACC | NMI | ARI |", "|---|---|---|---|"]
    for key, name in METHODS.items():
        s = m["clustering"][key]
        lines.append(f"| {name} | " + " | ".join(f"{s[k + '_mean']:.3f} ± {s[k + '_std']:.3f}"
                                                  for k in ("acc", "nmi", "ari")) + " |")
    return "\n".join(lines)


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


def test_readme_metrics_are_the_committed_metrics_json():
    m = json.loads((ROOT / "metrics.json").read_text())
    assert metrics_tables(m) in readme()
    # the reference run is `python demo_script.py --no-progress`: the defaults, with the progress bars hidden
    defaults = vars(demo_script.parse_args(["--no-progress"]))
    assert {k: m["config"][k] for k in defaults} == defaults


def test_readme_prose_quotes_the_committed_metrics_json():
    m = json.loads((ROOT / "metrics.json").read_text())
    kl, iw, elbo = m["kl_per_dim"], m["test_iw_log_likelihood"], -m["test_neg_elbo"]
    quotes = [f"The IW bound ({iw:.2f}) sits {iw - elbo:.1f} nats above the ELBO ({elbo:.2f})".replace("-", "−"),
              f"(seed {m['config']['seed']}) scored {m['kmeans_single_seed_acc']:.3f}",
              f"All {m['active_units']} dimensions are active, with test KL between {min(kl):.1f} and {max(kl):.1f} nats",
              f"{m['kl_decomposition']['mi']:.2f} of a possible {m['kl_decomposition']['mi_bound']:.2f}"]
    text = " ".join(readme().split())  # prose is wrapped at 120 columns
    assert [q for q in quotes if q not in text] == []


def test_readme_likelihood_table_is_the_committed_binarized_runs():
    runs = likelihood_runs()
    assert likelihood_table(runs) in readme()
    assert all(m["config"]["binarize"] and m["iw_samples"] == 5000 for m in runs.values())
    assert {m["test_set"]["md5"] for m in runs.values()} == {"4b677d582c22a81cb1406ab0f33e15f7"}  # the one fixed binary test set


def test_readme_beta_study_is_the_committed_beta_sweep():
    assert (ROOT / "beta_sweep.txt").read_text().strip() in readme()


def test_committed_figures_exist():
    names = ["train_loss", "latent_dist_before_train", "latent_dist_after_train", "kmean", "confusion", "tsne",
             "generated_num", "reconstructions", "kl_per_dim", "traversals", "interpolations", "beta_sweep"]
    assert [n for n in names if not (ROOT / "samples" / f"{n}.png").is_file()] == []


if __name__ == "__main__":
    print(training_table(utils.parse_loss_table((ROOT / "loss.txt").read_text())) + "\n")
    print(metrics_tables(json.loads((ROOT / "metrics.json").read_text())) + "\n")
    print(likelihood_table(likelihood_runs()))
