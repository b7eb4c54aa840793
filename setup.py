"""vsdjax: Variational Score Distillation (ProlificDreamer) in pure JAX."""
from setuptools import find_packages, setup

setup(
    name="vsdjax",
    version="0.1.0",
    description="ProlificDreamer (VSD) and DreamFusion (SDS) text-to-3D in pure JAX",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["vsdjax", "vsdjax.*"]),
    # The real SD 2.1 / 2.1-base config files (shapes, schedule) ship as data.
    package_data={"vsdjax.prior": ["configs/*/*.json", "configs/*/*/*.json", "configs/*.md"]},
    python_requires=">=3.10",
    install_requires=[
        # Versions tested together; diffusers removed its Flax classes in 0.40
        # and transformers 5 removed FlaxCLIPTextModel.
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "chex>=0.1.90",
        "ml_collections>=1.0",
        "numpy>=1.26",
        "diffusers[flax]>=0.35,<0.40",
        "transformers>=4.45,<5",
        "safetensors>=0.4",
        "absl-py>=2.0",
        "tqdm>=4.60",
        "imageio>=2.30",
        "imageio-ffmpeg>=0.5",
        "trimesh>=4.0",
        "PyMCubes>=0.1.4",
    ],
    extras_require={
        # torch is only used by parity tests against diffusers' PyTorch classes.
        "test": ["pytest>=8", "torch==2.13.0"],
    },
)
