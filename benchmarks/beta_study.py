"""Does β disentangle MNIST's code? The β study's answer: python benchmarks/beta_study.py [--sweep beta_sweep]

Reads every run's metrics.json under SWEEP/grid/beta_<b>/seed_<s>/ (the README's β study) and prints two Markdown
tables. Per disentanglement metric: the mean ± sample std over seeds at each β, Spearman's rho of the metric against
β over all runs, and the share of the runs' variance that β explains (one-way ANOVA η², with the F test's p); the
rest is the spread between training seeds. Per Morpho-MNIST factor and β: in how many seeds the factor's most
informative dimension is its own (no other factor's, area aside), and its mean per-factor MIG. The README quotes it.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
from scipy.stats import f_oneway, spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from measures import AVERAGED  # noqa: E402  the factors the scores average; area ≈ length × thickness is not

METRICS = {"mig": "MIG", "sap": "SAP", "dci_d": "DCI D", "dci_c": "DCI C", "dci_i": "DCI I"}


def study_runs(sweep):
    """-> {β: [disentanglement block of each seed's metrics.json]}, β ascending, runs without the block left out."""
    runs = {}
    for path in sorted(Path(sweep, "grid").glob("beta_*/seed_*/metrics.json")):
        block = json.loads(path.read_text()).get("disentanglement")
        if block:
            runs.setdefault(float(path.parts[-3][5:]), []).append(block)
    return dict(sorted(runs.items()))


def eta_squared(groups):
    """[[values of one β]] -> the share of the total sum of squares between the groups' means (one-way ANOVA)."""
    everything = np.concatenate(groups)
    between = sum(len(g) * (np.mean(g) - everything.mean()) ** 2 for g in groups)
    return float(between / ((everything - everything.mean()) ** 2).sum())


def metric_table(runs):
    """{β: [blocks]} -> Markdown: per metric, mean ± std per β, Spearman rho against β, η² and its p."""
    betas = list(runs)
    lines = ["| metric | " + " | ".join(f"β = {b:g}" for b in betas) + " | Spearman ρ with β (p) | η² of β (p) |",
             "|---" * (len(betas) + 3) + "|"]
    for key, name in METRICS.items():
        groups = [[blk[key] for blk in runs[b]] for b in betas]
        cells = [f"{statistics.fmean(g):.3f} ± {statistics.stdev(g):.3f}" for g in groups]
        rho = spearmanr([b for b, g in zip(betas, groups) for _ in g], np.concatenate(groups))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {rho.statistic:+.2f} ({rho.pvalue:.1g}) | "
                     f"{eta_squared(groups):.2f} ({f_oneway(*groups).pvalue:.1g}) |")
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
    runs = study_runs(p.parse_args(argv).sweep)
    print(f"{sum(map(len, runs.values()))} runs; mean ± sample std over seeds\n\n{metric_table(runs)}\n")
    print(f"Seeds in which the factor's top dimension is its own / seeds, and its mean per-factor MIG\n\n"
          f"{factor_table(runs)}")


if __name__ == "__main__":
    main()
