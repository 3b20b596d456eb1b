"""The data / volume I/O room: readers and writers of images, labels and outputs, for training, evaluation
and inference alike."""
