"""Training logs: one log line per `log_every` steps, and a dependency-free SVG of the loss curves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def log_entry(acc: list[dict[str, Any]], objective: str, elapsed_s: float) -> dict[str, Any]:
    """One log line: the mean losses of the steps in `acc`, the last step's lr and gradient norm."""
    last = acc[-1]
    entry = {
        "step": last["step"],
        "loss": sum(r["loss"] for r in acc) / len(acc),
        "ar_loss": None if last["ar_loss"] is None else sum(r["ar_loss"] for r in acc) / len(acc),
        "lr": last["lr"],
        "grad_norm": last["grad_norm"],
        "elapsed_s": elapsed_s,
    }
    if objective == "diffusion":
        entry["diffusion_loss"] = sum(r["diffusion_loss"] for r in acc) / len(acc)
    return entry


def write_loss_plot(log: list[dict[str, Any]], path: Path) -> None:
    """A dependency-free SVG of the loss curves (total, diffusion, AR) against the step."""
    series = {
        k: [(e["step"], e[k]) for e in log if e.get(k) is not None] for k in ("loss", "diffusion_loss", "ar_loss")
    }
    series = {k: v for k, v in series.items() if v}
    if not series:
        return
    W, H, pad = 640, 360, 48
    xs = [s for v in series.values() for s, _ in v]
    ys = [math.log10(max(y, 1e-6)) for v in series.values() for _, y in v]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(ys), max(max(ys), min(ys) + 1e-3)

    def pt(s: float, y: float) -> str:
        px = pad + (s - x0) / (x1 - x0) * (W - 2 * pad)
        py = H - pad - (math.log10(max(y, 1e-6)) - y0) / (y1 - y0) * (H - 2 * pad)
        return f"{px:.1f},{py:.1f}"

    colors = {"loss": "#222", "diffusion_loss": "#1f77b4", "ar_loss": "#d62728"}
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
        f'font-size="12"><rect width="{W}" height="{H}" fill="white"/>',
        f'<line x1="{pad}" y1="{H - pad}" x2="{W - pad}" y2="{H - pad}" stroke="#888"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{H - pad}" stroke="#888"/>',
        f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle">step ({x0}-{x1})</text>',
        f'<text x="8" y="{pad - 12}">loss (log10 axis, {10**y0:.3g}-{10**y1:.3g})</text>',
    ]
    for i, (k, v) in enumerate(series.items()):
        parts.append(
            f'<polyline fill="none" stroke="{colors[k]}" stroke-width="1.5" '
            f'points="{" ".join(pt(s, y) for s, y in v)}"/>'
        )
        parts.append(f'<text x="{W - pad - 120}" y="{pad + 16 * i}" fill="{colors[k]}">{k}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")
