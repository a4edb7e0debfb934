#!/usr/bin/env bash
# Build dropflat on a GPU machine and check + benchmark its kernels there.
#
#   bash benchmarks/gpu_check.sh        (from anywhere; works offline)
#
# Needs python (>= 3.11, for -P), torch with CUDA, triton, nvcc, and the
# build requirements (setuptools, wheel, pybind11, cmake; ninja optional)
# already installed, since it builds with --no-build-isolation.  Logs and the
# benchmark JSON go to $OUT (default ./out).  Every step runs even if an
# earlier one fails; the exit status is non-zero if any failed, and the
# benchmark table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
failed=()

step() {  # step NAME CMD...: run CMD, remember NAME if it fails
  local name=$1
  shift
  echo "=== $name"
  "$@" || failed+=("$name")
}

build() {
  local start=$SECONDS
  "$PY" -m pip install --no-build-isolation --no-deps -v . >"$OUT/build.log" 2>&1 \
    || { tail -n 40 "$OUT/build.log"; return 1; }
  echo "built in $((SECONDS - start)) s (log: $OUT/build.log)"
}

step build build

# -P keeps the source tree (which has no compiled _C) off sys.path, so the
# tests exercise the installed package.
step build_info "$PY" -P -c \
  "import json, dropflat.kernels as k; print(json.dumps(k.build_info(), indent=1))"
# The build runs with DROPFLAT_CUDA=AUTO (the default) so that a machine
# without nvcc still checks the Triton kernels; a missing CUDA build is
# reported as a failed step instead.
step cuda_compiled "$PY" -P -c \
  "import sys, dropflat.kernels as k; sys.exit(not k.build_info()['cuda_compiled'])"
step gpu_tests "$PY" -P -m pytest -m gpu -x -q -rs tests/
step kernel_tests "$PY" -P -m pytest -q -rs tests/test_build.py tests/test_philox.py \
  tests/test_dropout_kernels.py  # fused replayable dropout
# per-sample gradient ghost Gram (Triton on CUDA; its GPU benches run in the benchmarks step)
step persample_tests "$PY" -P -m pytest -q -rs tests/test_persample.py
# fused softmax cross-entropy R-operator (Triton on CUDA; its GPU benches run in the benchmarks step)
step cross_entropy_tests "$PY" -P -m pytest -q -rs tests/test_cross_entropy_kernel.py
# The R-operator engine on the device: products against the double-backward engine (tests), then
# model-scale figures (ResNet-18, GPT-2 small: gradient, HVP at k=8, top-20, dropout noise M=64).
step rop_tests "$PY" -P -m pytest -q -rs tests/test_rop.py -m gpu
step model_figures "$PY" -P benchmarks/gpu_models.py --device cuda --out "$OUT"
rm -f "$OUT/bench.json"
# The kernel suites only (each GPU kernel beside its reference; their CPU rows are seconds):
# the model-level suites (HVP, Lanczos with peers, noise) take tens of minutes on their own.
step benchmarks "$PY" -P -m pytest benchmarks/bench_philox.py benchmarks/bench_dropout.py \
  benchmarks/bench_persample.py benchmarks/bench_cross_entropy.py --benchmark-only -q --benchmark-json="$OUT/bench.json"
if [[ -f "$OUT/bench.json" ]]; then
  step summary "$PY" benchmarks/summarize.py "$OUT/bench.json"
fi

if ((${#failed[@]})); then
  echo "FAILED steps: ${failed[*]}"
  exit 1
fi
echo "all steps passed"
