// Thin libtorch bindings of the CUDA kernels in kernels/ (issue 8), used by
// llama_ops.cc on CUDA bf16 tensors. Each Try* function returns an undefined
// tensor when its fused path does not apply (kernels not compiled in, the
// TUNE_DISABLE_FUSED_KERNELS=1 switch, a CPU tensor, a dtype other than bf16,
// an unsupported layout); the caller then runs its torch implementation, which
// stays the reference and the CPU path. When the fused path applies, shapes
// are checked and a kernel failure is raised as c10::Error naming the op.
//
// The fused ops are torch::autograd::Functions with the same gradients as the
// torch ops they replace (for frozen norm and output-projection weights no
// weight gradient is computed or stored, and LM-head weight gradients are not
// supported: the Try function declines when the weight requires grad).
#ifndef TUNE_WORKER_TRAINER_MODEL_CUDA_OPS_H_
#define TUNE_WORKER_TRAINER_MODEL_CUDA_OPS_H_

#include <torch/torch.h>

#include "worker/trainer/model/nf4.h"

namespace tune::model::cuda_ops {

// The kernels were compiled into this binary (torch with CUDA and kernels/
// built with CUDA).
bool Compiled();
// Compiled() and the environment does not set TUNE_DISABLE_FUSED_KERNELS=1
// (read on every call, so a process can A/B both paths).
bool Enabled();

// ops::RmsNorm: x [..., H] bf16 CUDA, weight bf16 [H]. With spare_cols > 0
// the result is a view whose rows sit spare_cols apart more than H, in one
// [rows, H + spare_cols] buffer (the spare columns are not written).
torch::Tensor TryRmsNorm(const torch::Tensor& x, const torch::Tensor& weight, double eps, int64_t spare_cols = 0);
// ops::ApplyRope: x [B, heads, T, d] (any strides, e.g. a transposed
// [B, T, heads, d] projection), cos/sin [B or 1, T, d] bf16 (no grad).
// The result has x's shape in [B, T, heads, d] storage.
torch::Tensor TryApplyRope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);
// ChunkedCrossEntropySum's core: hidden [N, H] bf16 rows that are all
// supervised, weight [V, H] bf16 not requiring grad, labels int64 [N] in
// [0, V). Returns the fp32 loss sum; gradient flows to hidden only. In grad
// mode with hidden requiring grad, the gradient is computed in the forward
// (from the logits at hand) and backward only scales it: [N, H] bf16 held
// from forward to backward instead of hidden itself.
torch::Tensor TryLinearCrossEntropySum(const torch::Tensor& hidden, const torch::Tensor& weight,
                                       const torch::Tensor& labels, int64_t chunk_tokens);

// silu(gate) * up, fused on CUDA bf16 (gate/up [..., I] of equal shape, e.g.
// the two halves of a fused gate/up projection), torch ops otherwise. Always
// returns a result.
torch::Tensor SwiGlu(const torch::Tensor& gate, const torch::Tensor& up);
// The same for gu = [..., 2I], the output of a fused gate/up projection (gate
// in the first I columns): [..., I]. On CUDA bf16 its gradient is written as
// one [..., 2I] tensor, the fused projection's output gradient, with no
// concatenation.
torch::Tensor SwiGluHalves(const torch::Tensor& gu);

// Whether SwiGluHalvesBackwardWithForward runs for tensors like t (the
// kernels are on and t is CUDA bf16).
bool SwiGluBackwardWithForwardApplies(const torch::Tensor& t);
// Without autograd, for gu [N, 2I] (a fused gate/up output, no longer needed)
// and dh [N, I]: {d gu, swiglu(gu)} from one kernel that reads gu once. With
// in_place the gradient overwrites gu. Needs SwiGluBackwardWithForwardApplies.
std::pair<torch::Tensor, torch::Tensor> SwiGluHalvesBackwardWithForward(const torch::Tensor& gu,
                                                                        const torch::Tensor& dh, bool in_place);

// residual + x w^T for 2-D x [N, K], w [M, K], residual [N, M] without
// autograd (inside a node's forward). On CUDA bf16 with contiguous rows the
// GEMM reads the residual in its epilogue (kernels/gemm.h) instead of
// torch::addmm's copy of it into the output first (a [N, M] read and write per
// call); otherwise, or when cuBLASLt offers no algorithm for the layout,
// torch::addmm. Always returns a new [N, M] tensor. AddMmApplies: whether the
// epilogue path is tried.
torch::Tensor AddMm(const torch::Tensor& residual, const torch::Tensor& x, const torch::Tensor& w);
bool AddMmApplies(const torch::Tensor& residual, const torch::Tensor& x, const torch::Tensor& w);

// Dequantises q into `scratch` (bf16, contiguous, on q's CUDA device, at least
// q.numel elements; reused across weights so no per-call allocation happens)
// and returns a view of it with q.shape. Bit-identical to
// nf4::Dequantize(q, kBFloat16). Throws c10::Error when the kernels are not
// compiled in or the arguments do not fit.
torch::Tensor Nf4DequantizeInto(const nf4::Nf4Tensor& q, const torch::Tensor& scratch);

// dst.copy_(src) for 2-D tensors of one dtype and shape; CUDA tensors whose
// rows are contiguous (either may have rows spaced wider) are copied as one
// 2-D memcpy, which torch's strided copy kernel is several times slower at.
void CopyRows(const torch::Tensor& dst, const torch::Tensor& src);
// The same into out, a bf16 [rows, cols] view of q's 2-D shape whose rows may
// be spaced wider than cols (out.stride(1) == 1), e.g. the first cols columns
// of a [rows, cols + r] buffer; the other columns are not touched.
void Nf4DequantizeIntoRows(const nf4::Nf4Tensor& q, const torch::Tensor& out);

}  // namespace tune::model::cuda_ops

#endif  // TUNE_WORKER_TRAINER_MODEL_CUDA_OPS_H_
