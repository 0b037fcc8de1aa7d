"""The RL stage's training curves as one PNG beside metrics.jsonl (return, SR, oracle rate, interventions per update).

Drawn with Pillow (already a dependency; matplotlib is not), so the picture needs nothing the run does not.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image, ImageDraw

PANELS = (("return", "mean return"), ("sr", "success rate"), ("oracle_rate", "oracle share of steps"),
          ("intervention_rate", "interventions per episode"))
PANEL_W, PANEL_H, MARGIN = 360, 220, 44


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's rows; a line cut short by a kill is skipped (the run logs that update again on resume)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _panel(draw: ImageDraw.ImageDraw, x0: int, y0: int, title: str, xs: list[float], ys: list[float]) -> None:
    left, top = x0 + MARGIN, y0 + 24
    right, bottom = x0 + PANEL_W - 12, y0 + PANEL_H - 28
    draw.rectangle([left, top, right, bottom], outline=(120, 120, 120))
    draw.text((x0 + MARGIN, y0 + 6), title, fill=(0, 0, 0))
    if not xs:
        draw.text((left + 8, top + 8), "no updates yet", fill=(120, 120, 120))
        return
    lo, hi = min(ys), max(ys)
    if hi - lo < 1e-9:  # a flat curve sits in the middle of its panel
        lo, hi = lo - 0.5, hi + 0.5
    first, last = xs[0], xs[-1] if xs[-1] > xs[0] else xs[0] + 1
    points = [(left + (x - first) / (last - first) * (right - left), bottom - (y - lo) / (hi - lo) * (bottom - top))
              for x, y in zip(xs, ys)]
    if len(points) > 1:
        draw.line(points, fill=(31, 119, 180), width=2)
    for px, py in points if len(points) <= 60 else points[-1:]:
        draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=(31, 119, 180))
    draw.text((x0 + 2, top - 4), f"{hi:.3g}", fill=(60, 60, 60))
    draw.text((x0 + 2, bottom - 8), f"{lo:.3g}", fill=(60, 60, 60))
    draw.text((left, bottom + 6), f"update {first:g}", fill=(60, 60, 60))
    draw.text((right - 70, bottom + 6), f"update {last:g}", fill=(60, 60, 60))


def plot_metrics(rows: list[dict], out: Path) -> Path:
    """Write the 2x2 panel PNG of the rows' curves to `out` (atomically: a kill leaves the previous picture)."""
    image = Image.new("RGB", (2 * PANEL_W, 2 * PANEL_H), "white")
    draw = ImageDraw.Draw(image)
    for i, (key, title) in enumerate(PANELS):
        usable = [r for r in rows if isinstance(r.get(key), (int, float)) and "update" in r]
        _panel(draw, (i % 2) * PANEL_W, (i // 2) * PANEL_H, title, [r["update"] for r in usable],
               [float(r[key]) for r in usable])
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, out)
    return out
