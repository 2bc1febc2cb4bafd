#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/reference/reference.h"
#include "kernels/reference/validate.h"

namespace tune::kernels::ref {

namespace {
float Rstd(const uint16_t* xr, int64_t hidden, float eps) {
  double ss = 0;
  for (int64_t j = 0; j < hidden; ++j) {
    const double v = Bf16ToFloat(xr[j]);
    ss += v * v;
  }
  const float var = static_cast<float>(ss / static_cast<double>(hidden));
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(var + eps)));
}
}  // namespace

Status RmsNormForward(const RmsNormShape& shape, const uint16_t* x, int64_t x_stride, const uint16_t* weight,
                      uint16_t* y, int64_t y_stride, float* rstd) {
  Status s = validate::RmsNorm(shape, x, x_stride, weight, y, y_stride);
  if (!s.ok()) return s;
  for (int64_t r = 0; r < shape.rows; ++r) {
    const uint16_t* xr = x + r * x_stride;
    const float rs = Rstd(xr, shape.hidden, shape.eps);
    if (rstd != nullptr) rstd[r] = rs;
    std::vector<uint16_t> row(shape.hidden);  // y may alias x
    for (int64_t j = 0; j < shape.hidden; ++j) {
      const float n = RoundBf16(Bf16ToFloat(xr[j]) * rs);
      row[j] = FloatToBf16(Bf16ToFloat(weight[j]) * n);
    }
    std::copy(row.begin(), row.end(), y + r * y_stride);
  }
  return OkStatus();
}

Status RmsNormBackward(const RmsNormShape& shape, const uint16_t* x, int64_t x_stride, const uint16_t* weight,
                       const float* rstd, const uint16_t* dy, int64_t dy_stride, uint16_t* dx, int64_t dx_stride,
                       float* dweight) {
  Status s = validate::RmsNormBackward(shape, x, x_stride, weight, rstd, dy, dy_stride, dx, dx_stride);
  if (!s.ok()) return s;
  const int64_t H = shape.hidden;
  std::vector<double> dw(dweight ? H : 0, 0.0);
  std::vector<float> gn(H);
  for (int64_t r = 0; r < shape.rows; ++r) {
    const uint16_t* xr = x + r * x_stride;
    const uint16_t* gr = dy + r * dy_stride;
    const double rs = rstd[r];
    double dot = 0;
    for (int64_t j = 0; j < H; ++j) {
      gn[j] = RoundBf16(Bf16ToFloat(gr[j]) * Bf16ToFloat(weight[j]));
      dot += static_cast<double>(gn[j]) * Bf16ToFloat(xr[j]);
      if (dweight) dw[j] += static_cast<double>(Bf16ToFloat(gr[j])) * RoundBf16(Bf16ToFloat(xr[j]) * rstd[r]);
    }
    const double c = rs * rs * rs * dot / static_cast<double>(H);
    for (int64_t j = 0; j < H; ++j) {
      dx[r * dx_stride + j] = FloatToBf16(static_cast<float>(rs * gn[j] - Bf16ToFloat(xr[j]) * c));
    }
  }
  for (int64_t j = 0; dweight && j < H; ++j) dweight[j] += static_cast<float>(dw[j]);
  return OkStatus();
}

}  // namespace tune::kernels::ref
