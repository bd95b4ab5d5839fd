#!/usr/bin/env bash
# The GPU suite (issue 16): the attention kernels' correctness on CUDA, attention timings (Triton vs SDPA vs
# FlexAttention), the engine's frames/s and latency, training throughput and MFU -- one command with a total
# time budget (7 minutes by default), every stage in its own process under its own time limit, results
# written to $OUT as they come in. What each stage does and how it counts: benchmarks/gpu_suite.py.
#
#   OUT=/tmp/suite bash scripts/gpu_suite.sh                             # on a GPU, about 7 minutes
#   OUT=/tmp/suite bash scripts/gpu_suite.sh --budget-s 540 --limit engine=220 --stages engine,training
#   OUT=/tmp/suite bash scripts/gpu_suite.sh --smoke                     # on a CPU: tiny sizes, checks the suite
#
# On a lent device, through the device tool, from the repository root. Nothing to install or carry: the
# image's python3 has torch, triton, numpy, matplotlib, safetensors and tqdm, and the suite needs neither
# vizdoom, pygame, gymnasium nor a checkpoint (random weights). Put the commit in the command (the working
# tree travels without .git; the JSONs also record a digest of the sources, `--digest` prints it here):
#
#   run(command="WORLDMODEL_COMMIT=<output of git rev-parse HEAD> bash scripts/gpu_suite.sh", timeout_s=540)
#
# The suite ends after at most --budget-s (420 s) plus a few seconds; timeout_s=540 leaves room for the
# machine's own start-up of Python. It writes eight files to $OUT, all of which come back (the tool returns
# at most eight): device.json kernels.json attention.json engine.json training.json summary.json
# gpu_suite.png suite.log. The last lines printed are the headline table. Copy the files into
# benchmarks/gpu_suite_<gpu>/ and commit them with the README's GPU section written from them.
#
# Compilation caches (Triton kernels and their autotune picks, inductor) go to .gpu_suite_cache/ (git-ignored,
# kept on a warm machine), so a rerun right after the first one skips most compiling.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
CACHE=${GPU_SUITE_CACHE:-$PWD/.gpu_suite_cache}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$CACHE/triton}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$CACHE/inductor}
export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}  # autotune picks cached beside the kernels
export TRITON_PRINT_AUTOTUNING=${TRITON_PRINT_AUTOTUNING:-1}  # each autotuning's time and pick, in suite.log
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"           # the repository, not an installed copy
export PYTHONUNBUFFERED=1
export GPU_SUITE_COMMAND="bash scripts/gpu_suite.sh${*:+ $*}"
exec "$PYTHON" benchmarks/gpu_suite.py "$@"
