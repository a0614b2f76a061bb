#!/usr/bin/env bash
# The device machine's check, in one call of a few minutes: the scoring loop's speed with and without
# the latent relaxation, at 224 px (open_clip ViT-B-16 tower) and at 32 px (ResNet-18, CIFAR stem).
# Runs without Ray; open_clip and its needs travel as wheels in .whl/ (see the device tool's README).
# Results: $OUT/<profile>-relax<N>.json (one JSON line each) and .log beside them.
#   DEVICE=cpu SECONDS_PER_LOOP=1 bash bench/gpu_check.sh   # the same check here, to try it (11 min on 2 cores)
set -euo pipefail
out=${OUT:-/tmp/gpu-check}
device=${DEVICE:-cuda}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && python=${PYTHON:-.venv/bin/python}
for profile in clip224 cl32; do
    for relax in 0 3; do
        name="$profile-relax$relax"
        "$python" bench/throughput.py --profile "$profile" --device "$device" --model-only \
            --relax-steps "$relax" --model-seconds "${SECONDS_PER_LOOP:-20}" --json "$out/$name.json" \
            2>&1 | tee "$out/$name.log"
    done
done
