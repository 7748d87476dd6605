"""Backbones: torchvision ResNet-18/50/101, a ViT-S and a small CNN, all randomly initialised.

`convnet`: four 3x3 conv-BN-ReLU blocks (32-64-128-256 channels, 2x2 max-pool after the
first three) and a global average pool, 256-d features: a 32-px encoder that trains in
seconds per hundred steps on one CPU thread (the science bench's).

`small_stem=True` adapts them to small images (32-96 px): ResNets get a 3x3 stride-1
first convolution and no max-pool (as in SimCLR's CIFAR setup); the ViT uses 4-pixel
patches on a 32-pixel base grid instead of 16-pixel patches on 224.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sasi_online.errors import UserInputError

BACKBONES = ("resnet18", "resnet50", "resnet101", "vit_small", "convnet")


def _resnet(name: str, small_stem: bool) -> tuple[nn.Module, int]:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if small_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feat_dim


class ConvNet(nn.Module):
    """conv3x3-BN-ReLU blocks, max-pool between them, global average pool."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256)):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(widths):
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.out_dim = c_in
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


class ViTBackbone(nn.Module):
    """torchvision's VisionTransformer, returning the class token, for any input size.

    Multi-crop methods (DINO) feed global and local crops of different sizes; the
    position embeddings are interpolated (bicubic) to each input's patch grid, as DINO does.
    """

    def __init__(self, patch_size: int, base_image_size: int, hidden_dim: int = 384,
                 num_layers: int = 12, num_heads: int = 6, mlp_dim: int = 1536):
        super().__init__()
        from torchvision.models.vision_transformer import VisionTransformer

        self.patch_size = patch_size
        self.base_grid = base_image_size // patch_size
        self.vit = VisionTransformer(image_size=base_image_size, patch_size=patch_size,
                                     num_layers=num_layers, num_heads=num_heads,
                                     hidden_dim=hidden_dim, mlp_dim=mlp_dim)
        self.vit.heads = nn.Identity()
        self.out_dim = hidden_dim

    def _position_embedding(self, gh: int, gw: int) -> torch.Tensor:
        pe = self.vit.encoder.pos_embedding
        if gh == gw == self.base_grid:
            return pe
        cls_pe, grid = pe[:, :1], pe[:, 1:]
        d = grid.shape[-1]
        grid = grid.reshape(1, self.base_grid, self.base_grid, d).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([cls_pe, grid.permute(0, 2, 3, 1).reshape(1, gh * gw, d)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise UserInputError(f"ViT input {h}x{w} is not a multiple of the patch size {self.patch_size}: "
                                 f"set data.image_size (and the recipe's local crop size) to a multiple of "
                                 f"{self.patch_size}")
        vit = self.vit
        x = vit.conv_proj(x)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([vit.class_token.expand(n, -1, -1), x], dim=1)
        x = x + self._position_embedding(gh, gw)
        enc = vit.encoder
        x = enc.ln(enc.layers(enc.dropout(x)))
        return x[:, 0]


def build_backbone(name: str, small_stem: bool) -> tuple[nn.Module, int]:
    """A randomly initialised backbone without classifier, and its feature size."""
    if name in ("resnet18", "resnet50", "resnet101"):
        return _resnet(name, small_stem)
    if name == "vit_small":
        net = ViTBackbone(patch_size=4, base_image_size=32) if small_stem else \
            ViTBackbone(patch_size=16, base_image_size=224)
        return net, net.out_dim
    if name == "convnet":  # sized for small images already: small_stem changes nothing
        net = ConvNet()
        return net, net.out_dim
    import difflib

    close = difflib.get_close_matches(str(name), BACKBONES, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise UserInputError(f"unknown method.backbone '{name}'.{hint} Choose one of: {', '.join(BACKBONES)}")
