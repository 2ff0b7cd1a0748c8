#!/bin/bash
# One device call: `dgemma bench` sweeps at the real shape (random weights), results and logs under $OUT.
# BENCH_SETS picks what runs (space-separated): check compare sweep long eager ar tests tests1 tests2 micro attn2 profile
# (check: scripts/gpu_fastpath_check.py, the fast path's logits against the reference ops at the real shape;
#  tests: the GPU-marked tests; micro: the kernel micro-benchmarks (sampler, projections, MoE, sliding attention);
#  attn2: the two-pass attention against the fused kernel (scripts/gpu_two_pass_probe.py);
#  profile: where the batch-1 and batch-8 step's time goes; DGEMMA_PDL=0 for per-kernel times, see fmath.pdl)
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
export DGEMMA_COMMIT=${DGEMMA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}
B="python3 -m dgemma.cli bench --random-weights --shape 26b-a4b --out $OUT"
for set in ${BENCH_SETS:-compare sweep long}; do
  case $set in
    check)    timeout 200 python3 scripts/gpu_fastpath_check.py --out $OUT/fastpath_check.json 2>&1 | tee $OUT/check.log ;;
    compare)  timeout 560 $B --batch 1 --prompt-len 512 --steps 16 --reps 5 --compare transformers 2>&1 | tee $OUT/compare.log ;;
    sweep)    timeout 400 $B --batch 1 2 4 8 16 --prompt-len 512 --steps 16 48 --reps 3 2>&1 | tee $OUT/sweep.log ;;
    long)     timeout 400 $B --batch 1 8 --prompt-len 4096 32768 --steps 16 --reps 3 2>&1 | tee $OUT/long.log ;;
    eager)    timeout 400 $B --batch 1 8 16 --prompt-len 512 --steps 16 --no-compile --no-triton 2>&1 | tee $OUT/eager.log ;;
    ar)       timeout 200 $B --batch 1 --prompt-len 512 --steps 16 --ar 2>&1 | tee $OUT/ar.log ;;
    tests)    DGEMMA_COMPILE=0 timeout 590 python3 -m pytest -q -rf -m gpu tests -k "not compiled_kernels" \
                --ignore=tests/test_serve.py --ignore=tests/test_serve_browser.py --ignore=tests/test_serve_schema.py \
                2>&1 | tail -30 | tee $OUT/gpu_tests.txt ;;  # > 400 s on an H200 (session 5); serve tests need httpx
    # the same suite in two halves, for calls that also bench (each ~4 min on an H200)
    tests1)   DGEMMA_COMPILE=0 timeout 400 python3 -m pytest -q -rf -m gpu tests/test_kernels.py \
                tests/test_kernel_moe_tma.py tests/test_kernel_glue.py tests/test_fused_layer.py 2>&1 | tail -30 \
                | tee $OUT/gpu_tests1.txt ;;
    tests2)   DGEMMA_COMPILE=0 timeout 400 python3 -m pytest -q -rf -m gpu tests/test_gpu.py tests/test_fusion.py \
                tests/test_kernel_attention.py tests/test_scheduler.py tests/test_train.py -k "not compiled_kernels" \
                2>&1 | tail -30 | tee $OUT/gpu_tests2.txt ;;
    micro)    timeout 100 python3 scripts/gpu_sampler_bench.py --out $OUT/sampler.json 2>&1 | tee $OUT/sampler.log
              timeout 150 python3 scripts/gpu_linear_bench.py --rows 256 512 --out $OUT/linear.json 2>&1 | tee $OUT/linear.log
              timeout 100 python3 scripts/gpu_moe_bench.py --dense --out $OUT/moe_dense.json 2>&1 | tee $OUT/moe_dense.log
              timeout 150 python3 scripts/gpu_moe_bench.py --tokens 2048 --out $OUT/moe_tiles.json 2>&1 | tee $OUT/moe_tiles.log
              timeout 100 python3 scripts/gpu_attention_bench.py --sweep-full --sliding-only --budget 80 \
                --out $OUT/attn_sliding.json 2>&1 | tee $OUT/attn_sliding.log ;;
    attn2)    timeout 220 python3 scripts/gpu_two_pass_probe.py --budget 170 --out $OUT/two_pass_probe.json 2>&1 \
                | tee $OUT/two_pass_probe.log ;;
    profile)  for b in 1 8; do timeout 150 python3 scripts/gpu_profile_step.py --batch $b --out $OUT/profile_b$b.txt \
                2>&1 | grep -A9 "per step"; done ;;
  esac
done
