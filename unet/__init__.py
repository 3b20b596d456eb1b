"""UNet for 2D biomedical image segmentation on Ascend NPUs, NVIDIA GPUs and CPUs."""
from unet.model import ModelConfig, UNet

__version__ = "0.1.0"
__all__ = ["ModelConfig", "UNet", "__version__"]
