"""uint8 ring slots → augmented, normalised float views in one pass.

The ring keeps SASI as uint8 images on the trainer's device. A view is:
random resized crop (bilinear, no antialias) → horizontal flip → colour jitter in the
FIXED order brightness, contrast, saturation, hue (torchvision picks a random order per
call; a fixed order keeps the kernel branch-free) → optional grayscale → optional Gaussian
blur (per-view sigma, reflect padding, torchvision's taps; the kernel covers ±3σ of the
recipe's largest sigma, `blur_kernel_for`) → optional solarisation
(pixels at or above 128/255 inverted) → normalise. That is every op of the project's
recipes (data/recipes/: MoCo-v2, SimCLR, BYOL, MoCo-v3, SwAV, DINO, solo-learn's).
The Triton kernel fuses everything up to grayscale; blur and solarisation, when a draw
asks for them, run after it on the same device as one batched depthwise convolution and
one elementwise pass (`blur_solarize_normalize`), still without a per-view loop.

``ring_augment_vectorized`` computes the kernel's views with batched torch ops (gathers
for the crops, per-view factors as tensors): the path the dispatcher takes on a GPU when
Triton cannot run, and the baseline the GPU check measures the kernel against.

Parameters are drawn once by ``sample_aug_params`` and fed to every path, so the torch
reference (torchvision.transforms.v2.functional on float images) and the Triton kernel
compute the same views. The reference and the kernel both work in float from the uint8
source: no rounding back to uint8 between operations, unlike torchvision on uint8 input.

Contrast blends towards the mean grey level of the whole (cropped, resized, brightened)
view, so the kernel makes two launches: a small one summing that grey level per view
in tiles, then the main one. Neither writes a float intermediate image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from sasi_online.errors import UserInputError

from ._triton import jit, require_triton

try:
    import triton.language as tl
except Exception:  # noqa: BLE001 - Triton is optional; require_triton explains at call time
    tl = None


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class AugRecipe:
    """One augmentation draw's distribution. Defaults: MoCo v2 without blur."""

    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in pixels of the output view
    blur_kernel: int = 0  # odd side; 0 = 2 * ceil(3 * blur_sigma max) + 1 (>= 3); capped at the output side
    solarize_p: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def from_mapping(cls, values: dict) -> "AugRecipe":
        """Build from a plain mapping (e.g. a YAML section); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserInputError(f"augmentation recipe: unknown keys {unknown}; "
                                 f"known: {sorted(known)}.")
        vals = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**vals)

    @classmethod
    def from_view_spec(cls, spec, mean, std, image_size: int | None = None) -> "AugRecipe":
        """From one view of the project's augmentation recipe (``sasi_online.data.augment``
        ViewSpec plus the recipe's mean/std), blur and solarisation included. The blur's
        sigma range and kernel are the ViewSpec's (`sigma_range`, `blur_kernel`), the ones
        the torchvision and DALI paths use: with `image_size` (data.image_size) at that
        size; without it only for a sigma in pixels of the view (no `blur.sigma_at`),
        the kernel then following the same rule at the output side (blur_kernel 0)."""
        if image_size:
            sigma, kernel = spec.sigma_range(image_size), spec.blur_kernel(image_size)
        elif spec.blur_prob > 0 and spec.blur_sigma_at is not None:
            raise UserInputError(f"this view quotes blur.sigma {list(spec.blur_sigma)} at "
                                 f"blur.sigma_at={spec.blur_sigma_at:g} px, so its sigma depends on the "
                                 f"view's side: pass image_size (data.image_size) to from_view_spec.")
        else:
            lo = max(float(spec.blur_sigma[0]), 1e-3)
            sigma, kernel = (lo, max(float(spec.blur_sigma[1]), lo)), 0
        return cls(scale=tuple(spec.scale), ratio=tuple(spec.ratio), flip_p=spec.flip,
                   jitter_p=spec.jitter_prob, brightness=spec.brightness,
                   contrast=spec.contrast, saturation=spec.saturation, hue=spec.hue,
                   gray_p=spec.grayscale, blur_p=spec.blur_prob, blur_sigma=tuple(sigma),
                   blur_kernel=kernel, solarize_p=spec.solarize, mean=tuple(mean), std=tuple(std))

    def __post_init__(self):
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise UserInputError(f"recipe.scale={self.scale}: need 0 < min <= max <= 1.")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise UserInputError(f"recipe.ratio={self.ratio}: need 0 < min <= max.")
        if not (0 < self.blur_sigma[0] <= self.blur_sigma[1]):
            raise UserInputError(f"recipe.blur_sigma={self.blur_sigma}: need 0 < min <= max.")
        if self.blur_kernel < 0 or (self.blur_kernel and self.blur_kernel % 2 == 0):
            raise UserInputError(f"recipe.blur_kernel={self.blur_kernel}: must be 0 (automatic) or odd.")
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserInputError(f"recipe.{name}={getattr(self, name)}: must be a "
                                     f"probability in [0, 1].")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise UserInputError(f"recipe.{name}={getattr(self, name)}: must be >= 0.")
        if not 0 <= self.hue <= 0.5:
            raise UserInputError(f"recipe.hue={self.hue}: must lie in [0, 0.5].")
        if any(s <= 0 for s in self.std):
            raise UserInputError(f"recipe.std={self.std}: every entry must be > 0.")


@dataclass
class AugParams:
    """Per-view parameters, one row per view (tensors on any device)."""

    crop: torch.Tensor  # int64 [N, 4]: top, left, height, width in source pixels
    flip: torch.Tensor  # bool [N]
    brightness: torch.Tensor  # float32 [N], 1 = unchanged
    contrast: torch.Tensor  # float32 [N], 1 = unchanged
    saturation: torch.Tensor  # float32 [N], 1 = unchanged
    hue: torch.Tensor  # float32 [N], 0 = unchanged
    gray: torch.Tensor  # bool [N]
    blur_sigma: torch.Tensor | None = None  # float32 [N] in output pixels, 0 = no blur
    solarize: torch.Tensor | None = None  # bool [N]
    blur_kernel: int = 0  # odd kernel side (capped at the output side); 0 = the rule on the drawn sigmas

    def needs_post(self) -> bool:
        """Whether blur or solarisation may apply (decided without reading the values)."""
        return self.blur_sigma is not None or self.solarize is not None

    def __len__(self) -> int:
        return int(self.crop.shape[0])

    def packed(self, device) -> torch.Tensor:
        """float32 [N, 10] for the kernel (small integers are exact in float32), built where
        the parameters are and sent to `device` without blocking (pinned host memory)."""
        cols = [self.crop[:, i] for i in range(4)] + [self.flip, self.brightness, self.contrast,
                                                      self.saturation, self.hue, self.gray]
        return to_device(torch.stack([c.to(torch.float32) for c in cols], 1).contiguous(), device)

    def post_packed(self, device) -> torch.Tensor | None:
        """float32 [N, 2] (blur sigma, solarise flag) on `device`, one non-blocking copy;
        None when neither was drawn."""
        if not self.needs_post():
            return None
        n = len(self)
        sigma = self.blur_sigma if self.blur_sigma is not None else torch.zeros(n, device=self.crop.device)
        sol = self.solarize if self.solarize is not None else torch.zeros(n, device=self.crop.device)
        return to_device(torch.stack([sigma.to(torch.float32), sol.to(torch.float32)], 1), device)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """`t` on `device`: a host tensor bound for CUDA goes through pinned memory with a
    non-blocking copy (no host sync; the caching host allocator keeps the pinned block
    until the copy is done)."""
    device = torch.device(device)
    if t.device == device or (device.type == t.device.type and device.index is None):
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def sample_aug_params(n: int, image_hw: tuple[int, int], recipe: AugRecipe = AugRecipe(),
                      generator: torch.Generator | None = None) -> AugParams:
    """Draw `n` views' parameters on the CPU, shared by the torch and Triton paths.

    Crops follow torchvision's RandomResizedCrop.get_params (10 tries, then a centre
    crop with the ratio clamped), vectorised over the batch.
    """
    if n < 0:
        raise UserInputError(f"n={n}: the number of views must be >= 0.")
    h, w = (int(v) for v in image_hw)
    if h < 1 or w < 1:
        raise UserInputError(f"image_hw={image_hw}: both sides must be >= 1.")
    g = generator

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)

    tries = 10
    area = h * w
    target = area * uniform(recipe.scale[0], recipe.scale[1], n, tries)
    log_r = (math.log(recipe.ratio[0]), math.log(recipe.ratio[1]))
    aspect = torch.exp(uniform(log_r[0], log_r[1], n, tries))
    cw = torch.round(torch.sqrt(target * aspect)).long()
    ch = torch.round(torch.sqrt(target / aspect)).long()
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    # Fallback (no try fitted): the largest centre crop with the ratio clamped.
    in_ratio = w / h
    if in_ratio < recipe.ratio[0]:
        fw, fh = w, int(round(w / recipe.ratio[0]))
    elif in_ratio > recipe.ratio[1]:
        fh, fw = h, int(round(h * recipe.ratio[1]))
    else:
        fw, fh = w, h
    idx = first.clamp(min=0)[:, None]
    crop_h = torch.where(first >= 0, ch.gather(1, idx)[:, 0], torch.full((n,), fh))
    crop_w = torch.where(first >= 0, cw.gather(1, idx)[:, 0], torch.full((n,), fw))
    top = torch.where(first >= 0, (torch.rand(n, generator=g, dtype=torch.float64)
                                   * (h - crop_h + 1)).floor().long(), (h - crop_h) // 2)
    left = torch.where(first >= 0, (torch.rand(n, generator=g, dtype=torch.float64)
                                    * (w - crop_w + 1)).floor().long(), (w - crop_w) // 2)

    flip = torch.rand(n, generator=g) < recipe.flip_p
    jitter = torch.rand(n, generator=g) < recipe.jitter_p

    def factor(spread):
        f = uniform(max(0.0, 1 - spread), 1 + spread, n).float()
        return torch.where(jitter, f, torch.ones(n))

    brightness, contrast, saturation = (factor(recipe.brightness), factor(recipe.contrast),
                                        factor(recipe.saturation))
    hue = torch.where(jitter, uniform(-recipe.hue, recipe.hue, n).float(), torch.zeros(n))
    gray = torch.rand(n, generator=g) < recipe.gray_p
    # Drawn after the others, so recipes without blur/solarisation keep their old draws.
    blur_sigma = solarize = None
    if recipe.blur_p > 0:
        on = torch.rand(n, generator=g) < recipe.blur_p
        sigma = uniform(recipe.blur_sigma[0], recipe.blur_sigma[1], n).float()
        blur_sigma = torch.where(on, sigma, torch.zeros(n))
    if recipe.solarize_p > 0:
        solarize = torch.rand(n, generator=g) < recipe.solarize_p
    return AugParams(crop=torch.stack([top, left, crop_h, crop_w], 1), flip=flip,
                     brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
                     gray=gray, blur_sigma=blur_sigma, solarize=solarize,
                     blur_kernel=(recipe.blur_kernel or blur_kernel_for(recipe.blur_sigma[1]))
                     if recipe.blur_p > 0 else recipe.blur_kernel)


def _layout(images: torch.Tensor, channels_last: bool | None) -> bool:
    """Validate `images` and say whether it is [N, H, W, 3] (True) or [N, 3, H, W]."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise UserInputError(f"images: expected a uint8 [N,H,W,3] or [N,3,H,W] batch, got "
                             f"{images.dtype} {tuple(images.shape)}.")
    if channels_last is None:
        last, second = images.shape[-1] == 3, images.shape[1] == 3
        if last and second:
            raise UserInputError("images: both dim 1 and dim 3 are 3; pass channels_last=True "
                                 "for [N,H,W,3] or False for [N,3,H,W].")
        if not (last or second):
            raise UserInputError(f"images: shape {tuple(images.shape)} has no channel axis of "
                                 f"size 3 (RGB) at dim 1 or dim 3.")
        return last
    if images.shape[-1 if channels_last else 1] != 3:
        raise UserInputError(f"images: shape {tuple(images.shape)} has no RGB axis where "
                             f"channels_last={channels_last} says.")
    return channels_last


