// Torch bindings of the cuBLASLt MLP GEMMs (csrc/kernels/mlp_gemm.cu): fc1 + GELU(tanh) with the
// pre-activation kept for the backward, and fc2's input gradient with GELU's derivative and fc1's
// bias gradient in the epilogue. Schemas in namespace masked_dit_C; the Python op
// (masked_dit/ops/mlp.py) checks shapes, alignment and dtype before it picks this backend, so the
// checks here only guard against misuse from elsewhere.
#include <tuple>

#include "bindings/torch_cuda.h"

#include "kernels/mlp_gemm.h"

namespace {

namespace mlp = masked_dit::mlp;

void check_status(cublasStatus_t status, const char* op) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "masked_dit_C::", op, ": cuBLASLt failed: ",
              cublasLtGetStatusString(status));
}

mlp::Dtype lt_dtype(const at::Tensor& t, const char* op) {
  if (t.scalar_type() == at::kBFloat16) return mlp::Dtype::kBFloat16;
  TORCH_CHECK(t.scalar_type() == at::kHalf, "masked_dit_C::", op, ": bfloat16 or float16 only, got ", t.scalar_type());
  return mlp::Dtype::kFloat16;
}

// A contiguous CUDA tensor of `sizes`, with `like`'s dtype and device.
void check_operand(const at::Tensor& t, at::IntArrayRef sizes, const at::Tensor& like, const char* name,
                   const char* op) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), "masked_dit_C::", op, ": ", name, " is on ", t.device(),
              ", expected ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "masked_dit_C::", op, ": ", name, " dtype ", t.scalar_type(),
              " differs from ", like.scalar_type());
  TORCH_CHECK(t.sizes() == sizes, "masked_dit_C::", op, ": ", name, " must be ", sizes, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "masked_dit_C::", op, ": ", name, " must be contiguous");
}

struct LtCall {
  cublasLtHandle_t handle;
  at::Tensor workspace;  // from the caching allocator on the current stream: freed after the GEMM is queued
  cudaStream_t stream;
};

LtCall prepare(const at::Tensor& like, const char* op) {
  const int device = like.get_device();
  LtCall call{};
  check_status(mlp::handle_for_device(device, &call.handle), op);
  const auto bytes = static_cast<int64_t>(mlp::workspace_bytes(device));
  call.workspace = at::empty({bytes}, like.options().dtype(at::kByte));
  call.stream = c10::cuda::getCurrentCUDAStream(device).stream();
  return call;
}

void check_algo(int64_t algo, const char* op) {
  TORCH_CHECK(algo >= 0 && algo < mlp::kMaxAlgos, "masked_dit_C::", op, ": algo must be in [0, ", mlp::kMaxAlgos,
              "), got ", algo);
}

// x [M, K], w1 [H, K], b1 [H] -> (act, pre) [M, H] each; algo: the heuristic's candidate to run (0: its best).
std::tuple<at::Tensor, at::Tensor> linear_gelu_aux(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                                   int64_t algo) {
  const char* op = "linear_gelu_aux";
  check_algo(algo, op);
  TORCH_CHECK(x.dim() == 2 && w1.dim() == 2, "masked_dit_C::", op, ": x and w1 must be 2-D, got ", x.sizes(), " and ",
              w1.sizes());
  const int64_t M = x.size(0), K = x.size(1), H = w1.size(0);
  const mlp::Dtype dtype = lt_dtype(x, op);
  check_operand(x, {M, K}, x, "x", op);
  check_operand(w1, {H, K}, x, "w1", op);
  check_operand(b1, {H}, x, "b1", op);
  TORCH_CHECK(H % 8 == 0, "masked_dit_C::", op, ": the hidden width ", H, " must be a multiple of 8 (aux layout)");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor act = at::empty({M, H}, x.options());
  at::Tensor pre = at::empty({M, H}, x.options());
  if (M == 0) return {act, pre};
  LtCall call = prepare(x, op);
  check_status(mlp::linear_gelu_aux(call.handle, dtype, M, H, K, x.data_ptr(), w1.data_ptr(), b1.data_ptr(),
                                    act.data_ptr(), pre.data_ptr(), static_cast<int>(algo), call.workspace.data_ptr(),
                                    static_cast<size_t>(call.workspace.numel()), call.stream),
               op);
  return {act, pre};
}

// dout [M, N], w2 [N, H], pre [M, H] -> (dpre [M, H], db1 [H]).
std::tuple<at::Tensor, at::Tensor> dgelu_bgrad(const at::Tensor& dout, const at::Tensor& w2, const at::Tensor& pre,
                                               int64_t algo) {
  const char* op = "dgelu_bgrad";
  check_algo(algo, op);
  TORCH_CHECK(dout.dim() == 2 && w2.dim() == 2, "masked_dit_C::", op, ": dout and w2 must be 2-D, got ", dout.sizes(),
              " and ", w2.sizes());
  const int64_t M = dout.size(0), N = dout.size(1), H = w2.size(1);
  const mlp::Dtype dtype = lt_dtype(dout, op);
  check_operand(dout, {M, N}, dout, "dout", op);
  check_operand(w2, {N, H}, dout, "w2", op);
  check_operand(pre, {M, H}, dout, "pre", op);
  TORCH_CHECK(H % 8 == 0, "masked_dit_C::", op, ": the hidden width ", H, " must be a multiple of 8 (aux layout)");
  const c10::cuda::CUDAGuard guard(dout.device());
  at::Tensor dpre = at::empty({M, H}, dout.options());
  if (M == 0) return {dpre, at::zeros({H}, dout.options())};
  at::Tensor db1 = at::empty({H}, dout.options());
  LtCall call = prepare(dout, op);
  check_status(mlp::dgelu_bgrad(call.handle, dtype, M, H, N, dout.data_ptr(), w2.data_ptr(), pre.data_ptr(),
                                dpre.data_ptr(), db1.data_ptr(), static_cast<int>(algo), call.workspace.data_ptr(),
                                static_cast<size_t>(call.workspace.numel()), call.stream),
               op);
  return {dpre, db1};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(masked_dit_C, m) {
  m.def("linear_gelu_aux(Tensor x, Tensor w1, Tensor b1, int algo) -> (Tensor, Tensor)");
  m.def("dgelu_bgrad(Tensor dout, Tensor w2, Tensor pre, int algo) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(masked_dit_C, CUDA, m) {
  m.impl("linear_gelu_aux", &linear_gelu_aux);
  m.impl("dgelu_bgrad", &dgelu_bgrad);
}
