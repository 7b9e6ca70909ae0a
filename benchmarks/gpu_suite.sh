#!/usr/bin/env bash
# Every performance benchmark on the local accelerator (GPU or TPU) in under 8
# minutes, one summary table at the end; JSON and logs under OUT_DIR.
#   pip install -e ".[cuda]"          # or ".[tpu]"
#   bash benchmarks/gpu_suite.sh [OUT_DIR] [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-benchmarks/results}"
shift || true
# XLA's GPU allocator: take memory on demand so the suite's processes can share one device.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
exec python benchmarks/suite.py --out "$OUT_DIR" "$@"
