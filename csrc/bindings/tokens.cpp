// Torch bindings of the masked-token gather / scatter kernels (csrc/kernels/tokens.cu):
// schemas in namespace masked_dit_C, CUDA implementations that check inputs, allocate outputs
// and workspaces, and launch on the current stream. Argument order matches the Python backends
// in masked_dit/ops/tokens.py.
#include <tuple>
#include <vector>

#include "bindings/torch_cuda.h"

#include "kernels/tokens.h"

namespace {

using masked_dit::tokens::AccumType;
using masked_dit::tokens::RowStrides;

// -----------------------------------------------------------------------------
// Helpers
// -----------------------------------------------------------------------------

template <typename T>
struct Tag {
  using type = T;
};

// Calls fn(Tag<T>{}) with the CUDA element type matching `dtype`.
template <typename Fn>
void dispatch_float(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(Tag<float>{}); break;
    case at::kDouble: fn(Tag<double>{}); break;
    case at::kHalf: fn(Tag<__half>{}); break;
    case at::kBFloat16: fn(Tag<__nv_bfloat16>{}); break;
    default: TORCH_CHECK(false, "masked_dit_C::", op, ": unsupported dtype ", dtype, " (float32, float64, float16, bfloat16)");
  }
}

RowStrides strides_bnd(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }
RowStrides strides_packed(const at::Tensor& t) { return {t.stride(0), 0, t.stride(1)}; }
RowStrides strides_fill(const at::Tensor& fill) { return fill.dim() == 1 ? RowStrides{0, 0, fill.stride(0)} : strides_bnd(fill); }

template <typename T>
const T* cptr(const at::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); }
template <typename T>
T* mptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

void check_cuda_error(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "masked_dit_C::", op, ": CUDA error: ", cudaGetErrorString(err));
}

void check_tokens(const at::Tensor& t, int64_t dim, const char* name, const char* op) {
  TORCH_CHECK(t.is_cuda(), "masked_dit_C::", op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == dim, "masked_dit_C::", op, ": ", name, " must be ", dim, "-D, got ", t.sizes());
}

// ids must be int64 on `device`; returns a contiguous copy if needed.
at::Tensor check_ids(const at::Tensor& ids, int64_t dim, const at::Tensor& like, const char* op) {
  TORCH_CHECK(ids.scalar_type() == at::kLong, "masked_dit_C::", op, ": ids_keep must be int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == dim, "masked_dit_C::", op, ": ids_keep must be ", dim, "-D, got ", ids.sizes());
  TORCH_CHECK(ids.device() == like.device(), "masked_dit_C::", op, ": ids_keep is on ", ids.device(), ", tokens on ", like.device());
  return ids.contiguous();
}

at::Tensor check_cu_seqlens(const at::Tensor& cu, const at::Tensor& like, const char* op) {
  TORCH_CHECK(cu.scalar_type() == at::kInt, "masked_dit_C::", op, ": cu_seqlens must be int32, got ", cu.scalar_type());
  TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 1, "masked_dit_C::", op, ": cu_seqlens must be 1-D [B+1], got ", cu.sizes());
  TORCH_CHECK(cu.device() == like.device(), "masked_dit_C::", op, ": cu_seqlens is on ", cu.device(), ", tokens on ", like.device());
  return cu.contiguous();
}

