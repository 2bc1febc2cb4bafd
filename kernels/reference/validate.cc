#include "kernels/reference/validate.h"

#include <cstdint>

namespace tune::kernels::validate {

Status Nf4(const Nf4View& q, const uint16_t* out) {
  if (q.numel < 0) return InvalidArgument("nf4: numel must be >= 0");
  if (q.block_size <= 0 || q.block_size % 2 != 0) {
    return InvalidArgument("nf4: block_size must be a positive even number (the quantiser's block size)");
  }
  if (q.numel == 0) return OkStatus();
  if (q.packed == nullptr) return InvalidArgument("nf4: packed is null");
  if (out == nullptr) return InvalidArgument("nf4: out is null");
  const bool dq_any = q.absmax_q || q.absmax_scale || q.absmax_offset || q.dynamic_map;
  const bool dq_all = q.absmax_q && q.absmax_scale && q.absmax_offset && q.dynamic_map;
  if (q.absmax != nullptr && dq_any) {
    return InvalidArgument("nf4: set either absmax (plain) or absmax_q/absmax_scale/absmax_offset/dynamic_map "
                           "(double quant), not both");
  }
  if (q.absmax == nullptr && !dq_all) {
    return InvalidArgument("nf4: double quant needs absmax_q, absmax_scale, absmax_offset and dynamic_map all set "
                           "(or set absmax for plain quantisation)");
  }
  return OkStatus();
}

Status Nf4Rows(const Nf4View& q, int64_t row_len, const uint16_t* out, int64_t out_stride) {
  Status s = Nf4(q, out);
  if (!s.ok()) return s;
  if (row_len <= 0 || q.numel % row_len != 0) {
    return InvalidArgument("nf4: row_len must be > 0 and divide numel (whole rows)");
  }
  if (out_stride < row_len) return InvalidArgument("nf4: out_stride must be >= row_len");
  return OkStatus();
}

Status RmsNorm(const RmsNormShape& shape, const void* x, int64_t x_stride, const void* weight, const void* out,
               int64_t out_stride) {
  if (shape.rows < 0) return InvalidArgument("rmsnorm: rows must be >= 0");
  if (shape.hidden <= 0) return InvalidArgument("rmsnorm: hidden must be > 0");
  if (!(shape.eps >= 0.0f)) return InvalidArgument("rmsnorm: eps must be >= 0");
  if (shape.rows == 0) return OkStatus();
  if (x == nullptr || weight == nullptr || out == nullptr) {
    return InvalidArgument("rmsnorm: x, weight and the output must be non-null");
  }
  if (x_stride < shape.hidden || out_stride < shape.hidden) {
    return InvalidArgument("rmsnorm: row strides must be >= hidden (rows may not overlap)");
  }
  return OkStatus();
}

Status RmsNormBackward(const RmsNormShape& shape, const void* x, int64_t x_stride, const void* weight,
                       const float* rstd, const void* dy, int64_t dy_stride, const void* dx, int64_t dx_stride) {
  Status s = RmsNorm(shape, x, x_stride, weight, dx, dx_stride);
  if (!s.ok() || shape.rows == 0) return s;
  if (rstd == nullptr) return InvalidArgument("rmsnorm backward: rstd (from the forward) is null");
  if (dy == nullptr) return InvalidArgument("rmsnorm backward: dy is null");
  if (dy_stride < shape.hidden) return InvalidArgument("rmsnorm backward: dy_stride must be >= hidden");
  return OkStatus();
}

Status Rope(const RopeShape& shape, const RopeTensor& in, const RopeTensor& out, const RopeTables& tables) {
  if (shape.batch < 0 || shape.seq < 0 || shape.heads < 0) {
    return InvalidArgument("rope: batch, seq and heads must be >= 0");
  }
  if (shape.head_dim <= 0 || shape.head_dim % 2 != 0) return InvalidArgument("rope: head_dim must be even and > 0");
  if (shape.batch == 0 || shape.seq == 0 || shape.heads == 0) return OkStatus();
  if (in.data == nullptr || out.data == nullptr) return InvalidArgument("rope: input and output data must be non-null");
  if (tables.cos == nullptr || tables.sin == nullptr) return InvalidArgument("rope: cos and sin tables must be non-null");
  if (in.stride_b < 0 || in.stride_t < 0 || in.stride_h < 0 || out.stride_b < 0 || out.stride_t < 0 ||
      out.stride_h < 0 || tables.stride_b < 0 || tables.stride_t < 0) {
    return InvalidArgument("rope: strides must be >= 0");
  }
  if (in.data == out.data &&
      (in.stride_b != out.stride_b || in.stride_t != out.stride_t || in.stride_h != out.stride_h)) {
    return InvalidArgument("rope: in-place use needs identical input and output strides");
  }
  if (tables.position_ids != nullptr && tables.table_rows <= 0) {
    return InvalidArgument("rope: table_rows must be > 0 when position_ids are given");
  }
  return OkStatus();
}

Status SwiGlu(const SwiGluShape& shape, const void* a, int64_t a_stride, const void* b, int64_t b_stride,
              const void* out, int64_t out_stride) {
  if (shape.rows < 0 || shape.cols < 0) return InvalidArgument("swiglu: rows and cols must be >= 0");
  if (shape.rows == 0 || shape.cols == 0) return OkStatus();
  if (a == nullptr || b == nullptr || out == nullptr) return InvalidArgument("swiglu: a pointer argument is null");
  if (a_stride < shape.cols || b_stride < shape.cols || out_stride < shape.cols) {
    return InvalidArgument("swiglu: row strides must be >= cols");
  }
  if ((out == a && out_stride != a_stride) || (out == b && out_stride != b_stride)) {
    return InvalidArgument("swiglu: an output aliasing an input needs the same row stride");
  }
  return OkStatus();
}

Status LinearCrossEntropy(const LinearCrossEntropyArgs& args, bool need_scratch) {
  if (args.rows < 0) return InvalidArgument("linear_cross_entropy: rows must be >= 0");
  if (args.hidden_dim <= 0) return InvalidArgument("linear_cross_entropy: hidden_dim must be > 0");
  if (args.vocab <= 0) return InvalidArgument("linear_cross_entropy: vocab must be > 0");
  if (args.rows == 0) return OkStatus();
  if (args.hidden == nullptr || args.weight == nullptr || args.labels == nullptr) {
    return InvalidArgument("linear_cross_entropy: hidden, weight and labels must be non-null");
  }
  if (args.hidden_stride < args.hidden_dim || args.weight_stride < args.hidden_dim) {
    return InvalidArgument("linear_cross_entropy: hidden_stride and weight_stride must be >= hidden_dim");
  }
  if (need_scratch) {
    if (args.logits_chunk == nullptr) {
      return InvalidArgument("linear_cross_entropy: logits_chunk (bf16 [chunk_rows, vocab] scratch) is null");
    }
    if (args.chunk_rows <= 0) return InvalidArgument("linear_cross_entropy: chunk_rows must be > 0");
    // cuBLAS takes int dimensions.
    if (args.vocab > INT32_MAX || args.hidden_dim > INT32_MAX || args.chunk_rows > INT32_MAX ||
        args.hidden_stride > INT32_MAX || args.weight_stride > INT32_MAX) {
      return InvalidArgument("linear_cross_entropy: sizes and strides must fit in 32 bits (cuBLAS)");
    }
  }
  return OkStatus();
}

Status ScaleBf16Rows(const void* src, int64_t src_stride, const void* dst, int64_t dst_stride, int64_t rows,
                     int64_t cols, const float* scale) {
  if (rows < 0 || cols < 0) return InvalidArgument("scale_bf16_rows: rows and cols must be >= 0");
  if (rows == 0 || cols == 0) return OkStatus();
  if (src == nullptr || dst == nullptr || scale == nullptr) {
    return InvalidArgument("scale_bf16_rows: src, dst and scale must be non-null");
  }
  if (src_stride < cols || dst_stride < cols) return InvalidArgument("scale_bf16_rows: row strides must be >= cols");
  if (src == dst && src_stride != dst_stride) {
    return InvalidArgument("scale_bf16_rows: dst aliasing src needs the same row stride");
  }
  return OkStatus();
}

namespace {

// Whether the bf16 spans of `rows` rows (`cols` wide, `stride` apart) at a and
// b share an address.
bool Overlap(const void* a, int64_t a_stride, int64_t a_cols, const void* b, int64_t b_stride, int64_t b_cols,
             int64_t rows_a, int64_t rows_b) {
  const auto lo_a = reinterpret_cast<uintptr_t>(a), lo_b = reinterpret_cast<uintptr_t>(b);
  const uintptr_t hi_a = lo_a + 2 * static_cast<uintptr_t>((rows_a - 1) * a_stride + a_cols);
  const uintptr_t hi_b = lo_b + 2 * static_cast<uintptr_t>((rows_b - 1) * b_stride + b_cols);
  return lo_a < hi_b && lo_b < hi_a;
}

}  // namespace

Status GemmResidual(const GemmResidualArgs& a) {
  if (a.rows < 0 || a.cols < 0) return InvalidArgument("gemm_residual: rows and cols must be >= 0");
  if (a.k <= 0) return InvalidArgument("gemm_residual: k must be > 0");
  if (a.rows == 0 || a.cols == 0) return OkStatus();
  if (a.x == nullptr || a.w == nullptr || a.residual == nullptr || a.y == nullptr) {
    return InvalidArgument("gemm_residual: x, w, residual and y must be non-null");
  }
  if (a.x_stride < a.k || a.w_stride < a.k) return InvalidArgument("gemm_residual: x_stride and w_stride must be >= k");
  if (a.y_stride < a.cols) return InvalidArgument("gemm_residual: y_stride must be >= cols");
  if (a.workspace == nullptr && a.workspace_bytes > 0) {
    return InvalidArgument("gemm_residual: workspace is null but workspace_bytes > 0");
  }
  if (a.y != a.residual && Overlap(a.y, a.y_stride, a.cols, a.residual, a.y_stride, a.cols, a.rows, a.rows)) {
    return InvalidArgument("gemm_residual: y must be residual itself or not overlap it");
  }
  if (Overlap(a.y, a.y_stride, a.cols, a.x, a.x_stride, a.k, a.rows, a.rows) ||
      Overlap(a.y, a.y_stride, a.cols, a.w, a.w_stride, a.k, a.rows, a.cols)) {
    return InvalidArgument("gemm_residual: y must not overlap x or w");
  }
  return OkStatus();
}

}  // namespace tune::kernels::validate