def _check_params(params: AugParams, n: int, h: int, w: int, out_size: int) -> None:
    if len(params) != n:
        raise UserInputError(f"params: {len(params)} views for {n} images; draw them with "
                             f"sample_aug_params(n={n}, ...).")
    if out_size < 1:
        raise UserInputError(f"out_size={out_size}: must be >= 1.")
    c = params.crop if params.crop.device.type == "cpu" else params.crop.cpu()  # drawn on the host: no sync
    bad = (c[:, 0] < 0) | (c[:, 1] < 0) | (c[:, 2] < 1) | (c[:, 3] < 1) | \
          (c[:, 0] + c[:, 2] > h) | (c[:, 1] + c[:, 3] > w)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise UserInputError(f"params.crop[{i}]={c[i].tolist()} (top, left, height, width) does "
                             f"not fit a {h}x{w} image; draw params for this image size.")


SOLARIZE_THRESHOLD = 128 / 255  # torchvision's RandomSolarize(threshold=128) on uint8 images


def _odd_cap(side: int) -> int:
    """The largest odd kernel side reflect padding allows at `side` (k // 2 < side)."""
    return (int(side) - 1) // 2 * 2 + 1


def blur_kernel_for(sigma_max: float, side: int | None = None) -> int:
    """The blur rule's kernel: odd k = 2 * ceil(3 * sigma_max) + 1 (the Gaussian beyond 3 sigma
    weighs < 0.3 %), at least 3, at most the largest odd number <= `side` (reflect padding
    needs k // 2 < side); 1 (no blur) when side < 3. `side` None: no cap."""
    if not sigma_max > 0:
        raise UserInputError(f"blur sigma_max={sigma_max}: must be > 0")
    k = max(3, 2 * math.ceil(round(3.0 * float(sigma_max), 9)) + 1)  # round: 3 * 0.1 * 10 is 3.0000000000000004
    if side is None:
        return k
    side = int(side)
    return 1 if side < 3 else min(k, _odd_cap(side))


