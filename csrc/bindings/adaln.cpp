// torch.ops.masked_dit_C.{adaln_modulate, gated_residual_adaln}[_backward]: schemas and CUDA impls.
//
// Same contracts as the masked_dit::* custom ops in masked_dit/ops/adaln.py (which call these):
// activations [B, L, D] (x, branch, dh, dr, r) share one dtype, the [B, D] modulation tensors
// (shift, scale, gate) share one dtype; any strides; outputs contiguous; mean/rstd fp32 [B, L].
#include <cstdint>
#include <tuple>

#include "bindings/torch_cuda.h"

#include "kernels/adaln.h"

namespace masked_dit {
namespace {

using at::Tensor;
using adaln::Strides2;
using adaln::Strides3;

// ---------------------------------------------------------------------------
// helpers

template <typename T> struct Tag { using type = T; };

// Calls f(Tag<act>, Tag<mod>) with the CUDA element types of the two torch dtypes.
template <typename F>
void dispatch_dtypes(const char* op, at::ScalarType act, at::ScalarType mod, F&& f) {
  auto with_mod = [&](auto act_tag) {
    switch (mod) {
      case at::kFloat: return f(act_tag, Tag<float>{});
      case at::kHalf: return f(act_tag, Tag<__half>{});
      case at::kBFloat16: return f(act_tag, Tag<__nv_bfloat16>{});
      default: TORCH_CHECK(false, op, ": modulation dtype must be float32/float16/bfloat16, got ", mod);
    }
  };
  switch (act) {
    case at::kFloat: return with_mod(Tag<float>{});
    case at::kHalf: return with_mod(Tag<__half>{});
    case at::kBFloat16: return with_mod(Tag<__nv_bfloat16>{});
    default: TORCH_CHECK(false, op, ": activation dtype must be float32/float16/bfloat16, got ", act);
  }
}

template <typename T> const T* ptr(const Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); }
template <typename T> T* mut_ptr(Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

Strides3 strides3(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }
Strides2 strides2(const Tensor& t) { return {t.stride(0), t.stride(1)}; }

void check_activation(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be [B, L, D], got ", t.sizes());
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " shape ", t.sizes(), " must equal ", x.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
              " must equal the activation dtype ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), ", expected ", x.device());
  TORCH_CHECK(x.size(2) > 0 && x.size(2) <= adaln::kMaxD, op, ": feature dim D=", x.size(2),
              " must be in [1, ", adaln::kMaxD, "]");
  // the forward launches one block per token row on grid.x
  TORCH_CHECK(x.size(0) * x.size(1) <= INT32_MAX, op, ": B*L=", x.size(0) * x.size(1),
              " token rows exceed the 2^31-1 rows the kernels take");
}

void check_modulation(const char* op, const char* name, const Tensor& t, const Tensor& x, const Tensor& ref) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(2), op, ": ", name,
              " must be [B, D] = [", x.size(0), ", ", x.size(2), "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
              " must equal the modulation dtype ", ref.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), ", expected ", x.device());
}

void check_stats(const char* op, const Tensor& mean, const Tensor& rstd, const Tensor& x) {
  for (const Tensor* t : {&mean, &rstd}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 &&
                    t->size(0) == x.size(0) && t->size(1) == x.size(1) && t->device() == x.device(),
                op, ": mean/rstd must be contiguous float32 [B, L] on the activations' device");
  }
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

Tensor stats_like(const Tensor& x) { return at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kFloat)); }

Tensor contiguous_like(const Tensor& x) { return at::empty(x.sizes(), x.options()); }

// ---------------------------------------------------------------------------
// ops

