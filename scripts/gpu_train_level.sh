#!/usr/bin/env bash
# A lent GPU's minutes, spent on the level model: one command that collects the level on the device's
# cores, fine-tunes the decoder, trains the transformer from the shipped weights with bf16 + compile at a
# large batch for as many minutes as the budget leaves, distils it, and writes the checkpoint to $OUT in
# files the device tool brings back (under 16 MiB each, at most 8). It is scripts/train_level.sh with GPU
# sizes and a clock: nothing here trains differently.
#
# Here, once (packs ViZDoom for the device's Python 3.12: freedoom2 only, stripped, about 20 MB):
#   bash scripts/gpu_train_level.sh pack
# Through the device tool (the working tree travels; .whl is git-ignored, so carry it):
#   run(command="OUT=$OUT bash scripts/gpu_train_level.sh run", carry=[".whl"], timeout_s=600)
# Back here: the files under the tool's files_at folder -> checkpoints/doom-map01 (bash this-script unpack DIR).
#
# BUDGET (seconds, default 530) is the whole run's; the transformer gets what collection, the decoder,
# distillation and packing leave (RESERVE seconds are kept for the last two). On the CPU, with tiny
# sizes, the same command is the smoke test (tests/test_recipes.py):
#   GPU_SMOKE=1 OUT=/tmp/o bash scripts/gpu_train_level.sh run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHL=.whl/vizdoom-slim-cp312.tar.xz

case "${1:-}" in
pack)
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 -d "$tmp" "vizdoom==1.3.2"
  (cd "$tmp" && unzip -q vizdoom-*.whl -d site && rm -f site/vizdoom/freedoom1.wad \
     && strip --strip-unneeded site/vizdoom.libs/*.so* site/vizdoom/vizdoom site/vizdoom/*.so 2>/dev/null || true)
  mkdir -p .whl
  tar cJf "$WHL" -C "$tmp/site" .
  du -h "$WHL"
  exit 0 ;;
unpack)
  src=${2:?usage: gpu_train_level.sh unpack DIR_WITH_THE_RETURNED_FILES [CHECKPOINT_DIR]}
  dest=${3:-checkpoints/doom-map01}
  mkdir -p "$dest"
  cp "$src"/config.json "$src"/*.safetensors "$dest"/
  [ -f "$src/extra.tar" ] && tar xf "$src/extra.tar" -C "$dest"
  echo "unpacked into $dest"; ls -la "$dest"
  exit 0 ;;
run) ;;
*) echo "usage: $0 pack | run | unpack DIR [CHECKPOINT_DIR]" >&2; exit 2 ;;
esac

t0=$(date +%s)
OUT=${OUT:?set OUT to the folder whose files come back}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
if ! $PY -c "import vizdoom" 2>/dev/null; then  # the device has no vizdoom: the carried one
  [ -f "$WHL" ] || { echo "no vizdoom and no $WHL: run 'bash $0 pack' here first and carry .whl" >&2; exit 2; }
  mkdir -p /tmp/site && tar xJf "$WHL" -C /tmp/site
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 PYTHON=$PY
BUDGET=${BUDGET:-530}
RESERVE=${RESERVE:-90}
export LEVEL=${LEVEL:-MAP01} BASE=${BASE:-checkpoints/doom-tiny} RUNS=${RUNS:-/tmp/gpu-level/runs}
export DATA=${DATA:-/tmp/gpu-level/data} VAL=${VAL:-/tmp/gpu-level/val} CKPT=${CKPT:-/tmp/gpu-level/checkpoint}
if [ -n "${GPU_SMOKE:-}" ]; then  # the CPU smoke test: the same stages at toy sizes
  export FRAMES=2048 EPISODE_FRAMES=512 VAL_FRAMES=1024 AE_FRAMES=1024 AE_STEPS=2 STEPS=3 BATCH=2 WARMUP=1 \
         DISTILL_ITERS=1 DISTILL_BATCH=2 START_CLIPS=2 WORKERS=${WORKERS:-1}
else
  export FRAMES=${FRAMES:-400000} AE_STEPS=${AE_STEPS:-3000} AE_BATCH=${AE_BATCH:-128} STEPS=${STEPS:-3000} \
         BATCH=${BATCH:-256} LR=${LR:-4e-4} WARMUP=${WARMUP:-200} COMPILE=${COMPILE:-1} DISTILL_BATCH=${DISTILL_BATCH:-32} \
         WORKERS=${WORKERS:-$(nproc)}
fi
left() { echo $(( BUDGET - ($(date +%s) - t0) )); }

STAGES="1 2" bash scripts/train_level.sh
MAX_TIME=$(( $(left) - RESERVE ))
if [ "$MAX_TIME" -lt 30 ] && [ -z "${GPU_SMOKE:-}" ]; then
  echo "only $(left) s left after collection and the decoder: no time to train" >&2; exit 3
fi
MAX_TIME=$(( MAX_TIME > 1 ? MAX_TIME : 1 )) STAGES=3 bash scripts/train_level.sh
STAGES="4 5" bash scripts/train_level.sh

# what comes back: at most 8 files under 16 MiB each
cp "$CKPT"/config.json "$CKPT"/*.safetensors "$OUT"/
tar cf "$OUT/extra.tar" -C "$CKPT" $(cd "$CKPT" && ls -d start_clips distill_report.json 2>/dev/null)
for f in metrics.jsonl curves.png config.json; do
  [ -f "$RUNS/dit/$f" ] && cp "$RUNS/dit/$f" "$OUT/transformer_$f"
done
ls -la "$OUT"
echo "done in $(( $(date +%s) - t0 )) s of a $BUDGET s budget"
