"""One self-supervised method per module; `METHODS` maps `method.name` to its class."""
from __future__ import annotations

from sasi_online.ssl.methods.adco import AdCo
from sasi_online.ssl.methods.barlow_twins import BarlowTwins
from sasi_online.ssl.methods.base import Method
from sasi_online.ssl.methods.byol import BYOL
from sasi_online.ssl.methods.dino import DINO
from sasi_online.ssl.methods.mocov2 import MoCoV2
from sasi_online.ssl.methods.mocov3 import MoCoV3
from sasi_online.ssl.methods.simclr import SimCLR
from sasi_online.ssl.methods.simsiam import SimSiam
from sasi_online.ssl.methods.swav import SwAV
from sasi_online.ssl.methods.vicreg import VICReg

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (MoCoV2, MoCoV3, SimSiam, SwAV, AdCo, DINO, BYOL, SimCLR, BarlowTwins, VICReg)
}

__all__ = ["METHODS", "Method"] + [cls.__name__ for cls in METHODS.values()]