std::tuple<Tensor, Tensor, Tensor> adaln_modulate(const Tensor& x, const Tensor& shift, const Tensor& scale,
                                                  double eps) {
  constexpr const char* op = "masked_dit_C::adaln_modulate";
  check_activation(op, "x", x, x);
  check_modulation(op, "shift", shift, x, shift);
  check_modulation(op, "scale", scale, x, shift);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor h = contiguous_like(x), mean = stats_like(x), rstd = stats_like(x);
  dispatch_dtypes(op, x.scalar_type(), shift.scalar_type(), [&](auto a, auto m) {
    using T = typename decltype(a)::type;
    using M = typename decltype(m)::type;
    check_launch(op, adaln::adaln_modulate_forward<T, M>(
                         ptr<T>(x), strides3(x), ptr<M>(shift), strides2(shift), ptr<M>(scale), strides2(scale),
                         mut_ptr<T>(h), mean.data_ptr<float>(), rstd.data_ptr<float>(), x.size(0), x.size(1),
                         x.size(2), static_cast<float>(eps), c10::cuda::getCurrentCUDAStream()));
  });
  return {h, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> adaln_modulate_backward(const Tensor& dh, const Tensor& x, const Tensor& scale,
                                                           const Tensor& mean, const Tensor& rstd) {
  constexpr const char* op = "masked_dit_C::adaln_modulate_backward";
  check_activation(op, "x", x, x);
  check_activation(op, "dh", dh, x);
  check_modulation(op, "scale", scale, x, scale);
  check_stats(op, mean, rstd, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2);
  const int64_t chunks = adaln::backward_num_chunks(B, L, x.get_device());
  Tensor dx = contiguous_like(x);
  Tensor dshift = at::empty({B, D}, scale.options()), dscale = at::empty({B, D}, scale.options());
  Tensor workspace = at::empty({2, B, chunks, D}, x.options().dtype(at::kFloat));
  dispatch_dtypes(op, x.scalar_type(), scale.scalar_type(), [&](auto a, auto m) {
    using T = typename decltype(a)::type;
    using M = typename decltype(m)::type;
    check_launch(op, adaln::adaln_modulate_backward<T, M>(
                         ptr<T>(dh), strides3(dh), ptr<T>(x), strides3(x), ptr<M>(scale), strides2(scale),
                         mean.data_ptr<float>(), rstd.data_ptr<float>(), mut_ptr<T>(dx), mut_ptr<M>(dshift),
                         mut_ptr<M>(dscale), workspace.data_ptr<float>(), chunks, B, L, D,
                         c10::cuda::getCurrentCUDAStream()));
  });
  return {dx, dshift, dscale};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gated_residual_adaln(const Tensor& x, const Tensor& branch,
                                                                const Tensor& gate, const Tensor& shift,
                                                                const Tensor& scale, double eps) {
  constexpr const char* op = "masked_dit_C::gated_residual_adaln";
  check_activation(op, "x", x, x);
  check_activation(op, "branch", branch, x);
  check_modulation(op, "gate", gate, x, gate);
  check_modulation(op, "shift", shift, x, gate);
  check_modulation(op, "scale", scale, x, gate);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor r = contiguous_like(x), h = contiguous_like(x), mean = stats_like(x), rstd = stats_like(x);
  dispatch_dtypes(op, x.scalar_type(), gate.scalar_type(), [&](auto a, auto m) {
    using T = typename decltype(a)::type;
    using M = typename decltype(m)::type;
    check_launch(op, adaln::gated_residual_adaln_forward<T, M>(
                         ptr<T>(x), strides3(x), ptr<T>(branch), strides3(branch), ptr<M>(gate), strides2(gate),
                         ptr<M>(shift), strides2(shift), ptr<M>(scale), strides2(scale), mut_ptr<T>(r),
                         mut_ptr<T>(h), mean.data_ptr<float>(), rstd.data_ptr<float>(), x.size(0), x.size(1),
                         x.size(2), static_cast<float>(eps), c10::cuda::getCurrentCUDAStream()));
  });
  return {r, h, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gated_residual_adaln_backward(
    const Tensor& dr, const Tensor& dh, const Tensor& r, const Tensor& branch, const Tensor& gate,
    const Tensor& scale, const Tensor& mean, const Tensor& rstd) {
  constexpr const char* op = "masked_dit_C::gated_residual_adaln_backward";
  check_activation(op, "r", r, r);
  check_activation(op, "dr", dr, r);
  check_activation(op, "dh", dh, r);
  check_activation(op, "branch", branch, r);
  check_modulation(op, "gate", gate, r, gate);
  check_modulation(op, "scale", scale, r, gate);
  check_stats(op, mean, rstd, r);
  const c10::cuda::CUDAGuard guard(r.device());
  const int64_t B = r.size(0), L = r.size(1), D = r.size(2);
  const int64_t chunks = adaln::backward_num_chunks(B, L, r.get_device());
  Tensor dx = contiguous_like(r), dbranch = contiguous_like(r);
  Tensor dgate = at::empty({B, D}, gate.options()), dshift = at::empty({B, D}, gate.options()),
         dscale = at::empty({B, D}, gate.options());
  Tensor workspace = at::empty({3, B, chunks, D}, r.options().dtype(at::kFloat));
  dispatch_dtypes(op, r.scalar_type(), gate.scalar_type(), [&](auto a, auto m) {
    using T = typename decltype(a)::type;
    using M = typename decltype(m)::type;
    check_launch(op, adaln::gated_residual_adaln_backward<T, M>(
                         ptr<T>(dr), strides3(dr), ptr<T>(dh), strides3(dh), ptr<T>(r), strides3(r),
                         ptr<T>(branch), strides3(branch), ptr<M>(gate), strides2(gate), ptr<M>(scale),
                         strides2(scale), mean.data_ptr<float>(), rstd.data_ptr<float>(), mut_ptr<T>(dx),
                         mut_ptr<T>(dbranch), mut_ptr<M>(dgate), mut_ptr<M>(dshift), mut_ptr<M>(dscale),
                         workspace.data_ptr<float>(), chunks, B, L, D, c10::cuda::getCurrentCUDAStream()));
  });
  return {dx, dbranch, dgate, dshift, dscale};
}

}  // namespace
}  // namespace masked_dit

// ---------------------------------------------------------------------------
// registration

TORCH_LIBRARY_FRAGMENT(masked_dit_C, m) {
  m.def("adaln_modulate(Tensor x, Tensor shift, Tensor scale, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("adaln_modulate_backward(Tensor dh, Tensor x, Tensor scale, Tensor mean, Tensor rstd)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("gated_residual_adaln(Tensor x, Tensor branch, Tensor gate, Tensor shift, Tensor scale, float eps)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gated_residual_adaln_backward(Tensor dr, Tensor dh, Tensor r, Tensor branch, Tensor gate,"
        " Tensor scale, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(masked_dit_C, CUDA, m) {
  m.impl("adaln_modulate", &masked_dit::adaln_modulate);
  m.impl("adaln_modulate_backward", &masked_dit::adaln_modulate_backward);
  m.impl("gated_residual_adaln", &masked_dit::gated_residual_adaln);
  m.impl("gated_residual_adaln_backward", &masked_dit::gated_residual_adaln_backward);
}
