#include "worker/trainer/model/cuda_ops.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#ifdef TUNE_HAVE_FUSED_KERNELS
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <map>
#include <mutex>

#include "tune/kernels/gemm.h"
#include "tune/kernels/linear_cross_entropy.h"
#include "tune/kernels/nf4.h"
#include "tune/kernels/rmsnorm.h"
#include "tune/kernels/rope.h"
#include "tune/kernels/swiglu.h"
#endif

namespace tune::model::cuda_ops {

bool Compiled() {
#ifdef TUNE_HAVE_FUSED_KERNELS
  return true;
#else
  return false;
#endif
}

bool Enabled() {
  const char* off = std::getenv("TUNE_DISABLE_FUSED_KERNELS");
  return Compiled() && !(off != nullptr && std::strcmp(off, "1") == 0);
}

#ifdef TUNE_HAVE_FUSED_KERNELS
namespace {

namespace k = tune::kernels;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool IsCudaBf16(const torch::Tensor& t) {
  return t.defined() && t.is_cuda() && t.scalar_type() == torch::kBFloat16;
}

const uint16_t* Bf16(const torch::Tensor& t) { return static_cast<const uint16_t*>(t.data_ptr()); }
uint16_t* Bf16Mut(const torch::Tensor& t) { return static_cast<uint16_t*>(t.data_ptr()); }

cudaStream_t Stream(const torch::Tensor& t) { return at::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

void Check(const k::Status& s, const char* op) {
  TORCH_CHECK(s.ok(), op, " kernel failed (", k::StatusCodeName(s.code), "): ", s.message);
}

class RmsNormFn : public torch::autograd::Function<RmsNormFn> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, torch::Tensor weight, double eps,
                               int64_t spare_cols) {
    c10::cuda::CUDAGuard guard(x.device());
    const int64_t H = x.size(-1);
    torch::Tensor x2 = x.contiguous().view({-1, H});
    torch::Tensor w = weight.contiguous();
    torch::Tensor y = torch::empty({x2.size(0), H + spare_cols}, x2.options());
    torch::Tensor rstd = torch::empty({x2.size(0)}, x.options().dtype(torch::kFloat32));
    Check(k::RmsNormForward({x2.size(0), H, static_cast<float>(eps)}, Bf16(x2), H, Bf16(w), Bf16Mut(y), y.stride(0),
                            rstd.data_ptr<float>(), Stream(x)),
          "rmsnorm forward");
    ctx->save_for_backward({x2, w, rstd});
    ctx->saved_data["eps"] = eps;
    return y.narrow(1, 0, H).view(x.sizes());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    variable_list saved = ctx->get_saved_variables();
    const torch::Tensor &x2 = saved[0], &w = saved[1], &rstd = saved[2];
    c10::cuda::CUDAGuard guard(x2.device());
    const int64_t H = x2.size(1);
    // Rows spaced wider than H (a column view, e.g. a folded projection's
    // dx) are read in place.
    torch::Tensor dy = grad[0].to(torch::kBFloat16).reshape({-1, H});
    if (dy.stride(1) != 1 || (dy.size(0) > 1 && dy.stride(0) < H)) dy = dy.contiguous();
    const int64_t dy_stride = dy.size(0) > 1 ? dy.stride(0) : H;  // one row: its stride is arbitrary
    torch::Tensor dx = torch::empty_like(x2);
    torch::Tensor dw;  // only when the norm weight is trainable
    if (ctx->needs_input_grad(1)) dw = torch::zeros({H}, x2.options().dtype(torch::kFloat32));
    const float eps = static_cast<float>(ctx->saved_data["eps"].toDouble());
    Check(k::RmsNormBackward({x2.size(0), H, eps}, Bf16(x2), H, Bf16(w), rstd.data_ptr<float>(), Bf16(dy), dy_stride,
                             Bf16Mut(dx), H, dw.defined() ? dw.data_ptr<float>() : nullptr, Stream(x2)),
          "rmsnorm backward");
    return {dx.view(grad[0].sizes()), dw.defined() ? dw.to(w.scalar_type()) : torch::Tensor(), torch::Tensor(),
            torch::Tensor()};
  }
};

// x and the result are [B, heads, T, d] views; the kernels address them as
// [B, T, heads, d] through their strides.
k::RopeTensor AsRope(const torch::Tensor& t) { return {Bf16Mut(t), t.stride(0), t.stride(2), t.stride(1)}; }

k::RopeTables Tables(const torch::Tensor& cos, const torch::Tensor& sin) {
  // A batch of 1 broadcasts over B.
  return {Bf16(cos), Bf16(sin), cos.size(0) == 1 ? 0 : cos.stride(0), cos.stride(1), nullptr, 0};
}

torch::Tensor EmptyRopeLike(const torch::Tensor& x) {
  return torch::empty({x.size(0), x.size(2), x.size(1), x.size(3)}, x.options()).transpose(1, 2);
}

class RopeFn : public torch::autograd::Function<RopeFn> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
    c10::cuda::CUDAGuard guard(x.device());
    if (x.stride(3) != 1) x = x.contiguous();
    torch::Tensor out = EmptyRopeLike(x);
    const k::RopeShape shape{x.size(0), x.size(2), x.size(1), x.size(3)};
    Check(k::RopeForward(shape, AsRope(x), AsRope(out), Tables(cos, sin), Stream(x)), "rope forward");
    ctx->save_for_backward({cos, sin});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    variable_list saved = ctx->get_saved_variables();
    torch::Tensor g = grad[0].to(torch::kBFloat16);
    c10::cuda::CUDAGuard guard(g.device());
    if (g.stride(3) != 1) g = g.contiguous();
    torch::Tensor dx = EmptyRopeLike(g);
    const k::RopeShape shape{g.size(0), g.size(2), g.size(1), g.size(3)};
    Check(k::RopeBackward(shape, AsRope(g), AsRope(dx), Tables(saved[0], saved[1]), Stream(g)), "rope backward");
    return {dx, torch::Tensor(), torch::Tensor()};
  }
};

