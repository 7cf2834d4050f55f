// Masked-token gather / scatter kernels (see tokens.h for the contract).
//
// All kernels move whole rows of D elements. When every tensor involved is contiguous in D, row
// strides and pointers are 16-byte aligned and D is a multiple of the vector width, rows move as
// 16-byte vectors (VEC elements); otherwise element by element with arbitrary strides.
// Scatter-type kernels run over *output* rows and read an inverse map inv[b*N + n] = k + 1
// (0: not kept), so each output row is written exactly once.
// Only conversion intrinsics are used on half / bfloat16 (torch builds with
// __CUDA_NO_HALF_CONVERSIONS__ and friends).
#include "kernels/tokens.h"

#include <algorithm>

namespace masked_dit {
namespace tokens {
namespace {

// -----------------------------------------------------------------------------
// Element helpers
// -----------------------------------------------------------------------------

template <typename T>
struct Num;
template <>
struct Num<float> {
  static __device__ __forceinline__ float to_acc(float v) { return v; }
  static __device__ __forceinline__ float from_acc(float v) { return v; }
};
template <>
struct Num<double> {
  static __device__ __forceinline__ double to_acc(double v) { return v; }
  static __device__ __forceinline__ double from_acc(double v) { return v; }
};
template <>
struct Num<__half> {
  static __device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_acc(float v) { return __float2half(v); }
};
template <>
struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float v) { return __float2bfloat16(v); }
};

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// Loads VEC elements at `p` (stride `sd` between elements; sd == 1 whenever VEC > 1).
template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load(const T* p, int64_t sd) {
  if constexpr (VEC == 1) {
    Vec<T, 1> out;
    out.v[0] = p[0];
    return out;
  } else {
    return *reinterpret_cast<const Vec<T, VEC>*>(p);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, const Vec<T, VEC>& val) {
  *reinterpret_cast<Vec<T, VEC>*>(p) = val;
}

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> zeros() {
  Vec<T, VEC> out;
#pragma unroll
  for (int i = 0; i < VEC; ++i) out.v[i] = Num<T>::from_acc(0);
  return out;
}

// Sample owning packed row r: the largest b < B with cu_seqlens[b] <= r (skips empty samples).
__device__ __forceinline__ int64_t find_sample(const int32_t* cu_seqlens, int64_t B, int64_t r) {
  int64_t lo = 0, hi = B - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (cu_seqlens[mid] <= r) lo = mid; else hi = mid - 1;
  }
  return lo;
}

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;     // grid-stride loops cover the rest
constexpr int64_t kRowsPerPartial = 128;    // rows summed per block in the [D]-fill backward

int64_t num_blocks(int64_t items) { return std::max<int64_t>(1, std::min<int64_t>((items + kThreads - 1) / kThreads, kMaxBlocks)); }

// -----------------------------------------------------------------------------
// Kernels
// -----------------------------------------------------------------------------

template <typename T, int VEC>
__global__ void gather_kernel(const T* __restrict__ x, RowStrides xs, const int64_t* __restrict__ ids,
                              const int32_t* __restrict__ cu_seqlens, int64_t rows, int64_t K, int64_t B,
                              int64_t D, T* __restrict__ out) {
  const int64_t dv = D / VEC;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < rows * dv; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / dv;
    const int64_t c = (i - r * dv) * VEC;
    const int64_t b = cu_seqlens ? find_sample(cu_seqlens, B, r) : r / K;
    store<T, VEC>(out + r * D + c, load<T, VEC>(x + b * xs.b + ids[r] * xs.n + c * xs.d, xs.d));
  }
}

// inv[b*N + ids[r]] = k + 1, k = r % K (dense) or the packed row r itself (varlen).
__global__ void inverse_map_kernel(const int64_t* __restrict__ ids, const int32_t* __restrict__ cu_seqlens,
                                   int64_t rows, int64_t K, int64_t B, int64_t N, int32_t* __restrict__ inv) {
  for (int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; r < rows; r += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = cu_seqlens ? find_sample(cu_seqlens, B, r) : r / K;
    const int64_t k = cu_seqlens ? r : r - b * K;
    inv[b * N + ids[r]] = static_cast<int32_t>(k + 1);
  }
}

