#include "kernels/reference/reference.h"
#include "kernels/reference/validate.h"

namespace tune::kernels::ref {

Status GemmResidualBf16(const GemmResidualArgs& a) {
  Status s = validate::GemmResidual(a);
  if (!s.ok()) return s;
  for (int64_t i = 0; i < a.rows; ++i) {
    const uint16_t* x = a.x + i * a.x_stride;
    for (int64_t j = 0; j < a.cols; ++j) {
      const uint16_t* w = a.w + j * a.w_stride;
      double acc = 0;
      for (int64_t kk = 0; kk < a.k; ++kk) acc += static_cast<double>(Bf16ToFloat(x[kk])) * Bf16ToFloat(w[kk]);
      // Read before the write: y may be the residual itself.
      const float r = Bf16ToFloat(a.residual[i * a.y_stride + j]);
      a.y[i * a.y_stride + j] = FloatToBf16(static_cast<float>(acc) + r);
    }
  }
  return OkStatus();
}

}  // namespace tune::kernels::ref
