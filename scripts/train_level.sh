#!/usr/bin/env bash
# Dream your own level: the recipe of a level model (checkpoints/doom-map01 is Freedoom 2 MAP01's), end
# to end and resumable. A level model is the base model (checkpoints/doom-tiny, trained on twenty maps)
# specialised to one level, learned densely:
#   1. collect the level with episodes starting all over it (`collect --starts level`), and its held-out
#      episodes (the level's evaluation start places and seeds, never used for training);
#   2. a sharper decoder for the level: the base autoencoder's decoder fine-tuned with an adversarial
#      (PatchGAN) loss, encoder frozen, so the latents keep their meaning;
#   3. the transformer, from the base model's weights, with the previous frame's latent as an extra input
#      (`--set prev_frame=true`: copying what was there is one linear map away);
#   4. distillation to few sampling steps (float16 weights); 5. start clips spread over the level.
# Every stage resumes (collect continues its dataset; training passes --resume), so re-running after an
# interruption picks up where it stopped (distillation and the start clips are redone).
#
#   LEVEL=MAP01 bash scripts/train_level.sh                   # the shipped doom-map01 recipe
#   LEVEL=MAP07 CKPT=checkpoints/doom-map07 bash scripts/train_level.sh   # another level
#   WAD=~/doom/mylevel.wad LEVEL=MAP01 NAME=mylevel bash scripts/train_level.sh   # a level of your own WAD
#   LEVEL=MAP01 FRAMES=4000 VAL_FRAMES=1536 AE_STEPS=4 STEPS=4 DISTILL_ITERS=2 bash scripts/train_level.sh  # smoke test
#
# LEVEL: a training map of freedoom2 (MAP01-MAP20), or any map of your own WAD file (WAD=path/to/my.wad,
# loaded on top of freedoom2); the level's evaluation episodes are kept apart from its training episodes
# by construction. Sizes and folders are environment variables (defaults below); each run folder keeps
# its own config.json. How long it takes on 2 CPU cores: README.
set -euo pipefail

PYTHON=${PYTHON:-python3}
WM=${WM:-$PYTHON -m worldmodel}
LEVEL=${LEVEL:-MAP01}
WAD=${WAD:-freedoom2}
BASE=${BASE:-checkpoints/doom-tiny}       # the model the level model starts from
NAME=${NAME:-doom-$(echo "$LEVEL" | tr '[:upper:]' '[:lower:]')}
DATA=${DATA:-data/$NAME}
VAL=${VAL:-data/$NAME-val}
RUNS=${RUNS:-runs/$NAME}
CKPT=${CKPT:-$RUNS/checkpoint}
WORKERS=${WORKERS:-$(nproc)}
THREADS=${THREADS:-0}                     # torch threads for training (0: torch's default)
FRAMES=${FRAMES:-1000000}                 # training frames of the level
EPISODE_FRAMES=${EPISODE_FRAMES:-512}     # frames per training episode (one start place each)
VAL_FRAMES=${VAL_FRAMES:-24576}           # held-out frames: one 1024-frame episode per evaluation start place
AE_FRAMES=${AE_FRAMES:-60000}             # frames the decoder fine-tune reads (evenly spaced)
AE_STEPS=${AE_STEPS:-3000}
AE_BATCH=${AE_BATCH:-32}
AE_CROP=${AE_CROP:-48x64}                 # random crops: the decoder is convolutional, crops are 4x cheaper
AE_LR=${AE_LR:-2e-4}
AE_ADV=${AE_ADV:-0.02}                    # adversarial weight of the decoder fine-tune (0: L1 + MSE only)
AE_ADV_START=${AE_ADV_START:-200}
STEPS=${STEPS:-4000}
BATCH=${BATCH:-16}
LR=${LR:-2e-4}
WARMUP=${WARMUP:-100}
MAX_TIME=${MAX_TIME:-}                    # seconds: stop the transformer run (checkpointed, exported) after this
COMPILE=${COMPILE:-}                      # non-empty: torch.compile the transformer's training step
STUDENT_STEPS=${STUDENT_STEPS:-2}
TEACHER_STEPS=${TEACHER_STEPS:-8}
DISTILL_ITERS=${DISTILL_ITERS:-300}
DISTILL_BATCH=${DISTILL_BATCH:-8}
START_CLIPS=${START_CLIPS:-8}             # start scenes shipped with the checkpoint, spread over the level
STAGES=${STAGES:-1 2 3 4 5}               # the stages to run (e.g. STAGES=3 to train the transformer only)

