#!/usr/bin/env python
"""Thin entry point: see `python infer.py --help` (the code lives in unet/)."""
import sys

from unet.cli.commands import infer

if __name__ == "__main__":
    sys.exit(infer())
