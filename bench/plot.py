#!/usr/bin/env python3
"""Plots for mpt-bench: throughput vs offered rate, residual loss vs per-path loss, RTT CDFs.

usage: bench/plot.py RESULTS_DIR   (reads results.json, writes *.png beside it)
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

out = Path(sys.argv[1])
r = json.loads((out / "results.json").read_text())
cells = r["cells"]
title = f"mpt-bench {r['date']} ({r['mode']}, {r['cpus']} CPUs)"

# throughput vs offered
fig, ax = plt.subplots(figsize=(7, 4.5))
for c in cells:
    if c["throughput"]:
        xs = sorted(int(k) for k in c["throughput"])
        ax.plot(xs, [c["throughput"][str(x)] for x in xs], marker="o", label=c["name"])
ax.plot([10, 1000], [10, 1000], color="grey", linestyle=":", label="offered")
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("offered Mbit/s (1400-byte UDP)")
ax.set_ylabel("delivered Mbit/s")
ax.set_title(title)
ax.legend(fontsize=7)
ax.grid(True, which="both", alpha=0.3)
fig.tight_layout()
fig.savefig(out / "throughput.png", dpi=120)

# residual loss vs per-path loss
fig, ax = plt.subplots(figsize=(7, 4.5))
for paths in (1, 2, 3):
    pts = sorted(
        (c["loss_pct"], c["residual_loss"])
        for c in cells
        if c["setup"] == "tunnel" and c["paths"] == paths and c["residual_loss"] is not None
    )
    if pts:
        ax.plot([p for p, _ in pts], [l * 100 for _, l in pts], marker="o", label=f"tunnel, {paths} path(s)")
        ax.plot(
            [p for p, _ in pts],
            [(p / 100) ** paths * 100 for p, _ in pts],
            linestyle=":",
            color=ax.lines[-1].get_color(),
            label=f"p^{paths}",
        )
socat = sorted((c["loss_pct"], c["residual_loss"]) for c in cells if c["setup"] == "socat" and c["residual_loss"] is not None)
if socat:
    ax.plot([p for p, _ in socat], [l * 100 for _, l in socat], marker="s", label="one socat relay")
ax.set_xlabel("loss per path and direction (%)")
ax.set_ylabel("delivered loss (%)")
ax.set_title(title)
ax.legend(fontsize=7)
ax.grid(True, alpha=0.3)
fig.tight_layout()
fig.savefig(out / "residual_loss.png", dpi=120)

# RTT CDFs
fig, ax = plt.subplots(figsize=(7, 4.5))
for c in cells:
    s = sorted(c["rtt_samples_ms"])
    if s:
        ax.plot(s, [(i + 1) / len(s) for i in range(len(s))], label=c["name"])
ax.set_xscale("log")
ax.set_xlabel("RTT (ms)")
ax.set_ylabel("fraction of probes")
ax.set_title(title)
ax.legend(fontsize=6)
ax.grid(True, which="both", alpha=0.3)
fig.tight_layout()
fig.savefig(out / "rtt_cdf.png", dpi=120)
print(f"wrote {out}/throughput.png, residual_loss.png, rtt_cdf.png")
