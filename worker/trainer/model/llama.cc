#include "worker/trainer/model/llama.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <stdexcept>

#include "worker/trainer/model/cuda_ops.h"
#include "worker/trainer/model/llama_ops.h"
#include "worker/trainer/model/offload.h"
#include "worker/trainer/model/safetensors.h"

namespace tune::model {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The dense copy of an NF4 weight for one matmul: the fused CUDA kernel on
// bf16 CUDA weights (bit-identical to nf4::Dequantize), torch ops otherwise.
// The buffer comes from the caching allocator and dies with the matmul, so
// consecutive layers reuse the same block.
torch::Tensor DequantizeForMatmul(const nf4::Nf4Tensor& w, torch::ScalarType dtype) {
  if (dtype == torch::kBFloat16 && w.packed.is_cuda() && cuda_ops::Enabled()) {
    return cuda_ops::Nf4DequantizeInto(w, torch::empty({w.numel}, w.packed.options().dtype(torch::kBFloat16)));
  }
  return nf4::Dequantize(w, dtype);
}

// Set while a checkpointed forward is recomputed during backward: each base
// weight dequantised there is kept (FrozenWeight::kept) until its own
// backward, the next use, a few GEMMs later, instead of being dequantised
// again. Costs one layer's dense weights at the start of its backward.
thread_local bool t_keep_dense = false;

class KeepDenseScope {
 public:
  explicit KeepDenseScope(bool on) : prev_(t_keep_dense) { t_keep_dense = on; }
  ~KeepDenseScope() { t_keep_dense = prev_; }
  KeepDenseScope(const KeepDenseScope&) = delete;
  KeepDenseScope& operator=(const KeepDenseScope&) = delete;

 private:
  bool prev_;
};

// One projection's frozen weight as held: NF4 or dense in the compute dtype.
struct FrozenPart {
  std::optional<nf4::Nf4Tensor> nf4;
  torch::Tensor dense;
  int64_t rows = 0;
};

// A frozen base weight reachable from an autograd node (saved_data holds
// IValues): one projection, or the projections of a fused group (q/k/v,
// gate/up) stacked along the output dimension. NF4 parts are dequantised for
// each matmul (each into its rows of one buffer) and again in backward, so
// only the quantised form stays alive; dense parts are used as held (a bf16
// group is stored fused at load, so its parts are adjacent rows of one tensor).
struct FrozenWeight : torch::CustomClassHolder {
  std::vector<FrozenPart> parts;
  int64_t in = 0;
  // On the CUDA kernel path, NF4 weights carry their LoRA factor in the dense
  // copy: those with out > in (q/k/v, gate/up) B as extra columns (Folds),
  // those with in > out (down) A as extra rows for backward (FoldsRows).
  bool fold_lora = false, fold_lora_rows = false;
  mutable torch::Tensor kept;  // see t_keep_dense

  torch::Tensor Get(torch::ScalarType dtype) const {
    if (parts.size() == 1) {
      const FrozenPart& p = parts[0];
      return p.nf4 ? DequantizeForMatmul(*p.nf4, dtype) : p.dense;
    }
    if (torch::Tensor v = AdjacentDense(); v.defined()) return v;
    const torch::Tensor& any = parts[0].nf4 ? parts[0].nf4->packed : parts[0].dense;
    torch::Tensor out = torch::empty({Rows(), in}, any.options().dtype(dtype));
    FillRows(out);
    return out;
  }
  // The matmul weight for backward: the copy kept from the recompute, or Get().
  torch::Tensor Take(torch::ScalarType dtype) const {
    if (torch::Tensor t = TakeKept(dtype, in); t.defined()) return t;
    return Get(dtype);
  }
  bool quantized() const { return parts[0].nf4.has_value(); }

  // Whether a matmul of x with LoRA A `a` folds B into the weight: y = [x | s x
  // A^T] [W | B]^T is one GEMM, with no read-modify-write of the [N, out]
  // output for the LoRA term (out > in makes that cost more than copying x
  // into the wider input, when x has no spare columns), and backward's
  // g [W | B] gives g B with dx.
  bool Folds(const torch::Tensor& x, const torch::Tensor& a) const { return fold_lora && LoraOnKernelPath(x, a); }
  // [W | b] for a folding weight: W in the first `in` columns, b [Rows(), r]
  // copied into the last r.
  torch::Tensor GetFolded(const torch::Tensor& b) const {
    torch::Tensor out = torch::empty({Rows(), in + b.size(1)}, b.options());
    FillRows(out.narrow(1, 0, in));
    out.narrow(1, in, b.size(1)).copy_(b);
    return out;
  }
  // Whether backward's dx = g W + (s g B) A runs as one GEMM, [g | s g B]
  // [W; A]: copying g [N, out] into the wider input costs less than a
  // read-modify-write of dx [N, in] when in > out.
  bool FoldsRows(const torch::Tensor& g, const torch::Tensor& a) const {
    return fold_lora_rows && LoraOnKernelPath(g, a);
  }
  // [W; a] for a row-folding weight: W in the first Rows() rows, a [r, in]
  // copied into the last r.
  torch::Tensor GetRowFolded(const torch::Tensor& a) const {
    torch::Tensor out = torch::empty({Rows() + a.size(0), in}, a.options());
    FillRows(out.narrow(0, 0, Rows()));
    out.narrow(0, Rows(), a.size(0)).copy_(a);
    return out;
  }
  // Take() for a folding weight: [W | b] kept from the recompute, or GetFolded.
  torch::Tensor TakeFolded(const torch::Tensor& b) const {
    if (torch::Tensor t = TakeKept(b.scalar_type(), in + b.size(1)); t.defined()) return t;
    return GetFolded(b);
  }
  int64_t Rows() const {
    int64_t rows = 0;
    for (const FrozenPart& p : parts) rows += p.rows;
    return rows;
  }

