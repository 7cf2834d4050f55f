// Masked-token gather / scatter: host launchers (pure CUDA C++, no torch headers).
//
// Layouts. "Dense": ids [B, K] int64 (row r = b*K + k). "Varlen": packed ids [T] int64 and
// cu_seqlens [B+1] int32 (flash-attn convention); pass cu_seqlens == nullptr for dense.
// Ids are positions in [0, N) and unique within a sample (MAE masks are permutations).
// Inputs take any element strides; outputs are contiguous. All launchers are asynchronous on
// `stream` and return cudaGetLastError().
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace masked_dit {
namespace tokens {

// Element strides of a [B, N, D] tensor. A packed [T, D] x_keep uses (t, 0, d); a [D] fill (0, 0, d).
struct RowStrides {
  int64_t b;
  int64_t n;
  int64_t d;
};

// Accumulation type of the [D]-fill gradient reduction (float, double for double).
template <typename T>
struct AccumType {
  using type = float;
};
template <>
struct AccumType<double> {
  using type = double;
};

// Rows of fp32 partial sums the [D]-fill backward needs for B*N output rows.
int64_t scatter_backward_num_partials(int64_t B, int64_t N);

// out[r, :] = x[b(r), ids[r], :]; rows = B*K (dense, b = r / K) or T (varlen).
template <typename T>
cudaError_t gather_tokens(const T* x, RowStrides x_strides, const int64_t* ids, const int32_t* cu_seqlens,
                          int64_t rows, int64_t K, int64_t B, int64_t D, T* out, cudaStream_t stream);

// out [B, N, D] = fill (or zeros when fill == nullptr), with x_keep rows at the kept positions.
// inverse_workspace: B*N int32 scratch. num_keep_rows = B*K (dense) or T (varlen).
template <typename T>
cudaError_t scatter_tokens(const T* x_keep, RowStrides keep_strides, const int64_t* ids, const int32_t* cu_seqlens,
                           int64_t num_keep_rows, int64_t K, const T* fill, RowStrides fill_strides, int64_t B,
                           int64_t N, int64_t D, int32_t* inverse_workspace, T* out, cudaStream_t stream);

// Adjoint of scatter_tokens in one read of grad_out [B, N, D]:
//   grad_keep [num_keep_rows, D] = grad_out at the kept positions (a gather: every row is written,
//   also where ids repeat within a sample);
//   grad_fill = grad_out with kept rows zeroed ([B, N, D], fill_dense) or the sum of the non-kept
//   rows ([D]; two-stage deterministic reduction through partial_workspace
//   [scatter_backward_num_partials(B, N), D] of AccumType<T>).
template <typename T>
cudaError_t scatter_tokens_backward(const T* grad_out, RowStrides grad_strides, const int64_t* ids,
                                    const int32_t* cu_seqlens, int64_t num_keep_rows, int64_t K, int64_t B,
                                    int64_t N, int64_t D, bool fill_dense, int32_t* inverse_workspace,
                                    typename AccumType<T>::type* partial_workspace, T* grad_keep, T* grad_fill,
                                    cudaStream_t stream);

}  // namespace tokens
}  // namespace masked_dit
