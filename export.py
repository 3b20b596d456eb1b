#!/usr/bin/env python
"""Thin entry point: see `python export.py --help` (the code lives in unet/bioimageio.py)."""
import sys

from unet.bioimageio import cli

if __name__ == "__main__":
    sys.exit(cli())
