#!/usr/bin/env python3
"""Plots for mpt-bench: throughput vs offered rate, residual loss vs per-path loss, RTT CDFs,
and (full mode) TCP goodput and request/response p99 per setup vs loss.

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
written = ["throughput.png", "residual_loss.png", "rtt_cdf.png"]

# TCP through each setup (full mode): goodput and request/response p99 vs loss
vpn = r.get("vpn") or []
if vpn:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for setup in dict.fromkeys(c["setup"] for c in vpn):
        pts = sorted((c["loss_pct"], c) for c in vpn if c["setup"] == setup)
        label = pts[0][1]["name"].rsplit(",", 1)[0]
        good = [(p, c["tcp_mbit"]) for p, c in pts if c["tcp_mbit"] is not None]
        if good:
            left.plot([p for p, _ in good], [max(m, 0.01) for _, m in good], marker="o", label=label)
        rr = [(p, c["rr_ms"]["p99"]) for p, c in pts if c.get("rr_ms")]
        if rr:
            right.plot([p for p, _ in rr], [v for _, v in rr], marker="o", label=label)
    left.set_yscale("log")
    left.set_xlabel("loss per path and direction (%)")
    left.set_ylabel("single-stream TCP goodput (Mbit/s)")
    right.set_yscale("log")
    right.set_xlabel("loss per path and direction (%)")
    right.set_ylabel("TCP request/response p99 (ms)")
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "tcp.png", dpi=120)
    written.append("tcp.png")
print(f"wrote {', '.join(written)} in {out}")
