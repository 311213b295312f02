#!/usr/bin/env python3
"""Renders the tunnel benchmark's chart from the JSON that bench-tunnel writes.

usage: python3 bench/chart.py docs/bench/tunnel.json docs/bench/tunnel.png

Left: ratio to a direct connection per row (log scale), grouped bars per path.
Right: resident memory per idle stream, KiB.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    src, dst = sys.argv[1], sys.argv[2]
    with open(src) as f:
        data = json.load(f)
    paths = [p for p in data["paths"] if p != "direct"]
    ratio_rows = [r for r in data["rows"] if r["ratio_to_direct"]]
    mem = next((r for r in data["rows"] if r["key"] == "mem"), None)

    fig, (ax, axm) = plt.subplots(
        1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [4, 1]}
    )
    n = max(len(paths), 1)
    width = 0.8 / n
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, p in enumerate(paths):
        xs, ys = [], []
        for j, r in enumerate(ratio_rows):
            v = r["ratios"].get(p)
            if v is not None and v > 0:
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(v)
        bars = ax.bar(xs, ys, width, label=p, color=colors[i % len(colors)])
        for b, v in zip(bars, ys):
            ax.annotate(
                f"{v:.2f}" if v >= 0.1 else f"{v:.3f}",
                (b.get_x() + b.get_width() / 2, v),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(ratio_rows)))
    ax.set_xticklabels([r["label"] for r in ratio_rows], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("ratio to direct (higher is better)")
    ax.set_title("Throughput, transactions and connection rate relative to direct")
    ax.legend(fontsize=8)

    if mem:
        mp = [p for p in paths if mem["values"].get(p) is not None]
        vals = [mem["values"][p] for p in mp]
        bars = axm.bar(
            range(len(mp)),
            vals,
            color=[colors[paths.index(p) % len(colors)] for p in mp],
        )
        for b, v in zip(bars, vals):
            axm.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
        axm.axhline(16, color="red", linewidth=0.8, linestyle="--", label="target 16 KiB")
        axm.set_xticks(range(len(mp)))
        axm.set_xticklabels(mp, rotation=25, ha="right", fontsize=8)
        axm.set_ylabel("KiB per idle stream (lower is better)")
        axm.set_title(mem["label"].split(",")[0], fontsize=9)
        axm.legend(fontsize=7)
    else:
        axm.axis("off")

    title = "Routy tunnel benchmark (loopback, one run)"
    if data.get("quick"):
        title += " --quick"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main()
