"""mmearth_jax: pretraining geospatial foundation models in JAX, from one CPU to a TPU pod."""
from setuptools import find_packages, setup

setup(
    name="mmearth_jax",
    version="0.1.0",
    description="MP-MAE, Scale-MAE, GFM and dense contrastive pretraining for Earth observation in JAX",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # The recipes live in the top-level configs/ folder and install as mmearth_jax.configs.
    packages=find_packages(include=["mmearth_jax", "mmearth_jax.*"]) + ["mmearth_jax.configs"],
    package_dir={"mmearth_jax.configs": "configs"},
    # A set seen working together (grain and orbax-checkpoint must be a compatible pair).
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "array-record>=0.8.6,<0.9",
        "tensorflow-datasets>=4.9.10,<4.10",
        "ml-collections>=1.1,<1.2",
        "h5py>=3.16,<4",
        "numpy>=2.0,<3",
        "tensorboardX>=2.6,<3",  # TensorBoard event files without TensorFlow
        "tqdm>=4.60",
        "safetensors>=0.4,<1",  # weight files read and written without unpickling
    ],
    extras_require={
        # The release the tests use. On Linux, PyPI's torch wheel is the CUDA build (GBs of
        # nvidia-* packages); for a CPU-only machine, install torch 2.13.0 from PyTorch's CPU
        # wheel index first (README, Install).
        "torch": ["torch==2.13.0"],
        # xdist: the suite runs in 2 processes (one per core of the CI machine).
        "test": ["pytest>=9,<10", "pytest-xdist>=3.6,<4", "portpicker>=1.6",
                 "filelock>=3.12"],  # the shared compilation cache's lock; tests/_wheel.py's
        # The Colab notebook, executed headless by the test suite.
        "notebook": ["papermill>=2.6,<3", "nbclient>=0.10", "ipykernel>=6", "matplotlib>=3.8"],
        # GeoTIFF scenes (rasterio ships GDAL in its wheels) and Parquet tables; pyarrow 16 is
        # the first built for numpy 2.
        "geo": ["rasterio>=1.4,<1.5", "pyarrow>=16"],
        # JAX for NVIDIA GPUs (CUDA 12 and cuDNN from pip) and for Cloud TPU VMs (libtpu): the same
        # JAX release as install_requires, with the accelerator's plugin.
        "cuda12": ["jax[cuda12]>=0.10.2,<0.11"],
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
    },
    entry_points={"console_scripts": ["mmearth-jax=mmearth_jax.cli:main"]},
)