 private:
  // LoRA present and x (or g) on the CUDA kernel path in bf16: where folding can run.
  static bool LoraOnKernelPath(const torch::Tensor& t, const torch::Tensor& a) {
    return a.numel() > 0 && t.is_cuda() && t.scalar_type() == torch::kBFloat16 && cuda_ops::Enabled();
  }
  // Writes the parts into out [Rows(), in] (rows may be spaced wider), each
  // into its rows: NF4 through the CUDA kernel for bf16, torch ops otherwise.
  void FillRows(const torch::Tensor& out) const {
    int64_t r = 0;
    for (const FrozenPart& p : parts) {
      torch::Tensor slice = out.narrow(0, r, p.rows);
      if (p.nf4 && out.scalar_type() == torch::kBFloat16 && out.is_cuda() && cuda_ops::Enabled()) {
        cuda_ops::Nf4DequantizeIntoRows(*p.nf4, slice);
      } else {
        slice.copy_(p.nf4 ? nf4::Dequantize(*p.nf4, out.scalar_type()) : p.dense);
      }
      r += p.rows;
    }
  }
  // The copy kept from the recompute if it is `cols` wide in `dtype`, else
  // undefined; either way it is released.
  torch::Tensor TakeKept(torch::ScalarType dtype, int64_t cols) const {
    torch::Tensor t = std::move(kept);
    kept = torch::Tensor();
    if (t.defined() && t.scalar_type() == dtype && t.size(1) == cols) return t;
    return {};
  }
  // Dense parts that are consecutive rows of one tensor, as one view.
  torch::Tensor AdjacentDense() const {
    const torch::Tensor& first = parts[0].dense;
    if (!first.defined() || !first.is_contiguous()) return {};
    int64_t rows = 0;
    for (const FrozenPart& p : parts) {
      const torch::Tensor& d = p.dense;
      if (!d.defined() || !d.is_contiguous() || !d.is_alias_of(first) ||
          d.storage_offset() != first.storage_offset() + rows * in) {
        return {};
      }
      rows += p.rows;
    }
    return first.as_strided({rows, in}, {in, 1});
  }
};

// Where a checkpointed projection's output waits between its first pass and
// the recompute (LoraLinearFunction's kept_output); null: nowhere.
using Stash = std::shared_ptr<ops::ActivationStash>;

// An empty tensor standing for an absent input of the autograd functions
// below (torch 1.13's autograd rejects undefined inputs).
torch::Tensor Absent(const torch::Tensor& like) { return torch::empty({0}, like.options().requires_grad(false)); }

// xa = s x A^T: what the B GEMM consumes and dB needs.
torch::Tensor ScaledLoraInput(const torch::Tensor& x, const torch::Tensor& a, double scaling) {
  torch::Tensor xa = x.mm(a.t());
  if (scaling != 1.0) xa.mul_(scaling);
  return xa;
}

// The LoRA pairs (A_i [r, in], B_i [out_i, r]) of a fused group as one pair:
// A's stacked [n r, in], B's block-diagonal [sum out_i, n r], so y_i += s x
// A_i^T B_i^T lands in member i's columns. Autograd ops: gradients reach each
// member's copies. The zero blocks cost (n - 1) r out FLOPs per token, noise
// next to the base GEMM.
std::pair<torch::Tensor, torch::Tensor> StackLora(const std::vector<std::pair<torch::Tensor, torch::Tensor>>& ab) {
  std::vector<torch::Tensor> as, bs;
  for (const auto& [a, b] : ab) {
    as.push_back(a);
    bs.push_back(b);
  }
  return {torch::cat(as), torch::block_diag(bs)};
}

struct LoraLinearOut {
  torch::Tensor y;
  torch::Tensor xa;  // s x A^T, undefined without LoRA: dB needs it
  torch::Tensor x;   // x's values for dA: x, or its copy in the folded input
};

// Whether 2-D x's rows are followed by `cols` columns of its own buffer
// (ops::RmsNorm's spare_cols), so that [x | those columns] is one tensor.
bool HasSpareColumns(const torch::Tensor& x, int64_t cols) {
  if (x.dim() != 2 || x.stride(1) != 1 || x.stride(0) != x.size(1) + cols || x.size(0) == 0) return false;
  const int64_t last = x.storage_offset() + (x.size(0) - 1) * x.stride(0) + x.size(1) + cols;
  return static_cast<int64_t>(x.storage().nbytes()) >= last * static_cast<int64_t>(x.element_size());
}

// y = [residual +] x W^T [+ s (x A^T) B^T] for 2-D x without autograd. The
// LoRA term and the residual are accumulated by the GEMMs themselves (addmm_;
// the residual in the epilogue, cuda_ops::AddMm),
// or B is folded into the weight (FrozenWeight::Folds), so no [N, out]
// temporary is written, scaled or added. a/b/residual may be empty.
// `x_spare`: the caller made x with spare columns for the folded input
// (ops::RmsNorm's spare_cols) and x has no other reader, so they are written.
LoraLinearOut LoraLinearForward(const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& b,
                                const torch::Tensor& residual, const FrozenWeight& w, double scaling,
                                bool x_spare = false) {
  // Without spare columns x is copied, which pays only when the copy is this
  // node's alone: a fused group is x's only reader, a single projection may
  // share x with others (which would then each save a copy).
  if (w.Folds(x, a) && (x_spare || w.parts.size() > 1)) {
    // [x | s x A^T] against [W | B]: xa is written straight into its columns,
    // beside x itself when it has room, else beside a copy.
    const int64_t in = x.size(1), r = a.size(0);
    torch::Tensor xc;
    if (x_spare && HasSpareColumns(x, r)) {
      xc = x.as_strided({x.size(0), in + r}, {in + r, 1});
    } else {
      xc = torch::empty({x.size(0), in + r}, x.options());
      cuda_ops::CopyRows(xc.narrow(1, 0, in), x);
    }
    torch::Tensor xa = xc.narrow(1, in, r);
    at::mm_out(xa, x, a.t());
    if (scaling != 1.0) xa.mul_(scaling);
    torch::Tensor wide = w.GetFolded(b);
    if (t_keep_dense) w.kept = wide;
    torch::Tensor y = residual.numel() > 0 ? cuda_ops::AddMm(residual, xc, wide) : xc.mm(wide.t());
    return {y, xa, xc.narrow(1, 0, in)};  // x itself need not outlive this call
  }
  torch::Tensor dense = w.Get(x.scalar_type());
  // Kept for backward only in the layout backward uses (a folding backward
  // builds its own wider copy).
  if (t_keep_dense && w.quantized() && !w.Folds(x, a) && !w.FoldsRows(x, a)) w.kept = dense;
  torch::Tensor y = residual.numel() > 0 ? cuda_ops::AddMm(residual, x, dense) : x.mm(dense.t());
  torch::Tensor xa;
  if (a.numel() > 0) {
    xa = ScaledLoraInput(x, a, scaling);
    y.addmm_(xa, b.t());
  }
  return {y, xa, x};
}

struct LoraLinearGrads {
  torch::Tensor dx, da, db;
};

// The gradients of LoraLinearForward's y for dy = g: dx = g W, then
// dx += (s g B) A in the same buffer; dB = g^T xa; dA = (s g B)^T x. W is
// frozen: no weight gradient is computed.
LoraLinearGrads LoraLinearBackward(const torch::Tensor& g, const torch::Tensor& x, const torch::Tensor& a,
                                   const torch::Tensor& b, const torch::Tensor& xa, const FrozenWeight& w,
                                   double scaling, bool need_dx, bool need_da, bool need_db) {
  LoraLinearGrads r;
  if (need_dx && w.Folds(g, a)) {
    // [dx | g B] = g [W | B]; dxa is copied out (a few columns) so dx's
    // addmm_ does not read the buffer it writes.
    torch::Tensor full = g.mm(w.TakeFolded(b));
    r.dx = full.narrow(1, 0, w.in);
    torch::Tensor gb = full.narrow(1, w.in, a.size(0));
    torch::Tensor dxa = scaling != 1.0 ? gb.mul(scaling) : gb.contiguous();
    if (need_db) r.db = g.t().mm(xa);
    if (need_da) r.da = dxa.t().mm(x);
    r.dx.addmm_(dxa, a);
    return r;
  }
  if (need_dx && w.FoldsRows(g, a)) {
    const int64_t out = w.Rows(), rank = a.size(0);
    torch::Tensor gc = torch::empty({g.size(0), out + rank}, g.options());
    cuda_ops::CopyRows(gc.narrow(1, 0, out), g);
    torch::Tensor dxa = gc.narrow(1, out, rank);
    at::mm_out(dxa, g, b);
    if (scaling != 1.0) dxa.mul_(scaling);
    if (need_db) r.db = g.t().mm(xa);
    if (need_da) r.da = dxa.t().mm(x);
    w.kept = torch::Tensor();  // the recompute's copy lacks A's rows
    r.dx = gc.mm(w.GetRowFolded(a));
    return r;
  }
  if (need_dx) r.dx = g.mm(w.Take(g.scalar_type()));
  if (a.numel() > 0) {
    torch::Tensor dxa = g.mm(b);
    if (scaling != 1.0) dxa.mul_(scaling);
    if (need_db) r.db = g.t().mm(xa);
    if (need_da) r.da = dxa.t().mm(x);
    if (r.dx.defined()) r.dx.addmm_(dxa, a);
  }
  w.kept = torch::Tensor();  // unused when dx was not needed: do not hold it until the graph dies
  return r;
}

// LoraLinearForward as one autograd node (backward: LoraLinearBackward; the
// residual's gradient is g). a/b (compute-dtype copies of the LoRA leaves)
// and residual may be absent, passed as empty tensors (torch 1.13's autograd
// rejects undefined inputs). LoRA dropout is not handled here (the caller
// composes). `root_only`: the output is recomputed only as the root of a
// checkpoint's backward (its value is never read), so neither GEMM runs;
// backward needs only x and xa. `kept_output` (a checkpointed projection whose
// output waits in host memory): the first pass puts y there, and the
// recompute, with root_only, returns the y it takes back instead of an empty
// tensor, so the recompute runs neither GEMM and the value is still there.
class LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, torch::Tensor a, torch::Tensor b,
                               torch::Tensor residual, c10::intrusive_ptr<FrozenWeight> w, double scaling,
                               bool root_only, bool x_spare, Stash kept_output) {
    LoraLinearOut out;
    if (root_only) {
      if (a.numel() > 0) out.xa = ScaledLoraInput(x, a, scaling);
      if (kept_output) {
        out.y = kept_output->Take();
        TORCH_CHECK(out.y.dim() == 2 && out.y.size(0) == x.size(0) && out.y.size(1) == w->Rows() &&
                        out.y.scalar_type() == x.scalar_type(),
                    "kept projection output ", out.y.sizes(), " does not match the recompute's input ", x.sizes());
      } else {
        out.y = torch::empty({x.size(0), w->Rows()}, x.options());
      }
      out.x = x;
    } else {
      out = LoraLinearForward(x, a, b, residual, *w, scaling, x_spare);
      if (kept_output) kept_output->Put(out.y);
    }
    const bool lora = a.numel() > 0;
    ctx->save_for_backward({lora ? out.x : a, a, b, lora ? out.xa : a});
    ctx->saved_data["w"] = c10::IValue::make_capsule(w);
    ctx->saved_data["scaling"] = scaling;
    return out.y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    variable_list saved = ctx->get_saved_variables();
    auto capsule = ctx->saved_data["w"].toCapsule();
    LoraLinearGrads r = LoraLinearBackward(grad_out[0], saved[0], saved[1], saved[2], saved[3],
                                           *static_cast<FrozenWeight*>(capsule.get()),
                                           ctx->saved_data["scaling"].toDouble(), ctx->needs_input_grad(0),
                                           ctx->needs_input_grad(1), ctx->needs_input_grad(2));
    torch::Tensor dres = ctx->needs_input_grad(3) ? grad_out[0] : torch::Tensor();
    variable_list grads(9);  // w, scaling, root_only, x_spare, kept_output: none
    grads[0] = r.dx;
    grads[1] = r.da;
    grads[2] = r.db;
    grads[3] = dres;
    return grads;
  }
};

