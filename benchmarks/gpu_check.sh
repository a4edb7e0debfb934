#!/usr/bin/env bash
# One run that settles the GPU path: build for the card, every gpu-marked
# test, the model-scale and kernel benchmarks, one table last.
#
#   bash benchmarks/gpu_check.sh             on the GPU machine (offline; < 8 min on an H100/H200)
#   bash benchmarks/gpu_check.sh --dry-run   anywhere: the same steps with the GPU work skipped
#
# Needs python (>= 3.11, for -P), torch, triton, nvcc, and the build
# requirements (setuptools, wheel, pybind11, cmake; ninja optional) already
# installed: it builds with --no-build-isolation into a scratch folder (no
# install into the environment) that every later step imports from.
#
# --dry-run rehearses everything that can go wrong before the device is
# spent: the build (for sm_90 unless DROPFLAT_CUDA_ARCHS says otherwise),
# build_info, every Triton kernel compiled ahead of time for sm_80 and sm_90
# (no GPU needed), the collection of every gpu-marked test, gpu_models.py end to
# end on tiny CPU models (imports, arguments, JSON, table; no compilation),
# the kernel benchmarks' collection and one CPU benchmark's JSON, and the
# final report.
#
# Outputs in $OUT (default ./out): steps.tsv, build.log, build_info.json,
# gpu_tests.xml, gpu_models.json, bench.json and gpu_check.json (all merged).
# Every step runs under a time limit, even if an earlier one failed; the exit
# status is non-zero if any failed, and the table is printed last.
set -uo pipefail
DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
SITE=$SCRATCH/site
export PY OUT SITE  # for the functions that step runs in a child shell
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
STEPS=$OUT/steps.tsv
: >"$STEPS"
rm -f "$OUT"/{build_info.json,gpu_tests.xml,gpu_models.json,bench.json,gpu_check.json}
failed=()

step() {  # step NAME LIMIT_S CMD...: run CMD under a time limit, record its status
  local name=$1 limit=$2 start=$SECONDS rc status
  shift 2
  echo "=== $name (limit ${limit} s)"
  if declare -F "$1" >/dev/null; then  # a function of this script: timeout runs programs only
    timeout --kill-after=15 "$limit" bash -c "$(declare -f "$1"); $*"
  else
    timeout --kill-after=15 "$limit" "$@"
  fi
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="timed out"; failed+=("$name") ;;
    *) status="failed (exit $rc)"; failed+=("$name") ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >>"$STEPS"
}

skipped() {  # skipped NAME: a GPU step the dry run does not run
  echo "=== $1: skipped (dry run)"
  printf '%s\t%s\t%s\n' "$1" "skipped (dry run)" 0 >>"$STEPS"
}

# The card's architecture only: a build for every architecture takes minutes.
if [[ -z "${DROPFLAT_CUDA_ARCHS:-}" ]]; then
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
  export DROPFLAT_CUDA_ARCHS=${cap:-90}
fi
echo "building for CUDA architecture(s) $DROPFLAT_CUDA_ARCHS; output in $OUT"

build() {
  # DROPFLAT_CUDA=ON: a missing nvcc fails the build here rather than
  # leaving the CUDA kernels silently out.
  DROPFLAT_CUDA=ON "$PY" -m pip install --no-build-isolation --no-deps --no-compile -q --target "$SITE" . \
    >"$OUT/build.log" 2>&1 || { tail -n 40 "$OUT/build.log"; return 1; }
}
step build 180 build

# -P keeps the source tree (which has no compiled _C) off sys.path: every
# step imports the package just built.
step build_info 60 "$PY" -P -c "
import json, dropflat, dropflat.kernels as k
assert dropflat.__file__.startswith('$SITE'), dropflat.__file__
info = k.build_info()
print(json.dumps(info, indent=1))
open('$OUT/build_info.json', 'w').write(json.dumps(info, indent=1))
raise SystemExit(0 if info['cuda_compiled'] else 'the CUDA kernels were not compiled')"

GPU_TESTS=(-P -m pytest -m gpu tests/ -p no:cacheprovider -q -rs)
if ((DRY_RUN)); then
  # What the device would compile on first launch: every Triton kernel, ahead of time for sm_80/sm_90.
  step triton_compile 300 "$PY" -P -m pytest tests/test_triton_compile.py --runslow -p no:cacheprovider -q
  step gpu_tests_collect 120 "$PY" "${GPU_TESTS[@]}" --collect-only --junitxml="$OUT/gpu_tests.xml"
  skipped gpu_tests
else
  step gpu_tests 120 "$PY" "${GPU_TESTS[@]}" --durations=10 --junitxml="$OUT/gpu_tests.xml"
fi

# ResNet-50 and GPT-2 small: gradient, HVPs against double backward and
# torch.func (eager, compiled), top-20 Lanczos, dropout noise M=64.
if ((DRY_RUN)); then
  step model_figures 240 "$PY" -P benchmarks/gpu_models.py --device cpu --smoke --no-compile --budget-s 150 \
    --out "$OUT"
else
  step model_figures 180 "$PY" -P benchmarks/gpu_models.py --device cuda --budget-s 150 --out "$OUT"
fi

# The kernel suites' GPU rows (each kernel beside its reference).
BENCH=(-P -m pytest benchmarks/bench_philox.py benchmarks/bench_dropout.py benchmarks/bench_persample.py
  benchmarks/bench_cross_entropy.py -p no:cacheprovider -q)
if ((DRY_RUN)); then
  step kernel_bench_collect 120 "$PY" "${BENCH[@]}" -k cuda --collect-only
  # One CPU suite for real, so the report reads a genuine benchmark JSON.
  step kernel_bench_cpu 120 "$PY" -P -m pytest benchmarks/bench_philox.py -p no:cacheprovider -q -k cpu \
    --benchmark-only --benchmark-min-rounds=1 --benchmark-max-time=0.01 --benchmark-json="$OUT/bench.json"
  skipped kernel_bench
else
  step kernel_bench 60 "$PY" "${BENCH[@]}" -k cuda --benchmark-only --benchmark-max-time=0.2 \
    --benchmark-json="$OUT/bench.json"
fi

mode=device
((DRY_RUN)) && mode=dry-run
if ((${#failed[@]})); then
  echo "FAILED steps: ${failed[*]} ($mode, $SECONDS s)"
else
  echo "all steps passed ($mode, $SECONDS s)"
fi
echo "=== report"
"$PY" -P benchmarks/gpu_report.py --out "$OUT" --mode "$mode" || failed+=(report)
((${#failed[@]} == 0))
