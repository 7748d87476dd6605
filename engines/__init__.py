"""Faster ways to run the generator's models: ONNX export, onnxruntime, TensorRT
(build, cache, run), torch.compile / torch-tensorrt backends, attention kernel choice
and DeepCache feature reuse.

Modules, one job each:
    graphs        what each exported graph takes and returns (names, shapes, dynamic axes)
    export        torch → ONNX, one folder per graph; parity check in onnxruntime
    feeds         hook arguments → named graph inputs (shared by the engine backends)
    ort_backend   onnxruntime sessions behind the UNet hook
    trt_build     TensorRT 10/11: strongly typed build, profiles, timing cache, engine cache key
    trt_runtime   TensorRT execution on torch CUDA memory, CUDA graphs for static shapes
    backends      select_backend(name, unet, ...): eager | compile | onnxruntime | tensorrt | torch_tensorrt;
                  ControlNet + UNet as one compiled graph / engine, each graph built once
    attention     configure_attention(unet, controlnet, preference): xformers or SDPA, and why
    deepcache     DeepCacheUNet: full UNet every N steps, shallow blocks in between
    availability  guarded imports of the optional GPU stack with clear messages

Import the submodules directly; importing this package loads nothing heavy.
"""
