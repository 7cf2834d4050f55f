// fc1 + GELU(tanh) and its backward as cuBLASLt GEMMs with epilogues; see mlp_gemm.h for the layouts.
#include "kernels/mlp_gemm.h"

#include <cstdint>
#include <mutex>

namespace masked_dit {
namespace mlp {
namespace {

#define MASKED_DIT_LT_TRY(expr)                            \
  do {                                                     \
    const cublasStatus_t status_ = (expr);                 \
    if (status_ != CUBLAS_STATUS_SUCCESS) return status_;  \
  } while (0)

// Descriptors are destroyed on every return path, including the early error returns.
struct MatmulDesc {
  cublasLtMatmulDesc_t desc = nullptr;
  ~MatmulDesc() { if (desc != nullptr) cublasLtMatmulDescDestroy(desc); }
};
struct Layout {
  cublasLtMatrixLayout_t desc = nullptr;
  ~Layout() { if (desc != nullptr) cublasLtMatrixLayoutDestroy(desc); }
};
struct Preference {
  cublasLtMatmulPreference_t desc = nullptr;
  ~Preference() { if (desc != nullptr) cublasLtMatmulPreferenceDestroy(desc); }
};

// D [m x n, column-major, leading dimension m] = epilogue(op_a(A) * op_b(B)).
struct Gemm {
  cublasOperation_t op_a, op_b;
  int64_t m, n, k;
  const void* a;
  int64_t lda;
  const void* b;
  int64_t ldb;
  void* d;
  cublasLtEpilogue_t epilogue;
  const void* bias;  // the epilogue's bias vector [m]: read (GELU_AUX_BIAS) or written (DGELU_BGRAD)
  const void* aux;   // the pre-activation [m x n], leading dimension m: written or read
};

// The largest power of two (at most 256) that divides the address: the heuristic assumes 256-byte aligned
// matrices unless told otherwise, and would pick kernels a view at a smaller offset cannot run.
uint32_t alignment(const void* ptr) {
  const auto address = reinterpret_cast<uintptr_t>(ptr);
  uint32_t align = 256;
  while (align > 1 && address % align != 0) align /= 2;
  return align;
}

cublasStatus_t run(cublasLtHandle_t handle, Dtype dtype, const Gemm& g, int algo, void* workspace,
                   size_t workspace_size, cudaStream_t stream) {
  if (algo < 0 || algo >= kMaxAlgos) return CUBLAS_STATUS_INVALID_VALUE;
  if (reinterpret_cast<uintptr_t>(workspace) % 256 != 0) return CUBLAS_STATUS_INVALID_VALUE;  // cuBLAS needs 256
  const cudaDataType_t type = dtype == Dtype::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F;
  MatmulDesc op;
  MASKED_DIT_LT_TRY(cublasLtMatmulDescCreate(&op.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  MASKED_DIT_LT_TRY(cublasLtMatmulDescSetAttribute(op.desc, CUBLASLT_MATMUL_DESC_TRANSA, &g.op_a, sizeof(g.op_a)));
  MASKED_DIT_LT_TRY(cublasLtMatmulDescSetAttribute(op.desc, CUBLASLT_MATMUL_DESC_TRANSB, &g.op_b, sizeof(g.op_b)));
  MASKED_DIT_LT_TRY(cublasLtMatmulDescSetAttribute(op.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &g.epilogue,
                                                   sizeof(g.epilogue)));
  // bias and aux take the D type (their data-type attributes are left at "same as D")
  MASKED_DIT_LT_TRY(cublasLtMatmulDescSetAttribute(op.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)));
  MASKED_DIT_LT_TRY(cublasLtMatmulDescSetAttribute(op.desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &g.aux,
                                                   sizeof(g.aux)));
  const int64_t ld_aux = g.m;
  MASKED_DIT_LT_TRY(cublasLtMatmulDescSetAttribute(op.desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &ld_aux,
                                                   sizeof(ld_aux)));

  Layout a, b, d;
  const bool a_n = g.op_a == CUBLAS_OP_N, b_n = g.op_b == CUBLAS_OP_N;
  MASKED_DIT_LT_TRY(cublasLtMatrixLayoutCreate(&a.desc, type, a_n ? g.m : g.k, a_n ? g.k : g.m, g.lda));
  MASKED_DIT_LT_TRY(cublasLtMatrixLayoutCreate(&b.desc, type, b_n ? g.k : g.n, b_n ? g.n : g.k, g.ldb));
  MASKED_DIT_LT_TRY(cublasLtMatrixLayoutCreate(&d.desc, type, g.m, g.n, g.m));

  Preference pref;
  MASKED_DIT_LT_TRY(cublasLtMatmulPreferenceCreate(&pref.desc));
  MASKED_DIT_LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref.desc, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                         &workspace_size, sizeof(workspace_size)));
  const uint32_t align_a = alignment(g.a), align_b = alignment(g.b), align_d = alignment(g.d);
  MASKED_DIT_LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref.desc, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                         &align_a, sizeof(align_a)));
  MASKED_DIT_LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref.desc, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                         &align_b, sizeof(align_b)));
  MASKED_DIT_LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref.desc, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                                         &align_d, sizeof(align_d)));  // C is D (beta 0)
  MASKED_DIT_LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref.desc, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                         &align_d, sizeof(align_d)));
  cublasLtMatmulHeuristicResult_t candidates[kMaxAlgos] = {};
  int found = 0;
  MASKED_DIT_LT_TRY(cublasLtMatmulAlgoGetHeuristic(handle, op.desc, a.desc, b.desc, d.desc, d.desc, pref.desc,
                                                   algo + 1, candidates, &found));
  if (found == 0) return CUBLAS_STATUS_NOT_SUPPORTED;
  const cublasLtMatmulHeuristicResult_t& chosen = candidates[algo < found ? algo : found - 1];
  const float alpha = 1.0f, beta = 0.0f;  // beta 0: D is write-only, C is D's own layout
  return cublasLtMatmul(handle, op.desc, &alpha, g.a, a.desc, g.b, b.desc, &beta, g.d, d.desc, g.d, d.desc,
                        &chosen.algo, workspace, workspace_size, stream);
}

