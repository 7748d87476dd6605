"""sasi_online: contrastive self-supervised learning with semantic-aware synthetic images
generated in the loop.

`kernels/` and `engines/` sit at the repository top but install as
`sasi_online.kernels` and `sasi_online.engines`: a top-level module named `kernels`
would shadow the Hugging Face package of that name, which diffusers probes for.
"""
from setuptools import find_packages, setup

core = find_packages(include=["sasi_online", "sasi_online.*"])
extra_top = {"sasi_online.kernels": "kernels", "sasi_online.engines": "engines"}
for top_name, folder in list(extra_top.items()):
    core += [top_name] + [f"{top_name}.{p}" for p in find_packages(where=folder)]

setup(
    name="sasi_online",
    version="0.1.0",
    description="Semantic-aware synthetic images, generated in the loop, for contrastive SSL",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=core,
    package_dir={"sasi_online.kernels": "kernels", "sasi_online.engines": "engines"},
    package_data={"sasi_online": ["assets/*", "assets/**/*"], "": ["*.yaml"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "diffusers>=0.30",
        "transformers>=4.45",
        "accelerate",
        "safetensors",
        "tokenizers",
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
        "dev": ["pytest>=8", "pytest-timeout"],
        # Not installable on CPU-only machines; every import of these is guarded.
        "gpu": ["xformers", "torch-tensorrt", "tensorrt"],
    },
    entry_points={"console_scripts": ["sasi=sasi_online.cli:main"]},
)