// What MlpFunction needs besides its tensor inputs: the frozen weights and
// LoRA scalings of one layer's MLP, and its token chunk.
struct MlpWeights : torch::CustomClassHolder {
  torch::Tensor norm;  // post_attention_layernorm
  double eps = 0;
  c10::intrusive_ptr<FrozenWeight> gate, up, down;  // gate/up unset when they run as one GEMM:
  c10::intrusive_ptr<FrozenWeight> gate_up;         // then this is set (and s_gate == s_up)
  int64_t gate_up_spare = 0;                        // FoldedLoraColumns of gate/up
  double s_gate = 1, s_up = 1, s_down = 1;
  int64_t chunk = 0;
  bool root_only = false;  // see MlpFunction
  bool keep_dense = true;  // backward keeps gate/up's dequantised copy for their own backward (not with offload)
  c10::intrusive_ptr<ops::KeptAttentionSlab> slab;  // set: forward keeps r in slot `slot` of its residual block
  int64_t slot = 0;
  bool in_slab = false;           // forward placed r there (its layout allowed it)
  mutable torch::Tensor kept_r;  // that copy, from forward until backward has used it

  // gate_up(n) with n = rmsnorm(r), [N, 2I], for a fused gate/up: autograd
  // ops, so in backward (grad mode on) they form the graph MlpFunction
  // differentiates.
  torch::Tensor GateUp(const torch::Tensor& r, const torch::Tensor& ag, const torch::Tensor& bg,
                       const torch::Tensor& au, const torch::Tensor& bu) const {
    const torch::Tensor absent = Absent(r);
    // A folding gate/up reads n with its LoRA input beside it: n's rows get
    // the spare columns (n has no other reader).
    torch::Tensor n = ops::RmsNorm(r, norm, eps, gate_up_spare);
    auto [a, b] = ag.numel() > 0 ? StackLora({{ag, bg}, {au, bu}}) : std::make_pair(absent, absent);
    return LoraLinearFunction::apply(n, a, b, absent, gate_up, s_gate, false, gate_up_spare > 0, Stash());
  }

  // swiglu(gate(n), up(n)) with n = rmsnorm(r), as autograd ops (see GateUp).
  torch::Tensor Activation(const torch::Tensor& r, const torch::Tensor& ag, const torch::Tensor& bg,
                           const torch::Tensor& au, const torch::Tensor& bu) const {
    if (gate_up) return cuda_ops::SwiGluHalves(GateUp(r, ag, bg, au, bu));
    const torch::Tensor absent = Absent(r);
    torch::Tensor n = ops::RmsNorm(r, norm, eps);
    torch::Tensor g = LoraLinearFunction::apply(n, ag, bg, absent, gate, s_gate, false, false, Stash());
    torch::Tensor u = LoraLinearFunction::apply(n, au, bu, absent, up, s_up, false, false, Stash());
    return cuda_ops::SwiGlu(g, u);
  }
};

