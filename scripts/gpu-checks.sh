#!/usr/bin/env bash
# The checks that need a GPU, in one go on a lent device machine (its image has CUDA torch, Triton
# and transformers; the project's other dependencies travel as wheels in .whl/, made beforehand with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     --platform manylinux_2_17_x86_64 -d .whl pydantic pydantic_core annotated-types typing-inspection \
#     typing_extensions jsonschema jsonschema-specifications referencing rpds-py SQLAlchemy greenlet \
#     textual platformdirs mdit-py-plugins linkify-it-py uc-micro-py xgrammar apache-tvm-ffi py-spy
# at the versions the project's venv holds; see docs/kernels.md).
#   scripts/gpu-checks.sh [tests] [kernels] [engine] [engine-fp32] [diag] [spy] [switch]   (default: tests kernels engine)
# Logs go to $OUT (or ./gpu-out) and the markdown tables to the end of each log.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 AGENTRT_HOME=/tmp/agentrt-home
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)' | tee -a "$OUT/gpu.txt"
command -v agentrt >/dev/null || { mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -c "from agentrt.cli import main; main()" "$@"\n' >/tmp/bin/agentrt \
  && chmod +x /tmp/bin/agentrt && export PATH=/tmp/bin:$PATH; }
steps=${*:-tests kernels engine}
for step in $steps; do
  start=$(date +%s)
  case $step in
    tests)   timeout ${TESTS_S:-200} python3 -m pytest -q -m gpu -p no:cacheprovider ${TESTS:-tests/test_triton_*.py tests/test_kernel_forward.py} 2>&1 | tee "$OUT/tests.log" ;;
    kernels) timeout ${KERNELS_S:-200} agentrt bench kernels --markdown 2>&1 | tee "$OUT/kernels.log" ;;
    engine)  timeout ${ENGINE_S:-170} agentrt bench engine --markdown ${ENGINE_ARGS:-} 2>&1 | tee "$OUT/engine.log" ;;
    diag)    timeout ${DIAG_S:-200} python3 scripts/gpu_diag.py 2>&1 | tee "$OUT/diag.log" ;;
    spy)     timeout ${ENGINE_S:-170} /tmp/site/bin/py-spy record -r 250 -f raw --threads -o "$OUT/spy.txt" -- \
               agentrt bench engine --only agentrt --repeat 3 --dtype float32 2>&1 | tee "$OUT/spy.log" ;;
    switch)  timeout ${ENGINE_S:-170} python3 -c "import sys; sys.setswitchinterval(1e-4); from agentrt.cli import main; main()" \
               bench engine --only agentrt --repeat 3 --dtype float32 2>&1 | tee "$OUT/switch.log" ;;
    engine-fp32) timeout ${ENGINE_S:-170} agentrt bench engine --dtype float32 --markdown ${ENGINE_ARGS:-} 2>&1 | tee "$OUT/engine-fp32.log" ;;
    *)       echo "unknown step $step" ;;
  esac
  echo "== $step: exit ${PIPESTATUS[0]} in $(( $(date +%s) - start )) s" | tee -a "$OUT/steps.txt"
done
cat "$OUT/steps.txt"
