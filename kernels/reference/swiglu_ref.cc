#include <cmath>

#include "kernels/reference/reference.h"
#include "kernels/reference/validate.h"

namespace tune::kernels::ref {

namespace {
float Sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
}  // namespace

Status SwiGluForward(const SwiGluShape& shape, const uint16_t* gate, int64_t gate_stride, const uint16_t* up,
                     int64_t up_stride, uint16_t* h, int64_t h_stride) {
  Status s = validate::SwiGlu(shape, gate, gate_stride, up, up_stride, h, h_stride);
  if (!s.ok()) return s;
  for (int64_t r = 0; r < shape.rows; ++r) {
    for (int64_t j = 0; j < shape.cols; ++j) {
      const float g = Bf16ToFloat(gate[r * gate_stride + j]);
      const float a = RoundBf16(g / (1.0f + std::exp(-g)));
      h[r * h_stride + j] = FloatToBf16(a * Bf16ToFloat(up[r * up_stride + j]));
    }
  }
  return OkStatus();
}

Status SwiGluBackward(const SwiGluShape& shape, const uint16_t* gate, int64_t gate_stride, const uint16_t* up,
                      int64_t up_stride, const uint16_t* dh, int64_t dh_stride, uint16_t* dgate, int64_t dgate_stride,
                      uint16_t* dup, int64_t dup_stride) {
  Status s = validate::SwiGlu(shape, gate, gate_stride, up, up_stride, dh, dh_stride);
  if (s.ok()) s = validate::SwiGlu(shape, gate, gate_stride, up, up_stride, dgate, dgate_stride);
  if (s.ok()) s = validate::SwiGlu(shape, gate, gate_stride, up, up_stride, dup, dup_stride);
  if (!s.ok()) return s;
  for (int64_t r = 0; r < shape.rows; ++r) {
    for (int64_t j = 0; j < shape.cols; ++j) {
      const float g = Bf16ToFloat(gate[r * gate_stride + j]);
      const float u = Bf16ToFloat(up[r * up_stride + j]);
      const float d = Bf16ToFloat(dh[r * dh_stride + j]);
      const float sg = Sigmoid(g);
      const float a = RoundBf16(g / (1.0f + std::exp(-g)));
      const float dsilu = RoundBf16(d * u);
      dup[r * dup_stride + j] = FloatToBf16(d * a);
      dgate[r * dgate_stride + j] = FloatToBf16(dsilu * sg * (1.0f + g * (1.0f - sg)));
    }
  }
  return OkStatus();
}

}  // namespace tune::kernels::ref