// The MLP half of a decoder layer, y = r + down(swiglu(gate(n), up(n))) with
// n = rmsnorm(r), for r [N, H], as one autograd node that keeps only r (and
// the compute-dtype LoRA copies ag..bd, empty when absent). Forward and
// backward run `chunk` tokens at a time, so at most one chunk's [chunk, I]
// intermediates exist. Backward recomputes n, gate, up and their product per
// chunk with autograd and differentiates through them, but never recomputes
// down's output: its backward needs only its input. Selective checkpointing
// uses it outside the layer checkpoint (saving r instead of recomputing the
// whole MLP), long micro-batches inside it (the chunking bounds memory).
class MlpFunction : public torch::autograd::Function<MlpFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor r, torch::Tensor ag, torch::Tensor bg,
                               torch::Tensor au, torch::Tensor bu, torch::Tensor ad, torch::Tensor bd,
                               c10::intrusive_ptr<MlpWeights> w) {
    // A copy in the slab is this node's own, so it is kept outside the saved
    // variables (its slot's neighbours are written after it is saved, which
    // their version check would take for an in-place change of r).
    if (w->slab && !w->root_only) {
      torch::Tensor copy = w->slab->Place(r, w->slab->residual, w->slot);
      w->in_slab = !copy.is_same(r);
      if (w->in_slab) w->kept_r = copy;
    }
    w->slab.reset();  // the copy holds its block; the slab itself goes with the layers' KeptAttention
    ctx->save_for_backward({w->in_slab ? Absent(r) : r, ag, bg, au, bu, ad, bd});
    ctx->saved_data["w"] = c10::IValue::make_capsule(w);
    // Recomputed inside a layer checkpoint only as the root of its backward:
    // the value is never read, and backward recomputes what it needs.
    if (w->root_only) return torch::empty_like(r);
    const int64_t n = r.size(0);
    torch::Tensor y;
    for (int64_t s = 0; s < n; s += w->chunk) {
      torch::Tensor rc = r.slice(0, s, std::min(n, s + w->chunk));
      torch::Tensor yc = LoraLinearForward(w->Activation(rc, ag, bg, au, bu), ad, bd, rc, *w->down, w->s_down).y;
      if (rc.size(0) == n) return yc;
      if (!y.defined()) y = torch::empty_like(r);
      y.slice(0, s, s + rc.size(0)).copy_(yc);
    }
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    variable_list saved = ctx->get_saved_variables();
    auto capsule = ctx->saved_data["w"].toCapsule();
    const MlpWeights& w = *static_cast<MlpWeights*>(capsule.get());
    TORCH_CHECK(!w.in_slab || w.kept_r.defined(),
                "the MLP node's input was released by an earlier backward (a second backward through the same "
                "graph, retain_graph, is not supported with selective recompute on long sequences)");
    const torch::Tensor r = w.in_slab ? std::move(w.kept_r) : saved[0];
    w.kept_r = torch::Tensor();
    const torch::Tensor &ad = saved[5], &bd = saved[6];
    const int64_t n = r.size(0);
    const bool need_r = ctx->needs_input_grad(0);
    torch::Tensor dy = grad_out[0].defined() ? grad_out[0] : torch::zeros_like(r);
    // Fresh leaves for the gate/up LoRA copies: their gradients are this
    // node's gradients for inputs 1..4, summed over chunks.
    std::vector<torch::Tensor> leaves;
    std::vector<int> slot;
    for (int i = 1; i <= 4; ++i) {
      const bool want = saved[i].numel() > 0 && ctx->needs_input_grad(i);
      leaves.push_back(saved[i].detach().requires_grad_(want));
      if (want) slot.push_back(i);
    }
    variable_list result(8);
    torch::Tensor dr = need_r ? torch::empty_like(r) : torch::Tensor();
    // LoRA gradients are summed over chunks in fp32 (one rounding at the end).
    auto accumulate = [&](int i, const torch::Tensor& g) {
      if (!g.defined()) return;
      if (result[i].defined()) {
        result[i].add_(g);
      } else {
        result[i] = g.to(torch::kFloat32, /*non_blocking=*/false, /*copy=*/true);
      }
    };
    for (int64_t s = 0; s < n; s += w.chunk) {
      const int64_t e = std::min(n, s + w.chunk);
      torch::Tensor rc = r.slice(0, s, e).detach().requires_grad_(need_r);
      torch::Tensor dyc = dy.slice(0, s, e);
      std::vector<torch::Tensor> inputs;
      if (need_r) inputs.push_back(rc);
      for (int i : slot) inputs.push_back(leaves[i - 1]);
      // What to differentiate (root) and with which gradient (droot).
      torch::Tensor root, droot;
      LoraLinearGrads down;
      if (w.gate_up && !inputs.empty() && cuda_ops::SwiGluBackwardWithForwardApplies(dyc)) {
        // Fused gate/up on the kernel path: down's input gradient needs no
        // activation, so it comes first; one SwiGLU kernel then writes the
        // gate/up gradient (over gate/up's output) and the activation that
        // down's LoRA gradients need, instead of recomputing it beforehand.
        torch::Tensor gu;
        {
          torch::AutoGradMode enable(true);
          KeepDenseScope keep(w.keep_dense);  // gate/up's backward follows within this chunk
          gu = w.GateUp(rc, leaves[0], leaves[1], leaves[2], leaves[3]);
        }
        torch::Tensor dact = LoraLinearBackward(dyc, torch::Tensor(), ad, bd, torch::Tensor(), *w.down, w.s_down,
                                                true, false, false)
                                 .dx;
        torch::Tensor act;
        std::tie(droot, act) = cuda_ops::SwiGluHalvesBackwardWithForward(gu.detach(), dact, /*in_place=*/true);
        root = gu;
        const bool need_da = ctx->needs_input_grad(5), need_db = ctx->needs_input_grad(6);
        if (ad.numel() > 0 && (need_da || need_db)) {
          down = LoraLinearBackward(dyc, act, ad, bd, ScaledLoraInput(act, ad, w.s_down), *w.down, w.s_down, false,
                                    need_da, need_db);
        }
      } else {
        torch::Tensor act;
        {
          torch::AutoGradMode enable(true);
          KeepDenseScope keep(w.keep_dense);  // gate/up's backward follows within this chunk
          act = w.Activation(rc, leaves[0], leaves[1], leaves[2], leaves[3]);
        }
        torch::Tensor xa = ad.numel() > 0 ? ScaledLoraInput(act.detach(), ad, w.s_down) : torch::Tensor();
        down = LoraLinearBackward(dyc, act.detach(), ad, bd, xa, *w.down, w.s_down, true, ctx->needs_input_grad(5),
                                  ctx->needs_input_grad(6));
        root = act;
        droot = down.dx;
      }
      accumulate(5, down.da);
      accumulate(6, down.db);
      if (inputs.empty() || !root.requires_grad()) {
        if (need_r) dr.slice(0, s, e).copy_(dyc);
        continue;
      }
      variable_list grads = torch::autograd::grad({root}, inputs, {droot}, /*retain_graph=*/false,
                                                  /*create_graph=*/false, /*allow_unused=*/true);
      size_t k = 0;
      if (need_r) {
        // The residual passes dy through; the normed path adds its gradient.
        torch::Tensor drc = dr.slice(0, s, e);
        if (grads[k].defined()) {
          at::add_out(drc, dyc, grads[k]);
        } else {
          drc.copy_(dyc);
        }
        ++k;
      }
      for (int i : slot) accumulate(i, grads[k++]);
    }
    for (int i = 1; i <= 6; ++i) {
      if (result[i].defined()) result[i] = result[i].to(saved[i].scalar_type());
    }
    result[0] = dr;
    return result;
  }
};

std::string LayerPrefix(int i) { return "model.layers." + std::to_string(i) + "."; }

std::string ModulePath(const std::string& module) {
  if (module == "gate_proj" || module == "up_proj" || module == "down_proj") return "mlp." + module;
  return "self_attn." + module;
}