// [rows, cols] view with a contiguous last dim and one row stride.
torch::Tensor Rows(const torch::Tensor& t) {
  torch::Tensor r = t.reshape({-1, t.size(-1)});
  return r.stride(1) == 1 ? r : r.contiguous();
}

class SwiGluFn : public torch::autograd::Function<SwiGluFn> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor gate, torch::Tensor up) {
    c10::cuda::CUDAGuard guard(gate.device());
    torch::Tensor g = Rows(gate), u = Rows(up);
    torch::Tensor h = torch::empty({g.size(0), g.size(1)}, gate.options());
    Check(k::SwiGluForward({g.size(0), g.size(1)}, Bf16(g), g.stride(0), Bf16(u), u.stride(0), Bf16Mut(h), h.size(1),
                           Stream(gate)),
          "swiglu forward");
    ctx->save_for_backward({g, u});
    return h.view(gate.sizes());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    variable_list saved = ctx->get_saved_variables();
    const torch::Tensor &g = saved[0], &u = saved[1];
    c10::cuda::CUDAGuard guard(g.device());
    torch::Tensor dh = Rows(grad[0].to(torch::kBFloat16));
    torch::Tensor dg = torch::empty({g.size(0), g.size(1)}, g.options()), du = torch::empty_like(dg);
    Check(k::SwiGluBackward({g.size(0), g.size(1)}, Bf16(g), g.stride(0), Bf16(u), u.stride(0), Bf16(dh),
                            dh.stride(0), Bf16Mut(dg), dg.size(1), Bf16Mut(du), du.size(1), Stream(g)),
          "swiglu backward");
    return {dg.view(grad[0].sizes()), du.view(grad[0].sizes())};
  }
};

