#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/reference/reference.h"
#include "kernels/reference/validate.h"

namespace tune::kernels::ref {

namespace {

// Row r's bf16 logits (double dot products rounded to bf16), as floats.
std::vector<float> RowLogits(const LinearCrossEntropyArgs& a, int64_t r) {
  std::vector<float> h(a.hidden_dim);
  for (int64_t k = 0; k < a.hidden_dim; ++k) h[k] = Bf16ToFloat(a.hidden[r * a.hidden_stride + k]);
  std::vector<float> out(a.vocab);
  for (int64_t v = 0; v < a.vocab; ++v) {
    const uint16_t* w = a.weight + v * a.weight_stride;
    double acc = 0;
    for (int64_t k = 0; k < a.hidden_dim; ++k) acc += static_cast<double>(h[k]) * Bf16ToFloat(w[k]);
    out[v] = RoundBf16(static_cast<float>(acc));
  }
  return out;
}

bool LabelValid(int64_t y, int64_t vocab) { return y >= 0 && y < vocab; }

}  // namespace

Status LinearCrossEntropyForward(const LinearCrossEntropyArgs& args, float* lse, float* row_loss, float* loss_sum) {
  Status s = validate::LinearCrossEntropy(args, /*need_scratch=*/false);
  if (!s.ok()) return s;
  double total = 0;
  for (int64_t r = 0; r < args.rows; ++r) {
    const std::vector<float> logits = RowLogits(args, r);
    double m = -std::numeric_limits<double>::infinity();
    for (float v : logits) m = std::max(m, static_cast<double>(v));
    double sum = 0;
    for (float v : logits) sum += std::exp(v - m);
    const double l = m + std::log(sum);
    lse[r] = static_cast<float>(l);
    const int64_t y = args.labels[r];
    double loss = 0;
    if (y != kIgnoreIndex) {
      loss = LabelValid(y, args.vocab) ? l - logits[y] : std::numeric_limits<double>::quiet_NaN();
    }
    row_loss[r] = static_cast<float>(loss);
    total += loss;
  }
  *loss_sum = static_cast<float>(total);
  return OkStatus();
}

Status LinearCrossEntropyBackward(const LinearCrossEntropyArgs& args, const float* lse, const float* grad_scale,
                                  uint16_t* dhidden, int64_t dhidden_stride) {
  Status s = validate::LinearCrossEntropy(args, /*need_scratch=*/false);
  if (!s.ok()) return s;
  if (lse == nullptr || grad_scale == nullptr || dhidden == nullptr) {
    return InvalidArgument("linear_cross_entropy backward: lse, grad_scale and dhidden must be non-null");
  }
  if (dhidden_stride < args.hidden_dim) {
    return InvalidArgument("linear_cross_entropy backward: dhidden_stride must be >= hidden_dim");
  }
  std::vector<double> acc(args.hidden_dim);
  for (int64_t r = 0; r < args.rows; ++r) {
    std::fill(acc.begin(), acc.end(), 0.0);
    const int64_t y = args.labels[r];
    if (y != kIgnoreIndex) {
      const std::vector<float> logits = RowLogits(args, r);
      for (int64_t v = 0; v < args.vocab; ++v) {
        float p = std::exp(logits[v] - lse[r]);
        if (v == y) p -= 1.0f;
        const float d = RoundBf16(p * *grad_scale);
        if (d == 0.0f) continue;
        const uint16_t* w = args.weight + v * args.weight_stride;
        for (int64_t k = 0; k < args.hidden_dim; ++k) acc[k] += static_cast<double>(d) * Bf16ToFloat(w[k]);
      }
    }
    for (int64_t k = 0; k < args.hidden_dim; ++k) {
      dhidden[r * dhidden_stride + k] = FloatToBf16(static_cast<float>(acc[k]));
    }
  }
  return OkStatus();
}

Status LinearCrossEntropyForwardWithGrad(const LinearCrossEntropyArgs& args, float* lse, float* row_loss,
                                         float* loss_sum, uint16_t* dhidden, int64_t dhidden_stride) {
  Status s = LinearCrossEntropyForward(args, lse, row_loss, loss_sum);
  if (!s.ok() || args.rows == 0) return s;
  const float one = 1.0f;
  return LinearCrossEntropyBackward(args, lse, &one, dhidden, dhidden_stride);
}

Status ScaleBf16Rows(const uint16_t* src, int64_t src_stride, uint16_t* dst, int64_t dst_stride, int64_t rows,
                     int64_t cols, const float* scale) {
  Status s = validate::ScaleBf16Rows(src, src_stride, dst, dst_stride, rows, cols, scale);
  if (!s.ok()) return s;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      dst[r * dst_stride + c] = FloatToBf16(Bf16ToFloat(src[r * src_stride + c]) * *scale);
    }
  }
  return OkStatus();
}

}  // namespace tune::kernels::ref
