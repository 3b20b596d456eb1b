"""The command wing: each command's parser and ``main`` (train, evaluate, infer, export). Nothing in the
library imports it; the library below takes typed option objects, never argparse Namespaces."""
