#!/usr/bin/env bash
# The ready GPU check (benchmarks/gpu_check.py): eager vs compiled vs plain diffusers at true size
# with random weights, compile time cold and from the cache, memory per component. Under 8 minutes
# on one GPU; on a machine without CUDA it checks itself on a tiny model.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
