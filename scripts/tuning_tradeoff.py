"""The validation trade-off of docs/results/tuning/: for each tuning sweep under ROOT (one directory per
configuration, written by `dpfpl sweep ... -c evaluation=validation`), DP-FPL's mean local and neighbour gain
over zero-shot of the published prompt, and its worst client, as a table (tradeoff.md) and a plot (tradeoff.png).

Run: python scripts/tuning_tradeoff.py runs/tuning-honest docs/results/tuning
"""

import glob
import json
import os
import statistics as st
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

root, out = sys.argv[1], sys.argv[2]
LABELS = {
    "rho0.03": "ρ_L 0.03",
    "rho0.1": "ρ_L 0.1",
    "rho0.3": "ρ_L 0.3",
    "lrg0.03": "lr-global 0.03",
    "lrg0.03-rho0.3": "lr-global 0.03, ρ_L 0.3",
    "gnr0.3": "ρ_G 0.3",
    "pa25": "publish-average 25",
    "lrg0.03-pa25": "lr-global 0.03, publish-average 25",
}
rows = []
for d in sorted(glob.glob(f"{root}/*")):
    cfg = os.path.basename(d)
    by = {}
    for path in glob.glob(f"{d}/runs/dpfpl_eps-*/summary.json"):
        s = json.load(open(path))
        name = os.path.basename(os.path.dirname(path))
        rank = name.split("_rank-")[1].split("_")[0]
        zs, pub = s["zeroshot"], s["published"]
        by.setdefault(rank, []).append(
            (
                100 * (pub["local-acc"] - zs["local-acc"]),
                100 * (pub["neighbor-acc"] - zs["neighbor-acc"]),
                100 * s["worst-client"]["gain"],
            )
        )
    for rank, r in sorted(by.items()):
        label = LABELS.get(cfg, cfg) + ("" if rank == "2" else f", rank {rank}")
        rows.append(
            (
                label,
                st.mean(x[0] for x in r),
                st.stdev(x[0] for x in r),
                st.mean(x[1] for x in r),
                st.stdev(x[1] for x in r),
                min(x[2] for x in r),
                len(r),
            )
        )
lines = [
    "| configuration (over the demo preset of the earlier benchmark: ρ_L 0.1, rank 2) | validation local gain | validation neighbour gain | worst client (worst seed) | seeds |",
    "|---|---:|---:|---:|---:|",
]
for label, gain, gain_std, nb, nb_std, w, k in sorted(rows, key=lambda r: -r[1]):
    lines.append(f"| {label} | {gain:+.2f} ± {gain_std:.2f} | {nb:+.2f} ± {nb_std:.2f} | {w:+.1f} | {k} |")
open(f"{out}/tradeoff.md", "w").write("\n".join(lines) + "\n")
fig, ax = plt.subplots(figsize=(7, 5))
for label, gain, gain_std, nb, nb_std, w, _ in rows:
    ok = w >= -2.0
    ax.errorbar(
        nb, gain, xerr=nb_std, yerr=gain_std, fmt="o" if ok else "x", color="tab:green" if ok else "tab:red", capsize=3
    )
    ax.annotate(label, (nb, gain), textcoords="offset points", xytext=(5, 4), fontsize=7)
ax.axhline(3, color="grey", ls=":", lw=1)
ax.axvline(-3, color="grey", ls=":", lw=1)
ax.set_xlabel("neighbour accuracy gain over zero-shot (points, validation, mean ± std of 3 seeds)")
ax.set_ylabel("local accuracy gain over zero-shot (points)")
ax.set_title(
    "DP-FPL at published ε = 1: validation trade-off\n(green: every client within 2 points in every seed)", fontsize=9
)
fig.tight_layout()
fig.savefig(f"{out}/tradeoff.png", dpi=120)
print("\n".join(lines))
