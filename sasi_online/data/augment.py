"""Augmentation recipes: one YAML file drives both backends (torchvision v2 and DALI).

A recipe lists the global views (view i uses entry i mod len) and optional local crops.
Each view kind is augmented independently per image, so real and SASI streams share the
recipe but get their own random draws. `plain` is resize + normalise (sasi_no_aug).

Images enter as HWC uint8 numpy arrays (RGB) and leave as normalised float CHW tensors.

Blur: `blur.sigma` is in pixels of the view as trained (its output side), unless
`blur.sigma_at` names the image side it is quoted at (then scaled by side / sigma_at; the
shipped recipes quote SimCLR/MoCo's 224-px values). The kernel covers +-3 sigma of the
largest sigma at the view's side (`blur_kernel_for`). torchvision, DALI and the device
views (kernels/ring_augment.py) all take both from `ViewSpec.sigma_range`/`blur_kernel`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import yaml

from sasi_online.errors import UserInputError
from sasi_online.kernels.ring_augment import blur_kernel_for  # noqa: F401  (the rule lives beside the taps)

RECIPE_DIR = Path(__file__).parent / "recipes"
PLAIN = "plain"  # the view kind without augmentation


@dataclass
class ViewSpec:
    size: float = 1.0  # output side as a fraction of data.image_size
    scale: tuple = (0.2, 1.0)  # random-resized-crop area range
    ratio: tuple = (0.75, 4 / 3)
    flip: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1  # fraction of the hue circle, as torchvision's ColorJitter
    grayscale: float = 0.2
    blur_prob: float = 0.5
    # Gaussian blur sigma range in pixels of `blur_sigma_at`-px images, scaled by side /
    # blur_sigma_at; blur_sigma_at None: pixels of this view's output side, as given. A recipe
    # that gives `blur.sigma` without `blur.sigma_at` means None; the default range is
    # SimCLR/MoCo's, quoted at 224 px.
    blur_sigma: tuple = (0.1, 2.0)
    blur_sigma_at: Optional[float] = 224.0
    solarize: float = 0.0

    def side(self, image_size: int) -> int:
        return max(4, int(round(self.size * image_size)))

    def sigma_range(self, image_size: int) -> tuple[float, float]:
        """(min, max) blur sigma in pixels of this view's output side at `image_size`."""
        lo, hi = self.blur_sigma
        if self.blur_sigma_at is not None:
            f = self.side(image_size) / float(self.blur_sigma_at)
            lo, hi = lo * f, hi * f
        lo = max(lo, 1e-3)
        return (lo, max(hi, lo))

    def blur_kernel(self, image_size: int) -> int:
        """Odd kernel side covering +-3 sigma of the largest sigma at the view's side
        (`blur_kernel_for`); every backend (torchvision, DALI, device views) uses it."""
        return blur_kernel_for(self.sigma_range(image_size)[1], self.side(image_size))