void CheckShape(const torch::Tensor& t, const std::vector<int64_t>& want, const std::string& name) {
  if (t.sizes().vec() != want) {
    std::string w = "[", g = "[";
    for (auto d : want) w += std::to_string(d) + ",";
    for (auto d : t.sizes()) g += std::to_string(d) + ",";
    w.back() = ']';
    g.back() = ']';
    throw std::runtime_error("model weight \"" + name + "\" has shape " + g + " but config.json implies " + w);
  }
  if (!t.is_floating_point()) throw std::runtime_error("model weight \"" + name + "\" is not a floating-point tensor");
}

// t.to(device, dtype) that never aliases t: loaded tensors are views into
// an mmap that is unmapped once loading ends, so a no-op conversion must copy.
torch::Tensor OwnedCopy(const torch::Tensor& t, torch::Device device, torch::ScalarType dtype) {
  torch::Tensor r = t.to(device, dtype).contiguous();
  if (r.data_ptr() == t.data_ptr()) r = r.clone();
  return r;
}

}  // namespace

const std::vector<std::string>& LinearModuleNames() {
  static const std::vector<std::string> kNames = {"q_proj", "k_proj", "v_proj", "o_proj",
                                                  "gate_proj", "up_proj", "down_proj"};
  return kNames;
}

double LoraOptions::Scaling() const {
  return rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / static_cast<double>(r);
}

// ---------------------------------------------------------------- LinearWithLora

void LinearWithLora::SetBase(const torch::Tensor& weight, const LoadOptions& opts) {
  torch::NoGradGuard no_grad;
  out_ = weight.size(0);
  in_ = weight.size(1);
  compute_dtype_ = opts.compute_dtype;
  if (opts.base == "nf4") {
    nf4_ = nf4::Quantize(weight.to(opts.device), opts.block_size, opts.double_quant);
    weight_ = torch::Tensor();
  } else {
    weight_ = OwnedCopy(weight, opts.device, opts.compute_dtype);
    nf4_.reset();
  }
}

void LinearWithLora::EnableLora(const LoraOptions& lora, torch::Device device, at::Generator gen) {
  // PEFT: nn.init.kaiming_uniform_(A, a=sqrt(5)) -> bound = gain * sqrt(3 / fan_in)
  // with gain = sqrt(2 / (1 + a^2)) = sqrt(1/3), i.e. bound = 1 / sqrt(in).
  const double bound = 1.0 / std::sqrt(static_cast<double>(in_));
  torch::Tensor a = torch::empty({lora.r, in_}, torch::kFloat32);
  a.uniform_(-bound, bound, gen);
  lora_a_ = a.to(device).set_requires_grad(true);
  lora_b_ = torch::zeros({out_, lora.r}, torch::dtype(torch::kFloat32).device(device)).set_requires_grad(true);
  scaling_ = lora.Scaling();
  dropout_ = lora.dropout;
}

namespace {

c10::intrusive_ptr<FrozenWeight> Frozen(const std::vector<const LinearWithLora*>& group) {
  auto w = c10::make_intrusive<FrozenWeight>();
  w->in = group[0]->in_features();
  for (const LinearWithLora* lin : group) {
    w->parts.push_back({lin->nf4_weight(), lin->dense_weight(), lin->out_features()});  // shares the tensors
  }
  w->fold_lora = w->quantized() && w->Rows() > w->in;
  w->fold_lora_rows = w->quantized() && w->in > w->Rows();
  return w;
}

c10::intrusive_ptr<FrozenWeight> Frozen(const LinearWithLora& lin) { return Frozen({&lin}); }

// Whether the projections of `group` (same input) can run as one GEMM: LoRA
// on all or none of them, with one scaling and no active dropout.
bool CanFuse(const std::vector<const LinearWithLora*>& group, bool training) {
  for (const LinearWithLora* lin : group) {
    if (lin->has_lora() != group[0]->has_lora() || lin->scaling() != group[0]->scaling() ||
        lin->LoraDropoutActive(training)) {
      return false;
    }
  }
  return true;
}

// The spare columns ops::RmsNorm should leave after its rows for a group's
// folded LoRA input (FrozenWeight::Folds): the group's stacked rank, or 0
// when it does not fold.
int64_t FoldedLoraColumns(const std::vector<const LinearWithLora*>& group) {
  if (!group[0]->has_lora() || !Frozen(group)->fold_lora) return 0;
  int64_t r = 0;
  for (const LinearWithLora* lin : group) r += lin->lora_rank();
  return r;
}

// x [.., in] through a fusable group as one node: [.., sum out_i], member i's
// output in its columns (LoraLinearFunction on the stacked weights and LoRA).
// `x_spare`: x came from ops::RmsNorm with FoldedLoraColumns(group) spare
// columns and has no other reader. `kept_output`: see LoraLinearFunction; the
// first pass (grad mode off) puts the output there, the recompute (grad mode
// on) takes it back instead of running the GEMMs.
torch::Tensor FusedProjection(const std::vector<const LinearWithLora*>& group, const torch::Tensor& x,
                              bool x_spare = false, const Stash& kept_output = nullptr) {
  const LinearWithLora& first = *group[0];
  const torch::Tensor absent = Absent(x);
  torch::Tensor a = absent, b = absent;
  if (first.has_lora()) {
    std::vector<std::pair<torch::Tensor, torch::Tensor>> ab;
    for (const LinearWithLora* lin : group) ab.push_back(lin->LoraCopies(x.scalar_type(), absent));
    std::tie(a, b) = StackLora(ab);
  }
  c10::intrusive_ptr<FrozenWeight> w = Frozen(group);
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = w->Rows();
  const bool replay = kept_output && torch::GradMode::is_enabled();
  return LoraLinearFunction::apply(x.reshape({-1, first.in_features()}), a, b, absent, w, first.scaling(), replay,
                                   x_spare, kept_output)
      .view(shape);
}

}  // namespace

torch::Tensor LinearWithLora::Forward(const torch::Tensor& x, bool training, const torch::Tensor& residual,
                                      bool root_only) const {
  c10::intrusive_ptr<FrozenWeight> w = Frozen(*this);
  const torch::Tensor absent = Absent(x);
  torch::Tensor x2 = x.reshape({-1, in_});
  torch::Tensor r2 = residual.defined() ? residual.reshape({-1, out_}) : absent;
  const bool dropout = LoraDropoutActive(training);
  auto [a, b] = LoraCopies(x.scalar_type(), absent);
  torch::Tensor y;
  if (!dropout) {
    y = LoraLinearFunction::apply(x2, a, b, r2, w, scaling_, root_only, false, Stash());
  } else {
    // The LoRA branch sees dropout(x): composed from autograd ops, with the
    // update still accumulated into the base output in place.
    y = LoraLinearFunction::apply(x2, absent, absent, r2, w, 1.0, false, false, Stash());
    torch::Tensor xa = torch::linear(torch::dropout(x2, dropout_, /*train=*/true), a);
    if (scaling_ != 1.0) xa = xa * scaling_;
    y.addmm_(xa, b.t());
  }
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = out_;
  return y.view(shape);
}

std::pair<torch::Tensor, torch::Tensor> LinearWithLora::LoraCopies(torch::ScalarType dtype,
                                                                   const torch::Tensor& absent) const {
  if (!has_lora()) return {absent, absent};
  return {lora_a_.to(dtype), lora_b_.to(dtype)};
}

