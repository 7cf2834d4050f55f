// adaLN LayerNorm + modulate and its fusion with the gated residual add: host launchers.
//
// Pure CUDA C++ (no torch headers): raw pointers, element strides, sizes, a stream.
//   adaln_modulate:       h = LayerNorm(x) * (1 + scale[b]) + shift[b]              (x [B, L, D])
//   gated_residual_adaln: r = x + gate[b] * branch;  h = adaln_modulate(r)          (r rounded to T first)
// T is the activation dtype (x, branch, r, h, dx, dbranch, dh, dr), M the modulation dtype
// (shift, scale, gate and their grads): float, __half or __nv_bfloat16 each. Statistics
// (mean, rstd [B, L]) and all accumulation are fp32. Inputs are read through their strides (so
// chunks of the adaLN Linear's [B, 6D] output need no copy); outputs are contiguous.
// The backward reduces dshift/dscale/dgate over tokens in two stages: each block owns a chunk of
// one sample's tokens and writes fp32 partial sums to `workspace` ([n, B, num_chunks, D], n = 2
// or 3 quantities), then a small kernel sums the chunks. No atomics.
// Every launcher returns the launch's cudaError_t (cudaSuccess when B * L == 0: nothing to do).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace masked_dit {
namespace adaln {

struct Strides3 { int64_t b, l, d; };  // element strides of a [B, L, D] tensor
struct Strides2 { int64_t b, d; };     // element strides of a [B, D] tensor

// Largest feature dim the kernels take (each thread keeps its share of a row in registers).
constexpr int64_t kMaxD = 16384;

// Token chunks per sample for the backward's first stage on `device`; size the workspace with it.
int64_t backward_num_chunks(int64_t B, int64_t L, int device);

template <typename T, typename M>
cudaError_t adaln_modulate_forward(
    const T* x, Strides3 sx, const M* shift, Strides2 sshift, const M* scale, Strides2 sscale,
    T* h, float* mean, float* rstd, int64_t B, int64_t L, int64_t D, float eps, cudaStream_t stream);

// workspace: 2 * B * num_chunks * D floats.
template <typename T, typename M>
cudaError_t adaln_modulate_backward(
    const T* dh, Strides3 sdh, const T* x, Strides3 sx, const M* scale, Strides2 sscale,
    const float* mean, const float* rstd, T* dx, M* dshift, M* dscale, float* workspace,
    int64_t num_chunks, int64_t B, int64_t L, int64_t D, cudaStream_t stream);

template <typename T, typename M>
cudaError_t gated_residual_adaln_forward(
    const T* x, Strides3 sx, const T* branch, Strides3 sbranch, const M* gate, Strides2 sgate,
    const M* shift, Strides2 sshift, const M* scale, Strides2 sscale,
    T* r, T* h, float* mean, float* rstd, int64_t B, int64_t L, int64_t D, float eps, cudaStream_t stream);

// workspace: 3 * B * num_chunks * D floats.
template <typename T, typename M>
cudaError_t gated_residual_adaln_backward(
    const T* dr, Strides3 sdr, const T* dh, Strides3 sdh, const T* r, Strides3 sr,
    const T* branch, Strides3 sbranch, const M* gate, Strides2 sgate, const M* scale, Strides2 sscale,
    const float* mean, const float* rstd, T* dx, T* dbranch, M* dgate, M* dshift, M* dscale,
    float* workspace, int64_t num_chunks, int64_t B, int64_t L, int64_t D, cudaStream_t stream);

}  // namespace adaln
}  // namespace masked_dit
