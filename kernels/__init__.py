"""Triton kernels, each beside its torch reference, and a dispatcher that picks one.

Import as ``sasi_online.kernels``. Triton is optional: nothing here needs it to import,
and every call falls back to (or can be forced onto) the torch reference.

- ``guided_step``: classifier-free guidance fused with a DDPM/DDIM step.
- ``ring_augment``: uint8 ring slots → augmented, normalised float views in one pass
  (Triton), with a vectorised torch path and the per-view torchvision reference.
- ``probe``: one trivial kernel run at start-up; the dispatcher uses Triton only if it ran.
- ``infonce``: MoCo InfoNCE over a queue without materialising the [B, 1+K] logits.
"""

if __name__ == "kernels":  # pragma: no cover - exercised in a subprocess by tests/test_import_roots.py
    # Imported under the top-level name: the checkout's top folder is on sys.path (`python -m`,
    # `python -c` or a REPL started there). That name belongs to Hugging Face's `kernels`,
    # which transformers >= 5.25 imports; hand it the name instead of shadowing it.
    from ._handover import hand_over as _hand_over

    _hand_over()
else:
    from ._triton import TritonUnavailableError
    from .dispatch import (BackendChoice, augment_views, choose_backend, dispatch_counts,
                           guided_scheduler_step, guided_step_fused, infonce_loss, last_choice)
    from .guided_step import StepScalars, guided_step_torch, guided_step_triton, step_scalars
    from .infonce import infonce_held_bytes, infonce_saved_bytes, infonce_torch, infonce_triton
    from .probe import probe as triton_probe
    from .ring_augment import (AugParams, AugRecipe, ring_augment_torch, ring_augment_triton,
                               ring_augment_vectorized, sample_aug_params)

    __all__ = [
        "AugParams", "AugRecipe", "BackendChoice", "StepScalars", "TritonUnavailableError",
        "augment_views", "choose_backend", "dispatch_counts", "guided_scheduler_step", "guided_step_fused",
        "guided_step_torch", "guided_step_triton", "infonce_held_bytes", "infonce_loss", "infonce_saved_bytes",
        "infonce_torch", "infonce_triton", "last_choice", "ring_augment_torch",
        "ring_augment_triton", "ring_augment_vectorized", "sample_aug_params", "step_scalars",
        "triton_probe",
    ]
