"""Attention heatmaps over the slide thumbnail, as CLAM draws them: each tile's attention converted to its
percentile within the slide (so slides and models compare on one scale; `scale="linear"` shows attention / max
instead, i.e. where the attention mass is), coloured with a jet colormap, averaged where tiles overlap, blended over
the thumbnail (tissue without tiles and background stay as they are), and a colour bar on the right. The PNG is
written under a temporary name and renamed.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
from PIL import Image, ImageDraw

SCALES = ("percentile", "linear")


def percentiles(scores: np.ndarray) -> np.ndarray:
    """Percentile rank in [0, 1] of each score within the slide (ties averaged; scipy's percentileofscore 'mean'
    up to the /100)."""
    s = np.asarray(scores, np.float64)
    if s.size == 1:
        return np.ones(1)
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    below = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return (below + (counts + 1) / 2.0 - 1)[inv] / (s.size - 1)


def jet(x: np.ndarray) -> np.ndarray:
    """uint8 RGB of matplotlib's 'jet' (piecewise linear) for x in [0, 1]."""
    x = np.clip(np.asarray(x, np.float64), 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * x - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def read_attention(attention_h5: str | os.PathLike, features_h5: str | os.PathLike | None = None,
                   tile_span: int | None = None):
    """(scores [N], coords [N, 2], level-0 tile span) from an attention file (and the features file for coords /
    patch_size where the attention file lacks them); tile_span overrides the stored span."""
    with h5py.File(attention_h5, "r") as f:
        if "attention" not in f:
            raise ValueError(f"{attention_h5}: no 'attention' dataset (has {sorted(f)})")
        scores = np.asarray(f["attention"][()], np.float64).reshape(-1)
        coords = np.asarray(f["coords"][()]) if "coords" in f else None
        span = f.attrs.get("patch_size")
    if features_h5 is not None:
        with h5py.File(features_h5, "r") as f:
            if coords is None:
                coords = np.asarray(f["coords"][()])
            elif len(f["coords"]) != len(coords) or not np.array_equal(f["coords"][()], coords):
                raise ValueError(f"{attention_h5} and {features_h5} have different tiles (coords differ)")
            span = f["coords"].attrs.get("patch_size", span)
    if coords is None:
        raise ValueError(f"{attention_h5}: no coords; pass --features SLIDE.h5")
    if span is not None and not np.isfinite(span):
        span = None
    span = tile_span or span
    if span is None:
        raise ValueError(f"{attention_h5}: unknown tile size (no coords.attrs['patch_size']); pass --tile-span")
    if len(scores) != len(coords):
        raise ValueError(f"{attention_h5}: {len(scores)} attention scores for {len(coords)} tiles")
    if not np.isfinite(scores).all():
        raise ValueError(f"{attention_h5}: attention contains NaN or Inf")
    return scores, coords, int(span)


def draw_heatmap(thumbnail: Image.Image, scale: float, coords: np.ndarray, scores: np.ndarray, span: int,
                 alpha: float = 0.5, legend: bool = True, value_scale: str = "percentile") -> Image.Image:
    """thumbnail: RGB image of the slide at `scale` thumbnail pixels per level-0 pixel."""
    if value_scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {value_scale!r}")
    base = np.asarray(thumbnail.convert("RGB"), np.float64)
    h, w = base.shape[:2]
    acc = np.zeros((h, w), np.float64)
    cnt = np.zeros((h, w), np.float64)
    pct = percentiles(scores) if value_scale == "percentile" else scores / max(float(np.max(scores)), 1e-30)
    for (x, y), p in zip(np.asarray(coords, np.float64), pct):
        x0, y0 = int(np.floor(x * scale)), int(np.floor(y * scale))
        x1, y1 = int(np.ceil((x + span) * scale)), int(np.ceil((y + span) * scale))
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if x1 > x0 and y1 > y0:
            acc[y0:y1, x0:x1] += p
            cnt[y0:y1, x0:x1] += 1
    covered = cnt > 0
    colour = jet(np.where(covered, acc / np.maximum(cnt, 1), 0.0)).astype(np.float64)
    out = np.where(covered[..., None], (1 - alpha) * base + alpha * colour, base)
    img = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))
    return _with_colour_bar(img, "attention %ile" if value_scale == "percentile" else "attention / max") \
        if legend else img


def _with_colour_bar(img: Image.Image, title: str) -> Image.Image:
    bar_w, pad = max(12, img.width // 40), 8
    canvas = Image.new("RGB", (img.width + bar_w + 5 * pad + 30, img.height), "white")
    canvas.paste(img, (0, 0))
    top, bottom = pad * 2, img.height - pad * 2
    ramp = jet(np.linspace(1.0, 0.0, max(bottom - top, 2)))[:, None, :].repeat(bar_w, 1)
    x0 = img.width + pad
    canvas.paste(Image.fromarray(ramp), (x0, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((x0 + bar_w + 4, top - 4), "100" if "ile" in title else "1", fill="black")
    draw.text((x0 + bar_w + 4, bottom - 10), "0", fill="black")
    draw.text((x0, 2), title, fill="black")
    return canvas


def slide_heatmap(slide_path: str | os.PathLike, attention_h5: str | os.PathLike, out_png: str | os.PathLike,
                  features_h5: str | os.PathLike | None = None, max_size: int = 2048, alpha: float = 0.5,
                  tile_span: int | None = None, value_scale: str = "percentile") -> Path:
    """Draws the attention of one slide over its thumbnail (longest side max_size) and writes the PNG."""
    import openslide

    scores, coords, span = read_attention(attention_h5, features_h5, tile_span)
    try:
        slide = openslide.OpenSlide(str(slide_path))
    except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError, FileNotFoundError) as e:
        raise ValueError(f"{slide_path}: cannot open slide ({e})") from None
    try:
        w0, h0 = slide.dimensions
        if coords.max(0)[0] >= w0 or coords.max(0)[1] >= h0:
            raise ValueError(f"{attention_h5}: coords reach beyond {slide_path} ({w0}x{h0}); wrong slide?")
        thumb = slide.get_thumbnail((max_size, max_size))
    finally:
        slide.close()
    img = draw_heatmap(thumb, thumb.width / w0, coords, scores, span, alpha, value_scale=value_scale)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    img.save(tmp, format="PNG")
    os.replace(tmp, out)
    return out
