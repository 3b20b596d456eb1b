"""Evaluation: sharded whole-slice metrics of a model, checkpoint evaluation and cross-validation tables."""
