#!/bin/bash
# Wheels the GPU machine lacks (it has torch, triton, tokenizers, safetensors, httpx, anyio, prometheus-client, ...):
# transformers for --compare/parity, and the server stack for scripts/gpu_serve_throughput.py. They go to .whl/ (keep
# it git-ignored, e.g. in .git/info/exclude) and travel with the device call (`carry: [".whl"]`); the device scripts
# install them with `pip install --no-index --no-deps --target /tmp/site .whl/*.whl`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
  transformers==5.23.0 fastapi==0.165.0 uvicorn==0.54.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 \
  annotated-types==0.8.0 typing-inspection==0.4.5 opentelemetry-api==1.45.2
ls .whl
