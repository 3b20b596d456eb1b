#!/usr/bin/env bash
# Training throughput on N devices (default 8) at batch 8 and 16 per device; prints global images/s.
#   bash launch/benchmark_8p.sh [--nproc N] [--data-dir DIR] [train.py flags...]

NPROC="${NPROC:-8}"
source "$(dirname "$0")/_common.sh"
source "$(dirname "$0")/_benchmark.sh"
