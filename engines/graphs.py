"""What each exported graph looks like: input/output names, dtypes, dynamic axes and
the concrete shape of every input for a given (batch, image height, image width).

One description serves three users, so they cannot drift apart: the ONNX exporter
(dummy inputs and `dynamic_axes`), the onnxruntime backend (zero residuals when the
caller passes none) and the TensorRT builder (min/opt/max optimisation profiles).
Shapes are described from the models' configs only; nothing here runs a model.

Sizes are always given in image pixels; latent graphs divide by the VAE's scale factor,
as NVIDIA's TensorRT diffusion demo does.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sasi_online.errors import UserInputError

GRAPH_KINDS = ("unet", "unet_controlnet", "vae_decoder", "text_encoder")

# numpy/onnx dtype names; torch dtypes are looked up lazily so this module stays cheap.
_FLOAT = "float32"
_INT64 = "int64"


@dataclass(frozen=True)
class Residual:
    """One ControlNet residual: its channel count and its downsampling from the latent."""

    channels: int
    factor: int


@dataclass
class GraphSpec:
    """A graph's interface. `kind` is one of GRAPH_KINDS."""

    kind: str
    latent_channels: int = 4
    out_channels: int = 4
    text_len: int = 77
    text_dim: int = 768
    vae_scale_factor: int = 8  # image pixels per latent pixel
    residuals: list[Residual] = field(default_factory=list)  # down residuals (unet with residuals)
    mid_residual: Residual | None = None
    with_residuals: bool = False  # unet: takes ControlNet residuals as inputs
    control_channels: int = 3  # unet_controlnet: channels of the control image
    image_channels: int = 3  # vae_decoder output
    latent_multiple: int = 1  # UNets: latent sides must divide by 2**(levels - 1)
    vocab_size: int = 49408  # text_encoder: token ids are < this
    float_dtype: str = _FLOAT  # every float input/output (float16 for a TensorRT fp16 graph)
    extra: dict = field(default_factory=dict)

    # -- names -----------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        if self.kind == "unet":
            names = ["sample", "timestep", "encoder_hidden_states"]
            if self.with_residuals:
                names += [f"down_residual_{i}" for i in range(len(self.residuals))]
                names += ["mid_residual"]
            return names
        if self.kind == "unet_controlnet":
            return ["sample", "timestep", "encoder_hidden_states", "control_image", "conditioning_scale"]
        if self.kind == "vae_decoder":
            return ["latent"]
        if self.kind == "text_encoder":
            return ["input_ids"]
        raise UserInputError(f"unknown graph kind '{self.kind}'; choose one of {', '.join(GRAPH_KINDS)}")

    @property
    def output_names(self) -> list[str]:
        return {
            "unet": ["noise_pred"],
            "unet_controlnet": ["noise_pred"],
            "vae_decoder": ["image"],
            "text_encoder": ["last_hidden_state"],
        }[self.kind]

    def dtype(self, name: str) -> str:
        return _INT64 if name == "input_ids" else self.float_dtype

    # -- shapes ----------------------------------------------------------------------
    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        f = self.vae_scale_factor
        if height % f or width % f:
            raise UserInputError(
                f"image size {height}x{width} is not a multiple of the VAE scale factor {f}; "
                f"choose a height and width divisible by {f}"
            )
        m = self.latent_multiple
        if (height // f) % m or (width // f) % m:
            raise UserInputError(
                f"image size {height}x{width} gives a {height // f}x{width // f} latent, which this "
                f"{self.kind} cannot take: latent sides must be multiples of {m} (image sides of {m * f})"
            )
        return height // f, width // f

    def input_shapes(self, batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        """Concrete shape of every input for `batch` samples of `height` x `width` pixels.

        `batch` is what the graph sees: with classifier-free guidance a UNet sees twice
        the number of images (the caller doubles it).
        """
        if batch < 1:
            raise UserInputError(f"batch must be >= 1, got {batch}")
        if self.kind == "text_encoder":
            return {"input_ids": (batch, self.text_len)}
        h, w = self.latent_size(height, width)
        if self.kind == "vae_decoder":
            return {"latent": (batch, self.latent_channels, h, w)}
        shapes = {
            "sample": (batch, self.latent_channels, h, w),
            "timestep": (batch,),
            "encoder_hidden_states": (batch, self.text_len, self.text_dim),
        }
        if self.kind == "unet_controlnet":
            shapes["control_image"] = (batch, self.control_channels, height, width)
            shapes["conditioning_scale"] = (1,)
        elif self.with_residuals:
            for i, r in enumerate(self.residuals):
                shapes[f"down_residual_{i}"] = (batch, r.channels, _down(h, r.factor), _down(w, r.factor))
            m = self.mid_residual
            shapes["mid_residual"] = (batch, m.channels, _down(h, m.factor), _down(w, m.factor))
        return shapes

    def output_shapes(self, batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        if self.kind == "text_encoder":
            return {"last_hidden_state": (batch, self.text_len, self.text_dim)}
        if self.kind == "vae_decoder":
            return {"image": (batch, self.image_channels, height, width)}
        h, w = self.latent_size(height, width)
        return {"noise_pred": (batch, self.out_channels, h, w)}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Legacy-exporter `dynamic_axes`: batch and spatial axes of every tensor.

        The text length stays static (tokenizers pad to a fixed length), as does the
        conditioning scale.
        """
        axes: dict[str, dict[int, str]] = {}
        for name in self.input_names + self.output_names:
            if name == "conditioning_scale":
                continue
            if name in ("timestep",):
                axes[name] = {0: "batch"}
            elif name in ("encoder_hidden_states", "input_ids", "last_hidden_state"):
                axes[name] = {0: "batch"}
            elif name.startswith("down_residual_") or name == "mid_residual":
                axes[name] = {0: "batch", 2: f"{name}_height", 3: f"{name}_width"}
            elif name in ("control_image", "image"):
                axes[name] = {0: "batch", 2: "height", 3: "width"}
            else:
                axes[name] = {0: "batch", 2: "latent_height", 3: "latent_width"}
        return axes

    # -- persistence -----------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> "GraphSpec":
        values = dict(values)
        values["residuals"] = [Residual(**r) for r in values.get("residuals", [])]
        if values.get("mid_residual") is not None:
            values["mid_residual"] = Residual(**values["mid_residual"])
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> "GraphSpec":
        p = Path(path)
        if not p.is_file():
            raise UserInputError(f"graph description '{p}' not found; export the graph first "
                                 f"(sasi_online.engines.export)")
        return cls.from_json(json.loads(p.read_text(encoding="utf-8")))


def _down(n: int, factor: int) -> int:
    # Each stride-2 downsampler (padding 1) maps n -> ceil(n / 2).
    while factor > 1:
        n = (n + 1) // 2
        factor //= 2
    return n


# ----------------------------------------------------------------------------- from configs
def unet_residual_layout(unet_config: Any) -> tuple[list[Residual], Residual]:
    """The ControlNet residuals a UNet accepts, computed from its config.

    Mirrors UNet2DConditionModel.forward: conv_in's output, then per down block one
    entry per resnet and one for its downsampler (all blocks but the last).
    """
    cfg = _as_dict(unet_config)
    channels = list(cfg["block_out_channels"])
    layers = cfg.get("layers_per_block", 2)
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    residuals = [Residual(channels[0], 1)]
    factor = 1
    for i, c in enumerate(channels):
        residuals += [Residual(c, factor)] * layers[i]
        if i < len(channels) - 1:
            factor *= 2
            residuals.append(Residual(c, factor))
    return residuals, Residual(channels[-1], factor)


def _as_dict(config: Any) -> dict:
    return dict(config) if not isinstance(config, dict) else config


def controlnet_scale_factor(controlnet_config: Any) -> int:
    """Pixels per latent pixel the ControlNet's conditioning embedding assumes."""
    cfg = _as_dict(controlnet_config)
    return 2 ** (len(cfg["conditioning_embedding_out_channels"]) - 1)


def vae_scale_factor(vae_config: Any) -> int:
    cfg = _as_dict(vae_config)
    return 2 ** (len(cfg["block_out_channels"]) - 1)


def unet_spec(unet_config: Any, *, with_residuals: bool, text_len: int = 77,
              vae_factor: int = 8) -> GraphSpec:
    cfg = _as_dict(unet_config)
    residuals, mid = unet_residual_layout(cfg)
    return GraphSpec(
        kind="unet", latent_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
        text_len=text_len, text_dim=_cross_dim(cfg), vae_scale_factor=vae_factor,
        residuals=residuals if with_residuals else [], mid_residual=mid if with_residuals else None,
        with_residuals=with_residuals, latent_multiple=2 ** (len(cfg["block_out_channels"]) - 1),
    )


def unet_controlnet_spec(unet_config: Any, controlnet_config: Any, *, text_len: int = 77) -> GraphSpec:
    cfg = _as_dict(unet_config)
    ccfg = _as_dict(controlnet_config)
    if _cross_dim(cfg) != _cross_dim(ccfg):
        raise UserInputError(
            f"the ControlNet's cross-attention width {_cross_dim(ccfg)} does not match the UNet's "
            f"{_cross_dim(cfg)}: pair a ControlNet trained for this base model"
        )
    return GraphSpec(
        kind="unet_controlnet", latent_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
        text_len=text_len, text_dim=_cross_dim(cfg), vae_scale_factor=controlnet_scale_factor(ccfg),
        control_channels=ccfg.get("conditioning_channels", 3),
        latent_multiple=2 ** (len(cfg["block_out_channels"]) - 1),
    )


def vae_decoder_spec(vae_config: Any) -> GraphSpec:
    cfg = _as_dict(vae_config)
    return GraphSpec(kind="vae_decoder", latent_channels=cfg["latent_channels"],
                     vae_scale_factor=vae_scale_factor(cfg), image_channels=cfg["out_channels"])


def text_encoder_spec(text_config: Any, text_len: int) -> GraphSpec:
    cfg = text_config.to_dict() if hasattr(text_config, "to_dict") else _as_dict(text_config)
    return GraphSpec(kind="text_encoder", text_len=text_len, text_dim=cfg["hidden_size"],
                     vocab_size=cfg["vocab_size"])


def _cross_dim(cfg: dict) -> int:
    d = cfg["cross_attention_dim"]
    return d if isinstance(d, int) else d[0]
