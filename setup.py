"""sasi_online: contrastive self-supervised learning with semantic-aware synthetic images
generated in the loop.

`kernels/`, `engines/` and `configs/` sit at the repository top but install as
`sasi_online.kernels`, `sasi_online.engines` and `sasi_online.configs`: a top-level module named `kernels`
would shadow the Hugging Face package of that name, which diffusers probes for.
"""
import os
import sys

# `python setup.py` and pip's metadata step put this folder first on sys.path, where
# kernels/ would hide the Hugging Face package whose egg_info writer setuptools loads.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from setuptools import find_packages, setup  # noqa: E402

core = find_packages(include=["sasi_online", "sasi_online.*"])
extra_top = {"sasi_online.kernels": "kernels", "sasi_online.engines": "engines"}
core += ["sasi_online.configs"]  # configs/: YAML only, shipped as package data
for top_name, folder in list(extra_top.items()):
    core += [top_name] + [f"{top_name}.{p}" for p in find_packages(where=folder)]


def _gpu_extra() -> list[str]:
    """TensorRT 10 or 11 (the APIs engines/ is tested against), and the torch-tensorrt / xformers
    builds that fit the torch already installed: torch-tensorrt X.Y requires torch X.Y exactly,
    so any other pin would make pip replace torch; xformers 0.0.35 needs torch >= 2.10 only."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_minor = ".".join(version("torch").split("+")[0].split(".")[:2])
    except PackageNotFoundError:
        torch_minor = "2.14"
    return ["tensorrt>=10,<12", f"torch-tensorrt=={torch_minor}.*", "xformers==0.0.35"]


setup(
    name="sasi_online",
    version="0.1.0",
    description="Semantic-aware synthetic images, generated in the loop, for contrastive SSL",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=core,
    package_dir={"sasi_online.kernels": "kernels", "sasi_online.engines": "engines",
                 "sasi_online.configs": "configs"},
    package_data={"sasi_online": ["assets/*", "assets/**/*"], "sasi_online.configs": ["*.yaml", "**/*.yaml"],
                  "sasi_online.data": ["recipes/*.yaml"],
                  "": ["*.yaml"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "diffusers>=0.30",
        "transformers>=4.45",
        "accelerate",
        "peft",  # diffusers' load_lora_weights (models.lora: an LCM-LoRA fused at start-up)
        "safetensors",
        "tokenizers",
        "sentencepiece",  # LLaMA-family folders that ship tokenizer.model only
        "protobuf",  # with sentencepiece: the slow-to-fast tokenizer conversion
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "tensorboard",
        "scikit-learn",
        "deepspeed",
        "bitsandbytes",
        "nvidia-dali-cuda130; platform_system == 'Linux'",
        "onnx",
        "onnxruntime",
        "onnxscript",
    ],
    extras_require={
        # timm: the export test loads into its ResNets; datasets: a store opens as an ImageFolder
        # kernels: the Hugging Face package transformers >= 5.25 imports; tests/test_import_roots.py
        # checks that the checkout's own kernels/ never shadows it
        "dev": ["pytest>=8", "pytest-timeout", "timm", "datasets", "kernels"],
        # Not installable on CPU-only machines; every import of these is guarded.
        "gpu": _gpu_extra(),
    },
    entry_points={"console_scripts": ["sasi=sasi_online.cli:main"]},
)
