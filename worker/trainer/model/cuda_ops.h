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

// ops::RmsNorm: x [..., H] bf16 CUDA, weight bf16 [H].
torch::Tensor TryRmsNorm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
// ops::ApplyRope: x [B, heads, T, d] (any strides, e.g. a transposed
// [B, T, heads, d] projection), cos/sin [B or 1, T, d] bf16 (no grad).
// The result has x's shape in [B, T, heads, d] storage.
torch::Tensor TryApplyRope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);
// ChunkedCrossEntropySum's core: hidden [N, H] bf16 rows that are all
// supervised, weight [V, H] bf16 not requiring grad, labels int64 [N] in
// [0, V). Returns the fp32 loss sum; gradient flows to hidden only.
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

// Dequantises q into `scratch` (bf16, contiguous, on q's CUDA device, at least
// q.numel elements; reused across weights so no per-call allocation happens)
// and returns a view of it with q.shape. Bit-identical to
// nf4::Dequantize(q, kBFloat16). Throws c10::Error when the kernels are not
// compiled in or the arguments do not fit.
torch::Tensor Nf4DequantizeInto(const nf4::Nf4Tensor& q, const torch::Tensor& scratch);

}  // namespace tune::model::cuda_ops

#endif  // TUNE_WORKER_TRAINER_MODEL_CUDA_OPS_H_