template <typename T, int VEC>
__global__ void scatter_kernel(const T* __restrict__ x_keep, RowStrides ks, bool varlen, const T* __restrict__ fill,
                               RowStrides fs, const int32_t* __restrict__ inv, int64_t B, int64_t N, int64_t D,
                               T* __restrict__ out) {
  const int64_t dv = D / VEC;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < B * N * dv; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / dv;
    const int64_t c = (i - r * dv) * VEC;
    const int64_t b = r / N;
    const int64_t n = r - b * N;
    const int32_t kept = inv[r];
    Vec<T, VEC> val;
    if (kept > 0) {
      const int64_t k = kept - 1;
      const int64_t off = varlen ? k * ks.b : b * ks.b + k * ks.n;
      val = load<T, VEC>(x_keep + off + c * ks.d, ks.d);
    } else if (fill != nullptr) {
      val = load<T, VEC>(fill + b * fs.b + n * fs.n + c * fs.d, fs.d);
    } else {
      val = zeros<T, VEC>();
    }
    store<T, VEC>(out + r * D + c, val);
  }
}

// Dense fill: grad_fill = grad_out with kept rows zeroed (kept rows are not read: their gradient
// goes to grad_keep through gather_tokens).
template <typename T, int VEC>
__global__ void scatter_backward_dense_kernel(const T* __restrict__ grad, RowStrides gs, const int32_t* __restrict__ inv,
                                              int64_t B, int64_t N, int64_t D, T* __restrict__ grad_fill) {
  const int64_t dv = D / VEC;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < B * N * dv; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / dv;
    const int64_t c = (i - r * dv) * VEC;
    const int64_t b = r / N;
    const int64_t n = r - b * N;
    const Vec<T, VEC> g = inv[r] > 0 ? zeros<T, VEC>() : load<T, VEC>(grad + b * gs.b + n * gs.n + c * gs.d, gs.d);
    store<T, VEC>(grad_fill + r * D + c, g);
  }
}

// [D] fill, stage 1: block (p, y) sums rows [p*kRowsPerPartial, ...) of non-kept rows for its
// column vectors into partial[p, :] (kept rows are skipped, not read).
template <typename T, int VEC>
__global__ void scatter_backward_reduce_kernel(const T* __restrict__ grad, RowStrides gs, const int32_t* __restrict__ inv,
                                               int64_t B, int64_t N, int64_t D,
                                               typename AccumType<T>::type* __restrict__ partial) {
  using Acc = typename AccumType<T>::type;
  const int64_t c = (blockIdx.y * (int64_t)blockDim.x + threadIdx.x) * VEC;
  if (c >= D) return;
  const int64_t r_begin = blockIdx.x * kRowsPerPartial;
  const int64_t r_end = r_begin + kRowsPerPartial < B * N ? r_begin + kRowsPerPartial : B * N;
  Acc acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = Acc(0);
  for (int64_t r = r_begin; r < r_end; ++r) {
    if (inv[r] > 0) continue;
    const int64_t b = r / N;
    const int64_t n = r - b * N;
    const Vec<T, VEC> g = load<T, VEC>(grad + b * gs.b + n * gs.n + c * gs.d, gs.d);
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] += Num<T>::to_acc(g.v[j]);
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) partial[blockIdx.x * D + c + j] = acc[j];
}

// [D] fill, stage 2: grad_fill[d] = sum_p partial[p, d]. A block owns 32 adjacent columns (coalesced
// rows of partial) and kSlices threads per column stride over the partials, so the loads are spread
// over ceil(D / 32) blocks of kSlices warps instead of one serial loop per column (B*N/128 partials:
// 512 at DiT batch 256). The slice sums are added in a fixed tree order: deterministic.
constexpr int kSlices = 16;