void check_fill(const at::Tensor& fill, const at::Tensor& x_keep, int64_t B, int64_t N, int64_t D, const char* op) {
  TORCH_CHECK(fill.scalar_type() == x_keep.scalar_type(), "masked_dit_C::", op, ": fill dtype ", fill.scalar_type(),
              " differs from x_keep dtype ", x_keep.scalar_type());
  TORCH_CHECK(fill.device() == x_keep.device(), "masked_dit_C::", op, ": fill is on ", fill.device(), ", x_keep on ", x_keep.device());
  const bool ok = (fill.dim() == 1 && fill.size(0) == D) ||
                  (fill.dim() == 3 && fill.size(0) == B && fill.size(1) == N && fill.size(2) == D);
  TORCH_CHECK(ok, "masked_dit_C::", op, ": fill must be [D] or [B, N, D] = [", B, ", ", N, ", ", D, "], got ", fill.sizes());
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Shared by the dense and varlen scatters: cu (undefined tensor for dense), K (dense only).
at::Tensor scatter_impl(const at::Tensor& x_keep, RowStrides ks, const at::Tensor& ids, const at::Tensor& cu,
                        int64_t num_keep_rows, int64_t K, const at::Tensor* fill, int64_t B, int64_t N, int64_t D,
                        const char* op) {
  auto out = at::empty({B, N, D}, x_keep.options());
  auto inv = at::empty({B * N}, x_keep.options().dtype(at::kInt));
  const int32_t* cu_ptr = cu.defined() ? cu.data_ptr<int32_t>() : nullptr;
  dispatch_float(x_keep.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* fill_ptr = fill ? cptr<T>(*fill) : nullptr;
    const RowStrides fs = fill ? strides_fill(*fill) : RowStrides{0, 0, 0};
    check_cuda_error(masked_dit::tokens::scatter_tokens<T>(cptr<T>(x_keep), ks, ids.data_ptr<int64_t>(), cu_ptr,
                                                           num_keep_rows, K, fill_ptr, fs, B, N, D, inv.data_ptr<int32_t>(),
                                                           mptr<T>(out), current_stream()),
                     op);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> scatter_backward_impl(const at::Tensor& grad, const at::Tensor& ids, const at::Tensor& cu,
                                                         std::vector<int64_t> keep_shape, int64_t K, bool fill_dense,
                                                         const char* op) {
  const int64_t B = grad.size(0), N = grad.size(1), D = grad.size(2);
  const int64_t num_keep_rows = ids.numel();
  auto grad_keep = at::empty(keep_shape, grad.options());
  auto grad_fill = fill_dense ? at::empty({B, N, D}, grad.options()) : at::empty({D}, grad.options());
  auto inv = at::empty({B * N}, grad.options().dtype(at::kInt));
  const auto acc_dtype = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto partial = fill_dense ? at::Tensor()
                            : at::empty({masked_dit::tokens::scatter_backward_num_partials(B, N), D}, grad.options().dtype(acc_dtype));
  const int32_t* cu_ptr = cu.defined() ? cu.data_ptr<int32_t>() : nullptr;
  dispatch_float(grad.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = typename AccumType<T>::type;
    Acc* partial_ptr = fill_dense ? nullptr : reinterpret_cast<Acc*>(partial.data_ptr());
    check_cuda_error(masked_dit::tokens::scatter_tokens_backward<T>(cptr<T>(grad), strides_bnd(grad), ids.data_ptr<int64_t>(),
                                                                    cu_ptr, num_keep_rows, K, B, N, D, fill_dense,
                                                                    inv.data_ptr<int32_t>(), partial_ptr, mptr<T>(grad_keep),
                                                                    mptr<T>(grad_fill), current_stream()),
                     op);
  });
  return {grad_keep, grad_fill};
}

// -----------------------------------------------------------------------------
// Ops: dense ids [B, K]
// -----------------------------------------------------------------------------

at::Tensor gather_tokens(const at::Tensor& x, const at::Tensor& ids_keep) {
  const char* op = "gather_tokens";
  check_tokens(x, 3, "x", op);
  const auto ids = check_ids(ids_keep, 2, x, op);
  TORCH_CHECK(ids.size(0) == x.size(0), "masked_dit_C::", op, ": batch mismatch: x ", x.sizes(), ", ids_keep ", ids.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), K = ids.size(1), D = x.size(2);
  auto out = at::empty({B, K, D}, x.options());
  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_cuda_error(masked_dit::tokens::gather_tokens<T>(cptr<T>(x), strides_bnd(x), ids.data_ptr<int64_t>(), nullptr,
                                                          B * K, K, B, D, mptr<T>(out), current_stream()),
                     op);
  });
  return out;
}

at::Tensor gather_tokens_backward(const at::Tensor& grad_out, const at::Tensor& ids_keep, int64_t num_tokens) {
  const char* op = "gather_tokens_backward";
  check_tokens(grad_out, 3, "grad_out", op);
  const auto ids = check_ids(ids_keep, 2, grad_out, op);
  TORCH_CHECK(ids.size(0) == grad_out.size(0) && ids.size(1) == grad_out.size(1), "masked_dit_C::", op,
              ": ids_keep ", ids.sizes(), " does not match grad_out ", grad_out.sizes());
  const c10::cuda::CUDAGuard guard(grad_out.device());
  return scatter_impl(grad_out, strides_bnd(grad_out), ids, at::Tensor(), ids.numel(), ids.size(1), nullptr,
                      grad_out.size(0), num_tokens, grad_out.size(2), op);
}

