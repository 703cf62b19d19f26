#!/bin/bash
# The gpu-marked tests (what `make test-gpu` runs) in five pytest processes at once, sharing the machine's GPUs:
# most of the suite's time is starting processes and compiling, which a 16-core host runs side by side (one H100:
# 5 min 47 s against about 24 min one after the other). Each group writes $OUT/gpu-<group>.txt (OUT defaults to
# runs/gpu-tests); the exit status is non-zero if any group failed. PY picks the interpreter (default python3).
set -u
OUT=${OUT:-runs/gpu-tests}; PY=${PY:-python3}; mkdir -p "$OUT"; : > "$OUT/gpu-rc.txt"
export DS_ACCELERATOR=cuda NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
"$PY" -c 'import torch; n = torch.cuda.device_count(); print("torch", torch.__version__, n, "CUDA device(s)"); exit(n == 0)' \
  || { echo "gpu_groups.sh: no CUDA device" >&2; exit 1; }
grouped="test_gpu_parity test_gpu_engines test_gpu_methods test_nonfinite test_gpu_faults test_gpu_fsdp_offload
         test_gpu_async_checkpoint"
for f in $(grep -l "mark.gpu" tests/test_*.py); do
  [[ " $(echo $grouped) " == *" $(basename "$f" .py) "* ]] || { echo "gpu_groups.sh: $f is in no group" >&2; exit 1; }
done
group() {
  name=$1; shift
  timeout "${LIMIT:-1800}" $PY -m pytest -q -m gpu -p no:cacheprovider --basetemp="/tmp/gpu-tests-$name" -rs "$@" \
    > "$OUT/gpu-$name.txt" 2>&1
  echo "$name $?" >> "$OUT/gpu-rc.txt"
}
group float8 tests/test_gpu_parity.py -k float8 &
group compiled tests/test_gpu_parity.py -k compiled_layers &
group parity tests/test_gpu_parity.py -k "not float8 and not compiled_layers" &
group engines tests/test_gpu_engines.py tests/test_gpu_methods.py tests/test_nonfinite.py &
group faults tests/test_gpu_faults.py tests/test_gpu_fsdp_offload.py tests/test_gpu_async_checkpoint.py &
wait
for f in "$OUT"/gpu-*.txt; do [ "$f" = "$OUT/gpu-rc.txt" ] || { echo "== $f"; tail -n 4 "$f"; }; done
! grep -qv ' 0$' "$OUT/gpu-rc.txt"
