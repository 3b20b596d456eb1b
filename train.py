#!/usr/bin/env python
"""Thin entry point: see `python train.py --help` (the code lives in unet/)."""
import sys

from unet.cli.commands import train

if __name__ == "__main__":
    sys.exit(train())
