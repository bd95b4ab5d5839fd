#!/usr/bin/env bash
# The recipe of checkpoints/doom-tiny, end to end: collect data on the training maps, train the
# autoencoder, train the transformer, distil it to few sampling steps (transformer stored in float16), add start clips. Every step resumes (collect continues its dataset; training steps pass
# --resume), so re-running after an interruption picks up where it stopped.
#
#   bash scripts/train_doom_tiny.sh                # the shipped model's recipe (on one H100 stages 1-3 took 15 minutes)
#   INIT=checkpoints/doom-tiny STEPS=10000 bash scripts/train_doom_tiny.sh   # continue the shipped model
#   FRAMES=4000 AE_STEPS=20 STEPS=20 DISTILL_ITERS=5 bash scripts/train_doom_tiny.sh   # a smoke test
#
# INIT: a checkpoint folder to continue from: its autoencoder is kept (no autoencoder training) and
# its transformer weights start the transformer run (`train model --init`).
#
# Sizes and folders are environment variables (defaults below); the resolved values are printed
# and each run folder keeps its own config.json.
set -euo pipefail

PYTHON=${PYTHON:-python3}
WM=${WM:-$PYTHON -m worldmodel}
DATA=${DATA:-data/doom-train}
VAL=${VAL:-data/doom-val}
RUNS=${RUNS:-runs/doom-tiny}
CKPT=${CKPT:-$RUNS/checkpoint}
INIT=${INIT:-}
WORKERS=${WORKERS:-$(nproc)}
FRAMES=${FRAMES:-300000}          # training frames, MAP01-MAP20
VAL_FRAMES=${VAL_FRAMES:-16384}   # validation frames, MAP21-MAP24
AE_FRAMES=${AE_FRAMES:-200000}    # frames the autoencoder trains on (evenly spaced)
AE_STEPS=${AE_STEPS:-4000}
AE_BATCH=${AE_BATCH:-128}
AE_LR=${AE_LR:-1e-3}
LATENT_CHANNELS=${LATENT_CHANNELS:-16}   # latent channels of the 6x8 grid (the transformer's cost barely changes)
AE_ADV=${AE_ADV:-0}               # > 0: adversarial (PatchGAN) loss weight for a sharper decoder (`--adv-weight`)
AE_ADV_START=${AE_ADV_START:-1000}
STEPS=${STEPS:-2800}
BATCH=${BATCH:-256}
LR=${LR:-8e-4}
WARMUP=${WARMUP:-500}
COMPILE=${COMPILE:-}              # non-empty: torch.compile the transformer's training step (`--compile`)
STUDENT_STEPS=${STUDENT_STEPS:-2}
TEACHER_STEPS=${TEACHER_STEPS:-8}
DISTILL_ITERS=${DISTILL_ITERS:-300}
DISTILL_BATCH=${DISTILL_BATCH:-8}
START_CLIPS=${START_CLIPS:-4}     # start scenes shipped with the checkpoint, MAP01-MAP04

for v in DATA VAL RUNS CKPT INIT WORKERS FRAMES VAL_FRAMES AE_FRAMES AE_STEPS AE_BATCH AE_LR LATENT_CHANNELS AE_ADV \
         AE_ADV_START STEPS BATCH LR WARMUP COMPILE \
         STUDENT_STEPS TEACHER_STEPS DISTILL_ITERS DISTILL_BATCH START_CLIPS; do
  echo "$v=${!v}"
done
stage() { echo "=== $(date -u +%H:%M:%S) $*"; }

stage "1/5 collect"
$WM collect --frames "$FRAMES" --out "$DATA" --workers "$WORKERS"
$WM collect --split val --frames "$VAL_FRAMES" --out "$VAL" --workers "$WORKERS"

if [ -n "$INIT" ]; then
  stage "2/5 autoencoder: kept from $INIT"
  AE=$INIT
else
  stage "2/5 autoencoder"
  $WM train autoencoder --data "$DATA" --val-data "$VAL" --out "$RUNS/ae" --max-frames "$AE_FRAMES" \
    --steps "$AE_STEPS" --batch "$AE_BATCH" --lr "$AE_LR" --set latent_channels="$LATENT_CHANNELS" \
    --adv-weight "$AE_ADV" --adv-start "$AE_ADV_START" --val-every 1000 --ckpt-every 1000 --resume
  AE=$RUNS/ae
fi

stage "3/5 transformer"
$WM train model --data "$DATA" --val-data "$VAL" --autoencoder "$AE" --out "$RUNS/dit" \
  ${INIT:+--init "$INIT"} ${COMPILE:+--compile} --steps "$STEPS" --batch "$BATCH" --lr "$LR" --warmup "$WARMUP" --val-every 1000 --ckpt-every 500 --resume

stage "4/5 distil to $STUDENT_STEPS steps (float16 weights)"
$WM distill --teacher "$RUNS/dit/export" --data "$DATA" --val-data "$VAL" --out "$CKPT" \
  --latents "$RUNS/dit/cache/train_latents.safetensors" --steps-student "$STUDENT_STEPS" \
  --teacher-steps "$TEACHER_STEPS" --iters "$DISTILL_ITERS" --batch "$DISTILL_BATCH" --half

stage "5/5 start clips"
rm -rf "$CKPT/start_clips"
$WM data start-clips "$DATA" --out "$CKPT/start_clips" --count "$START_CLIPS" --frames 8 --maps MAP01-MAP04

du -sh "$CKPT"/*
stage "done: $CKPT"
