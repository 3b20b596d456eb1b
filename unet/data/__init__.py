"""Training data: data sets in memory (datasets), folds, synthetic EM, augmentation and tile sampling.
Files are read through :mod:`unet.io`."""
