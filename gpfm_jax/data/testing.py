"""Helpers for tests and benchmarks: real H&E tiles cut from the repo's test images, and deliberately bad files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

_REPO = Path(__file__).resolve().parents[2]
HE_IMAGES = (_REPO / "tests/data/tiatoolbox_target_image.png", _REPO / "tests/data/wsidicom_test_tile.png")
SLIDE = _REPO / "tests/data/cmu_small_region.svs"


def cut_tiles(out_dir: str | Path, n: int = 8, size: int = 128, ext: str = ".jpg", seed: int = 0,
              subdirs: int = 1) -> list[Path]:
    """n RGB tiles of size x size cut at random offsets from the two H&E test images, spread over `subdirs`."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    sources = [Image.open(p).convert("RGB") for p in HE_IMAGES]
    paths = []
    for i in range(n):
        src = sources[i % len(sources)]
        s = min(size, src.width, src.height)
        x, y = (int(rng.integers(0, d - s + 1)) for d in src.size)
        d = out_dir / f"slide_{i % subdirs}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"tile_{i:04d}{ext}"
        tile = src.crop((x, y, x + s, y + s))
        if s != size:
            tile = tile.resize((size, size), Image.BICUBIC)
        tile.save(p, quality=90) if ext in (".jpg", ".jpeg") else tile.save(p)
        paths.append(p)
    return paths


def write_bad_files(out_dir: str | Path) -> list[Path]:
    """Files a tile folder meets in practice and that cannot be decoded: zero bytes, truncated JPEG and PNG,
    random bytes, text with an image extension."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    good = Image.open(HE_IMAGES[1]).convert("RGB")
    buf = io.BytesIO()
    good.save(buf, "JPEG", quality=90)
    jpg = buf.getvalue()
    buf = io.BytesIO()
    good.save(buf, "PNG")
    png = buf.getvalue()
    files = {
        "bad_zero.jpg": b"",
        "bad_truncated.jpg": jpg[: len(jpg) // 2],
        "bad_truncated.png": png[: len(png) // 3],
        "bad_random.jpg": np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "bad_text.png": b"this is not an image\n",
    }
    paths = []
    for name, data in files.items():
        (out_dir / name).write_bytes(data)
        paths.append(out_dir / name)
    return paths


def write_odd_mode_files(out_dir: str | Path) -> list[Path]:
    """Decodable tiles in modes other than RGB (grayscale, RGBA, CMYK JPEG, palette, 16-bit)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    im = Image.open(HE_IMAGES[1]).convert("RGB").resize((64, 64))
    variants = {
        "mode_L.png": im.convert("L"),
        "mode_RGBA.png": im.convert("RGBA"),
        "mode_CMYK.jpg": im.convert("CMYK"),
        "mode_P.png": im.convert("P"),
        "mode_I16.png": Image.fromarray((np.asarray(im.convert("L")).astype(np.uint16) * 200)),
    }
    paths = []
    for name, img in variants.items():
        img.save(out_dir / name)
        paths.append(out_dir / name)
    return paths
