"""The prediction wing: tiling, the one predictor, the streaming pipeline, ensembles, cell instances,
overlays and the stack jobs of infer.py."""