template <typename T>
__global__ void reduce_partials_kernel(const typename AccumType<T>::type* __restrict__ partial, int64_t num_partials,
                                       int64_t D, T* __restrict__ grad_fill) {
  using Acc = typename AccumType<T>::type;
  __shared__ Acc sums[kSlices][32];
  const int64_t d = blockIdx.x * 32LL + threadIdx.x;
  Acc acc = Acc(0);
  if (d < D) {
    for (int64_t p = threadIdx.y; p < num_partials; p += kSlices) acc += partial[p * D + d];
  }
  sums[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
#pragma unroll
  for (int s = kSlices / 2; s > 0; s >>= 1) {
    if (threadIdx.y < s) sums[threadIdx.y][threadIdx.x] += sums[threadIdx.y + s][threadIdx.x];
    __syncthreads();
  }
  if (threadIdx.y == 0 && d < D) grad_fill[d] = Num<T>::from_acc(sums[0][threadIdx.x]);
}

// -----------------------------------------------------------------------------
// Vector width selection
// -----------------------------------------------------------------------------

template <typename T>
constexpr int kVec = 16 / sizeof(T);

template <typename T>
bool aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * kVec<T>) == 0;
}

// A tensor (pointer + strides) can be read/written as 16-byte vectors along D.
template <typename T>
bool vectorizable(const T* p, RowStrides s) {
  return p == nullptr || (s.d == 1 && s.b % kVec<T> == 0 && s.n % kVec<T> == 0 && aligned(p));
}

template <typename T>
cudaError_t launch_inverse_map(const int64_t* ids, const int32_t* cu_seqlens, int64_t rows, int64_t K, int64_t B,
                               int64_t N, int32_t* inv, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(inv, 0, sizeof(int32_t) * B * N, stream);
  if (err != cudaSuccess) return err;
  if (rows > 0) inverse_map_kernel<<<num_blocks(rows), kThreads, 0, stream>>>(ids, cu_seqlens, rows, K, B, N, inv);
  return cudaGetLastError();
}

}  // namespace

// -----------------------------------------------------------------------------
// Launchers
// -----------------------------------------------------------------------------

int64_t scatter_backward_num_partials(int64_t B, int64_t N) {
  return std::max<int64_t>(1, (B * N + kRowsPerPartial - 1) / kRowsPerPartial);
}

