#!/bin/bash
# One device call: GPU parity tests, real-shape check, full-size load measurement. Results under $OUT.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 240 python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tail -15 | tee $OUT/gpu_tests.txt
fi
timeout 240 python3 scripts/gpu_realshape_check.py --prompt-len ${PROMPT_LEN:-1500} --out $OUT/realshape.json 2>&1 | tail -45
if [ "${LOAD:-1}" = 1 ]; then
  D=/tmp/ckpt_full; df -h /tmp
  timeout 300 python3 scripts/gpu_load_measure.py write $D 2>&1 | tail -3 | tee $OUT/load_write.txt
  sync; (echo 3 > /proc/sys/vm/drop_caches) 2>/dev/null && echo "page cache dropped" | tee -a $OUT/load.txt || echo "could not drop page cache (warm cache)" | tee -a $OUT/load.txt
  timeout 300 python3 scripts/gpu_load_measure.py load $D 2>&1 | tail -3 | tee -a $OUT/load.txt
  timeout 300 python3 scripts/gpu_load_measure.py load $D 2>&1 | tail -1 | tee -a $OUT/load.txt
fi
