#!/usr/bin/env bash
# Builds masked_dit._C here, on a machine without a GPU, for the lent GPU machine's image (Python 3.12,
# torch 2.11.0+cu130, sm_90), so that no device call spends its minutes compiling: the device machine
# is released 30 s after each call, so every call starts bare and gpu_session.sh would rebuild.
#
#   bash benchmarks/prebuild_ext.sh          # -> masked_dit/_C.cpython-312-x86_64-linux-gnu.so (git-ignored)
#
# then name that path in the device call's carry. gpu_session.sh imports it first and builds only if
# the import fails (another torch, another Python), so a stale build costs nothing but the build.
# Needs nvcc and a python3.12 (PYTHON312=..., else pyenv's or PATH's); TORCH_VERSION and ARCHS override.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_version=${TORCH_VERSION:-2.11.0}
archs=${ARCHS:-9.0}
# PYTHON312 if given, else the first candidate that runs as 3.12 (a pyenv shim for a version that is not
# selected is on PATH, and fails)
py=
if [ -n "${PYTHON312:-}" ]; then cands=("$PYTHON312")
else cands=("$(command -v python3.12 || true)" "$HOME"/.pyenv/versions/3.12*/bin/python); fi
for cand in "${cands[@]}"; do
    if [ -x "$cand" ] && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2> /dev/null; then
        py=$cand; break
    fi
done
[ -n "$py" ] || { echo "prebuild_ext: no python3.12 found; set PYTHON312=/path/to/python3.12" >&2; exit 2; }
venv=${VENV:-/tmp/masked-dit-py312-torch$torch_version}
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$torch_version')" 2> /dev/null; then
    "$py" -m venv "$venv"
    # torch with its CUDA runtime wheels (import torch loads them); setuptools<82 as torch 2.11 pins it
    "$venv/bin/pip" install -q "torch==$torch_version" "setuptools<82" ninja
fi
"$venv/bin/python" -c "import torch; print('building against torch', torch.__version__, 'CUDA', torch.version.cuda)"
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$archs" MAX_JOBS=${MAX_JOBS:-$(nproc)} PATH="$venv/bin:$PATH" \
    "$venv/bin/python" setup.py build_ext --inplace --build-temp "/tmp/masked-dit-build-py312" > /tmp/prebuild_ext.log 2>&1 \
    || { tail -30 /tmp/prebuild_ext.log; echo "prebuild_ext: build failed (log: /tmp/prebuild_ext.log)" >&2; exit 1; }
so=$(ls masked_dit/_C.cpython-312-*.so)
# the schemas register at import; no GPU is needed to check that the library loads and links
"$venv/bin/python" -c "
import sys; sys.path.insert(0, '.')
import torch, masked_dit._C as C
assert all(hasattr(torch.ops.masked_dit_C, op) for op in ('gather_tokens', 'adaln_modulate', 'linear_gelu_aux')), \\
    'ops not registered'
print('loads:', C.__file__, 'archs', getattr(C, 'cuda_archs', '?'))"
echo "carry: $so"