constexpr int kMaxDevices = 64;

}  // namespace

size_t workspace_bytes(int device) {
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    (void)cudaGetLastError();  // clear it: the caller's next launch must not report this
    major = 0;
  }
  return static_cast<size_t>(major >= 9 ? 32 : 4) << 20;
}

cublasStatus_t handle_for_device(int device, cublasLtHandle_t* handle) {
  static std::mutex mutex;
  static cublasLtHandle_t handles[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) return CUBLAS_STATUS_INVALID_VALUE;
  std::lock_guard<std::mutex> lock(mutex);
  if (handles[device] == nullptr) MASKED_DIT_LT_TRY(cublasLtCreate(&handles[device]));
  *handle = handles[device];
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t linear_gelu_aux(cublasLtHandle_t handle, Dtype dtype, int64_t M, int64_t H, int64_t K,
                               const void* x, const void* w1, const void* b1, void* act, void* pre, int algo,
                               void* workspace, size_t workspace_size, cudaStream_t stream) {
  if (M <= 0 || H <= 0 || K <= 0) return CUBLAS_STATUS_INVALID_VALUE;
  const Gemm g{CUBLAS_OP_T, CUBLAS_OP_N, /*m=*/H, /*n=*/M, /*k=*/K, w1, /*lda=*/K, x, /*ldb=*/K, act,
               CUBLASLT_EPILOGUE_GELU_AUX_BIAS, b1, pre};
  return run(handle, dtype, g, algo, workspace, workspace_size, stream);
}

cublasStatus_t dgelu_bgrad(cublasLtHandle_t handle, Dtype dtype, int64_t M, int64_t H, int64_t N,
                           const void* dout, const void* w2, const void* pre, void* dpre, void* db1, int algo,
                           void* workspace, size_t workspace_size, cudaStream_t stream) {
  if (M <= 0 || H <= 0 || N <= 0) return CUBLAS_STATUS_INVALID_VALUE;
  const Gemm g{CUBLAS_OP_N, CUBLAS_OP_N, /*m=*/H, /*n=*/M, /*k=*/N, w2, /*lda=*/H, dout, /*ldb=*/N, dpre,
               CUBLASLT_EPILOGUE_DGELU_BGRAD, db1, pre};
  return run(handle, dtype, g, algo, workspace, workspace_size, stream);
}

}  // namespace mlp
}  // namespace masked_dit
