// GEMM with the residual added in cuBLASLt's epilogue. Row-major y = r + x w^T
// is column-major y^T = w x^T + r^T: A = w (k x cols, transposed), B = x
// (k x rows), C = residual, D = y (cols x rows), all with their row strides as
// leading dimensions. No kernel of our own runs: this file only drives
// cuBLASLt (host code).
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <map>
#include <optional>
#include <tuple>

#include "kernels/reference/validate.h"
#include "kernels/src/common.cuh"
#include "tune/kernels/gemm.h"

namespace tune::kernels {
namespace {

using detail::CublasStatus;

// The alignment (bytes, at most 16) every row of a matrix at p with this row
// stride starts on.
uint32_t RowAlignment(const void* p, int64_t stride) {
  const uintptr_t v = reinterpret_cast<uintptr_t>(p) | static_cast<uintptr_t>(stride * 2) | 16;
  return static_cast<uint32_t>(v & (~v + 1));
}

// Descriptors freed on scope exit.
struct Descs {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, cd = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~Descs() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (cd) cublasLtMatrixLayoutDestroy(cd);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

template <typename T>
Status SetPref(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attr, T value) {
  return CublasStatus(cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof(value)));
}

// handle (one per thread and device), rows, cols, k, strides, alignments,
// workspace: what the heuristic sees.
using AlgoKey = std::tuple<cublasLtHandle_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, uint32_t, uint32_t, uint32_t,
                           uint32_t, size_t>;

}  // namespace

Status GemmResidualBf16(const GemmResidualArgs& a, cudaStream_t stream) {
  Status s = validate::GemmResidual(a);
  if (!s.ok() || a.rows == 0 || a.cols == 0) return s;
  cublasLtHandle_t handle;
  s = detail::ThreadDeviceHandle([](cublasLtHandle_t* h) { return CublasStatus(cublasLtCreate(h)); }, &handle);
  if (!s.ok()) return s;

  Descs d;
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  if (!(s = CublasStatus(cublasLtMatmulDescCreate(&d.op, CUBLAS_COMPUTE_32F, CUDA_R_32F))).ok()) return s;
  if (!(s = CublasStatus(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)))).ok()) return s;
  if (!(s = CublasStatus(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)))).ok()) return s;
  if (!(s = CublasStatus(cublasLtMatrixLayoutCreate(&d.a, CUDA_R_16BF, a.k, a.cols, a.w_stride))).ok()) return s;
  if (!(s = CublasStatus(cublasLtMatrixLayoutCreate(&d.b, CUDA_R_16BF, a.k, a.rows, a.x_stride))).ok()) return s;
  if (!(s = CublasStatus(cublasLtMatrixLayoutCreate(&d.cd, CUDA_R_16BF, a.cols, a.rows, a.y_stride))).ok()) return s;

  const uint32_t align_w = RowAlignment(a.w, a.w_stride), align_x = RowAlignment(a.x, a.x_stride);
  const uint32_t align_r = RowAlignment(a.residual, a.y_stride), align_y = RowAlignment(a.y, a.y_stride);
  const AlgoKey key{handle, a.rows, a.cols, a.k, a.x_stride, a.w_stride, a.y_stride,
                    align_x, align_w, align_r, align_y, a.workspace_bytes};
  // Asking the heuristic costs tens of microseconds of host time; a step
  // repeats the same few shapes hundreds of times. No algorithm (nullopt) is
  // remembered too.
  thread_local std::map<AlgoKey, std::optional<cublasLtMatmulAlgo_t>> algos;
  auto it = algos.find(key);
  if (it == algos.end()) {
    if (!(s = CublasStatus(cublasLtMatmulPreferenceCreate(&d.pref))).ok()) return s;
    const uint64_t ws = a.workspace_bytes;
    if (!(s = SetPref(d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, ws)).ok()) return s;
    if (!(s = SetPref(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_w)).ok()) return s;
    if (!(s = SetPref(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_x)).ok()) return s;
    if (!(s = SetPref(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_r)).ok()) return s;
    if (!(s = SetPref(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_y)).ok()) return s;
    // Split-K partial sums only in fp32 (the compute type), never in the
    // bf16 output: one rounding, as the contract says.
    const uint32_t reductions = CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
    if (!(s = SetPref(d.pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, reductions)).ok()) return s;
    cublasLtMatmulHeuristicResult_t result = {};
    int found = 0;
    s = CublasStatus(cublasLtMatmulAlgoGetHeuristic(handle, d.op, d.a, d.b, d.cd, d.cd, d.pref, 1, &result, &found));
    if (!s.ok()) return s;
    const bool usable = found > 0 && result.state == CUBLAS_STATUS_SUCCESS;
    it = algos.emplace(key, usable ? std::optional(result.algo) : std::nullopt).first;
  }
  if (!it->second) {
    return {StatusCode::kUnsupported, "gemm_residual: cuBLASLt offers no algorithm for this shape and alignment"};
  }
  const float alpha = 1.0f, beta = 1.0f;
  return CublasStatus(cublasLtMatmul(handle, d.op, &alpha, a.w, d.a, a.x, d.b, &beta, a.residual, d.cd, a.y, d.cd,
                                 &*it->second, a.workspace, a.workspace_bytes, stream));
}

}  // namespace tune::kernels
