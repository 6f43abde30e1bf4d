"""DINOv2 multi-crop augmentation in numpy + PIL (no torch).

Semantics follow the torchvision transforms DINOv2 composes (RandomResizedCrop, RandomHorizontalFlip,
RandomApply(ColorJitter), RandomGrayscale, GaussianBlur(kernel 9), RandomSolarize(128), ToTensor, Normalize), with
the colour ops computed on float32 in [0, 1] like torchvision's tensor path. All crops of one size are stacked and
processed together so the per-op Python overhead is paid once per group, not once per crop; that and a closed-form
hue rotation (no HSV round trip) are where the speed comes from.

Randomness: every decision is drawn from the ``numpy.random.Generator`` passed in, in a fixed order, so the output
is a pure function of (image, generator state). The pipeline seeds that generator from (seed, shard, index).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from gpfm_jax.data.batch import GLOBAL_CROPS, LOCAL_CROPS
from gpfm_jax.data.normalize import IMAGENET_MEAN, IMAGENET_STD  # re-exported: `data.augment.IMAGENET_MEAN` stays

_GRAY_W = np.array([0.2989, 0.587, 0.114], np.float32)  # torchvision rgb_to_grayscale weights
# Ruifrok & Johnston H&E-DAB stain matrix (rows: H, E, DAB optical densities), as in skimage.color.rgb2hed.
_HED_FROM_RGB_INV = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float64
)


@dataclasses.dataclass(frozen=True)
class MultiCropConfig:
    """Every number of the DINOv2/GPFM multi-crop recipe (defaults = SPEC.md, ViT-L config)."""

    global_size: int = 224
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_size: int = 98
    local_scale: tuple[float, float] = (0.05, 0.32)
    num_local_crops: int = 8
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    # Effective probabilities (DINOv2's GaussianBlur(p) applies with 1 - p; these are the resulting ones).
    blur_p_global1: float = 0.0
    blur_p_global2: float = 0.9
    blur_p_local: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int = 9
    solarize_p_global2: float = 0.2
    solarize_threshold: float = 128.0 / 255.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Pathology options, off by default (not in the reference recipe).
    vflip_p: float = 0.0
    rot90: bool = False
    hed_p: float = 0.0
    hed_sigma: float = 0.05

    def __post_init__(self) -> None:
        for name in ("global_scale", "local_scale", "ratio", "blur_sigma"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"MultiCropConfig.{name} must satisfy 0 < lo <= hi, got {(lo, hi)}")
        for f in dataclasses.fields(self):
            if f.name.endswith("_p") or "_p_" in f.name:
                v = getattr(self, f.name)
                if not 0.0 <= v <= 1.0:
                    raise ValueError(f"MultiCropConfig.{f.name} must be a probability, got {v}")
        if self.blur_kernel % 2 != 1:
            raise ValueError("blur_kernel must be odd")


# ----------------------------------------------------------------------------------------------------------------
# Geometry


def rrc_params(
    rng: np.random.Generator, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """RandomResizedCrop box (top, left, h, w): torchvision's algorithm (10 tries, then a central crop)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclasses.dataclass
class CropPlan:
    """The geometric decisions for n crops of one image, drawn before any pixel work (cheap to test)."""

    boxes: list[tuple[int, int, int, int]]  # (top, left, h, w) in source pixels
    hflip: np.ndarray  # bool [n]
    vflip: np.ndarray  # bool [n]
    rot90: np.ndarray  # int [n], quarter turns


def draw_crop_plan(
    rng: np.random.Generator, height: int, width: int, n: int, scale: tuple[float, float], cfg: MultiCropConfig
) -> CropPlan:
    boxes = [rrc_params(rng, height, width, scale, cfg.ratio) for _ in range(n)]
    u = rng.random((n, 2))
    rot = rng.integers(0, 4, n) if cfg.rot90 else np.zeros(n, np.int64)
    return CropPlan(boxes, u[:, 0] < cfg.hflip_p, u[:, 1] < cfg.vflip_p, rot)


