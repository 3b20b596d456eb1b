"""The metrics wing: segmentation metrics, the ISBI 2012 challenge's metrics (with Fiji's thinning) and
instance scores."""