template <typename T>
cudaError_t gather_tokens(const T* x, RowStrides xs, const int64_t* ids, const int32_t* cu_seqlens, int64_t rows,
                          int64_t K, int64_t B, int64_t D, T* out, cudaStream_t stream) {
  if (rows == 0 || D == 0) return cudaSuccess;
  if (D % kVec<T> == 0 && vectorizable(x, xs) && aligned(out)) {
    gather_kernel<T, kVec<T>><<<num_blocks(rows * D / kVec<T>), kThreads, 0, stream>>>(x, xs, ids, cu_seqlens, rows, K, B, D, out);
  } else {
    gather_kernel<T, 1><<<num_blocks(rows * D), kThreads, 0, stream>>>(x, xs, ids, cu_seqlens, rows, K, B, D, out);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t scatter_tokens(const T* x_keep, RowStrides ks, const int64_t* ids, const int32_t* cu_seqlens,
                           int64_t num_keep_rows, int64_t K, const T* fill, RowStrides fs, int64_t B, int64_t N,
                           int64_t D, int32_t* inv, T* out, cudaStream_t stream) {
  if (B * N == 0 || D == 0) return cudaSuccess;
  cudaError_t err = launch_inverse_map<T>(ids, cu_seqlens, num_keep_rows, K, B, N, inv, stream);
  if (err != cudaSuccess) return err;
  const bool varlen = cu_seqlens != nullptr;
  if (D % kVec<T> == 0 && vectorizable(x_keep, ks) && vectorizable(fill, fs) && aligned(out)) {
    scatter_kernel<T, kVec<T>><<<num_blocks(B * N * D / kVec<T>), kThreads, 0, stream>>>(x_keep, ks, varlen, fill, fs, inv, B, N, D, out);
  } else {
    scatter_kernel<T, 1><<<num_blocks(B * N * D), kThreads, 0, stream>>>(x_keep, ks, varlen, fill, fs, inv, B, N, D, out);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t scatter_tokens_backward(const T* grad, RowStrides gs, const int64_t* ids, const int32_t* cu_seqlens,
                                    int64_t num_keep_rows, int64_t K, int64_t B, int64_t N, int64_t D, bool fill_dense,
                                    int32_t* inv, typename AccumType<T>::type* partial, T* grad_keep, T* grad_fill,
                                    cudaStream_t stream) {
  if (D == 0) return cudaSuccess;
  if (B * N == 0) {  // no rows: the [D] fill gradient is an empty sum
    if (!fill_dense) return cudaMemsetAsync(grad_fill, 0, sizeof(T) * D, stream);
    return cudaSuccess;
  }
  // grad_keep is grad_out gathered at the ids: defined for every kept row even where ids repeat
  // (the fill pass below then skips kept rows, so grad_out is still read once in all).
  cudaError_t err = gather_tokens<T>(grad, gs, ids, cu_seqlens, num_keep_rows, K, B, D, grad_keep, stream);
  if (err != cudaSuccess) return err;
  err = launch_inverse_map<T>(ids, cu_seqlens, num_keep_rows, K, B, N, inv, stream);
  if (err != cudaSuccess) return err;
  const bool vec = D % kVec<T> == 0 && vectorizable(grad, gs) && aligned(grad_fill);
  if (fill_dense) {
    if (vec) {
      scatter_backward_dense_kernel<T, kVec<T>><<<num_blocks(B * N * D / kVec<T>), kThreads, 0, stream>>>(grad, gs, inv, B, N, D, grad_fill);
    } else {
      scatter_backward_dense_kernel<T, 1><<<num_blocks(B * N * D), kThreads, 0, stream>>>(grad, gs, inv, B, N, D, grad_fill);
    }
    return cudaGetLastError();
  }
  const int64_t num_partials = scatter_backward_num_partials(B, N);
  const int threads = 128;
  const int v = vec ? kVec<T> : 1;
  const dim3 grid(static_cast<unsigned>(num_partials), static_cast<unsigned>((D / v + threads - 1) / threads));
  if (vec) {
    scatter_backward_reduce_kernel<T, kVec<T>><<<grid, threads, 0, stream>>>(grad, gs, inv, B, N, D, partial);
  } else {
    scatter_backward_reduce_kernel<T, 1><<<grid, threads, 0, stream>>>(grad, gs, inv, B, N, D, partial);
  }
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  reduce_partials_kernel<T><<<static_cast<unsigned>((D + 31) / 32), dim3(32, kSlices), 0, stream>>>(
      partial, num_partials, D, grad_fill);
  return cudaGetLastError();
}

// -----------------------------------------------------------------------------
// Explicit instantiations
// -----------------------------------------------------------------------------

#define MASKED_DIT_INSTANTIATE_TOKENS(T)                                                                          \
  template cudaError_t gather_tokens<T>(const T*, RowStrides, const int64_t*, const int32_t*, int64_t, int64_t,   \
                                        int64_t, int64_t, T*, cudaStream_t);                                      \
  template cudaError_t scatter_tokens<T>(const T*, RowStrides, const int64_t*, const int32_t*, int64_t, int64_t,  \
                                         const T*, RowStrides, int64_t, int64_t, int64_t, int32_t*, T*,           \
                                         cudaStream_t);                                                           \
  template cudaError_t scatter_tokens_backward<T>(const T*, RowStrides, const int64_t*, const int32_t*, int64_t,  \
                                                  int64_t, int64_t, int64_t, int64_t, bool, int32_t*,             \
                                                  typename AccumType<T>::type*, T*, T*, cudaStream_t);

MASKED_DIT_INSTANTIATE_TOKENS(float)
MASKED_DIT_INSTANTIATE_TOKENS(double)
MASKED_DIT_INSTANTIATE_TOKENS(__half)
MASKED_DIT_INSTANTIATE_TOKENS(__nv_bfloat16)

#undef MASKED_DIT_INSTANTIATE_TOKENS

}  // namespace tokens
}  // namespace masked_dit
