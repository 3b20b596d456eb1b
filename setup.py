from setuptools import find_packages, setup

setup(
    name="unet-em",
    version="0.1.0",
    description="UNet for 2D biomedical image segmentation on Ascend NPUs, NVIDIA GPUs and CPUs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["unet", "unet.*"]),
    python_requires=">=3.11",  # zarr 3 needs 3.11
    install_requires=[
        "torch>=2.6",
        "torchvision",
        "numpy",
        # tifffile's zarr interface (TIFF pages read in tiles) needs zarr 3, which it supports from 2025.5.21.
        "tifffile>=2025.5.21",
        "pillow",
        "scikit-image",
        "scipy",
        "tqdm",
        "matplotlib",
        # Chunked volumes (unet.io.volumes, unet.io.volume_writers): zarr 3 API (zarr 2 differs), N5 through tensorstore
        # (zarr 3 dropped N5), HDF5 through h5py; numcodecs for the zarr v2 Blosc compressor.
        "zarr>=3",
        "numcodecs",
        "tensorstore",
        "h5py",
    ],
    extras_require={
        # ome-zarr: its Reader opens our OME-Zarr outputs in a test; tensorboard: the event-file tests read back
        "test": ["pytest", "ome-zarr", "tensorboard"],
        "tensorboard": ["tensorboard"],  # train.py's event files (off without it)
        "npu": ["torch-npu"],
        "onnx": ["onnx", "onnxscript"],
        # infer.py --backend openvino (CPU); the version measured in docs/benchmarks.md
        "openvino": ["openvino>=2025.0"],
        # BioImage Model Zoo packages (export.py); the versions tested with spec 0.5.12 (pydantic 2.14 breaks
        # bioimageio.spec 0.5.12's serializer: 'index_key' TypeError on a fresh install, 2026-11-26).
        "bioimageio": ["bioimageio.core==0.11.0", "bioimageio.spec==0.5.12.0", "pydantic<2.14", "onnx", "onnxruntime"],
    },
    entry_points={
        "console_scripts": [
            "unet-train=unet.cli.commands:train",
            "unet-evaluate=unet.cli.commands:evaluate",
            "unet-infer=unet.cli.commands:infer",
            "unet-export=unet.cli.commands:export",
        ],
    },
)