def apply_crop_plan(img: Image.Image, plan: CropPlan, size: int) -> np.ndarray:
    """uint8 [n, size, size, 3]: crop, bicubic resize (PIL, antialiased like torchvision on PIL images), flips."""
    out = np.empty((len(plan.boxes), size, size, 3), np.uint8)
    for k, (top, left, h, w) in enumerate(plan.boxes):
        crop = np.asarray(img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC))
        if plan.hflip[k]:
            crop = crop[:, ::-1]
        if plan.vflip[k]:
            crop = crop[::-1]
        if plan.rot90[k]:
            crop = np.rot90(crop, int(plan.rot90[k]))
        out[k] = crop
    return out


# ----------------------------------------------------------------------------------------------------------------
# Colour ops on float32 PLANAR crops [n, 3, H, W] in [0, 1] (contiguous channel planes: numpy is several times faster
# on them than on an interleaved last axis of size 3); per-crop factors broadcast as [n, 1, 1, 1].


def _gray(x: np.ndarray) -> np.ndarray:
    """[n, 1, H, W] luma with torchvision's weights."""
    w = _GRAY_W
    g = x[:, 0:1] * w[0]
    g += x[:, 1:2] * w[1]
    g += x[:, 2:3] * w[2]
    return g


def _blend(x: np.ndarray, other: np.ndarray | float, f: np.ndarray) -> np.ndarray:
    """torchvision's _blend: clamp(f * x + (1 - f) * other, 0, 1)."""
    out = x * f
    out += (1.0 - f) * other
    return np.clip(out, 0.0, 1.0, out=out)


def adjust_brightness(x: np.ndarray, f: np.ndarray) -> np.ndarray:
    return np.clip(x * f, 0.0, 1.0)


def adjust_contrast(x: np.ndarray, f: np.ndarray) -> np.ndarray:
    return _blend(x, _gray(x).mean(axis=(1, 2, 3), keepdims=True), f)


def adjust_saturation(x: np.ndarray, f: np.ndarray) -> np.ndarray:
    return _blend(x, _gray(x), f)


