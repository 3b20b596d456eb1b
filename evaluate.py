#!/usr/bin/env python
"""Thin entry point: see `python evaluate.py --help` (the code lives in unet/)."""
import sys

from unet.cli.commands import evaluate

if __name__ == "__main__":
    sys.exit(evaluate())
