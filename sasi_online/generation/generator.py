"""SASIGenerator: (rewritten caption, visual prompt, seed) → synthetic image.

Batches of different prompts and visual prompts go through one forward per step; every
image has its own `torch.Generator`, so batching does not change an image. Items that
need a different schedule (img2img vs pure noise) or another family are split into
separate sub-batches automatically.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from sasi_online.errors import UserInputError
from sasi_online.utils import derive_seed, to_uint8_hwc

from . import loop
from .backend import apply_attention, build_backend, build_decoder, pads_batches, prepare_module
from .families import Family, family_for, load_family
from .schedulers import SCHEDULER_NAMES, check_steps

log = logging.getLogger(__name__)

STAGES = ("text", "latents", "denoise", "decode")


@dataclass
class GenerationResult:
    """Images of one `generate` call, in input order.

    images: N x H x W x 3 uint8 (all zero where `finite` is False: never use those): a
    numpy array, or with `generate(..., on_device=True)` a uint8 tensor on the generator's device;
    finite: per-image flag; retries: regenerations per image; seeds: the seed that made
    each image (differs from the request after a retry); seconds: time per stage.
    """

    images: Any  # np.ndarray, or a torch.Tensor on the device (on_device=True)
    finite: np.ndarray
    retries: np.ndarray
    seeds: list
    families: list
    seconds: dict = field(default_factory=dict)


def _vp_parts(vp: Any) -> tuple[str, Any, Any]:
    """(kind, init image | None, control image | None) from a VisualPrompt (None = direct)."""
    if vp is None:
        return "direct", None, None
    return getattr(vp, "kind"), getattr(vp, "init_image", None), getattr(vp, "control_image", None)


def _pil(image: Any) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(to_uint8_hwc(image))


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if choice == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if choice not in table:
        raise UserInputError(f"generation.dtype='{choice}' is not known; use auto, {', '.join(table)}")
    return table[choice]


class SASIGenerator:
    """Owns the denoising loop over diffusers components of one or two families."""

    def __init__(self, models_cfg: Any, gen_cfg: Any,
                 backend_hook: Optional[Callable[[Callable], Callable]] = None):
        self.models_cfg = models_cfg
        self.cfg = gen_cfg
        if gen_cfg.scheduler not in SCHEDULER_NAMES:
            raise UserInputError(f"generation.scheduler='{gen_cfg.scheduler}' is not known; "
                                 f"use one of {', '.join(SCHEDULER_NAMES)}")
        if gen_cfg.steps < 1:
            raise UserInputError(f"generation.steps must be >= 1, got {gen_cfg.steps}")
        check_steps(gen_cfg.scheduler, gen_cfg.steps)
        if not 0.0 < gen_cfg.strength <= 1.0:
            raise UserInputError(f"generation.strength must be in (0, 1], got {gen_cfg.strength}")
        if gen_cfg.batch_size < 1:
            raise UserInputError(f"generation.batch_size must be >= 1, got {gen_cfg.batch_size}")
        self.device = resolve_device(getattr(gen_cfg, "device", "auto"))
        self.dtype = resolve_dtype(getattr(gen_cfg, "dtype", "auto"), self.device)
        self.backend_hook = backend_hook  # wraps each family's UNet backend (engines, fault injection)
        self.attention: Optional[str] = None  # which attention kernel runs, and why (after a family loads)
        self._families: dict[str, Family] = {}
        self._backends: dict[str, Callable] = {}
        self._resets: dict[str, Callable] = {}  # stateful backends (DeepCache) start each batch afresh
        self._decoders: dict[str, Callable] = {}  # latents -> images, per family
        self.pads = pads_batches(gen_cfg)  # partial batches padded to batch_size (static shapes)

    @classmethod
    def from_config(cls, models_cfg: Any, gen_cfg: Any, **kw: Any) -> "SASIGenerator":
        """Families load lazily, on the first image that needs them, from local folders only."""
        return cls(models_cfg, gen_cfg, **kw)

    def with_settings(self, **overrides: Any) -> "SASIGenerator":
        """A generator with some `generation.*` settings changed that shares this one's
        loaded models (speed sweeps, A/B checks): families are not loaded again; each gets
        a backend built for the new settings. The modules are shared, so settings that
        change them in place (`attention`) apply to both generators."""
        try:
            cfg = dataclasses.replace(self.cfg, **overrides)
        except TypeError as exc:
            raise UserInputError(f"with_settings({', '.join(overrides)}): {exc}; use field names of "
                                 f"the generation config") from None
        other = type(self)(self.models_cfg, cfg, backend_hook=self.backend_hook)
        if (other.device, other.dtype) == (self.device, self.dtype):
            for name, fam in self._families.items():
                other._adopt(name, fam)
        return other

    # ------------------------------------------------------------------ families
    def family(self, name: str) -> Family:
        if name not in self._families:
            self._adopt(name, load_family(name, self.models_cfg, self.device, self.dtype))
        return self._families[name]

    def _adopt(self, name: str, fam: Family) -> None:
        """Check a loaded family against the settings; set its memory layout and attention;
        build its UNet backend and its decoder."""
        self._check_resolution(fam)
        prepare_module(self.cfg, fam.unet, self.device)
        self.attention = apply_attention(self.cfg, fam.unet)

        def on_controlnet(cn, cfg=self.cfg, device=self.device):
            prepare_module(cfg, cn, device)
            apply_attention(cfg, cn)

        fam.on_controlnet_load = on_controlnet
        if fam._controlnet is not None:  # loaded by a generator sharing this family
            on_controlnet(fam._controlnet)
        backend = build_backend(self.cfg, fam)
        self._resets[name] = getattr(backend, "reset", None)
        self._backends[name] = self.backend_hook(backend) if self.backend_hook else backend
        self._decoders[name] = build_decoder(self.cfg, self.models_cfg, fam)
        self._families[name] = fam

    def family_for(self, kind: str) -> str:
        return family_for(kind, self.cfg.family)

    def _check_resolution(self, fam: Family) -> None:
        multiple = fam.vae_scale_factor * 2 ** (len(fam.unet.config.block_out_channels) - 1)
        if self.cfg.resolution % multiple:
            raise UserInputError(f"generation.resolution={self.cfg.resolution} must be a multiple of "
                                 f"{multiple} for the {fam.name} models in '{fam.folder}'")

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Sequence[str], prompts_visual: Sequence[Any],
                 seeds: Sequence[int], on_device: bool = False) -> GenerationResult:
        """Generate one image per (prompt, visual prompt, seed); None as VP means text only.

        on_device: keep the images on the generator's device (a uint8 tensor, the same values
        as the default numpy array); only the per-image finite flags are read back, once a batch."""
        n = len(prompts)
        if len(prompts_visual) != n or len(seeds) != n:
            raise UserInputError(f"generate needs as many visual prompts and seeds as prompts "
                                 f"({n}); got {len(prompts_visual)} and {len(seeds)}")
        res = self.cfg.resolution
        images = (torch.zeros((n, res, res, 3), dtype=torch.uint8, device=self.device) if on_device
                  else np.zeros((n, res, res, 3), np.uint8))
        finite = np.zeros(n, bool)
        retries = np.zeros(n, np.int64)
        used_seeds = [int(s) for s in seeds]
        families = [""] * n
        seconds = {s: 0.0 for s in STAGES}
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, vp in enumerate(prompts_visual):
            kind, init, control = _vp_parts(vp)
            families[i] = self.family_for(kind)
            groups[(families[i], init is not None, control is not None)].append(i)
        for (fam_name, _, _), members in groups.items():
            pending = list(members)
            attempt = 0
            while pending:
                for start in range(0, len(pending), self.cfg.batch_size):
                    idx = pending[start:start + self.cfg.batch_size]
                    out, ok = self._run_batch(
                        fam_name, [prompts[i] for i in idx], [prompts_visual[i] for i in idx],
                        [used_seeds[i] for i in idx], seconds, host=not on_device)
                    for j, i in enumerate(idx):
                        finite[i] = ok[j]
                        if ok[j]:
                            images[i] = out[j]
                failed = [i for i in pending if not finite[i]]
                if not failed or attempt >= self.cfg.max_retries:
                    for i in failed:
                        log.warning("image %d: non-finite output after %d retries; marked failed", i, attempt)
                    break
                attempt += 1
                for i in failed:  # a new seed derived from the requested one: reproducible
                    retries[i] = attempt
                    used_seeds[i] = derive_seed(int(seeds[i]), "retry", attempt)
                    log.warning("image %d: non-finite output; retry %d with seed %d", i, attempt, used_seeds[i])
                pending = failed
        return GenerationResult(images, finite, retries, used_seeds, families, seconds)

    def _pad(self, prompts: list, vps: list, seeds: list) -> tuple[list, list, list, int]:
        """Pad a partial batch to `batch_size` with copies of its first item (each row has its
        own generator, so the real rows do not change); returns the real row count too."""
        n = len(prompts)
        extra = self.cfg.batch_size - n if self.pads else 0
        if extra <= 0:
            return prompts, vps, seeds, n
        return prompts + prompts[:1] * extra, vps + vps[:1] * extra, seeds + seeds[:1] * extra, n

    def _start(self, fam: Family, vps: list, gens: list) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """A fresh scheduler on the CPU, the CPU timesteps this batch runs, and its first latents."""
        from .schedulers import make_scheduler

        cfg, res, dev = self.cfg, self.cfg.resolution, self.device
        scheduler = make_scheduler(cfg.scheduler, fam.scheduler_config)
        scheduler.set_timesteps(cfg.steps, device="cpu")  # step coefficients from the CPU copy
        shape = (len(vps), fam.unet.config.in_channels, res // fam.vae_scale_factor, res // fam.vae_scale_factor)
        if _vp_parts(vps[0])[1] is not None:
            timesteps = loop.img2img_timesteps(scheduler, cfg.steps, cfg.strength)
            pixels = fam.image_processor.preprocess([_pil(_vp_parts(v)[1]) for v in vps], height=res, width=res)
            latents = loop.init_latents(scheduler, fam.vae, shape, gens, dev, self.dtype,
                                        image=pixels, first_t=timesteps[:1])
        else:
            timesteps = scheduler.timesteps
            latents = loop.init_latents(scheduler, fam.vae, shape, gens, dev, self.dtype)
        return scheduler, timesteps, latents

    def _control(self, fam: Family, backend: Any, vps: list) -> tuple[Any, Optional[torch.Tensor]]:
        if _vp_parts(vps[0])[2] is None:
            return None, None
        res = self.cfg.resolution
        # a compiled graph or an engine holding ControlNet + UNet runs both in one call
        controlnet = backend if getattr(backend, "fuses_controlnet", False) else fam.controlnet
        control = fam.control_image_processor.preprocess(
            [_pil(_vp_parts(v)[2]) for v in vps], height=res, width=res).to(self.device, self.dtype)
        return controlnet, torch.cat([control] * 2) if self.cfg.guidance > 1.0 else control

    @torch.inference_mode()
    def _run_batch(self, fam_name: str, prompts: list, vps: list, seeds: list,
                   seconds: dict, host: bool = True) -> tuple[Any, np.ndarray]:
        cfg = self.cfg
        fam = self.family(fam_name)
        backend = self._backends[fam_name]
        prompts, vps, seeds, real = self._pad(prompts, vps, seeds)
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

        t0 = time.perf_counter()
        negatives = [cfg.negative_prompt] * len(prompts) if cfg.guidance > 1.0 else None
        text = loop.encode_text(fam.tokenizer, fam.text_encoder, prompts, negatives, self.device)
        t1 = time.perf_counter()
        scheduler, timesteps, latents = self._start(fam, vps, gens)
        controlnet, control = self._control(fam, backend, vps)
        t2 = time.perf_counter()

        extra = loop.step_kwargs(scheduler, gens)
        if self._resets.get(fam_name):
            # DeepCache guesses a new run from a rising timestep; a one-step schedule repeats
            # the same t, so say it outright: no deep features cross from another batch
            self._resets[fam_name]()
        latents = loop.denoise(backend, scheduler, latents, timesteps, text, cfg.guidance, extra,
                               controlnet=controlnet, control=control, control_scale=cfg.controlnet_scale,
                               fused=getattr(cfg, "fused_step", True))
        t3 = time.perf_counter()

        # the padded batch is decoded whole (one static shape for a compiled decoder), then the
        # padding rows are dropped
        decoded = self._decoders[fam_name](latents)[:real]
        ok = torch.isfinite(latents[:real]).flatten(1).all(1) & torch.isfinite(decoded).flatten(1).all(1)
        out = loop.to_uint8(torch.nan_to_num(decoded), host=host)
        t4 = time.perf_counter()
        for name, dt in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            seconds[name] += dt
        return out, ok.cpu().numpy()