def blur_kernel_size(params: AugParams, out_size: int) -> int:
    """The blur's odd kernel side at `out_size`: `params.blur_kernel` (sample_aug_params sets
    the recipe's, 2 * ceil(3 * sigma_max) + 1) capped at the largest odd number <= the side,
    as `blur_kernel_for`; 1 (no blur) below 3 px."""
    if out_size < 3:
        return 1
    if params.blur_kernel:
        return min(params.blur_kernel, _odd_cap(out_size))
    sigma = params.blur_sigma
    if sigma is None or sigma.numel() == 0:
        return 3
    if sigma.device.type != "cpu":
        raise UserInputError("params.blur_kernel=0 with blur_sigma on a device: set blur_kernel "
                             "(sample_aug_params does) rather than read the sigmas back.")
    return blur_kernel_for(max(float(sigma.max()), 1e-3), out_size)


def _gauss_1d(sigma: torch.Tensor, k: int) -> torch.Tensor:
    """[N, k] normalised Gaussian taps (torchvision's _get_gaussian_kernel1d); sigma 0: identity."""
    x = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, device=sigma.device, dtype=torch.float32)
    s = sigma.float().clamp_min(1e-6)[:, None]
    taps = torch.exp(-0.5 * (x[None] / s) ** 2)
    taps = taps / taps.sum(1, keepdim=True)
    delta = (x == 0).float().expand_as(taps)
    return torch.where(sigma[:, None] > 0, taps, delta)


