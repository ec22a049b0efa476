#!/usr/bin/env bash
# On the device machine: move the parts of the onnxruntime-gpu wheel this command carried (and the
# manifest, when carried) to /tmp/ortgpu-parts, where they wait for the next command while the
# machine stays up; install.py joins them. Prints what is there so far.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p /tmp/ortgpu-parts
if compgen -G "parts/*" > /dev/null; then
  cp -f parts/* /tmp/ortgpu-parts/
fi
ls -l /tmp/ortgpu-parts
df -h /tmp | tail -1