// SwiGluFn on the two halves of one [N, 2I] tensor; backward fills one
// [N, 2I] gradient (dgate | dup).
class SwiGluHalvesFn : public torch::autograd::Function<SwiGluHalvesFn> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor gu) {
    c10::cuda::CUDAGuard guard(gu.device());
    torch::Tensor x = Rows(gu);
    const int64_t n = x.size(0), i = x.size(1) / 2;
    torch::Tensor h = torch::empty({n, i}, gu.options());
    Check(k::SwiGluForward({n, i}, Bf16(x), x.stride(0), Bf16(x) + i, x.stride(0), Bf16Mut(h), i, Stream(gu)),
          "swiglu forward");
    ctx->save_for_backward({x});
    std::vector<int64_t> shape = gu.sizes().vec();
    shape.back() = i;
    return h.view(shape);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    const torch::Tensor x = ctx->get_saved_variables()[0];
    c10::cuda::CUDAGuard guard(x.device());
    const int64_t n = x.size(0), i = x.size(1) / 2;
    torch::Tensor dh = Rows(grad[0].to(torch::kBFloat16));
    torch::Tensor dx = torch::empty({n, 2 * i}, x.options());
    Check(k::SwiGluBackward({n, i}, Bf16(x), x.stride(0), Bf16(x) + i, x.stride(0), Bf16(dh), dh.stride(0),
                            Bf16Mut(dx), 2 * i, Bf16Mut(dx) + i, 2 * i, Stream(x)),
          "swiglu backward");
    std::vector<int64_t> shape = grad[0].sizes().vec();
    shape.back() = 2 * i;
    return {dx.view(shape)};
  }
};

k::LinearCrossEntropyArgs CeArgs(const torch::Tensor& h, const torch::Tensor& w, const torch::Tensor& labels,
                                 const torch::Tensor& scratch) {
  k::LinearCrossEntropyArgs a;
  a.hidden = Bf16(h);
  a.hidden_stride = h.stride(0);
  a.weight = Bf16(w);
  a.weight_stride = w.stride(0);
  a.labels = labels.data_ptr<int64_t>();
  a.rows = h.size(0);
  a.hidden_dim = h.size(1);
  a.vocab = w.size(0);
  a.logits_chunk = Bf16Mut(scratch);
  a.chunk_rows = scratch.size(0);
  return a;
}