at::Tensor scatter_tokens(const at::Tensor& x_keep, const at::Tensor& ids_keep, const at::Tensor& fill, int64_t num_tokens) {
  const char* op = "scatter_tokens";
  check_tokens(x_keep, 3, "x_keep", op);
  const auto ids = check_ids(ids_keep, 2, x_keep, op);
  const int64_t B = x_keep.size(0), K = x_keep.size(1), D = x_keep.size(2);
  TORCH_CHECK(ids.size(0) == B && ids.size(1) == K, "masked_dit_C::", op, ": ids_keep ", ids.sizes(), " does not match x_keep ", x_keep.sizes());
  TORCH_CHECK(num_tokens >= K, "masked_dit_C::", op, ": num_tokens=", num_tokens, " < kept tokens ", K);
  check_fill(fill, x_keep, B, num_tokens, D, op);
  const c10::cuda::CUDAGuard guard(x_keep.device());
  return scatter_impl(x_keep, strides_bnd(x_keep), ids, at::Tensor(), B * K, K, &fill, B, num_tokens, D, op);
}

std::tuple<at::Tensor, at::Tensor> scatter_tokens_backward(const at::Tensor& grad_out, const at::Tensor& ids_keep, bool fill_dense) {
  const char* op = "scatter_tokens_backward";
  check_tokens(grad_out, 3, "grad_out", op);
  const auto ids = check_ids(ids_keep, 2, grad_out, op);
  TORCH_CHECK(ids.size(0) == grad_out.size(0), "masked_dit_C::", op, ": batch mismatch: grad_out ", grad_out.sizes(), ", ids_keep ", ids.sizes());
  const c10::cuda::CUDAGuard guard(grad_out.device());
  return scatter_backward_impl(grad_out, ids, at::Tensor(), {ids.size(0), ids.size(1), grad_out.size(2)}, ids.size(1), fill_dense, op);
}

// -----------------------------------------------------------------------------
// Ops: packed varlen ids [T] + cu_seqlens [B+1]
// -----------------------------------------------------------------------------

at::Tensor gather_tokens_varlen(const at::Tensor& x, const at::Tensor& ids_keep, const at::Tensor& cu_seqlens) {
  const char* op = "gather_tokens_varlen";
  check_tokens(x, 3, "x", op);
  const auto ids = check_ids(ids_keep, 1, x, op);
  const auto cu = check_cu_seqlens(cu_seqlens, x, op);
  TORCH_CHECK(cu.numel() == x.size(0) + 1, "masked_dit_C::", op, ": cu_seqlens has ", cu.numel(), " entries, x has batch ", x.size(0));
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), T_rows = ids.size(0), D = x.size(2);
  // the kernel maps packed rows to samples through cu_seqlens: with no sample, any row reads out of bounds
  TORCH_CHECK(B > 0 || T_rows == 0, "masked_dit_C::", op, ": ", T_rows, " packed ids but x has batch 0");
  auto out = at::empty({T_rows, D}, x.options());
  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_cuda_error(masked_dit::tokens::gather_tokens<T>(cptr<T>(x), strides_bnd(x), ids.data_ptr<int64_t>(),
                                                          cu.data_ptr<int32_t>(), T_rows, 1, B, D, mptr<T>(out),
                                                          current_stream()),
                     op);
  });
  return out;
}

at::Tensor gather_tokens_varlen_backward(const at::Tensor& grad_out, const at::Tensor& ids_keep, const at::Tensor& cu_seqlens,
                                         int64_t num_tokens) {
  const char* op = "gather_tokens_varlen_backward";
  check_tokens(grad_out, 2, "grad_out", op);
  const auto ids = check_ids(ids_keep, 1, grad_out, op);
  const auto cu = check_cu_seqlens(cu_seqlens, grad_out, op);
  TORCH_CHECK(ids.size(0) == grad_out.size(0), "masked_dit_C::", op, ": ids_keep ", ids.sizes(), " does not match grad_out ", grad_out.sizes());
  const c10::cuda::CUDAGuard guard(grad_out.device());
  return scatter_impl(grad_out, strides_packed(grad_out), ids, cu, ids.numel(), 1, nullptr, cu.numel() - 1, num_tokens,
                      grad_out.size(1), op);
}