for v in LEVEL WAD BASE NAME DATA VAL RUNS CKPT WORKERS THREADS FRAMES EPISODE_FRAMES VAL_FRAMES AE_FRAMES AE_STEPS \
         AE_BATCH AE_CROP AE_LR AE_ADV AE_ADV_START STEPS BATCH LR WARMUP MAX_TIME COMPILE STUDENT_STEPS TEACHER_STEPS \
         DISTILL_ITERS DISTILL_BATCH START_CLIPS STAGES; do
  echo "$v=${!v}"
done
stage() { echo "=== $(date -u +%H:%M:%S) $*"; }
want() { [[ " $STAGES " == *" $1 "* ]]; }

if want 1; then
stage "1/5 collect $WAD $LEVEL: training episodes from start cells all over the level, and its held-out episodes"
$WM collect --wad "$WAD" --frames "$FRAMES" --maps "$LEVEL" --starts level --episode-frames "$EPISODE_FRAMES" --warmup-frames 64 \
  --out "$DATA" --workers "$WORKERS"
$WM collect --wad "$WAD" --frames "$VAL_FRAMES" --maps "$LEVEL" --starts level --split val --episode-frames 1024 --warmup-frames 64 \
  --out "$VAL" --workers "$WORKERS"
$WM data verify "$DATA" --no-checksum --coverage-map "$RUNS/coverage.png"
fi

if want 2; then
stage "2/5 decoder: fine-tuned for the level (adversarial weight $AE_ADV), encoder kept from $BASE"
$WM train autoencoder --data "$DATA" --val-data "$VAL" --out "$RUNS/decoder" --init "$BASE" --decoder-only \
  --adv-weight "$AE_ADV" --adv-start "$AE_ADV_START" --max-frames "$AE_FRAMES" --steps "$AE_STEPS" --batch "$AE_BATCH" \
  --crop "$AE_CROP" --lr "$AE_LR" --warmup 50 --val-every 250 --ckpt-every 250 --val-frames 256 --threads "$THREADS" --resume
fi

if want 3; then
stage "3/5 transformer from $BASE, with the previous frame as input"
$WM train model --data "$DATA" --val-data "$VAL" --autoencoder "$RUNS/decoder" --out "$RUNS/dit" --init "$BASE" \
  --set prev_frame=true ${COMPILE:+--compile} ${MAX_TIME:+--max-time "$MAX_TIME"} --steps "$STEPS" --batch "$BATCH" \
  --lr "$LR" --warmup "$WARMUP" --val-every 500 --ckpt-every 250 --threads "$THREADS" --resume
fi

if want 4; then
stage "4/5 distil to $STUDENT_STEPS steps (float16 weights)"
$WM distill --teacher "$RUNS/dit/export" --data "$DATA" --val-data "$VAL" --out "$CKPT" \
  --latents "$RUNS/dit/cache/train_latents.safetensors" --steps-student "$STUDENT_STEPS" \
  --teacher-steps "$TEACHER_STEPS" --iters "$DISTILL_ITERS" --batch "$DISTILL_BATCH" --threads "$THREADS" --half
fi

if want 5; then
stage "5/5 start clips spread over the level"
rm -rf "$CKPT/start_clips"
$WM data start-clips "$DATA" --out "$CKPT/start_clips" --count "$START_CLIPS" --frames 8
du -sh "$CKPT"/*
fi
stage "done: $CKPT  (play it: worldmodel play --checkpoint $CKPT)"
