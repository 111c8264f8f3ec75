#!/usr/bin/env bash
# The one GPU command (DEVELOPERS.md's standing order): python -m bench.gpu_suite, from the repository root.
#   bash bench/gpu_suite.sh             # on the GPU machine: install carried wheels, run the checks, write the block
#   bash bench/gpu_suite.sh --dry_run   # anywhere: what it would run
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m bench.gpu_suite "$@"