_NORM_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def norm_constants(mean, std, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1 / std) as [1, 3, 1, 1] tensors on `device`, built once per (values, device,
    dtype) and reused: no host-to-device copy per call."""
    device = torch.device(device)
    key = (tuple(float(m) for m in mean), tuple(float(v) for v in std), device, dtype)
    if key not in _NORM_CACHE:
        m = torch.tensor(key[0], dtype=torch.float64)
        inv = 1.0 / torch.tensor(key[1], dtype=torch.float64)
        _NORM_CACHE[key] = (to_device(m.to(dtype).reshape(1, 3, 1, 1), device),
                            to_device(inv.to(dtype).reshape(1, 3, 1, 1), device))
    return _NORM_CACHE[key]


def blur_solarize_normalize(x: torch.Tensor, params: AugParams, mean=IMAGENET_MEAN,
                            std=IMAGENET_STD) -> torch.Tensor:
    """[N, 3, S, S] views in [0, 1] → per-view blur (one depthwise convolution per axis for
    the whole batch), solarisation, normalisation. No host sync: the parameters reach the
    device in one non-blocking copy and stay tensors there."""
    n, c, h, w = x.shape
    post = params.post_packed(x.device) if n else None
    if post is not None and params.blur_sigma is not None and h >= 3:
        k = blur_kernel_size(params, min(h, w))
        taps = _gauss_1d(post[:, 0], k).to(x.dtype).repeat_interleave(c, 0)  # [N*3, k]
        pad = k // 2
        y = torch.nn.functional.pad(x.reshape(1, n * c, h, w), [pad, pad, pad, pad], mode="reflect")
        y = torch.nn.functional.conv2d(y, taps[:, None, None, :], groups=n * c)
        x = torch.nn.functional.conv2d(y, taps[:, None, :, None], groups=n * c).reshape(n, c, h, w)
    if post is not None and params.solarize is not None:
        flip = (post[:, 1] > 0.5)[:, None, None, None] & (x >= SOLARIZE_THRESHOLD)
        x = torch.where(flip, 1.0 - x, x)
    m, inv = norm_constants(mean, std, x.device, x.dtype)
    return (x - m) * inv


def ring_augment_torch(images: torch.Tensor, params: AugParams, out_size: int,
                       mean=IMAGENET_MEAN, std=IMAGENET_STD,
                       channels_last: bool | None = None) -> torch.Tensor:
    """Reference with torchvision.transforms.v2.functional on float images, view by view."""
    import torchvision.transforms.v2.functional as F

    last = _layout(images, channels_last)
    x = images.permute(0, 3, 1, 2) if last else images
    n, _, h, w = x.shape
    _check_params(params, n, h, w, out_size)
    outs = []
    for i in range(n):
        top, left, ch, cw = (int(v) for v in params.crop[i])
        v = x[i].float() / 255.0
        v = F.resized_crop(v, top, left, ch, cw, [out_size, out_size],
                           interpolation=F.InterpolationMode.BILINEAR, antialias=False)
        if bool(params.flip[i]):
            v = F.horizontal_flip(v)
        v = F.adjust_brightness(v, float(params.brightness[i]))
        v = F.adjust_contrast(v, float(params.contrast[i]))
        v = F.adjust_saturation(v, float(params.saturation[i]))
        if float(params.hue[i]) != 0.0:
            v = F.adjust_hue(v, float(params.hue[i]))
        if bool(params.gray[i]):
            v = F.rgb_to_grayscale(v, num_output_channels=3)
        if params.blur_sigma is not None and float(params.blur_sigma[i]) > 0 and out_size >= 3:
            k = blur_kernel_size(params, out_size)
            v = F.gaussian_blur(v, [k, k], [float(params.blur_sigma[i])] * 2)
        if params.solarize is not None and bool(params.solarize[i]):
            v = F.solarize(v, SOLARIZE_THRESHOLD)
        outs.append(F.normalize(v, list(mean), list(std)))
    if not outs:
        return torch.empty(0, 3, out_size, out_size, device=images.device)
    return torch.stack(outs)


def _axis_taps(start: torch.Tensor, length: torch.Tensor, out_size: int, flip: torch.Tensor | None):
    """Bilinear source rows (or columns) and weights for each view along one axis, as the
    kernel computes them (align_corners=False, no antialias): int64 i0, i1 and float w1,
    each [N, S]; `flip` mirrors the output index (horizontal flip)."""
    o = torch.arange(out_size, device=start.device, dtype=torch.float32)[None].expand(len(start), -1)
    if flip is not None:
        o = torch.where(flip[:, None], out_size - 1 - o, o)
    span = length.to(torch.float32)[:, None]
    src = ((span / out_size) * (o + 0.5) - 0.5).clamp_min(0.0)
    last = length.to(torch.int64)[:, None] - 1
    i0 = torch.minimum(src.to(torch.int64), last)
    w1 = (src - i0.to(torch.float32)).clamp(0.0, 1.0)
    i1 = torch.where(i0 < last, i0 + 1, i0)
    base = start.to(torch.int64)[:, None]
    return base + i0, base + i1, w1


def _resized_crop_batched(x: torch.Tensor, prm: torch.Tensor, out_size: int) -> torch.Tensor:
    """uint8 [N, 3, H, W] + packed params → float [N, 3, S, S] in [0, 1], cropped, resized
    and flipped per view with four gathers (no per-view loop)."""
    n, c, h, w = x.shape
    y0, y1, wy = _axis_taps(prm[:, 0], prm[:, 2], out_size, None)
    x0, x1, wx = _axis_taps(prm[:, 1], prm[:, 3], out_size, prm[:, 4] > 0.5)
    flat = x.reshape(n, c, h * w)

    def take(rows, cols):
        idx = (rows[:, :, None] * w + cols[:, None, :]).reshape(n, 1, -1).expand(n, c, -1)
        return flat.gather(2, idx).to(torch.float32).reshape(n, c, out_size, out_size)

    wy, wx = wy[:, None, :, None], wx[:, None, None, :]
    top = take(y0, x0) * (1 - wx) + take(y0, x1) * wx
    bottom = take(y1, x0) * (1 - wx) + take(y1, x1) * wx
    return (top * (1 - wy) + bottom * wy) / 255.0


def _grey(v: torch.Tensor) -> torch.Tensor:
    r, g, b = v.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b)[:, None]


def _hue_shift(v: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """RGB → HSV, shift H by `hue` [N], back: torchvision's _rgb_to_hsv / _hsv_to_rgb."""
    r, g, b = v.unbind(1)
    maxc, minc = v.amax(1), v.amin(1)
    eqc = maxc == minc
    crange = maxc - minc
    s = crange / torch.where(eqc, torch.ones_like(maxc), maxc)
    div = torch.where(eqc, torch.ones_like(crange), crange)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    neq_r, eq_g = maxc != r, maxc == g
    hh = torch.where(neq_r, 0.0, bc - gc)
    hh = hh + torch.where(eq_g & neq_r, 2.0 + rc - bc, 0.0)
    hh = hh + torch.where(neq_r & (maxc != g), 4.0 + gc - rc, 0.0)
    hh = torch.remainder(hh / 6.0 + 1.0, 1.0)
    hh = torch.remainder(hh + hue[:, None, None], 1.0)
    h6 = hh * 6.0
    fi = torch.floor(h6)
    f = h6 - fi
    i = fi.to(torch.int64) % 6
    p = ((1.0 - s) * maxc).clamp(0.0, 1.0)
    q = ((1.0 - s * f) * maxc).clamp(0.0, 1.0)
    t = ((s * f + (1.0 - s)) * maxc).clamp(0.0, 1.0)
    # sector i of the hue circle → (r, g, b) among v, p, q, t (torchvision's select table)
    v = maxc
    hr = torch.where(i == 0, v, torch.where(i == 1, q, torch.where(i <= 3, p, torch.where(i == 4, t, v))))
    hg = torch.where(i == 0, t, torch.where(i <= 2, v, torch.where(i == 3, q, p)))
    hb = torch.where(i <= 1, p, torch.where(i == 2, t, torch.where(i <= 4, v, q)))
    return torch.stack([hr, hg, hb], 1)


