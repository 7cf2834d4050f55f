#!/usr/bin/env bash
# Compiles every CUDA kernel with nvcc (sm_90; CHECK_ARCHS="90 80" for more) and every binding file with the host
# compiler against torch's headers, to objects only: a kernel or binding that does not compile, or a
# kernel that spills registers where it must not, cannot land, even on machines without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
NVCC=${NVCC:-nvcc}
shopt -s nullglob
kernels=(csrc/kernels/*.cu)
CUDA_HOME_NVCC=$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")
# cuBLASLt's headers (mlp_gemm.cu): the toolkit's, a pip install's, or (CI: nvcc without cuBLAS) fetched
# once from the nvidia-cublas wheel into ~/.cache/masked-dit; a folder of the cuBLAS headers alone
cublas_inc=$(python tools/cublas_headers.py --cuda-home "$CUDA_HOME_NVCC" --build-dir "$out" --download --nvcc "$NVCC")
cublas_flag=(); [ -n "$cublas_inc" ] && cublas_flag=(-I"$cublas_inc")
# the flags torch's CUDAExtension adds to every nvcc call (-D__CUDA_NO_HALF_OPERATORS__ and friends):
# without them half/bfloat16 operators and implicit conversions compile here but break setup.py
read -r -a torch_nvcc_flags <<< "$(python -c "from torch.utils.cpp_extension import COMMON_NVCC_FLAGS; print(' '.join(COMMON_NVCC_FLAGS))")"
# -Xptxas -v: every kernel's registers and spills, gated by tools/ptxas_report.py (a spilling kernel
# compiles and passes every CPU test, yet runs slower on the GPU)
for arch in ${CHECK_ARCHS:-90}; do
  for f in "${kernels[@]}"; do
    echo "nvcc sm_${arch}: $f"
    log="$out/$(basename "$f").sm${arch}.log"
    "$NVCC" -c -std=c++17 -O2 -arch=sm_${arch} "${torch_nvcc_flags[@]}" -Xptxas -v -Icsrc "${cublas_flag[@]}" "$f" \
      -o "$out/$(basename "$f").sm${arch}.o" 2> "$log" || { cat "$log" >&2; exit 1; }
  done
done
python tools/ptxas_report.py "$out"/*.log
TORCH_INC=$(python -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
PY_INC=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
CUDA_INC=$CUDA_HOME_NVCC/include
[ -d "$CUDA_INC" ] || CUDA_INC=/usr/local/cuda/include
for f in csrc/bindings/*.cpp; do
  echo "c++: $f"
  ${CXX:-g++} -c -std=c++17 -Wno-c++20-extensions -O1 -fPIC -D_GLIBCXX_USE_CXX11_ABI=1 -I"$TORCH_INC" -I"$TORCH_INC/torch/csrc/api/include" \
    -I"$CUDA_INC" -I/usr/local/cuda/include -I"$PY_INC" -Icsrc "${cublas_flag[@]}" "$f" -o "$out/$(basename "$f").o"
done
echo "csrc check: ${#kernels[@]} kernel file(s) x archs and $(ls csrc/bindings/*.cpp | wc -l) binding file(s) compiled"
