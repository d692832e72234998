"""A PNG of the ratings with their bootstrap intervals (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_ratings(report: dict[str, Any], out: str | Path, title: str = "Arena ratings") -> None:
    """Horizontal interval plot of ``compute_ratings``' report, best model on top."""
    from matplotlib.figure import Figure

    rows = [r for r in report["models"] if r["rating"] is not None][::-1]
    fig = Figure(figsize=(7.5, 0.9 + 0.38 * max(len(rows), 1)), dpi=120)
    ax = fig.add_subplot()
    y = range(len(rows))
    ratings = [r["rating"] for r in rows]
    low = [r["rating"] - r["ci_low"] if r["ci_low"] is not None else 0 for r in rows]
    high = [r["ci_high"] - r["rating"] if r["ci_high"] is not None else 0 for r in rows]
    ax.errorbar(ratings, list(y), xerr=[low, high], fmt="o", color="#1f5fa8", ecolor="#7ea6d8",
                elinewidth=3, capsize=4)
    ax.set_yticks(list(y), [f"{r['name']}  ({r['votes']})" for r in rows])
    ax.axvline(1000, color="#bbbbbb", linewidth=0.8, zorder=0)
    ci = report.get("bootstrap", {}).get("ci", 0.95)
    ax.set_xlabel(f"Bradley-Terry rating (Elo scale), {ci:.0%} bootstrap interval")
    ax.set_title(f"{title}: {report['votes']} votes")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, format="png")