at::Tensor scatter_tokens_varlen(const at::Tensor& x_keep, const at::Tensor& ids_keep, const at::Tensor& cu_seqlens,
                                 const at::Tensor& fill, int64_t num_tokens) {
  const char* op = "scatter_tokens_varlen";
  check_tokens(x_keep, 2, "x_keep", op);
  const auto ids = check_ids(ids_keep, 1, x_keep, op);
  const auto cu = check_cu_seqlens(cu_seqlens, x_keep, op);
  TORCH_CHECK(ids.size(0) == x_keep.size(0), "masked_dit_C::", op, ": ids_keep ", ids.sizes(), " does not match x_keep ", x_keep.sizes());
  TORCH_CHECK(num_tokens >= 0, "masked_dit_C::", op, ": num_tokens must be >= 0, got ", num_tokens);
  const int64_t B = cu.numel() - 1, D = x_keep.size(1);
  check_fill(fill, x_keep, B, num_tokens, D, op);
  const c10::cuda::CUDAGuard guard(x_keep.device());
  return scatter_impl(x_keep, strides_packed(x_keep), ids, cu, ids.numel(), 1, &fill, B, num_tokens, D, op);
}

std::tuple<at::Tensor, at::Tensor> scatter_tokens_varlen_backward(const at::Tensor& grad_out, const at::Tensor& ids_keep,
                                                                  const at::Tensor& cu_seqlens, bool fill_dense) {
  const char* op = "scatter_tokens_varlen_backward";
  check_tokens(grad_out, 3, "grad_out", op);
  const auto ids = check_ids(ids_keep, 1, grad_out, op);
  const auto cu = check_cu_seqlens(cu_seqlens, grad_out, op);
  TORCH_CHECK(cu.numel() == grad_out.size(0) + 1, "masked_dit_C::", op, ": cu_seqlens has ", cu.numel(), " entries, grad_out has batch ", grad_out.size(0));
  const c10::cuda::CUDAGuard guard(grad_out.device());
  return scatter_backward_impl(grad_out, ids, cu, {ids.size(0), grad_out.size(2)}, 1, fill_dense, op);
}

}  // namespace

// -----------------------------------------------------------------------------
// Registration
// -----------------------------------------------------------------------------

TORCH_LIBRARY_FRAGMENT(masked_dit_C, m) {
  m.def("gather_tokens(Tensor x, Tensor ids_keep) -> Tensor");
  m.def("gather_tokens_backward(Tensor grad_out, Tensor ids_keep, int num_tokens) -> Tensor");
  m.def("scatter_tokens(Tensor x_keep, Tensor ids_keep, Tensor fill, int num_tokens) -> Tensor");
  m.def("scatter_tokens_backward(Tensor grad_out, Tensor ids_keep, bool fill_dense) -> (Tensor, Tensor)");
  m.def("gather_tokens_varlen(Tensor x, Tensor ids_keep, Tensor cu_seqlens) -> Tensor");
  m.def("gather_tokens_varlen_backward(Tensor grad_out, Tensor ids_keep, Tensor cu_seqlens, int num_tokens) -> Tensor");
  m.def("scatter_tokens_varlen(Tensor x_keep, Tensor ids_keep, Tensor cu_seqlens, Tensor fill, int num_tokens) -> Tensor");
  m.def("scatter_tokens_varlen_backward(Tensor grad_out, Tensor ids_keep, Tensor cu_seqlens, bool fill_dense) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(masked_dit_C, CUDA, m) {
  m.impl("gather_tokens", &gather_tokens);
  m.impl("gather_tokens_backward", &gather_tokens_backward);
  m.impl("scatter_tokens", &scatter_tokens);
  m.impl("scatter_tokens_backward", &scatter_tokens_backward);
  m.impl("gather_tokens_varlen", &gather_tokens_varlen);
  m.impl("gather_tokens_varlen_backward", &gather_tokens_varlen_backward);
  m.impl("scatter_tokens_varlen", &scatter_tokens_varlen);
  m.impl("scatter_tokens_varlen_backward", &scatter_tokens_varlen_backward);
}