void LinearWithLora::StackDense(const std::vector<LinearWithLora*>& group) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> parts;
  for (LinearWithLora* lin : group) {
    if (!lin->weight_.defined()) return;
    parts.push_back(lin->weight_);
  }
  torch::Tensor stacked = torch::cat(parts);
  int64_t row = 0;
  for (LinearWithLora* lin : group) {
    lin->weight_ = stacked.narrow(0, row, lin->out_);
    row += lin->out_;
  }
}

int64_t LinearWithLora::StorageBytes() const {
  if (nf4_) return nf4_->StorageBytes();
  return weight_.defined() ? weight_.numel() * weight_.element_size() : 0;
}

torch::Tensor LinearWithLora::BaseWeight(torch::ScalarType dtype) const {
  torch::NoGradGuard no_grad;
  if (nf4_) return nf4::Dequantize(*nf4_, dtype);
  return weight_.to(dtype);
}

LinearWithLora* DecoderLayer::Linear(const std::string& name) {
  if (name == "q_proj") return &q_proj;
  if (name == "k_proj") return &k_proj;
  if (name == "v_proj") return &v_proj;
  if (name == "o_proj") return &o_proj;
  if (name == "gate_proj") return &gate_proj;
  if (name == "up_proj") return &up_proj;
  if (name == "down_proj") return &down_proj;
  return nullptr;
}

// ---------------------------------------------------------------- LlamaForCausalLM

LlamaForCausalLM::LlamaForCausalLM(LlamaConfig config, LoadOptions opts)
    : config_(std::move(config)), opts_(std::move(opts)) {}

std::shared_ptr<LlamaForCausalLM> LlamaForCausalLM::Load(const std::string& model_dir, const LoadOptions& opts) {
  namespace fs = std::filesystem;
  const LlamaConfig config = LlamaConfig::FromJsonFile((fs::path(model_dir) / "config.json").string());
  auto reader = safetensors::Reader::OpenDir(model_dir);
  auto get = [&](const std::string& name) -> torch::Tensor {
    if (!reader->Has(name)) {
      throw std::runtime_error(model_dir + ": weights lack tensor \"" + name +
                               "\" (is this a complete Llama checkpoint matching config.json?)");
    }
    return reader->View(name);
  };
  return FromTensors(config, get, opts);
}

std::shared_ptr<LlamaForCausalLM> LlamaForCausalLM::FromTensors(
    const LlamaConfig& config, const std::function<torch::Tensor(const std::string&)>& get,
    const LoadOptions& opts) {
  if (opts.base != "nf4" && opts.base != "bf16") {
    throw std::runtime_error("quantization.base must be nf4 or bf16 (got \"" + opts.base + "\")");
  }
  if (opts.compute_dtype != torch::kBFloat16 && opts.compute_dtype != torch::kFloat32 &&
      opts.compute_dtype != torch::kFloat16) {
    throw std::runtime_error("compute dtype must be bf16, fp16 or fp32");
  }
  if (opts.base == "nf4" && (opts.block_size <= 0 || opts.block_size % 2 != 0)) {
    throw std::runtime_error("quantization.block_size must be a positive even number (got " +
                             std::to_string(opts.block_size) + ")");
  }
  const auto& all = LinearModuleNames();
  std::set<std::string> targets;
  for (const auto& t : opts.lora.targets) {
    if (std::find(all.begin(), all.end(), t) == all.end()) {
      throw std::runtime_error("lora.targets: unknown module \"" + t +
                               "\" (choose from q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)");
    }
    targets.insert(t);
  }
  if (!targets.empty() && opts.lora.r <= 0) throw std::runtime_error("lora.r must be > 0");
  config.Validate("config");

  std::shared_ptr<LlamaForCausalLM> m(new LlamaForCausalLM(config, opts));
  // Canonical module order (PEFT stores target_modules as a set).
  m->opts_.lora.targets.clear();
  for (const auto& t : all) {
    if (targets.count(t)) m->opts_.lora.targets.push_back(t);
  }
  torch::NoGradGuard no_grad;
  const auto cdt = opts.compute_dtype;
  const int64_t H = config.hidden_size, I = config.intermediate_size, V = config.vocab_size;
  const int64_t q_dim = int64_t{config.num_attention_heads} * config.head_dim;
  const int64_t kv_dim = int64_t{config.num_key_value_heads} * config.head_dim;
  auto dense = [&](const std::string& name, const std::vector<int64_t>& shape, torch::Device where) {
    torch::Tensor t = get(name);
    CheckShape(t, shape, name);
    return OwnedCopy(t, where, cdt);
  };
  const bool host_embed = opts.host_embedding && !config.tie_word_embeddings;
  m->embed_ = dense("model.embed_tokens.weight", {V, H}, host_embed ? torch::Device(torch::kCPU) : opts.device);
  m->layers_.resize(config.num_hidden_layers);
  std::map<std::string, std::vector<int64_t>> shapes = {
      {"q_proj", {q_dim, H}},    {"k_proj", {kv_dim, H}}, {"v_proj", {kv_dim, H}}, {"o_proj", {H, q_dim}},
      {"gate_proj", {I, H}},     {"up_proj", {I, H}},     {"down_proj", {H, I}}};
  for (int i = 0; i < config.num_hidden_layers; ++i) {
    DecoderLayer& layer = m->layers_[i];
    const std::string p = LayerPrefix(i);
    layer.input_layernorm = dense(p + "input_layernorm.weight", {H}, opts.device);
    layer.post_attention_layernorm = dense(p + "post_attention_layernorm.weight", {H}, opts.device);
    for (const auto& mod : all) {
      const std::string name = p + ModulePath(mod) + ".weight";
      torch::Tensor w = get(name);
      CheckShape(w, shapes[mod], name);
      layer.Linear(mod)->SetBase(w, opts);
    }
    LinearWithLora::StackDense({&layer.q_proj, &layer.k_proj, &layer.v_proj});
    LinearWithLora::StackDense({&layer.gate_proj, &layer.up_proj});
  }
  m->norm_ = dense("model.norm.weight", {H}, opts.device);
  if (config.tie_word_embeddings) {
    m->lm_head_ = m->embed_;
  } else {
    m->lm_head_ = dense("lm_head.weight", {V, H}, opts.device);
  }
  m->inv_freq_ = ops::RopeInvFreq(config).to(opts.device);

  // LoRA A init from a CPU generator seeded by opts.seed: the same seed gives
  // the same adapters on every device and rank.
  at::Generator gen = at::detail::createCPUGenerator(opts.seed);
  for (int i = 0; i < config.num_hidden_layers; ++i) {
    for (const auto& mod : m->opts_.lora.targets) {
      LinearWithLora* lin = m->layers_[i].Linear(mod);
      lin->EnableLora(m->opts_.lora, opts.device, gen);
      std::string base = "layers_" + std::to_string(i) + "_" + mod;
      m->register_parameter(base + "_lora_A", lin->lora_a());
      m->register_parameter(base + "_lora_B", lin->lora_b());
    }
  }
  return m;
}