def ring_augment_vectorized(images: torch.Tensor, params: AugParams, out_size: int,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD,
                            channels_last: bool | None = None) -> torch.Tensor:
    """The torch path the dispatcher runs when Triton cannot: the kernel's computation in
    batched torch ops on the images' device (gathers for the crops, per-view factors as
    [N, 1, 1, 1] tensors), no per-view loop and no host sync. Same views as
    `ring_augment_torch` (the per-view torchvision reference) and the Triton kernel."""
    last = _layout(images, channels_last)
    x = images.permute(0, 3, 1, 2) if last else images
    n, _, h, w = x.shape
    _check_params(params, n, h, w, out_size)
    if n == 0:
        return torch.empty(0, 3, out_size, out_size, device=images.device)
    prm = params.packed(images.device)
    col = [prm[:, i, None, None, None] for i in range(10)]
    v = (_resized_crop_batched(x, prm, out_size) * col[5]).clamp(0.0, 1.0)  # brightness
    mean_grey = _grey(v).mean((2, 3), keepdim=True)
    v = (col[6] * v + (1.0 - col[6]) * mean_grey).clamp(0.0, 1.0)  # contrast
    v = (col[7] * v + (1.0 - col[7]) * _grey(v)).clamp(0.0, 1.0)  # saturation
    v = torch.where(col[8] != 0.0, _hue_shift(v, prm[:, 8]), v)
    v = torch.where(col[9] > 0.5, _grey(v).expand(-1, 3, -1, -1), v)
    return blur_solarize_normalize(v, params, mean, std)


