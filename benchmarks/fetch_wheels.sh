#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels the lent GPU machine's image lacks, for its Python 3.12:
# diffusers (the VAE tests and --vae sampling) and importlib_metadata, the one need of diffusers the
# image does not have (it has huggingface_hub 1.33, safetensors 0.8, regex, requests, Pillow, filelock).
# Run it here, then name ".whl" in the device call's carry: gpu_session.sh installs them to /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl diffusers==0.42.1 importlib_metadata==10.2.0
ls -la .whl