def adjust_hue(x: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Rotate hue by delta (fraction of a turn), keeping HSV saturation and value: torchvision's RGB->HSV->RGB
    round trip in closed form (out = min + chroma * hexcone(h), per channel)."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    mx = np.maximum(np.maximum(r, g), b)
    mn = np.minimum(np.minimum(r, g), b)
    c = mx - mn
    inv = np.maximum(c, 1e-12)  # chroma 0: numerators are 0 too, and out = mn whatever h is
    np.divide(1.0, inv, out=inv)
    h = r - g
    h *= inv
    h += 4.0  # max == b
    np.copyto(h, (b - r) * inv + 2.0, where=mx == g)
    np.copyto(h, (g - b) * inv, where=mx == r)  # red wins ties, as in torchvision
    h += (6.0 * np.asarray(delta, np.float32)).reshape(-1, 1, 1)
    np.add(h, 6.0, out=h, where=h < 0)
    np.subtract(h, 6.0, out=h, where=h >= 6.0)
    out = np.empty_like(x)
    for ch, (sign, centre, offset) in enumerate(((1.0, 3.0, -1.0), (-1.0, 2.0, 2.0), (-1.0, 4.0, 2.0))):
        t = np.abs(h - centre)
        if sign < 0:
            np.subtract(offset, t, out=t)
        else:
            t += offset
        np.clip(t, 0.0, 1.0, out=t)
        t *= c
        np.add(t, mn, out=out[:, ch])
    return out


def grayscale(x: np.ndarray) -> np.ndarray:
    return np.repeat(_gray(x), 3, axis=1)


def solarize(x: np.ndarray, threshold: float) -> np.ndarray:
    return np.where(x >= threshold, 1.0 - x, x).astype(np.float32)


def gaussian_kernel(sigma: float, size: int) -> np.ndarray:
    t = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_blur(x: np.ndarray, sigma: float, size: int) -> np.ndarray:
    """Separable Gaussian blur of one planar [3, H, W] image with reflect padding (torchvision's GaussianBlur)."""
    import scipy.ndimage as ndi  # scipy ships with jax

    k = gaussian_kernel(sigma, size)
    y = ndi.correlate1d(x, k, axis=-2, mode="mirror")
    return ndi.correlate1d(y, k, axis=-1, mode="mirror", output=y)


def hed_jitter(x: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Stain jitter in H&E-DAB optical-density space (Tellez et al.): od' = od * alpha + beta per stain channel."""
    rgb_from_hed = _HED_FROM_RGB_INV.astype(np.float32)
    hed_from_rgb = np.linalg.inv(_HED_FROM_RGB_INV).astype(np.float32)
    od = -np.log(np.clip(x, 1e-6, 1.0))  # [n, 3, H, W]
    hed = np.einsum("nchw,cd->ndhw", od, hed_from_rgb)
    hed = hed * alpha.reshape(-1, 3, 1, 1) + beta.reshape(-1, 3, 1, 1)
    return np.clip(np.exp(-np.einsum("nchw,cd->ndhw", hed, rgb_from_hed)), 0.0, 1.0).astype(np.float32)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


@dataclasses.dataclass
class ColorPlan:
    """The random decisions for one group of crops, drawn before any pixel work so they are cheap to test."""

    jitter: np.ndarray  # bool [n]
    order: np.ndarray  # int [n, 4] permutation of (brightness, contrast, saturation, hue)
    factors: np.ndarray  # float [n, 4]
    gray: np.ndarray  # bool [n]
    blur_sigma: np.ndarray  # float [n], 0 = no blur
    solarize: np.ndarray  # bool [n]
    hed: np.ndarray  # bool [n]
    hed_alpha: np.ndarray  # [n, 3]
    hed_beta: np.ndarray  # [n, 3]


def draw_color_plan(
    rng: np.random.Generator, blur_p: np.ndarray, solarize_p: np.ndarray, cfg: MultiCropConfig
) -> ColorPlan:
    """Draw the colour decisions of n crops (blur_p / solarize_p: per-crop probabilities, shape [n])."""
    n = len(blur_p)
    u = rng.random((n, 6))
    factors = np.stack(
        [
            rng.uniform(1 - cfg.brightness, 1 + cfg.brightness, n),
            rng.uniform(1 - cfg.contrast, 1 + cfg.contrast, n),
            rng.uniform(1 - cfg.saturation, 1 + cfg.saturation, n),
            rng.uniform(-cfg.hue, cfg.hue, n),
        ],
        axis=1,
    ).astype(np.float32)
    order = np.argsort(rng.random((n, 4)), axis=1)
    sigma = rng.uniform(cfg.blur_sigma[0], cfg.blur_sigma[1], n)
    blur = u[:, 2] < blur_p
    s = cfg.hed_sigma
    return ColorPlan(
        jitter=u[:, 0] < cfg.jitter_p,
        order=order,
        factors=factors,
        gray=u[:, 1] < cfg.grayscale_p,
        blur_sigma=np.where(blur, sigma, 0.0),
        solarize=u[:, 3] < solarize_p,
        hed=u[:, 4] < cfg.hed_p,
        hed_alpha=rng.uniform(1 - s, 1 + s, (n, 3)).astype(np.float32),
        hed_beta=rng.uniform(-s, s, (n, 3)).astype(np.float32),
    )


def _color_ops(x: np.ndarray, plan: ColorPlan, cfg: MultiCropConfig) -> np.ndarray:
    """The colour ops of `plan` on planar float32 crops [n, 3, H, W] in [0, 1], in place where possible."""
    if plan.hed.any():
        idx = np.flatnonzero(plan.hed)
        x[idx] = hed_jitter(x[idx], plan.hed_alpha[idx], plan.hed_beta[idx])
    if plan.jitter.any():
        jit = np.flatnonzero(plan.jitter)
        for step in range(4):
            for op in range(4):
                idx = jit[plan.order[jit, step] == op]
                if idx.size == 0:
                    continue
                f = plan.factors[idx, op]
                x[idx] = _JITTER_OPS[op](x[idx], f if op == 3 else f.reshape(-1, 1, 1, 1))
    if plan.gray.any():
        idx = np.flatnonzero(plan.gray)
        x[idx] = _gray(x[idx])  # broadcasts over the 3 channels
    for i in np.flatnonzero(plan.blur_sigma > 0):
        x[i] = gaussian_blur(x[i], float(plan.blur_sigma[i]), cfg.blur_kernel)
    if plan.solarize.any():
        idx = np.flatnonzero(plan.solarize)
        x[idx] = solarize(x[idx], cfg.solarize_threshold)
    return x


def _planar_unit(crops: np.ndarray) -> np.ndarray:
    """uint8 [n, H, W, 3] -> float32 [n, 3, H, W] in [0, 1] (contiguous channel planes)."""
    x = crops.transpose(0, 3, 1, 2).astype(np.float32, order="C")
    x *= np.float32(1.0 / 255.0)
    return x


def apply_color_plan(crops: np.ndarray, plan: ColorPlan, cfg: MultiCropConfig) -> np.ndarray:
    """uint8 [n, H, W, 3] -> normalised float32 [n, H, W, 3] (work is done planar, see _gray)."""
    x = _color_ops(_planar_unit(crops), plan, cfg)
    # Normalise while transposing back to NHWC: one strided pass instead of a normalise pass plus a copy.
    std = np.asarray(cfg.std, np.float32)
    out = np.empty((x.shape[0], x.shape[2], x.shape[3], 3), np.float32)
    np.multiply(x.transpose(0, 2, 3, 1), 1.0 / std, out=out)
    out += -np.asarray(cfg.mean, np.float32) / std
    return out


def _subset(plan: ColorPlan, idx: np.ndarray) -> ColorPlan:
    return ColorPlan(**{f.name: getattr(plan, f.name)[idx] for f in dataclasses.fields(ColorPlan)})


def touched(plan: ColorPlan) -> np.ndarray:
    """bool [n]: crops that any colour op changes (the others keep their uint8 pixels exactly)."""
    return plan.jitter | plan.gray | (plan.blur_sigma > 0) | plan.solarize | plan.hed


def apply_color_plan_uint8(crops: np.ndarray, plan: ColorPlan, cfg: MultiCropConfig) -> np.ndarray:
    """uint8 [n, H, W, 3] -> uint8 [n, H, W, 3]: the same colour ops as `apply_color_plan` in float32, rounded to the
    nearest grey level once at the end, unnormalised (the train step normalises on the device).

    Crops no colour op touches are passed through untouched (no float round trip): exactly their pixels. The others
    differ from the float path by at most half a grey level before normalisation, 0.5 / 255 / min(std) after it
    (0.0088 with ImageNet's std); the reference's PIL transforms round to uint8 after every op.
    """
    idx = np.flatnonzero(touched(plan))
    out = np.array(crops, np.uint8, copy=True, order="C")
    if idx.size:
        x = _color_ops(_planar_unit(crops[idx]), _subset(plan, idx), cfg)
        x *= np.float32(255.0)
        np.rint(x, out=x)
        np.clip(x, 0.0, 255.0, out=x)
        out[idx] = x.transpose(0, 2, 3, 1)  # the cast rounds nothing: x holds integers
    return out


CROP_DTYPES = ("uint8", "float32")


def multi_crop(image: np.ndarray | Image.Image, rng: np.random.Generator, cfg: MultiCropConfig,
               dtype: str = "float32") -> dict[str, np.ndarray]:
    """One image -> {GLOBAL_CROPS: [2, G, G, 3], LOCAL_CROPS: [N, L, L, 3]} (data/batch.py's keys), NHWC.

    dtype "float32": ImageNet-normalised floats (the host does everything). dtype "uint8": the crops after every
    colour op, as pixels (4x fewer bytes to the accelerator; `data.normalize` finishes them inside the jitted step).
    The random draws are the same for both, so the two differ only by the rounding described in
    `apply_color_plan_uint8`.
    """
    if dtype not in CROP_DTYPES:
        raise ValueError(f"crop dtype must be one of {CROP_DTYPES}, got {dtype!r}")
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    if img.mode != "RGB":
        img = img.convert("RGB")
    H, W = img.height, img.width
    g = apply_crop_plan(img, draw_crop_plan(rng, H, W, 2, cfg.global_scale, cfg), cfg.global_size)
    loc = apply_crop_plan(img, draw_crop_plan(rng, H, W, cfg.num_local_crops, cfg.local_scale, cfg), cfg.local_size)
    g_plan = draw_color_plan(
        rng, np.array([cfg.blur_p_global1, cfg.blur_p_global2]), np.array([0.0, cfg.solarize_p_global2]), cfg
    )
    nl = cfg.num_local_crops
    l_plan = draw_color_plan(rng, np.full(nl, cfg.blur_p_local), np.zeros(nl), cfg)
    apply = apply_color_plan_uint8 if dtype == "uint8" else apply_color_plan
    return {GLOBAL_CROPS: apply(g, g_plan, cfg), LOCAL_CROPS: apply(loc, l_plan, cfg)}