@jit
def _sample(img_ptr, n, prm, pix, mask, H, W, S, s_n, s_c, s_h, s_w):
    """Bilinear sample (align_corners=False, like F.interpolate) of one output pixel
    block of view n; returns r, g, b in [0, 1] after flip and brightness."""
    top = tl.load(prm + n * 10 + 0)
    left = tl.load(prm + n * 10 + 1)
    ch = tl.load(prm + n * 10 + 2)
    cw = tl.load(prm + n * 10 + 3)
    flip = tl.load(prm + n * 10 + 4)
    bright = tl.load(prm + n * 10 + 5)
    oy = pix // S
    ox = pix % S
    ox = tl.where(flip > 0.5, S - 1 - ox, ox)
    sy = tl.maximum((ch / S) * (oy.to(tl.float32) + 0.5) - 0.5, 0.0)
    sx = tl.maximum((cw / S) * (ox.to(tl.float32) + 0.5) - 0.5, 0.0)
    chi = ch.to(tl.int32)
    cwi = cw.to(tl.int32)
    y0 = tl.minimum(sy.to(tl.int32), chi - 1)
    x0 = tl.minimum(sx.to(tl.int32), cwi - 1)
    ly = tl.minimum(tl.maximum(sy - y0.to(tl.float32), 0.0), 1.0)
    lx = tl.minimum(tl.maximum(sx - x0.to(tl.float32), 0.0), 1.0)
    y1 = tl.where(y0 < chi - 1, y0 + 1, y0)
    x1 = tl.where(x0 < cwi - 1, x0 + 1, x0)
    ty = top.to(tl.int32)
    tx = left.to(tl.int32)
    base = img_ptr + n.to(tl.int64) * s_n
    r00 = (ty + y0) * s_h + (tx + x0) * s_w
    r01 = (ty + y0) * s_h + (tx + x1) * s_w
    r10 = (ty + y1) * s_h + (tx + x0) * s_w
    r11 = (ty + y1) * s_h + (tx + x1) * s_w
    w00 = (1.0 - ly) * (1.0 - lx)
    w01 = (1.0 - ly) * lx
    w10 = ly * (1.0 - lx)
    w11 = ly * lx
    r = (w00 * tl.load(base + r00, mask=mask, other=0).to(tl.float32)
         + w01 * tl.load(base + r01, mask=mask, other=0).to(tl.float32)
         + w10 * tl.load(base + r10, mask=mask, other=0).to(tl.float32)
         + w11 * tl.load(base + r11, mask=mask, other=0).to(tl.float32))
    g = (w00 * tl.load(base + s_c + r00, mask=mask, other=0).to(tl.float32)
         + w01 * tl.load(base + s_c + r01, mask=mask, other=0).to(tl.float32)
         + w10 * tl.load(base + s_c + r10, mask=mask, other=0).to(tl.float32)
         + w11 * tl.load(base + s_c + r11, mask=mask, other=0).to(tl.float32))
    b = (w00 * tl.load(base + 2 * s_c + r00, mask=mask, other=0).to(tl.float32)
         + w01 * tl.load(base + 2 * s_c + r01, mask=mask, other=0).to(tl.float32)
         + w10 * tl.load(base + 2 * s_c + r10, mask=mask, other=0).to(tl.float32)
         + w11 * tl.load(base + 2 * s_c + r11, mask=mask, other=0).to(tl.float32))
    r = tl.minimum(tl.maximum(r / 255.0 * bright, 0.0), 1.0)
    g = tl.minimum(tl.maximum(g / 255.0 * bright, 0.0), 1.0)
    b = tl.minimum(tl.maximum(b / 255.0 * bright, 0.0), 1.0)
    return r, g, b