torch::Tensor LlamaForCausalLM::AttentionHalf(DecoderLayer& layer, const torch::Tensor& x, const torch::Tensor& cos,
                                              const torch::Tensor& sin, const torch::Tensor& segment_ids,
                                              bool root_only, const c10::intrusive_ptr<ops::KeptAttention>& kept,
                                              const Stash& kept_qkv) {
  const int64_t B = x.size(0), T = x.size(1);
  const int64_t hq = config_.num_attention_heads, hkv = config_.num_key_value_heads, d = config_.head_dim;
  const std::vector<const LinearWithLora*> qkv = {&layer.q_proj, &layer.k_proj, &layer.v_proj};
  const bool fuse = fused_projections_ && CanFuse(qkv, training_);
  const int64_t spare = fuse ? FoldedLoraColumns(qkv) : 0;
  torch::Tensor h = ops::RmsNorm(x, layer.input_layernorm, config_.rms_norm_eps, spare);
  torch::Tensor q, k, v;
  if (fuse) {
    // One GEMM; q/k/v are column views of its output (split's backward
    // writes their gradients into one buffer for the fused backward GEMM).
    std::vector<torch::Tensor> parts =
        FusedProjection(qkv, h, spare > 0, kept_qkv).split_with_sizes({hq * d, hkv * d, hkv * d}, -1);
    q = parts[0], k = parts[1], v = parts[2];
  } else {
    q = layer.q_proj.Forward(h, training_);
    k = layer.k_proj.Forward(h, training_);
    v = layer.v_proj.Forward(h, training_);
  }
  q = q.view({B, T, hq, d}).transpose(1, 2);
  k = k.view({B, T, hkv, d}).transpose(1, 2);
  v = v.view({B, T, hkv, d}).transpose(1, 2);
  q = ops::ApplyRope(q, cos, sin);
  k = ops::ApplyRope(k, cos, sin);
  // SDPA picks cuDNN for this layout and for all-contiguous or all-[B, T,
  // heads, d] inputs alike, at the same speed (bench/sdpa_backends.py --layouts).
  torch::Tensor a = kept ? ops::AttentionKeepingOutput(q, k, v.contiguous(), kept)
                        : ops::Attention(q, k, v.contiguous(), segment_ids);
  a = a.transpose(1, 2).reshape({B, T, hq * d});
  return layer.o_proj.Forward(a, training_, /*residual=*/x, root_only);
}

bool LlamaForCausalLM::MlpNodeApplies() const { return !(training_ && opts_.lora.dropout > 0); }

torch::Tensor LlamaForCausalLM::MlpHalf(DecoderLayer& layer, const torch::Tensor& r, bool as_node, bool root_only,
                                        const c10::intrusive_ptr<ops::KeptAttentionSlab>& slab, int64_t slot) {
  const int64_t H = config_.hidden_size, n = r.numel() / H;
  const std::vector<const LinearWithLora*> gate_up = {&layer.gate_proj, &layer.up_proj};
  const bool fuse = fused_projections_ && CanFuse(gate_up, training_);
  const int64_t spare = fuse ? FoldedLoraColumns(gate_up) : 0;
  if (!as_node || !MlpNodeApplies()) {
    torch::Tensor h = ops::RmsNorm(r, layer.post_attention_layernorm, config_.rms_norm_eps, spare);
    torch::Tensor act = fuse ? cuda_ops::SwiGluHalves(FusedProjection(gate_up, h, spare > 0))
                             : cuda_ops::SwiGlu(layer.gate_proj.Forward(h, training_),
                                                layer.up_proj.Forward(h, training_));
    return layer.down_proj.Forward(act, training_, /*residual=*/r);
  }
  auto w = c10::make_intrusive<MlpWeights>();
  w->norm = layer.post_attention_layernorm;
  w->eps = config_.rms_norm_eps;
  if (fuse) {
    w->gate_up = Frozen(gate_up);
    w->gate_up_spare = spare;
  } else {
    w->gate = Frozen(layer.gate_proj);
    w->up = Frozen(layer.up_proj);
  }
  w->down = Frozen(layer.down_proj);
  w->s_gate = layer.gate_proj.scaling();
  w->s_up = layer.up_proj.scaling();
  w->s_down = layer.down_proj.scaling();
  w->chunk = n > kMlpChunkAbove ? kMlpChunkTokens : std::max<int64_t>(n, 1);
  w->root_only = root_only;
  w->keep_dense = !OffloadsActivations();  // offload is for least memory
  w->slab = slab;
  w->slot = slot;
  const torch::Tensor absent = Absent(r);
  auto [ag, bg] = layer.gate_proj.LoraCopies(r.scalar_type(), absent);
  auto [au, bu] = layer.up_proj.LoraCopies(r.scalar_type(), absent);
  auto [ad, bd] = layer.down_proj.LoraCopies(r.scalar_type(), absent);
  torch::Tensor y = MlpFunction::apply(r.reshape({n, H}), ag, bg, au, bu, ad, bd, w);
  return y.view(r.sizes());
}

torch::Tensor LlamaForCausalLM::LayerForward(DecoderLayer& layer, const torch::Tensor& x, const torch::Tensor& cos,
                                             const torch::Tensor& sin, const torch::Tensor& segment_ids,
                                             bool root_only) {
  // With checkpointing the MLP runs as its node, so the recompute (root_only)
  // skips its forward: the node's backward recomputes gate/up itself and
  // never needs down's output.
  return MlpHalf(layer, AttentionHalf(layer, x, cos, sin, segment_ids),
                 /*as_node=*/checkpointing_, root_only);
}

bool LlamaForCausalLM::embedding_on_host() const { return embed_.is_cpu() && !opts_.device.is_cpu(); }

void LlamaForCausalLM::SetActivationOffload(bool on) {
  offload_ = on;
  // The input embedding is only gathered from: with offload on a GPU and an
  // untied head it stays in host memory (a tied one is also the LM head).
  const bool host = on && opts_.device.is_cuda() && !config_.tie_word_embeddings;
  if (host == embedding_on_host()) return;
  torch::NoGradGuard no_grad;
  embed_ = embed_.to(host ? torch::Device(torch::kCPU) : opts_.device);
}

torch::Tensor LlamaForCausalLM::Embed(const torch::Tensor& input_ids) const {
  if (!embedding_on_host()) return torch::embedding(embed_, input_ids.to(opts_.device));
  // Gather the rows on the host, then one pinned copy to the device.
  torch::Tensor rows = torch::embedding(embed_, input_ids.to(torch::kCPU));
  return rows.pin_memory().to(opts_.device, /*non_blocking=*/true);
}

