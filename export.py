#!/usr/bin/env python
"""Thin entry point: see `python export.py --help` (the code lives in unet/cli/export.py)."""
import sys

from unet.cli.commands import export

if __name__ == "__main__":
    sys.exit(export())
