#!/usr/bin/env bash
# Training throughput on one device at batch 8 and 16 (images/s, step time, peak memory, MFU).
#   bash launch/benchmark_1p.sh [--data-dir DIR] [train.py flags, e.g. --amp-dtype fp16 --compile]
# STEPS / WARMUP environment variables override the timed and warm-up step counts.

NPROC=1
source "$(dirname "$0")/_common.sh"
source "$(dirname "$0")/_benchmark.sh"
