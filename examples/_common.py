"""Helpers shared by the example scripts: results folders, markdown tables, intervals, plots."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from scipy.stats import t as t_dist


def results_dir(path: str) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def markdown(rows: list[dict], columns: list[str] | None = None) -> str:
    """A markdown table of ``rows`` (dicts) in the order of ``columns``."""
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_table(out: Path, name: str, rows: list[dict], title: str, columns: list[str] | None = None) -> str:
    """Print the table and write it to ``out/name.md``."""
    text = f"## {title}\n\n{markdown(rows, columns)}\n"
    (out / f"{name}.md").write_text(text)
    print("\n" + text)
    return text


def mean_ci(values) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (n - 1 degrees of freedom): with 3 runs the
    quantile is 4.30, not the normal 1.96, which would claim an interval twice too narrow."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = x.numel()
    half = t_dist.ppf(0.975, n - 1) * x.std().item() / math.sqrt(n) if n > 1 else float("nan")
    return x.mean().item(), half


def fmt_ci(values, digits: int = 3) -> str:
    mean, half = mean_ci(values)
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save(fig, out: Path, name: str) -> Path:
    path = out / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
    return path
