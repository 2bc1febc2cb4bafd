// NF4 dequantisation and bf16 conversions on the CPU.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/reference/reference.h"
#include "kernels/reference/validate.h"

namespace tune::kernels::ref {

float Bf16ToFloat(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

uint16_t FloatToBf16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

std::array<float, 256> Nf4DynamicMap() {
  // Exponent i in 0..6: 2^i midpoints of linspace(0.1, 1, 2^i + 1) (torch's
  // fp32 linspace: from the start below the half, from the end above),
  // scaled by 10^(i-6), both signs; then 0 and 1.
  std::vector<float> data;
  for (int i = 0; i < 7; ++i) {
    const int64_t items = (int64_t{1} << i) + 1;
    const float start = 0.1f, end = 1.0f;
    const float step = (end - start) / static_cast<float>(items - 1);
    std::vector<float> b(items);
    for (int64_t k = 0; k < items; ++k) {
      b[k] = k < items / 2 ? start + step * static_cast<float>(k) : end - step * static_cast<float>(items - k - 1);
    }
    const float scale = static_cast<float>(std::pow(10.0, -6 + i));
    for (int sign : {1, -1}) {
      for (int64_t k = 0; k + 1 < items; ++k) data.push_back((b[k] + b[k + 1]) / 2.0f * (sign * scale));
    }
  }
  data.push_back(0.0f);
  data.push_back(1.0f);
  std::sort(data.begin(), data.end());
  std::array<float, 256> out{};
  std::copy(data.begin(), data.end(), out.begin());
  return out;
}

Status Nf4DequantizeBf16Rows(const Nf4View& q, int64_t row_len, uint16_t* out, int64_t out_stride) {
  Status s = validate::Nf4Rows(q, row_len, out, out_stride);
  if (!s.ok()) return s;
  for (int64_t i = 0; i < q.numel; ++i) {
    const int64_t block = i / q.block_size;
    float absmax;
    if (q.absmax != nullptr) {
      absmax = q.absmax[block];
    } else {
      // Two fp32 roundings, as the trainer's separate tensor ops (no FMA).
      volatile float scaled = q.dynamic_map[q.absmax_q[block]] * q.absmax_scale[block / kNf4DoubleQuantBlock];
      absmax = scaled + q.absmax_offset[0];
    }
    const uint8_t byte = q.packed[i / 2];
    const int code = (i % 2 == 0) ? (byte >> 4) : (byte & 15);
    volatile float v = kNf4CodeTable[code] * absmax;
    out[i / row_len * out_stride + i % row_len] = FloatToBf16(v);
  }
  return OkStatus();
}

Status Nf4DequantizeBf16(const Nf4View& q, uint16_t* out) {
  const int64_t all = std::max<int64_t>(q.numel, 1);
  return Nf4DequantizeBf16Rows(q, all, out, all);
}

}  // namespace tune::kernels::ref
