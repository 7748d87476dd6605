"""SASI generation: the denoising loop over diffusers components (see `generator`)."""
from .generator import GenerationResult, SASIGenerator

__all__ = ["GenerationResult", "SASIGenerator"]
