#!/bin/sh
# Installs requirements-runtime.lock into the image. With TORCH_INDEX_URL set, torch and
# torchvision (the lock's versions) come from that index instead (PyTorch's CPU wheels for the
# CPU image) and the CUDA stack stays out; empty, the lock goes in as it is (CUDA torch from PyPI).
set -eu
LOCK=requirements-runtime.lock
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  grep -vE '^(nvidia-|triton==|cuda-|torch==|torchvision==)' "$LOCK" > /tmp/runtime-without-torch.txt
  pip install --no-cache-dir -r /tmp/runtime-without-torch.txt
  # shellcheck disable=SC2046  # two pins, one word each
  pip install --no-cache-dir --no-deps --index-url "$TORCH_INDEX_URL" $(grep -E '^(torch|torchvision)==' "$LOCK")
  rm /tmp/runtime-without-torch.txt
else
  pip install --no-cache-dir -r "$LOCK"
fi
pip check