@jit
def grey_sum_kernel(img_ptr, prm, part_ptr, H, W, S, s_n, s_c, s_h, s_w, tiles,
                    BLOCK: tl.constexpr):
    n = tl.program_id(0)
    tile = tl.program_id(1)
    pix = tile * BLOCK + tl.arange(0, BLOCK)
    mask = pix < S * S
    r, g, b = _sample(img_ptr, n, prm, pix, mask, H, W, S, s_n, s_c, s_h, s_w)
    grey = 0.2989 * r + 0.587 * g + 0.114 * b
    tl.store(part_ptr + n * tiles + tile, tl.sum(tl.where(mask, grey, 0.0), 0))

@jit
def augment_kernel(img_ptr, prm, grey_mean_ptr, out_ptr, H, W, S, s_n, s_c, s_h, s_w,
                   m0, m1, m2, is0, is1, is2, BLOCK: tl.constexpr):
    n = tl.program_id(0)
    pix = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = pix < S * S
    r, g, b = _sample(img_ptr, n, prm, pix, mask, H, W, S, s_n, s_c, s_h, s_w)
    contrast = tl.load(prm + n * 10 + 6)
    sat = tl.load(prm + n * 10 + 7)
    hue = tl.load(prm + n * 10 + 8)
    gray = tl.load(prm + n * 10 + 9)
    # contrast: blend with the view's mean grey level
    mg = tl.load(grey_mean_ptr + n)
    r = tl.minimum(tl.maximum(contrast * r + (1.0 - contrast) * mg, 0.0), 1.0)
    g = tl.minimum(tl.maximum(contrast * g + (1.0 - contrast) * mg, 0.0), 1.0)
    b = tl.minimum(tl.maximum(contrast * b + (1.0 - contrast) * mg, 0.0), 1.0)
    # saturation: blend with each pixel's grey level
    px = 0.2989 * r + 0.587 * g + 0.114 * b
    r = tl.minimum(tl.maximum(sat * r + (1.0 - sat) * px, 0.0), 1.0)
    g = tl.minimum(tl.maximum(sat * g + (1.0 - sat) * px, 0.0), 1.0)
    b = tl.minimum(tl.maximum(sat * b + (1.0 - sat) * px, 0.0), 1.0)
    # hue: RGB -> HSV, shift H, back (torchvision's _rgb_to_hsv / _hsv_to_rgb)
    maxc = tl.maximum(tl.maximum(r, g), b)
    minc = tl.minimum(tl.minimum(r, g), b)
    eqc = maxc == minc
    crange = maxc - minc
    s = crange / tl.where(eqc, 1.0, maxc)
    div = tl.where(eqc, 1.0, crange)
    rc = (maxc - r) / div
    gc = (maxc - g) / div
    bc = (maxc - b) / div
    neq_r = maxc != r
    eq_g = maxc == g
    h = tl.where(neq_r, 0.0, bc - gc)
    h += tl.where(eq_g & neq_r, 2.0 + rc - bc, 0.0)
    h += tl.where(neq_r & (maxc != g), 4.0 + gc - rc, 0.0)
    h = h * (1.0 / 6.0) + 1.0
    h = h - tl.floor(h)  # fmod(h, 1) for h >= 0
    h = h + hue
    h = h - tl.floor(h)  # remainder(h, 1)
    h6 = h * 6.0
    fi = tl.floor(h6)
    f = h6 - fi
    i = fi.to(tl.int32) % 6
    v = maxc
    q = tl.minimum(tl.maximum((1.0 - s * f) * v, 0.0), 1.0)
    t = tl.minimum(tl.maximum((s * f + (1.0 - s)) * v, 0.0), 1.0)
    p = tl.minimum(tl.maximum((1.0 - s) * v, 0.0), 1.0)
    # sector i of the hue circle → (r, g, b) among v, p, q, t (torchvision's select table)
    hr = tl.where(i == 0, v, tl.where(i == 1, q, tl.where(i <= 3, p, tl.where(i == 4, t, v))))
    hg = tl.where(i == 0, t, tl.where(i <= 2, v, tl.where(i == 3, q, p)))
    hb = tl.where(i <= 1, p, tl.where(i == 2, t, tl.where(i <= 4, v, q)))
    use_hue = hue != 0.0
    r = tl.where(use_hue, hr, r)
    g = tl.where(use_hue, hg, g)
    b = tl.where(use_hue, hb, b)
    # grayscale, then normalise
    gy = 0.2989 * r + 0.587 * g + 0.114 * b
    is_gray = gray > 0.5
    r = tl.where(is_gray, gy, r)
    g = tl.where(is_gray, gy, g)
    b = tl.where(is_gray, gy, b)
    o = out_ptr + n.to(tl.int64) * 3 * S * S + pix
    tl.store(o, (r - m0) * is0, mask=mask)
    tl.store(o + S * S, (g - m1) * is1, mask=mask)
    tl.store(o + 2 * S * S, (b - m2) * is2, mask=mask)


