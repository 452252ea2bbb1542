"""Plots commit → visible latency over time from sustained_bench's CSVs.

Usage: python plot_latency.py out.png run1.csv [run2.csv ...]
One panel per run: every probe as a dot, and the per-minute p50 / p99 as lines.
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    name = rows[0]["run"] if rows else path
    return name, [float(r["t_s"]) for r in rows], [float(r["visible_ms"]) for r in rows]


def quantile(xs, q):
    xs = sorted(xs)
    return xs[round((len(xs) - 1) * q)] if xs else float("nan")


def main():
    out, paths = sys.argv[1], sys.argv[2:]
    runs = [load(p) for p in paths]
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 3.2 * len(runs)), squeeze=False)
    for ax, (name, ts, ms) in zip(axes[:, 0], runs):
        ax.scatter([t / 60 for t in ts], ms, s=2, alpha=0.35, label="probe")
        minutes = sorted({int(t // 60) for t in ts})
        for q, style in [(0.5, "-"), (0.99, "--")]:
            ys = [quantile([m for t, m in zip(ts, ms) if int(t // 60) == k], q) for k in minutes]
            ax.plot([k + 0.5 for k in minutes], ys, style, color="black", label=f"p{int(q * 100)} per minute")
        ax.set_title(name)
        ax.set_xlabel("minutes")
        ax.set_ylabel("commit → visible (ms)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    main()
