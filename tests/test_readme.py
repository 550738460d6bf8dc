"""The README's results are the committed reference run: its tables must equal loss.txt, metrics.json, beta_sweep.txt.

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
           "kmeans_tsne": "KMeans on the t-SNE map"}


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


def metrics_tables(m):
    """metrics.json -> the README's headline and clustering tables."""
    lines = ["| Metric | Value |", "|---|---|",
             f"| Test −ELBO at β = 1 (nats; mean of {m['test_eval_draws']} z per image ± Monte Carlo std error) | "
             f"{m['test_neg_elbo']:.2f} ± {m['test_neg_elbo_se']:.2f} |",
             f"| Test log p(x), IW bound with K = {m['iw_samples']} (nats) | {m['test_iw_log_likelihood']:.2f} |",
             f"| Active units | {m['active_units']} of {len(m['kl_per_dim'])} |", "",
             "| Clustering of the 10k test digits | ACC | NMI | ARI |", "|---|---|---|---|"]
    for key, name in METHODS.items():
        s = m["clustering"][key]
        lines.append(f"| {name} | " + " | ".join(f"{s[k + '_mean']:.3f} ± {s[k + '_std']:.3f}"
                                                  for k in ("acc", "nmi", "ari")) + " |")
    return "\n".join(lines)


def readme():
    return (ROOT / "README.md").read_text()


def test_readme_training_table_is_the_committed_loss_txt():
    rows = utils.parse_loss_table((ROOT / "loss.txt").read_text())
    assert [r["epoch"] for r in rows] == list(range(1, 31))
    assert training_table(rows) in readme()


def test_readme_metrics_are_the_committed_metrics_json():
    m = json.loads((ROOT / "metrics.json").read_text())
    assert metrics_tables(m) in readme()
    defaults = vars(demo_script.parse_args([]))  # the reference run is `python demo_script.py`, no flags
    assert {k: m["config"][k] for k in defaults} == defaults


def test_readme_prose_quotes_the_committed_metrics_json():
    m = json.loads((ROOT / "metrics.json").read_text())
    acc, kl = m["clustering"]["kmeans_latent"]["acc_per_seed"], m["kl_per_dim"]
    iw, elbo = m["test_iw_log_likelihood"], -m["test_neg_elbo"]
    quotes = [f"The IW bound ({iw:.2f}) sits {iw - elbo:.1f} nats above the ELBO ({elbo:.2f})".replace("-", "−"),
              f"ranged from {min(acc):.3f} to {max(acc):.3f}", f"(seed {m['config']['seed']}) scored "
              f"{m['kmeans_single_seed_acc']:.3f}", f"All {m['active_units']} dimensions are active, with test KL "
              f"between {min(kl):.1f} and {max(kl):.1f} nats", f"or {-elbo:.2f} ± {m['test_neg_elbo_se']:.2f} averaged"]
    text = " ".join(readme().split())  # prose is wrapped at 120 columns
    assert [q for q in quotes if q not in text] == []


def test_readme_beta_study_is_the_committed_beta_sweep():
    assert (ROOT / "beta_sweep.txt").read_text().strip() in readme()


def test_committed_figures_exist():
    names = ["train_loss", "latent_dist_before_train", "latent_dist_after_train", "kmean", "confusion", "tsne",
             "generated_num", "reconstructions", "kl_per_dim", "traversals", "interpolations", "beta_sweep"]
    assert [n for n in names if not (ROOT / "samples" / f"{n}.png").is_file()] == []


if __name__ == "__main__":
    print(training_table(utils.parse_loss_table((ROOT / "loss.txt").read_text())) + "\n")
    print(metrics_tables(json.loads((ROOT / "metrics.json").read_text())))