def ring_augment_triton(images: torch.Tensor, params: AugParams, out_size: int,
                        mean=IMAGENET_MEAN, std=IMAGENET_STD, channels_last: bool | None = None,
                        block: int = 256) -> torch.Tensor:
    """Fused kernel: float32 [N, 3, out_size, out_size] from uint8 slots and `params`
    (blur and solarisation, when drawn, batched on the same device after the kernel)."""
    if params.needs_post():
        raw = ring_augment_triton(images, AugParams(params.crop, params.flip, params.brightness,
                                                    params.contrast, params.saturation, params.hue,
                                                    params.gray),
                                  out_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                                  channels_last=channels_last, block=block)
        return blur_solarize_normalize(raw, params, mean, std)
    last = _layout(images, channels_last)
    n = images.shape[0]
    h, w = (images.shape[1], images.shape[2]) if last else (images.shape[2], images.shape[3])
    _check_params(params, n, h, w, out_size)
    require_triton([images], "ring_augment")
    out = torch.empty(n, 3, out_size, out_size, device=images.device, dtype=torch.float32)
    if n == 0:
        return out
    if last:
        s_n, s_h, s_w, s_c = images.stride()
    else:
        s_n, s_c, s_h, s_w = images.stride()
    prm = params.packed(images.device)
    tiles = (out_size * out_size + block - 1) // block
    partial = torch.empty(n, tiles, device=images.device, dtype=torch.float32)
    strides = (h, w, out_size, s_n, s_c, s_h, s_w)
    grey_sum_kernel[(n, tiles)](images, prm, partial, *strides, tiles, BLOCK=block)
    grey_mean = (partial.sum(1) / (out_size * out_size)).contiguous()
    augment_kernel[(n, tiles)](images, prm, grey_mean, out, *strides,
                               *(float(m) for m in mean), *(1.0 / float(s) for s in std),
                               BLOCK=block)
    return out
