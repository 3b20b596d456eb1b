# Shared by the launch scripts: argument parsing, device detection and per-device defaults.
# Not meant to be run by itself.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA_DIR=""
NPROC="${NPROC:-}"
FOLD="0"
MODEL_DIR=""
EXTRA=()
usage() {
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
  exit "${1:-0}"
}
while [ $# -gt 0 ]; do
  case "$1" in
    --data-dir|--data_dir) DATA_DIR="$2"; shift 2 ;;
    --nproc|--devices) NPROC="$2"; shift 2 ;;
    --fold) FOLD="$2"; shift 2 ;;
    --model-dir|--model_dir) MODEL_DIR="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA+=("$@"); break ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
DEVICE="$(cd "$REPO" && python -c 'from unet.device import resolve_device_type; print(resolve_device_type())')"
if [ "$DEVICE" = cpu ]; then
  # The reference model needs ~10-20 s per batch-8 step on a laptop CPU: the small model there, with the
  # CPU recipe of docs/training.md's search (BatchNorm, no weight decay, peak 3e-3 with warm-up and cosine
  # decay, flips and quarter turns only; bf16).
  MODEL_ARGS=(--base-filters 16 --padding same --amp --batch-norm --weight-decay 0 --learning-rate 3e-3
              --lr-schedule cosine --lr-warmup-steps 50 --augment-level flips)
  DEFAULT_STEPS=650  # under 5 minutes a fold on 2 cores (4 min 50 s measured for fold 0)
else
  MODEL_ARGS=(--amp)  # NVIDIA UNet_Medical's model: 64 base filters, valid padding, 572 -> 388 crops
  DEFAULT_STEPS=6400
fi
DATA_ARGS=()
[ -n "$DATA_DIR" ] && DATA_ARGS=(--data-dir "$DATA_DIR")
launcher() {  # one process, or torchrun with one process per device
  if [ "${NPROC:-1}" -gt 1 ]; then
    torchrun --standalone --nproc_per_node="$NPROC" "$@"
  else
    python "$@"
  fi
}
echo "launch: device $DEVICE, $NPROC process(es), data ${DATA_DIR:-built-in synthetic}" >&2