// With `grad_in_forward` (training: the loss is always differentiated) the
// forward also writes d(loss)/d hidden at unit scale from the logits it has
// at hand, and backward only multiplies it by the upstream gradient: one
// [rows, V] GEMM per step less than recomputing the logits in backward.
class LinearCeFn : public torch::autograd::Function<LinearCeFn> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor hidden, torch::Tensor weight, torch::Tensor labels,
                               int64_t chunk, bool grad_in_forward) {
    c10::cuda::CUDAGuard guard(hidden.device());
    torch::Tensor h = hidden.contiguous(), w = weight.contiguous(), y = labels.contiguous();
    const int64_t n = h.size(0);
    // One reused bf16 [chunk, V] buffer: the only logits ever held.
    torch::Tensor scratch = torch::empty({std::min(chunk, n), w.size(0)}, h.options());
    torch::Tensor lse = torch::empty({n}, h.options().dtype(torch::kFloat32));
    torch::Tensor row_loss = torch::empty_like(lse);
    torch::Tensor loss = torch::empty({}, lse.options());
    if (grad_in_forward) {
      torch::Tensor dh = torch::empty_like(h);
      Check(k::LinearCrossEntropyForwardWithGrad(CeArgs(h, w, y, scratch), lse.data_ptr<float>(),
                                                 row_loss.data_ptr<float>(), loss.data_ptr<float>(), Bf16Mut(dh),
                                                 dh.stride(0), Stream(h)),
            "linear cross-entropy forward");
      // A saved variable (not saved_data), so it is freed once this backward
      // has run instead of living as long as the graph.
      ctx->save_for_backward({dh});
      ctx->saved_data["grad_in_forward"] = true;
      return loss;
    }
    Check(k::LinearCrossEntropyForward(CeArgs(h, w, y, scratch), lse.data_ptr<float>(), row_loss.data_ptr<float>(),
                                       loss.data_ptr<float>(), Stream(h)),
          "linear cross-entropy forward");
    ctx->save_for_backward({h, w, y, lse});
    ctx->saved_data["chunk"] = chunk;
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    if (ctx->saved_data.count("grad_in_forward") > 0) {
      const torch::Tensor unit = ctx->get_saved_variables()[0];
      c10::cuda::CUDAGuard guard(unit.device());
      torch::Tensor g = grad[0].to(unit.device(), torch::kFloat32).contiguous();
      torch::Tensor dh = torch::empty_like(unit);  // out of place: backward may run again (retain_graph)
      Check(k::ScaleBf16Rows(Bf16(unit), unit.stride(0), Bf16Mut(dh), dh.stride(0), unit.size(0), unit.size(1),
                             g.data_ptr<float>(), Stream(unit)),
            "linear cross-entropy gradient scale");
      return {dh, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
    }
    variable_list saved = ctx->get_saved_variables();
    const torch::Tensor &h = saved[0], &w = saved[1], &y = saved[2], &lse = saved[3];
    c10::cuda::CUDAGuard guard(h.device());
    const int64_t chunk = ctx->saved_data["chunk"].toInt();
    // The upstream gradient stays on the device: the kernel reads it there.
    torch::Tensor g = grad[0].to(h.device(), torch::kFloat32).contiguous();
    torch::Tensor scratch = torch::empty({std::min(chunk, h.size(0)), w.size(0)}, h.options());
    torch::Tensor dh = torch::empty_like(h);
    Check(k::LinearCrossEntropyBackward(CeArgs(h, w, y, scratch), lse.data_ptr<float>(), g.data_ptr<float>(),
                                        Bf16Mut(dh), dh.stride(0), Stream(h)),
          "linear cross-entropy backward");
    return {dh, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

// nf4::DynamicMap() on each device, uploaded once. Leaked on purpose: static
// CUDA tensors destroyed after the CUDA runtime has shut down crash at exit.
const torch::Tensor& DeviceDynamicMap(torch::Device device) {
  static std::mutex mu;
  static auto* maps = new std::map<int, torch::Tensor>();
  std::lock_guard<std::mutex> lock(mu);
  torch::Tensor& t = (*maps)[device.index()];
  if (!t.defined()) {
    const auto& m = nf4::DynamicMap();
    t = torch::tensor(std::vector<float>(m.begin(), m.end()), torch::dtype(torch::kFloat32)).to(device);
  }
  return t;
}

}  // namespace

torch::Tensor TryRmsNorm(const torch::Tensor& x, const torch::Tensor& weight, double eps, int64_t spare_cols) {
  if (!Enabled() || !IsCudaBf16(x) || !IsCudaBf16(weight) || weight.dim() != 1 || x.dim() < 1 ||
      weight.size(0) != x.size(-1) || weight.device() != x.device() || x.numel() == 0 || spare_cols < 0) {
    return {};
  }
  return RmsNormFn::apply(x, weight, eps, spare_cols);
}

void CopyRows(const torch::Tensor& dst, const torch::Tensor& src) {
  TORCH_CHECK(dst.dim() == 2 && dst.sizes() == src.sizes() && dst.scalar_type() == src.scalar_type(),
              "CopyRows: dst and src must be 2-D tensors of one shape and dtype");
  const int64_t rows = dst.size(0), cols = dst.size(1);
  const bool rows_ok = dst.is_cuda() && src.device() == dst.device() && dst.stride(1) == 1 && src.stride(1) == 1 &&
                       (rows == 1 || (dst.stride(0) >= cols && src.stride(0) >= cols));
  if (!rows_ok || rows == 0 || cols == 0) {
    dst.copy_(src);
    return;
  }
  c10::cuda::CUDAGuard guard(dst.device());
  const size_t elem = dst.element_size();
  const size_t dpitch = static_cast<size_t>(rows == 1 ? cols : dst.stride(0)) * elem;
  const size_t spitch = static_cast<size_t>(rows == 1 ? cols : src.stride(0)) * elem;
  TORCH_CHECK(cudaMemcpy2DAsync(dst.data_ptr(), dpitch, src.data_ptr(), spitch, static_cast<size_t>(cols) * elem,
                                static_cast<size_t>(rows), cudaMemcpyDeviceToDevice, Stream(dst)) == cudaSuccess,
              "CopyRows: cudaMemcpy2DAsync failed");
}

torch::Tensor TryApplyRope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  if (!Enabled() || !IsCudaBf16(x) || !IsCudaBf16(cos) || !IsCudaBf16(sin) || x.dim() != 4 || cos.dim() != 3 ||
      cos.sizes() != sin.sizes() || cos.requires_grad() || sin.requires_grad() || x.numel() == 0 ||
      cos.device() != x.device() || sin.device() != x.device()) {
    return {};
  }
  const int64_t B = x.size(0), T = x.size(2), d = x.size(3);
  if ((cos.size(0) != B && cos.size(0) != 1) || cos.size(1) != T || cos.size(2) != d || d % 2 != 0) return {};
  torch::Tensor c = cos.contiguous(), s = sin.contiguous();
  return RopeFn::apply(x, c, s);
}

torch::Tensor TryLinearCrossEntropySum(const torch::Tensor& hidden, const torch::Tensor& weight,
                                       const torch::Tensor& labels, int64_t chunk_tokens) {
  if (!Enabled() || !IsCudaBf16(hidden) || !IsCudaBf16(weight) || weight.requires_grad() || hidden.dim() != 2 ||
      weight.dim() != 2 || weight.size(1) != hidden.size(1) || labels.scalar_type() != torch::kInt64 ||
      labels.dim() != 1 || labels.size(0) != hidden.size(0) || hidden.size(0) == 0 ||
      weight.device() != hidden.device() || labels.device() != hidden.device() || chunk_tokens <= 0) {
    return {};
  }
  const bool grad_in_forward = torch::GradMode::is_enabled() && hidden.requires_grad();
  return LinearCeFn::apply(hidden, weight, labels, chunk_tokens, grad_in_forward);
}

torch::Tensor SwiGlu(const torch::Tensor& gate, const torch::Tensor& up) {
  if (Enabled() && IsCudaBf16(gate) && IsCudaBf16(up) && gate.sizes() == up.sizes() && gate.numel() > 0 &&
      gate.device() == up.device()) {
    return SwiGluFn::apply(gate, up);
  }
  return torch::silu(gate) * up;
}

namespace {

// The kernel's view of q (device copies of its absmax tensors kept alive in
// `keep` until the launch is queued).
k::Nf4View KernelView(const nf4::Nf4Tensor& q, std::vector<torch::Tensor>* keep) {
  k::Nf4View v;
  v.packed = q.packed.data_ptr<uint8_t>();
  v.numel = q.numel;
  v.block_size = q.block_size;
  if (q.double_quant()) {
    keep->push_back(q.absmax_q.contiguous());
    keep->push_back(q.absmax_scale.to(torch::kFloat32).contiguous());
    keep->push_back(q.absmax_offset.to(torch::kFloat32).contiguous());
    v.absmax_q = (*keep)[0].data_ptr<uint8_t>();
    v.absmax_scale = (*keep)[1].data_ptr<float>();
    v.absmax_offset = (*keep)[2].data_ptr<float>();
    v.dynamic_map = DeviceDynamicMap(q.device()).data_ptr<float>();
  } else {
    keep->push_back(q.absmax.to(torch::kFloat32).contiguous());
    v.absmax = (*keep)[0].data_ptr<float>();
  }
  return v;
}

}  // namespace

bool SwiGluBackwardWithForwardApplies(const torch::Tensor& t) { return Enabled() && IsCudaBf16(t); }

std::pair<torch::Tensor, torch::Tensor> SwiGluHalvesBackwardWithForward(const torch::Tensor& gu,
                                                                        const torch::Tensor& dh, bool in_place) {
  TORCH_CHECK(IsCudaBf16(gu) && IsCudaBf16(dh) && gu.dim() == 2 && dh.dim() == 2 && gu.size(0) == dh.size(0) &&
                  gu.size(1) == 2 * dh.size(1) && gu.stride(1) == 1 && gu.device() == dh.device(),
              "swiglu backward with forward: gu must be CUDA bf16 [N, 2I] with contiguous rows, dh [N, I]");
  c10::cuda::CUDAGuard guard(gu.device());
  const int64_t n = gu.size(0), i = dh.size(1);
  torch::Tensor d = Rows(dh);
  torch::Tensor dgu = in_place ? gu : torch::empty({n, 2 * i}, gu.options());
  torch::Tensor h = torch::empty({n, i}, gu.options());
  Check(k::SwiGluBackwardWithForward({n, i}, Bf16(gu), gu.stride(0), Bf16(gu) + i, gu.stride(0), Bf16(d), d.stride(0),
                                     Bf16Mut(dgu), dgu.stride(0), Bf16Mut(dgu) + i, dgu.stride(0), Bf16Mut(h), i,
                                     Stream(gu)),
        "swiglu backward with forward");
  return {dgu, h};
}

torch::Tensor Nf4DequantizeInto(const nf4::Nf4Tensor& q, const torch::Tensor& scratch) {
  TORCH_CHECK(q.packed.defined() && q.packed.is_cuda(), "nf4 dequantize: the NF4 tensor must be on a CUDA device");
  TORCH_CHECK(IsCudaBf16(scratch) && scratch.is_contiguous() && scratch.device() == q.device(),
              "nf4 dequantize: scratch must be a contiguous bf16 tensor on the NF4 tensor's device");
  TORCH_CHECK(scratch.numel() >= q.numel, "nf4 dequantize: scratch holds ", scratch.numel(),
              " elements; the weight needs ", q.numel, " (allocate the largest weight's size)");
  c10::cuda::CUDAGuard guard(q.device());
  std::vector<torch::Tensor> keep;
  Check(k::Nf4DequantizeBf16(KernelView(q, &keep), Bf16Mut(scratch), Stream(scratch)), "nf4 dequantize");
  return scratch.view({-1}).narrow(0, 0, q.numel).view(q.shape);
}

void Nf4DequantizeIntoRows(const nf4::Nf4Tensor& q, const torch::Tensor& out) {
  TORCH_CHECK(q.packed.defined() && q.packed.is_cuda(), "nf4 dequantize: the NF4 tensor must be on a CUDA device");
  TORCH_CHECK(q.shape.size() == 2 && IsCudaBf16(out) && out.device() == q.device() && out.dim() == 2 &&
                  out.size(0) == q.shape[0] && out.size(1) == q.shape[1] && out.stride(1) == 1 &&
                  out.stride(0) >= out.size(1),
              "nf4 dequantize: out must be a bf16 [", q.shape, "] view with contiguous rows on the weight's device");
  c10::cuda::CUDAGuard guard(q.device());
  std::vector<torch::Tensor> keep;
  Check(k::Nf4DequantizeBf16Rows(KernelView(q, &keep), q.shape[1], Bf16Mut(out), out.stride(0), Stream(out)),
        "nf4 dequantize");
}

#else  // !TUNE_HAVE_FUSED_KERNELS: every fused path declines.

torch::Tensor TryRmsNorm(const torch::Tensor&, const torch::Tensor&, double, int64_t) { return {}; }
void CopyRows(const torch::Tensor& dst, const torch::Tensor& src) { dst.copy_(src); }
bool SwiGluBackwardWithForwardApplies(const torch::Tensor&) { return false; }
std::pair<torch::Tensor, torch::Tensor> SwiGluHalvesBackwardWithForward(const torch::Tensor&, const torch::Tensor&,
                                                                        bool) {
  TORCH_CHECK(false, "swiglu backward with forward: this tune-train was built without the CUDA kernels");
  return {};
}
torch::Tensor TryApplyRope(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&) { return {}; }
torch::Tensor TryLinearCrossEntropySum(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, int64_t) {
  return {};
}
torch::Tensor SwiGlu(const torch::Tensor& gate, const torch::Tensor& up) { return torch::silu(gate) * up; }
torch::Tensor Nf4DequantizeInto(const nf4::Nf4Tensor&, const torch::Tensor&) {
  TORCH_CHECK(false, "nf4 dequantize: this tune-train was built without the CUDA kernels (needs a CUDA libtorch "
                     "and nvcc; see TUNE_WITH_CUDA)");
  return {};
}
void Nf4DequantizeIntoRows(const nf4::Nf4Tensor& q, const torch::Tensor& out) { Nf4DequantizeInto(q, out); }

#endif  // TUNE_HAVE_FUSED_KERNELS

bool AddMmApplies(const torch::Tensor& residual, const torch::Tensor& x, const torch::Tensor& w) {
#ifdef TUNE_HAVE_FUSED_KERNELS
  const bool grad = torch::GradMode::is_enabled() &&
                    (residual.requires_grad() || x.requires_grad() || w.requires_grad());
  return Enabled() && !grad && IsCudaBf16(residual) && IsCudaBf16(x) && IsCudaBf16(w) && x.dim() == 2 &&
         w.dim() == 2 && residual.dim() == 2 && x.size(1) == w.size(1) && residual.size(0) == x.size(0) &&
         residual.size(1) == w.size(0) && x.size(1) > 0 && x.stride(1) == 1 && w.stride(1) == 1 &&
         residual.stride(1) == 1 && (residual.size(0) <= 1 || residual.stride(0) == residual.size(1)) &&
         (x.size(0) <= 1 || x.stride(0) >= x.size(1)) && (w.size(0) <= 1 || w.stride(0) >= w.size(1)) &&
         x.device() == residual.device() && w.device() == residual.device();
#else
  return false;
#endif
}

torch::Tensor AddMm(const torch::Tensor& residual, const torch::Tensor& x, const torch::Tensor& w) {
#ifdef TUNE_HAVE_FUSED_KERNELS
  if (AddMmApplies(residual, x, w)) {
    c10::cuda::CUDAGuard guard(x.device());
    const int64_t n = x.size(0), m = w.size(0), kk = x.size(1);
    torch::Tensor y = torch::empty({n, m}, residual.options());
    // From the caching allocator, on the stream the GEMM runs on, so it is
    // reused (not freed) once this call returns.
    torch::Tensor ws = torch::empty({static_cast<int64_t>(k::kGemmWorkspaceBytes)}, x.options().dtype(torch::kUInt8));
    k::GemmResidualArgs a;
    a.x = Bf16(x), a.x_stride = n > 1 ? x.stride(0) : kk;
    a.w = Bf16(w), a.w_stride = m > 1 ? w.stride(0) : kk;
    a.residual = Bf16(residual), a.y = Bf16Mut(y), a.y_stride = m;
    a.rows = n, a.cols = m, a.k = kk;
    a.workspace = ws.data_ptr(), a.workspace_bytes = k::kGemmWorkspaceBytes;
    const k::Status s = k::GemmResidualBf16(a, Stream(x));
    if (s.code != k::StatusCode::kUnsupported) {
      Check(s, "gemm + residual");
      return y;
    }
  }
#endif
  return torch::addmm(residual, x, w.t());
}

torch::Tensor SwiGluHalves(const torch::Tensor& gu) {
#ifdef TUNE_HAVE_FUSED_KERNELS
  if (Enabled() && IsCudaBf16(gu) && gu.numel() > 0 && gu.size(-1) % 2 == 0) return SwiGluHalvesFn::apply(gu);
#endif
  const int64_t i = gu.size(-1) / 2;
  return SwiGlu(gu.narrow(-1, 0, i), gu.narrow(-1, i, i));
}

}  // namespace tune::model::cuda_ops
