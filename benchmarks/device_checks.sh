#!/usr/bin/env bash
# Issue #3's checks on a lent accelerator, in one command that fits one call of the device tool (10 minutes at most,
# 15 of device time a session, the machine's start included): sparse against masked in fp32 and bf16, then
# `adavit benchmark` in bf16 at batch 256, 64 and 1 with random decisions, the decision networks and every unit kept,
# then the host cost of each op. Every step has its own time limit, so one that hangs costs its limit, not the lease;
# each step's output goes to $OUT/<step>.log and its JSON to $OUT/<step>.json.
#
# The device machine has torch but may lack timm: beforehand, on the developer machine,
#     pip download --no-deps --only-binary=:all: -d .devrun/whl timm==1.0.31
# and pass `.devrun` in the device tool's carry; every wheel there is installed when its package is missing.
#
#     OUT=/tmp/checks bash benchmarks/device_checks.sh              # device cuda, bf16, batch sizes 256,64,1
#     DEVICE=cpu DTYPE=fp32 BATCHES=1 bash benchmarks/device_checks.sh   # a dry run of the script itself
set -uo pipefail
cd "$(dirname "$0")/.."
device=${DEVICE:-cuda}
dtype=${DTYPE:-bf16}
batches=${BATCHES:-256,64,1}
out=${OUT:-runs/device_checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! python3 -c 'import timm' 2>/dev/null && compgen -G '.devrun/whl/*.whl' >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/adavit_site .devrun/whl/*.whl
    export PYTHONPATH="/tmp/adavit_site:$PYTHONPATH"
fi
if ! python3 -c 'import adavit' 2>"$out/import.log"; then
    echo "adavit does not import here ($(tail -n 1 "$out/import.log")): carry wheels of what is missing in .devrun/whl"
    exit 2
fi
{
    nvidia-smi 2>/dev/null || true
    python3 -c 'import sys, torch, timm; print(sys.version.split()[0], torch.__version__, timm.__version__)'
} >"$out/machine.txt"

failed=0
step() {  # step NAME SECONDS COMMAND...: run COMMAND under its time limit, its output to the screen and NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local status=${PIPESTATUS[0]}
    echo "== $name: exit $status after $((SECONDS - start))s$([ "$status" -eq 124 ] && echo ', over its time limit')"
    [ "$status" -eq 0 ] || failed=1
}

step agreement_fp32 45 python3 benchmarks/device_agreement.py --device "$device" --json "$out/agreement_fp32.json"
if [ "$dtype" != fp32 ]; then
    step "agreement_$dtype" 45 python3 benchmarks/device_agreement.py --device "$device" --dtype "$dtype" \
        --json "$out/agreement_$dtype.json"
fi
for policy in random gates keep-all; do
    step "benchmark_$policy" 90 python3 -m adavit benchmark --device "$device" --dtype "$dtype" \
        --policy "$policy" --batch-sizes "$batches" --json "$out/benchmark_$policy.json"
done
step op_host_cost 45 python3 benchmarks/op_host_cost.py --device "$device" --dtype "$dtype" \
    --json "$out/op_host_cost.json"
exit $failed
