#!/usr/bin/env bash
# The device check, one run on a CUDA machine with torch and triton (no vLLM needed), under 8 minutes:
# the gpu-marked tests (the Triton kernels compiled, at real shapes, against the torch forms), then the
# decode benchmark. From the repository root; logs and results go to $OUT (default benchmarks/results/gpu).
#     bash benchmarks/gpu_check.sh
set -o pipefail
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$out/gpu.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$out/gpu.txt"
# --noconftest: the suite's conftest builds models with vLLM's tokenizer stack, which the machine lacks;
# the gpu tests need none of its fixtures.
timeout 240 python3 -m pytest --noconftest -p no:cacheprovider -m gpu -v -rs \
    tests/test_slim_triton.py tests/test_slim_triton_store.py tests/test_slim_triton_prefill.py \
    tests/test_sata_triton.py tests/test_sata_triton_prefill.py 2>&1 | tee "$out/gpu_tests.log"
tests=$?
timeout 240 python3 -m benchmarks.gpu_decode --out "$out" 2>&1 | tee "$out/gpu_decode.log"
bench=$?
echo "gpu tests: exit $tests; benchmark: exit $bench"
exit $((tests || bench))
