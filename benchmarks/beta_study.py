"""Does β disentangle MNIST's code? The β study's answer: python benchmarks/beta_study.py [--sweep beta_sweep]

Reads every run's metrics.json under SWEEP/grid/beta_<b>/seed_<s>/ (the README's β study) and prints two Markdown
tables. Per disentanglement metric: the mean ± sample std over seeds at each β, Spearman's rho of the metric against
β over all runs, and how the runs' variance splits. Every β trains the same seeds, and a seed fixes the initial
weights, the batch order and DCI's split at every β, so the split is a two-way ANOVA without interaction: β's share
(η², and ω², which does not grow with the number of βs as η² does), the seed's share, the rest; each with its F test's
p. Per Morpho-MNIST factor and β: in how many seeds the factor's most informative dimension is its own (no other
factor's, area aside), and its mean per-factor MIG. The README quotes it.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
from scipy.stats import f as f_dist, spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from measures import AVERAGED  # noqa: E402  the factors the scores average; area ≈ length × thickness is not

METRICS = {"mig": "MIG", "sap": "SAP", "dci_d": "DCI D", "dci_c": "DCI C", "dci_i": "DCI I"}


def study_runs(sweep):
    """-> {β: [disentanglement block of each seed's metrics.json]}, {β: [its seeds]}, β ascending and seeds in the
    same order; runs without the block left out."""
    runs, seeds = {}, {}
    paths = Path(sweep, "grid").glob("beta_*/seed_*/metrics.json")
    for path in sorted(paths, key=lambda p: (float(p.parts[-3][5:]), int(p.parts[-2][5:]))):
        block = json.loads(path.read_text()).get("disentanglement")
        if block:
            runs.setdefault(float(path.parts[-3][5:]), []).append(block)
            seeds.setdefault(float(path.parts[-3][5:]), []).append(int(path.parts[-2][5:]))
    return runs, seeds


def variance_shares(table):
    """(βs, seeds) array -> β's η², ω² and p, the seed's η² and p: two-way ANOVA, one run per cell, no interaction."""
    (b, n), grand = table.shape, table.mean()
    ss_total = ((table - grand) ** 2).sum()
    ss_beta, ss_seed = n * ((table.mean(1) - grand) ** 2).sum(), b * ((table.mean(0) - grand) ** 2).sum()
    df_rest = (b - 1) * (n - 1)
    ms_rest = (ss_total - ss_beta - ss_seed) / df_rest
    p_beta = f_dist.sf(ss_beta / (b - 1) / ms_rest, b - 1, df_rest)
    p_seed = f_dist.sf(ss_seed / (n - 1) / ms_rest, n - 1, df_rest)
    # ω² = (SS_β − df_β MS_rest) / (SS_total + MS_rest) (Olejnik & Algina 2003): η² less what chance alone gives
    omega = (ss_beta - (b - 1) * ms_rest) / (ss_total + ms_rest)
    return ss_beta / ss_total, omega, p_beta, ss_seed / ss_total, p_seed


def metric_table(runs, seeds):
    """{β: [blocks]}, each β's seeds -> Markdown: per metric, mean ± std per β, Spearman rho against β, variance split."""
    betas = list(runs)
    lines = ["| metric | " + " | ".join(f"β = {b:g}" for b in betas) + " | Spearman ρ with β (p) | β: η², ω² (p) | "
             "seed: η² (p) |", "|---" * (len(betas) + 4) + "|"]
    for key, name in METRICS.items():
        groups = [[blk[key] for blk in runs[b]] for b in betas]
        cells = [f"{statistics.fmean(g):.3f} ± {statistics.stdev(g):.3f}" if len(g) > 1 else f"{g[0]:.3f} (1 seed)"
                 for g in groups]
        rho = spearmanr([b for b, g in zip(betas, groups) for _ in g], np.concatenate(groups))
        split = "— (the βs' seeds differ) | —"
        if all(s == seeds[betas[0]] for s in seeds.values()) and len(seeds[betas[0]]) > 1:
            eta, omega, p_beta, seed_eta, p_seed = variance_shares(np.array(groups))
            split = f"{eta:.2f}, {omega:.2f} ({p_beta:.1g}) | {seed_eta:.2f} ({p_seed:.1g})"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {rho.statistic:+.2f} ({rho.pvalue:.1g}) | {split} |")
    return "\n".join(lines)


def owns_a_dimension(block, factor):
    """-> whether the factor's most informative dimension is no other averaged factor's most informative one."""
    top = {f: block["per_factor"][f]["top_dim"] for f in AVERAGED}
    return all(top[factor] != d for f, d in top.items() if f != factor)


def factor_table(runs):
    """{β: [blocks]} -> Markdown: per factor and β, 'seeds where it owns its top dimension / seeds, mean MIG'."""
    betas = list(runs)
    lines = ["| factor | " + " | ".join(f"β = {b:g}" for b in betas) + " |", "|---" * (len(betas) + 1) + "|"]
    for factor in AVERAGED:
        cells = [f"{sum(owns_a_dimension(blk, factor) for blk in runs[b])}/{len(runs[b])}, "
                 f"{statistics.fmean(blk['per_factor'][factor]['mig'] for blk in runs[b]):.3f}" for b in betas]
        lines.append(f"| {factor} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", default=str(ROOT / "beta_sweep"), help="the grid's OUT_DIR (default: ROOT/beta_sweep)")
    runs, seeds = study_runs(p.parse_args(argv).sweep)
    print(f"{sum(map(len, runs.values()))} runs; mean ± sample std over seeds\n\n{metric_table(runs, seeds)}\n")
    print(f"Seeds in which the factor's top dimension is its own / seeds, and its mean per-factor MIG\n\n"
          f"{factor_table(runs)}")


if __name__ == "__main__":
    main()
