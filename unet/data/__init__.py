"""Everything between files on disk and training batches: reading, validation, folds, synthetic data,
augmentation and tile sampling."""
from unet.data.augment import AugmentConfig
from unet.data.folds import fold_indices
from unet.data.io import (SliceSet, StackInfo, iter_pages, load_dataset, read_stack, scale_by_dtype, stack_info,
                          synthetic_dataset)
from unet.data.sampling import TileBatches, TrainTiles, build_train_loader, default_workers
from unet.data.synthetic import make_synthetic_em

__all__ = ["AugmentConfig", "SliceSet", "StackInfo", "TileBatches", "TrainTiles", "build_train_loader", "default_workers",
           "fold_indices", "iter_pages", "load_dataset", "make_synthetic_em", "read_stack", "scale_by_dtype",
           "stack_info", "synthetic_dataset"]
