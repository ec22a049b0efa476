#!/usr/bin/env bash
# The device run in one command (about 4 minutes; every step has its own time limit, the whole
# stays under 8): what it measures and the command sequence that brings it there: README.md.
#
#   bash benchmarks/device/run.sh [--provider cuda|cpu] [--workers 1,2,4,8] [--cuda-workers 1,2,4]
#                                 [--loadgens N] [--duration S] [--no-install]
#
# Results (JSON + markdown + logs) go to $OUT (the run tool brings that folder back), else
# /tmp/device-results. --provider cpu with --no-install is the dry run on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/../.."
PROVIDER=cuda
WORKERS=1,2,4,8
CUDA_WORKERS=1,2,4
DURATION=3
INSTALL=1
CORES=$(nproc)
LOADGENS=$(( CORES * 3 / 8 )); [ "$LOADGENS" -lt 1 ] && LOADGENS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --provider) PROVIDER=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    --cuda-workers) CUDA_WORKERS=$2; shift 2 ;;
    --loadgens) LOADGENS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-/tmp/device-results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/steps.txt" >&2; }

if [ "$INSTALL" = 1 ]; then
  say "install: carried wheels (and the joined onnxruntime-gpu) into /tmp/site"
  if [ "$PROVIDER" = cuda ]; then
    timeout 60 "$PY" benchmarks/device/install.py > "$OUT/install.txt" 2>&1 || { say "install failed"; cat "$OUT/install.txt" >&2; exit 1; }
  else
    timeout 60 "$PY" benchmarks/device/install.py --no-gpu > "$OUT/install.txt" 2>&1 || { say "install failed"; exit 1; }
  fi
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
# The CUDA 13 / cuDNN libraries of the machine's nvidia-*-cu13 packages, for onnxruntime-gpu.
NVLIBS=$("$PY" - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("nvidia")
dirs = set()
for root in (spec.submodule_search_locations or []) if spec else []:
    for so in pathlib.Path(root).rglob("lib*.so*"):
        dirs.add(str(so.parent))
print(":".join(sorted(dirs)))
PY
)
[ -n "$NVLIBS" ] && export LD_LIBRARY_PATH=$NVLIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

{ nvidia-smi || echo "no nvidia-smi"; } > "$OUT/nvidia-smi.txt" 2>&1
"$PY" - > "$OUT/versions.txt" 2>&1 <<'PY'
import sys, grpc, numpy, onnxruntime, pydantic, google.protobuf as pb
print("python", sys.version.split()[0], "| onnxruntime", onnxruntime.__version__, onnxruntime.__file__,
      "| providers", onnxruntime.get_available_providers(), "| grpcio", grpc.__version__,
      "| protobuf", pb.__version__, "| numpy", numpy.__version__, "| pydantic", pydantic.__version__)
PY
cat "$OUT/versions.txt" >&2
say "cores $CORES, load generators $LOADGENS, provider $PROVIDER"

say "1-2. provider checks: parity, batch 256 served vs in process, batching on/off"
timeout 180 "$PY" benchmarks/device/gpu_checks.py --provider "$PROVIDER" --duration "$DURATION" --out "$OUT" \
  > "$OUT/gpu-checks-stdout.md" 2> "$OUT/gpu-checks.log" || say "provider checks FAILED (see gpu-checks.log)"

say "3. worker scaling, CPU provider: workers $WORKERS"
timeout 150 "$PY" benchmarks/workers.py --provider cpu --workers "$WORKERS" --loadgens "$LOADGENS" \
  --connections $(( LOADGENS * 8 )) --concurrency $(( LOADGENS * 32 )) --rounds 1 --duration "$DURATION" \
  --out "$OUT/workers-cpu.json" > "$OUT/workers-cpu.md" 2> "$OUT/workers-cpu.log" || say "CPU worker scaling FAILED"

if [ "$PROVIDER" = cuda ]; then
  say "3b. worker scaling, CUDA provider (processes sharing the GPU): workers $CUDA_WORKERS, fashion_cnn"
  timeout 90 "$PY" benchmarks/workers.py --provider cuda --model fashion_cnn --workers "$CUDA_WORKERS" \
    --loadgens "$LOADGENS" --connections $(( LOADGENS * 8 )) --concurrency $(( LOADGENS * 32 )) --rounds 1 \
    --duration "$DURATION" --out "$OUT/workers-cuda.json" > "$OUT/workers-cuda.md" 2> "$OUT/workers-cuda.log" \
    || say "CUDA worker scaling FAILED"
  { nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv || true; } > "$OUT/nvidia-smi-after.txt" 2>&1
fi
say "done"
for f in gpu-checks-stdout.md workers-cpu.md workers-cuda.md; do
  [ -f "$OUT/$f" ] && { echo; cat "$OUT/$f"; }
done