torch::Tensor LlamaForCausalLM::ForwardHidden(const torch::Tensor& input_ids, const torch::Tensor& position_ids,
                                              const torch::Tensor& segment_ids) {
  if (input_ids.dim() != 2 || input_ids.scalar_type() != torch::kInt64) {
    throw std::invalid_argument("ForwardHidden: input_ids must be int64 [B,T]");
  }
  if (!position_ids.defined() || position_ids.sizes() != input_ids.sizes()) {
    throw std::invalid_argument("ForwardHidden: position_ids must be int64 [B,T] like input_ids");
  }
  if (segment_ids.defined() && segment_ids.sizes() != input_ids.sizes()) {
    throw std::invalid_argument("ForwardHidden: segment_ids must be [B,T] like input_ids");
  }
  const torch::Device dev = opts_.device;
  torch::Tensor pos = position_ids.to(dev, torch::kInt64);
  torch::Tensor seg = segment_ids.defined() ? segment_ids.to(dev, torch::kInt64) : torch::Tensor();
  torch::Tensor h = Embed(input_ids);
  auto [cos, sin] = ops::RopeCosSin(inv_freq_, pos, opts_.compute_dtype);
  const bool checkpoint = checkpointing_ && torch::GradMode::is_enabled();
  const bool offload = checkpoint && OffloadsActivations();
  // Selective: only the attention half is checkpointed; the MLP node keeps
  // its input instead (MlpFunction), so its output GEMM is never recomputed.
  const bool selective = checkpoint && selective_ && !offload && MlpNodeApplies();
  // Long sequences: the attention output is kept too, and the layer inputs
  // and q/k/v projection outputs wait in host memory (SetSelectiveRecompute).
  const bool keep_attention = selective && !seg.defined() && input_ids.size(1) > kKeepAttentionOutputAbove &&
                              ops::CanKeepAttentionOutput(h, config_.head_dim);
  // Offload, or selective keeping attention outputs: layer inputs wait in
  // host memory, copied on a side stream.
  std::optional<HostOffloader> offloader;
  if (offload || keep_attention) offloader.emplace(dev);
  auto lora_leaves = [](DecoderLayer& layer, bool attention_only) {
    std::vector<torch::Tensor> params;
    for (const auto& mod : LinearModuleNames()) {
      LinearWithLora* lin = layer.Linear(mod);
      if (attention_only && lin == &layer.gate_proj) break;  // gate, up, down follow
      if (lin->has_lora()) {
        params.push_back(lin->lora_a());
        params.push_back(lin->lora_b());
      }
    }
    return params;
  };
  // One block for all layers' kept attention outputs, one for the MLP nodes'
  // inputs (KeptAttentionSlab).
  const auto slab = keep_attention ? c10::make_intrusive<ops::KeptAttentionSlab>(static_cast<int64_t>(layers_.size()))
                                   : c10::intrusive_ptr<ops::KeptAttentionSlab>();
  for (auto& layer : layers_) {
    if (!checkpoint) {
      h = LayerForward(layer, h, cos, sin, seg);
      continue;
    }
    DecoderLayer* lp = &layer;
    // Captured by value: the closures run again during backward, with grad
    // mode on; the weights dequantised then are kept for the backward that
    // follows (t_keep_dense), except with offload, which is for least memory.
    if (selective) {
      const int64_t slot = &layer - layers_.data();
      c10::intrusive_ptr<ops::KeptAttention> kept;
      Stash input, qkv;
      if (keep_attention) {
        kept = c10::make_intrusive<ops::KeptAttention>();
        kept->slab = slab;
        kept->slot = slot;
        // The input and q/k/v's output come back together (the companion),
        // one layer ahead of the recompute that takes them; the last layer's
        // stay on the device (its backward is the first, nothing would hide
        // their copies back).
        input = offloader->NewStash(/*stay_on_device=*/slot + 1 == static_cast<int64_t>(layers_.size()));
        qkv = offloader->NewCompanion(input);
      }
      auto attention = [this, lp, cos = cos, sin = sin, seg, kept, qkv](const torch::Tensor& x) {
        // In the recompute the output (r) is only the backward's root: the
        // MLP node kept its own r, so o_proj's GEMMs are skipped (and with a
        // kept output, attention's forward too, and with a kept q/k/v output
        // its GEMMs).
        const bool recompute = torch::GradMode::is_enabled();
        KeepDenseScope scope(recompute);
        return AttentionHalf(*lp, x, cos, sin, seg, /*root_only=*/recompute, kept, qkv);
      };
      h = MlpHalf(layer, ops::Checkpoint(attention, h, lora_leaves(layer, true), input), /*as_node=*/true,
                  /*root_only=*/false, slab, slot);
      continue;
    }
    auto fn = [this, lp, cos = cos, sin = sin, seg](const torch::Tensor& x) {
      const bool recompute = torch::GradMode::is_enabled();
      KeepDenseScope scope(recompute && !OffloadsActivations());
      return LayerForward(*lp, x, cos, sin, seg, /*root_only=*/recompute);
    };
    h = ops::Checkpoint(fn, h, lora_leaves(layer, false), offloader ? offloader->NewStash() : nullptr);
  }
  return ops::RmsNorm(h, norm_, config_.rms_norm_eps);
}

torch::Tensor LlamaForCausalLM::LossSum(const torch::Tensor& hidden, const torch::Tensor& labels,
                                        int64_t chunk_tokens) {
  return ops::ChunkedCrossEntropySum(hidden, lm_head_, labels, chunk_tokens);
}

torch::Tensor LlamaForCausalLM::Logits(const torch::Tensor& hidden) {
  return hidden.matmul(lm_head_.t()).to(torch::kFloat32);
}

std::vector<std::pair<std::string, torch::Tensor>> LlamaForCausalLM::LoraParameters() {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (int i = 0; i < config_.num_hidden_layers; ++i) {
    for (const auto& mod : LinearModuleNames()) {
      LinearWithLora* lin = layers_[i].Linear(mod);
      if (!lin->has_lora()) continue;
      const std::string p = LayerPrefix(i) + ModulePath(mod);
      out.emplace_back(p + ".lora_A.weight", lin->lora_a());
      out.emplace_back(p + ".lora_B.weight", lin->lora_b());
    }
  }
  return out;
}

void LlamaForCausalLM::LoadLoraState(const std::vector<std::pair<std::string, torch::Tensor>>& state) {
  std::map<std::string, torch::Tensor> by_name;
  for (const auto& [name, t] : state) {
    if (!by_name.emplace(name, t).second) throw std::runtime_error("LoRA state has duplicate entry \"" + name + "\"");
  }
  auto params = LoraParameters();
  std::set<std::string> known;
  for (auto& [name, p] : params) {
    known.insert(name);
    auto it = by_name.find(name);
    if (it == by_name.end()) throw std::runtime_error("LoRA state lacks \"" + name + "\"");
    if (it->second.sizes() != p.sizes()) {
      throw std::runtime_error("LoRA state entry \"" + name + "\" has shape " + c10::str(it->second.sizes()) +
                               ", the model expects " + c10::str(p.sizes()) + " (different r or model?)");
    }
  }
  for (const auto& [name, t] : by_name) {
    if (!known.count(name)) {
      throw std::runtime_error("LoRA state entry \"" + name + "\" matches no LoRA parameter of this model "
                               "(different lora.targets or layer count?)");
    }
  }
  torch::NoGradGuard no_grad;
  for (auto& [name, p] : params) p.copy_(by_name[name]);
}

int64_t LlamaForCausalLM::NumLoraParameters() {
  int64_t n = 0;
  for (auto& [name, p] : LoraParameters()) n += p.numel();
  return n;
}

int64_t LlamaForCausalLM::BaseStorageBytes() const {
  int64_t b = norm_.numel() * norm_.element_size();
  if (!embedding_on_host()) b += embed_.numel() * embed_.element_size();
  if (!config_.tie_word_embeddings) b += lm_head_.numel() * lm_head_.element_size();
  for (const auto& layer : layers_) {
    b += (layer.input_layernorm.numel() + layer.post_attention_layernorm.numel()) * layer.input_layernorm.element_size();
    for (const auto& mod : LinearModuleNames()) {
      auto* lin = const_cast<DecoderLayer&>(layer).Linear(mod);
      b += lin->StorageBytes();
    }
  }
  return b;
}

}  // namespace tune::model