def blur_neighbour_weight(sigma: float, kernel: int) -> float:
    """Weight of each nearest neighbour in the normalised 1-D Gaussian kernel of `kernel`
    taps at `sigma` px (torchvision's taps), i.e. what one axis of the blur mixes in from
    the next pixel (the centre tap is 1 minus twice this minus the farther taps). 0 for kernel 1."""
    kernel = int(kernel)
    if kernel < 1 or kernel % 2 == 0:
        raise UserInputError(f"blur kernel={kernel}: must be an odd number >= 1")
    if not sigma > 0:
        raise UserInputError(f"blur sigma={sigma}: must be > 0")
    if kernel == 1:
        return 0.0
    x = np.arange(kernel, dtype=np.float64) - (kernel - 1) / 2
    taps = np.exp(-0.5 * (x / float(sigma)) ** 2)
    return float(taps[kernel // 2 + 1] / taps.sum())


@dataclass
class Recipe:
    name: str
    mean: tuple
    std: tuple
    global_views: list[ViewSpec]
    local_view: Optional[ViewSpec] = None
    local_count: int = 0

    def view_kinds(self, num_global: int, num_local: int) -> list[str]:
        return [f"global{i % len(self.global_views)}" for i in range(num_global)] + ["local"] * num_local

    def spec(self, kind: str) -> Optional[ViewSpec]:
        if kind == PLAIN:
            return None
        if kind == "local":
            if self.local_view is None:
                raise UserInputError(f"recipe '{self.name}' has no 'local' section; local crops "
                                     f"need one (see the dino recipe) or set method.local_crops=0")
            return self.local_view
        return self.global_views[int(kind[len("global"):])]


_SPEC_KEYS = {"size", "scale", "ratio", "flip", "jitter", "grayscale", "blur", "solarize", "count"}


def _parse_spec(raw: dict, where: str) -> ViewSpec:
    if not isinstance(raw, dict):
        raise UserInputError(f"{where}: expected a mapping of view settings")
    unknown = set(raw) - _SPEC_KEYS
    if unknown:
        raise UserInputError(f"{where}: unknown keys {sorted(unknown)}; valid: {sorted(_SPEC_KEYS)}")
    s = ViewSpec()
    s.size = float(raw.get("size", s.size))
    s.scale = tuple(float(v) for v in raw.get("scale", s.scale))
    s.ratio = tuple(float(v) for v in raw.get("ratio", s.ratio))
    s.flip = float(raw.get("flip", s.flip))
    for section in ("jitter", "blur"):
        if not isinstance(raw.get(section, {}), dict):
            raise UserInputError(f"{where}: '{section}' must be a mapping (e.g. {section}: {{prob: 0.5}}), "
                                 f"got {raw[section]!r}")
    j = raw.get("jitter", {})
    s.jitter_prob = float(j.get("prob", s.jitter_prob))
    s.brightness = float(j.get("brightness", s.brightness))
    s.contrast = float(j.get("contrast", s.contrast))
    s.saturation = float(j.get("saturation", s.saturation))
    s.hue = float(j.get("hue", s.hue))
    s.grayscale = float(raw.get("grayscale", s.grayscale))
    _parse_blur(s, raw.get("blur", {}), where)
    s.solarize = float(raw.get("solarize", s.solarize))
    for name in ("flip", "jitter_prob", "grayscale", "blur_prob", "solarize"):
        if not 0.0 <= getattr(s, name) <= 1.0:
            raise UserInputError(f"{where}: probability '{name}' must lie in [0, 1], got {getattr(s, name)}")
    if not (0 < s.scale[0] <= s.scale[1] <= 1.0):
        raise UserInputError(f"{where}: scale must be 0 < min <= max <= 1, got {list(s.scale)}")
    if not (0 < s.ratio[0] <= s.ratio[1]):
        raise UserInputError(f"{where}: ratio must be 0 < min <= max, got {list(s.ratio)}")
    if not 0.0 <= s.hue <= 0.5:
        raise UserInputError(f"{where}: jitter.hue must lie in [0, 0.5], got {s.hue}")
    return s


_BLUR_KEYS = {"prob", "sigma", "sigma_at"}


def _parse_blur(s: ViewSpec, b: dict, where: str) -> None:
    """`blur: {prob, sigma: [min, max], sigma_at}`: sigma in pixels of the view's output
    side, or of `sigma_at`-px images (scaled by side / sigma_at) when sigma_at is given."""
    unknown = set(b) - _BLUR_KEYS
    if unknown:
        raise UserInputError(f"{where}: unknown blur keys {sorted(unknown)}; valid: {sorted(_BLUR_KEYS)}")
    s.blur_prob = float(b.get("prob", s.blur_prob))
    if "sigma" in b:
        sigma = b["sigma"]
        if not isinstance(sigma, (list, tuple)) or len(sigma) != 2 or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in sigma):
            raise UserInputError(f"{where}: blur.sigma must be [min, max] in pixels, got {sigma!r}")
        s.blur_sigma = tuple(float(v) for v in sigma)
        s.blur_sigma_at = None  # the recipe's own sigma: pixels of the view, unless sigma_at says
    if not (0 < s.blur_sigma[0] <= s.blur_sigma[1]):
        raise UserInputError(f"{where}: blur.sigma must be 0 < min <= max, got {list(s.blur_sigma)}")
    if "sigma_at" in b and b["sigma_at"] is not None:
        at = b["sigma_at"]
        if isinstance(at, bool) or not isinstance(at, (int, float)) or not at > 0 or not math.isfinite(at):
            raise UserInputError(f"{where}: blur.sigma_at must be a side in pixels > 0 (the image size "
                                 f"blur.sigma is quoted at, e.g. 224), got {at!r}")
        s.blur_sigma_at = float(at)
    elif "sigma_at" in b:  # sigma_at: null, said outright: pixels of the view
        s.blur_sigma_at = None


def load_recipe(name_or_path: str) -> Recipe:
    """A shipped recipe by name (mocov2, simclr, byol, mocov3, swav, dino, solo_*) or a YAML
    file path."""
    if name_or_path is None:
        raise UserInputError("augment.recipe is not set: name a recipe (mocov2, byol, dino, ...) or "
                             "load the config with load_config(), which fills in the method's own")
    p = Path(name_or_path)
    if not p.suffix:
        p = RECIPE_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        shipped = sorted(q.stem for q in RECIPE_DIR.glob("*.yaml"))
        raise UserInputError(f"augment.recipe '{name_or_path}' not found; use one of {shipped} "
                             f"or a path to a recipe YAML")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UserInputError(f"recipe '{p}' is not valid YAML ({exc})") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("global"), list) or not raw["global"]:
        raise UserInputError(f"recipe '{p}' needs a non-empty 'global' list of views")
    local = raw.get("local")
    return Recipe(
        name=str(raw.get("name", p.stem)),
        mean=tuple(float(v) for v in raw.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(float(v) for v in raw.get("std", (0.229, 0.224, 0.225))),
        global_views=[_parse_spec(g, f"{p}: global[{i}]") for i, g in enumerate(raw["global"])],
        local_view=_parse_spec(local, f"{p}: local") if local else None,
        local_count=int(local.get("count", 0)) if local else 0,
    )


class TorchvisionAugmenter:
    """Per-image torchvision v2 transforms; randomness comes from torch's global RNG,
    which the trainer seeds per step so a resumed run draws the same augmentations."""

    backend = "torchvision"

    def __init__(self, recipe: Recipe, image_size: int):
        self.recipe = recipe
        self.image_size = image_size
        self._cache: dict[tuple[str, bool], object] = {}

    def transform(self, kind: str, normalize: bool = True):
        if (kind, normalize) not in self._cache:
            self._cache[kind, normalize] = build_torchvision_transform(self.recipe, kind, self.image_size, normalize)
        return self._cache[kind, normalize]

    def apply(self, kind: str, images: Sequence[np.ndarray]) -> torch.Tensor:
        t = self.transform(kind)
        return torch.stack([t(_to_chw_tensor(im)) for im in images])

    def apply_uint8(self, kind: str, images: Sequence[np.ndarray]) -> torch.Tensor:
        """The same views left as uint8 [N, 3, S, S] (to travel small, pinned, and be
        normalised on the trainer's device with `normalize_on_device`)."""
        t = self.transform(kind, normalize=False)
        return torch.stack([t(_to_chw_tensor(im)) for im in images])


def normalize_on_device(views: torch.Tensor, recipe: Recipe, device: torch.device) -> torch.Tensor:
    """uint8 [N, 3, S, S] (pinned host or device) -> the recipe's normalised float32 on `device`."""
    x = views.to(device, non_blocking=True).to(torch.float32).div_(255.0)
    key = (tuple(recipe.mean), tuple(recipe.std), str(device))
    if key not in _MEAN_STD:  # uploaded once per device, not per step
        _MEAN_STD[key] = tuple(torch.tensor(v, dtype=torch.float32, device=device)[None, :, None, None]
                               for v in key[:2])
    mean, std = _MEAN_STD[key]
    return x.sub_(mean).div_(std)


_MEAN_STD: dict = {}


def _to_chw_tensor(image) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        return image if image.shape[0] == 3 else image.permute(2, 0, 1).contiguous()
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if not arr.flags.writeable or not arr.flags.c_contiguous:  # torch wants its own writable copy
        arr = np.array(arr, order="C")
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def build_torchvision_transform(recipe: Recipe, kind: str, image_size: int, normalize: bool = True):
    """The view's transform; `normalize=False` leaves uint8 CHW (normalised later, on a device)."""
    from torchvision.transforms import v2

    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(recipe.mean), list(recipe.std))] \
        if normalize else []
    spec = recipe.spec(kind)
    if spec is None:
        return v2.Compose([v2.Resize((image_size, image_size), antialias=True), *tail])
    side = spec.side(image_size)
    ops = [
        v2.RandomResizedCrop(side, scale=spec.scale, ratio=spec.ratio, antialias=True),
        v2.RandomHorizontalFlip(spec.flip),
    ]
    if spec.jitter_prob > 0:
        ops.append(v2.RandomApply([v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation,
                                                  spec.hue)], p=spec.jitter_prob))
    if spec.grayscale > 0:
        ops.append(v2.RandomGrayscale(spec.grayscale))
    if spec.blur_prob > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(spec.blur_kernel(image_size),
                                                   sigma=spec.sigma_range(image_size))], p=spec.blur_prob))
    if spec.solarize > 0:
        ops.append(v2.RandomSolarize(threshold=128, p=spec.solarize))
    return v2.Compose([*ops, *tail])


def build_augmenter(cfg_augment, image_size: int, seed: int = 0, max_batch: int = 256):
    """The augmenter for `augment.backend`; DALI is imported only when asked for."""
    recipe = load_recipe(cfg_augment.recipe)
    if cfg_augment.backend == "torchvision":
        return TorchvisionAugmenter(recipe, image_size)
    if cfg_augment.backend == "dali":
        from sasi_online.data.dali_pipeline import DaliAugmenter

        return DaliAugmenter(recipe, image_size, seed=seed, max_batch=max_batch)
    raise UserInputError(f"augment.backend '{cfg_augment.backend}' is not one of torchvision, dali")
