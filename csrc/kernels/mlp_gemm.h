// The MLP's fc1 + GELU(tanh) and its backward, with the GELU inside cuBLASLt's GEMM epilogues.
//
// Pure CUDA C++ (no torch headers): raw pointers of contiguous row-major matrices, sizes, a stream
// and a workspace. Dtype: bf16 or fp16 for every matrix and vector; fp32 accumulation.
//   linear_gelu_aux: pre = x @ w1^T + b1,  act = gelu_tanh(pre)          x [M, K], w1 [H, K], b1 [H]
//                    (one GEMM writes act, and pre as the epilogue's aux output for the backward)
//   dgelu_bgrad:     dpre = (dout @ w2) * gelu_tanh'(pre),  db1 = dpre summed over the M rows
//                    dout [M, N], w2 [N, H], pre [M, H]  (one GEMM; the epilogue reads pre)
// Without them the MLP runs three more passes over the [M, H] activations in the forward and
// backward (GELU, its derivative, fc1's bias gradient).
//
// cuBLASLt is column-major: a row-major [R, C] matrix with row stride C is a column-major C x R
// matrix with leading dimension C. So row-major act [M, H] is the column-major H x M product
// op(w1 viewed K x H, transposed) * (x viewed K x M): m = H, n = M, k = K; the bias and the aux
// are per row of that column-major output (per hidden unit), and the bias gradient reduces over
// its n columns (the M tokens). The dgrad is (w2 viewed H x N) * (dout viewed N x M): m = H,
// n = M, k = N, no transposes.
// Both return the first failing cublasStatus_t (CUBLAS_STATUS_NOT_SUPPORTED when the heuristic
// offers no algorithm for these operands; the heuristic is told each matrix pointer's actual
// alignment). The aux leading dimension H must be a multiple of 8; callers also keep K, N, H
// multiples of 8 and pointers 16-byte aligned (the fast kernels); the workspace 256-byte aligned.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cublasLt.h>
#include <cuda_runtime_api.h>

namespace masked_dit {
namespace mlp {

enum class Dtype { kBFloat16, kFloat16 };

// Workspace cuBLASLt may use per call (Hopper's fast kernels want more than older GPUs').
size_t workspace_bytes(int device);

// One cuBLASLt handle per device, created on first use and kept for the process (host memory only;
// the library is thread safe with a shared handle when every call brings its own workspace).
cublasStatus_t handle_for_device(int device, cublasLtHandle_t* handle);

// `algo`: which of the heuristic's candidates to run, best first (0); past the last one offered, the last.
// The first is not always the fastest for epilogue GEMMs (flash-attn found some slow): a GPU picks by timing.
constexpr int kMaxAlgos = 8;

cublasStatus_t linear_gelu_aux(cublasLtHandle_t handle, Dtype dtype, int64_t M, int64_t H, int64_t K,
                               const void* x, const void* w1, const void* b1, void* act, void* pre, int algo,
                               void* workspace, size_t workspace_size, cudaStream_t stream);

cublasStatus_t dgelu_bgrad(cublasLtHandle_t handle, Dtype dtype, int64_t M, int64_t H, int64_t N,
                           const void* dout, const void* w2, const void* pre, void* dpre, void* db1, int algo,
                           void* workspace, size_t workspace_size, cudaStream_t stream);

}  // namespace mlp
}  // namespace masked_dit
