#include <limits>

#include "kernels/reference/reference.h"
#include "kernels/reference/validate.h"

namespace tune::kernels::ref {

namespace {

// Every product and the sum rounded to bf16, as torch's bf16 tensor ops.
float MulB(float a, float b) { return RoundBf16(a * b); }

Status Apply(const RopeShape& shape, const RopeTensor& in, const RopeTensor& out, const RopeTables& t, bool backward) {
  Status s = validate::Rope(shape, in, out, t);
  if (!s.ok()) return s;
  const int64_t h = shape.head_dim / 2;
  for (int64_t b = 0; b < shape.batch; ++b) {
    for (int64_t tt = 0; tt < shape.seq; ++tt) {
      const uint16_t* c = nullptr;
      const uint16_t* sn = nullptr;
      bool valid = true;
      if (t.position_ids != nullptr) {
        const int64_t p = t.position_ids[b * shape.seq + tt];
        valid = p >= 0 && p < t.table_rows;
        if (valid) c = t.cos + p * t.stride_t, sn = t.sin + p * t.stride_t;
      } else {
        c = t.cos + b * t.stride_b + tt * t.stride_t;
        sn = t.sin + b * t.stride_b + tt * t.stride_t;
      }
      for (int64_t hd = 0; hd < shape.heads; ++hd) {
        const uint16_t* xr = in.data + b * in.stride_b + tt * in.stride_t + hd * in.stride_h;
        uint16_t* orow = out.data + b * out.stride_b + tt * out.stride_t + hd * out.stride_h;
        for (int64_t i = 0; i < h; ++i) {
          if (!valid) {
            orow[i] = orow[i + h] = FloatToBf16(std::numeric_limits<float>::quiet_NaN());
            continue;
          }
          const float x1 = Bf16ToFloat(xr[i]), x2 = Bf16ToFloat(xr[i + h]);
          const float c1 = Bf16ToFloat(c[i]), c2 = Bf16ToFloat(c[i + h]);
          const float s1 = Bf16ToFloat(sn[i]), s2 = Bf16ToFloat(sn[i + h]);
          float o1, o2;
          if (!backward) {
            o1 = MulB(x1, c1) + MulB(-x2, s1);
            o2 = MulB(x2, c2) + MulB(x1, s2);
          } else {
            o1 = MulB(x1, c1) + MulB(x2, s2);
            o2 = MulB(x2, c2) - MulB(x1, s1);
          }
          orow[i] = FloatToBf16(o1);
          orow[i + h] = FloatToBf16(o2);
        }
      }
    }
  }
  return OkStatus();
}

}  // namespace

Status RopeForward(const RopeShape& shape, const RopeTensor& x, const RopeTensor& out, const RopeTables& tables) {
  return Apply(shape, x, out, tables, /*backward=*/false);
}

Status RopeBackward(const RopeShape& shape, const RopeTensor& g, const RopeTensor& dx, const RopeTables& tables) {
  return Apply(shape, g, dx, tables, /*backward=*/true);
}

}  // namespace tune::kernels::ref
