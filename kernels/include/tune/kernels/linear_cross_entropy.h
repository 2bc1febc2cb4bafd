// Fused output projection + cross-entropy, chunked over tokens, that never
// materialises fp32 logits (the trainer's ops::ChunkedCrossEntropySum).
// For each chunk of `chunk_rows` tokens:
//   logits = hidden_chunk @ weight^T   bf16 out, fp32 accumulate (cuBLAS), into
//                                      the caller's reused bf16 scratch buffer
//   forward:  lse = logsumexp(float(logits)) (online over the vocab, fp32),
//             row_loss = lse - float(logits[label]); 0 where label == -100
//   backward: logits are recomputed, overwritten in place with
//             dlogits = bf16((exp(logit - lse) - onehot(label)) * grad_scale)
//             (zero rows where label == -100), then
//             dhidden_chunk = dlogits @ weight (cuBLAS, bf16 out).
// loss_sum = sum of row_loss in a fixed order (deterministic).
// Labels must be -100 or in [0, vocab); any other label gives a NaN row loss.
// No gradient for weight is computed (it is frozen in QLoRA).
// Layout: hidden [rows, hidden_dim] and weight [vocab, hidden_dim] bf16 with
// row strides (elements) and contiguous last dims; labels int64 [rows];
// logits_chunk bf16 [chunk_rows, vocab] contiguous; lse, row_loss fp32
// [rows]; loss_sum fp32 [1]; grad_scale fp32 [1] (device, so the upstream
// gradient is never copied to the host); dhidden [rows, hidden_dim] bf16 with
// a row stride. Device pointers, 2-byte alignment suffices. Outputs must not
// overlap inputs. A cuBLAS handle is created per host thread and device on
// first use and bound to `stream` on each call.
#ifndef TUNE_KERNELS_INCLUDE_TUNE_KERNELS_LINEAR_CROSS_ENTROPY_H_
#define TUNE_KERNELS_INCLUDE_TUNE_KERNELS_LINEAR_CROSS_ENTROPY_H_

#include <cstdint>

#include "tune/kernels/status.h"
#include "tune/kernels/stream.h"

namespace tune::kernels {

constexpr int64_t kIgnoreIndex = -100;

struct LinearCrossEntropyArgs {
  const uint16_t* hidden = nullptr;
  int64_t hidden_stride = 0;
  const uint16_t* weight = nullptr;
  int64_t weight_stride = 0;
  const int64_t* labels = nullptr;
  int64_t rows = 0, hidden_dim = 0, vocab = 0;
  uint16_t* logits_chunk = nullptr;  // scratch, [chunk_rows, vocab]
  int64_t chunk_rows = 0;
};

Status LinearCrossEntropyForward(const LinearCrossEntropyArgs& args, float* lse, float* row_loss, float* loss_sum,
                                 cudaStream_t stream);

// d(loss_sum * grad_scale)/d hidden into dhidden; lse is the forward's.
Status LinearCrossEntropyBackward(const LinearCrossEntropyArgs& args, const float* lse, const float* grad_scale,
                                  uint16_t* dhidden, int64_t dhidden_stride, cudaStream_t stream);

// Forward that also writes d(loss_sum)/d hidden into dhidden: the same bits as
// Backward with *grad_scale == 1, from the logits the forward computed anyway,
// so training computes each chunk's logits once instead of twice. The caller
// applies the upstream gradient later with ScaleBf16Rows (one more bf16
// rounding than Backward with that grad_scale).
Status LinearCrossEntropyForwardWithGrad(const LinearCrossEntropyArgs& args, float* lse, float* row_loss,
                                         float* loss_sum, uint16_t* dhidden, int64_t dhidden_stride,
                                         cudaStream_t stream);

// dst = bf16(float(src) * *scale) over [rows, cols] bf16 with row strides
// (elements); dst may be src (same stride). scale: one fp32 on the device.
Status ScaleBf16Rows(const uint16_t* src, int64_t src_stride, uint16_t* dst, int64_t dst_stride, int64_t rows,
                     int64_t cols, const float* scale, cudaStream_t stream);

}  // namespace tune::kernels

#endif  // TUNE_KERNELS_INCLUDE_TUNE_KERNELS_LINEAR_CROSS_ENTROPY_H_
