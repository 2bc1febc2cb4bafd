// Memory planner against figures computed by hand for Llama-3-8B shapes
// (hidden 4096, 32 layers, 32 heads, 8 KV heads, head_dim 128,
// intermediate 14336, vocab 128256, untied lm_head). Every expected value
// below is arithmetic written out in the test, not a copy of the planner's
// output.
#include "worker/trainer/plan/memory_plan.h"

#include <gtest/gtest.h>

#include <cmath>
#include <functional>

namespace tune::plan {
namespace {

constexpr int64_t kGiB = int64_t{1} << 30;
constexpr int64_t kMiB = int64_t{1} << 20;

model::LlamaConfig Llama3_8B() {
  model::LlamaConfig c;
  c.vocab_size = 128256;
  c.hidden_size = 4096;
  c.intermediate_size = 14336;
  c.num_hidden_layers = 32;
  c.num_attention_heads = 32;
  c.num_key_value_heads = 8;
  c.head_dim = 128;
  c.tie_word_embeddings = false;
  return c;
}

// The typical job: seq 2048, effective batch 16, NF4 double quant block 64,
// adamw_8bit, LoRA r=16 on all seven linears, bf16, SDPA (torch >= 2.5).
PlanInputs Job8B(int64_t free_bytes) {
  PlanInputs in;
  in.model = Llama3_8B();
  in.seq_len = 2048;
  in.effective_batch_size = 16;
  in.free_bytes = free_bytes;
  return in;
}

// A card of `gib` GiB as `tune-train plan --gpu-memory-gb` sees it.
int64_t Card(int64_t gib) { return gib * kGiB - kCudaContextBytes; }

// Linear elements per layer: q, o 4096x4096; k, v 1024x4096; gate, up, down 14336x4096.
constexpr int64_t kLinearPerLayer = 2 * 4096LL * 4096 + 2 * 1024LL * 4096 + 3 * 14336LL * 4096;  // 218,103,808
// Embeddings + lm_head (bf16) + 65 RMSNorm weights (bf16).
constexpr int64_t kDense = 2 * 128256LL * 4096 * 2 + 65LL * 4096 * 2;  // 2,101,878,784

TEST(MemoryPlanTest, Nf4WeightBytesFor8B) {
  static_assert(kLinearPerLayer == 218103808);
  static_assert(kDense == 2101878784);
  PlanInputs in = Job8B(0);
  // Double quant: 4-bit codes (numel/2) + one uint8 absmax per 64-block +
  // per tensor one fp32 scale per 256 blocks and one fp32 offset:
  //   q/o: 262,144 blocks -> 1024 scales; k/v: 65,536 -> 256; gate/up/down: 917,504 -> 3584.
  const int64_t scales_per_layer = 2 * (1024 * 4 + 4) + 2 * (256 * 4 + 4) + 3 * (3584 * 4 + 4);  // 53,276
  const int64_t dq = kDense + 32 * (kLinearPerLayer / 2 + kLinearPerLayer / 64 + scales_per_layer);
  EXPECT_EQ(dq, 5702296448);
  EXPECT_EQ(BaseWeightBytes(in), dq);
  // The calibration run reported 5.47 GiB "NF4 weights" right after loading:
  // that figure includes the fp32 LoRA parameters (41,943,040 x 4 bytes).
  EXPECT_NEAR(static_cast<double>(dq + 41943040LL * 4) / kGiB, 5.47, 0.005);

  in.double_quant = false;  // fp32 absmax per 64-block
  EXPECT_EQ(BaseWeightBytes(in), kDense + 32 * (kLinearPerLayer / 2 + kLinearPerLayer / 64 * 4));
  in.base = "bf16";  // dense in the compute dtype
  EXPECT_EQ(BaseWeightBytes(in), kDense + 32 * kLinearPerLayer * 2);
}

TEST(MemoryPlanTest, LoraParameterCountR16AllLinears) {
  // r x (in + out) per module:
  //   q 16x(4096+4096)=131,072  k 16x(4096+1024)=81,920  v 81,920  o 131,072
  //   gate 16x(4096+14336)=294,912  up 294,912  down 294,912  -> 1,310,720 per layer
  //   x 32 layers = 41,943,040.
  PlanInputs in = Job8B(0);
  EXPECT_EQ(LoraParameterCount(in), 41943040);
  in.lora_targets = {"q_proj", "v_proj"};
  EXPECT_EQ(LoraParameterCount(in), 32 * (131072 + 81920));
}

TEST(MemoryPlanTest, OptimizerBytesEightBitVersusFp32) {
  PlanInputs in = Job8B(0);
  // 8-bit: every LoRA tensor has >= 4096 elements and a multiple of 256:
  // m and v take one byte per element plus one fp32 absmax per 256.
  EXPECT_EQ(OptimizerStateBytes(in), 2 * 41943040LL + 2 * (41943040LL / 256) * 4);  // 85,196,800
  in.optimizer = "adamw";  // fp32 m and v
  EXPECT_EQ(OptimizerStateBytes(in), 8 * 41943040LL);  // 335,544,320
}

TEST(MemoryPlanTest, AdamDenominatorsPeakWhenLoraDwarfsTheActivations) {
  // fp32 AdamW with r = 512 on all linears: 32 x 512 x (4096+4096 + 4096+1024 +
  // 4096+1024 + 4096+4096 + 3 x (4096+14336)) = 1,342,177,280 LoRA parameters.
  // Its update holds sqrt(v) as a new fp32 tensor per parameter, 4 bytes each
  // = 5,368,709,120 bytes on top of everything persistent; at 16 tokens no
  // activation phase comes near it.
  PlanInputs in = Job8B(0);
  in.optimizer = "adamw";
  in.lora_r = 512;
  in.seq_len = 16;
  ASSERT_EQ(LoraParameterCount(in), 1342177280);
  const Breakdown b = PlanFor(in, 1, Checkpointing::kOff);
  EXPECT_EQ(b.peak_phase, "optimizer");
  EXPECT_EQ(b.transient, 4 * 1342177280LL);
  EXPECT_EQ(b.activations, 0);
  EXPECT_EQ(b.peak_allocated, b.weights + b.lora + b.optimizer + b.workspace + 4 * 1342177280LL);
  // torch's fused AdamW (CUDA, torch >= 2.1) makes no denominators either.
  PlanInputs fused = in;
  SetTorchBuild(fused, 2, 11);
  ASSERT_TRUE(fused.fused_adamw);
  EXPECT_NE(PlanFor(fused, 1, Checkpointing::kOff).peak_phase, "optimizer");
  SetTorchBuild(fused, 1, 13);
  EXPECT_FALSE(fused.fused_adamw);
  EXPECT_FALSE(fused.cudnn_attention);
  // 8-bit AdamW keeps no fp32 state for tensors of 4096 elements or more (all
  // of these): no denominators, so an activation phase is the peak.
  in.optimizer = "adamw_8bit";
  EXPECT_NE(PlanFor(in, 1, Checkpointing::kOff).peak_phase, "optimizer");
}

TEST(MemoryPlanTest, ActivationsPerTokenWithAndWithoutCheckpointing) {
  PlanInputs in = Job8B(0);
  // One layer, bf16, SDPA, per token:
  //   2 RMSNorms: fp32 input 4x4096 + 1/rms 4, bf16 output 2x4096    2 x (16,388 + 8,192) = 49,160
  //   rotated q 2x4096, k 2x1024, contiguous v 2x1024                                      12,288
  //   SDPA output 2x4096 + fp32 logsumexp 4x32                                              8,320
  //   attention output transposed copy (o_proj LoRA input) 2x4096                           8,192
  //   MLP: gate, silu(gate), up, product 4 x 2x14336                                      114,688
  //   7 LoRA A outputs 7 x 2x16                                                               224
  const int64_t layer = 49160 + 12288 + 8320 + 8192 + 114688 + 224;
  EXPECT_EQ(layer, 192872);
  EXPECT_EQ(LayerActivationBytesPerToken(in), layer);
  EXPECT_EQ(SavedActivationBytesPerToken(in, Checkpointing::kOff), 32 * layer);     // 6,171,904
  EXPECT_EQ(SavedActivationBytesPerToken(in, Checkpointing::kOn), 32 * 4096 * 2);  // 262,144: layer inputs
  // The math path (torch 1.x) keeps fp32 + bf16 probabilities, 32 heads x T
  // per token, and the T-wide boolean mask, but no SDPA output/logsumexp.
  in.attention = AttentionKernel::kMath;
  EXPECT_EQ(LayerActivationBytesPerToken(in), layer - 8320 + 32 * 2048 * (4 + 2) + 2048);
}

// Peak of the calibration run (H200, torch 2.11): micro 1, seq 2048,
// checkpointing on. Cross-entropy backward is the peak phase:
//   persistent = weights 5,702,296,448 + LoRA params+grads 335,544,320
//              + 8-bit states 85,196,800 + 2 cuBLAS workspaces 67,108,864 = 6,190,146,432
//   layer inputs 262,144 x 2048 = 536,870,912; final RMSNorm fp32 input + normed
//   hidden 2048x4096x6 = 50,331,648; 2047 selected rows + their grad 2x2047x4096x2
//   = 33,538,048; one 1024-row chunk bf16 + fp32 + fp32 softmax 1024x128256x10 =
//   1,313,341,440  -> 8,124,228,480 bytes = 7.566 GiB (measured 7.57 GiB).
TEST(MemoryPlanTest, PredictsTheMeasured8BPeak) {
  PlanInputs in = Job8B(0);
  const Breakdown b = PlanFor(in, 1, Checkpointing::kOn);
  EXPECT_EQ(b.peak_allocated, 8124228480);
  EXPECT_EQ(b.peak_phase, "cross_entropy_backward");
  EXPECT_EQ(b.weights + b.lora + b.optimizer + b.workspace, 6190146432);
  EXPECT_EQ(b.logits, 33538048 + 1313341440);
  EXPECT_LT(std::abs(static_cast<double>(b.peak_allocated) / kGiB - 7.57) / 7.57, 0.01);
  EXPECT_EQ(b.reserved % (2 * kMiB), 0);
  EXPECT_GE(b.reserved, static_cast<int64_t>(b.peak_allocated * (1 + kFragmentation)));
}

// With checkpointing on, micro m >= 4 peaks in the last layer's backward,
// while the MLP node differentiates inside the layer's recompute:
//   536,870,912m (inputs) + 192,872 x 2048m (recomputed layer) + 8,192 x 2048m
//   (its output, the root of its backward) + 8,192 x 2048m (the node's input r)
//   + 2 x 1,310,720 (bf16 LoRA copies)
//   + the NF4 dequant of the stacked gate/up without the fused kernel: its bf16
//   buffer 2 x 117,440,512 and one 14336x4096 member's int64 indices + fp32
//   values 8 x 58,720,256 = 704,643,072 (more than the layer's seven bf16
//   weights the recompute keeps for their backward, 436,207,616) + 2048m x 2 x
//   (2 x 4096 + 14336) (gradients: incoming, the node's own, one [I]) =
//   1,057,701,888m + 707,264,512.
int64_t PeakOn(int m) { return 6190146432LL + 1057701888LL * m + 707264512LL; }
// Without checkpointing the cross-entropy backward is the peak:
//   6,171,904 x 2048m (all layers) + 32 x 2,621,440 (LoRA copies) + 2048m x 4096 x 6
//   + 2047m x 16,384 + 1,313,341,440.
int64_t PeakOff(int m) {
  return 6190146432LL + 6171904LL * 2048 * m + 32LL * 2621440 + 50331648LL * m + 33538048LL * m + 1313341440LL;
}
int64_t Budget(int64_t gib) { return static_cast<int64_t>(static_cast<double>(Card(gib)) * 0.90); }
bool Fits(int64_t peak, int64_t gib) { return static_cast<double>(peak) * 1.10 <= static_cast<double>(Budget(gib)); }

TEST(MemoryPlanTest, HandFiguresBehindTheChoices) {
  // The arithmetic the choice tests rely on, checked against the planner once.
  PlanInputs in = Job8B(0);
  for (int m : {4, 8, 16}) EXPECT_EQ(PlanFor(in, m, Checkpointing::kOn).peak_allocated, PeakOn(m)) << m;
  for (int m : {1, 2, 4}) EXPECT_EQ(PlanFor(in, m, Checkpointing::kOff).peak_allocated, PeakOff(m)) << m;
}

struct ChoiceCase {
  int64_t gib;
  int micro, accum;
  Checkpointing ckpt;
};

TEST(MemoryPlanTest, ChoosesSplitPerGpuSize) {
  // 16 GiB: on m=8 needs 15,359,026,048 x 1.1 > 14,978,698,444 budget; m=4 fits.
  EXPECT_FALSE(Fits(PeakOn(8), 16));
  EXPECT_TRUE(Fits(PeakOn(4), 16));
  // 24 GiB: off fits only at m=1 (< 4: recomputing with m=8 is faster); on m=8 fits, m=16 does not.
  EXPECT_TRUE(Fits(PeakOff(1), 24));
  EXPECT_FALSE(Fits(PeakOff(2), 24));
  EXPECT_TRUE(Fits(PeakOn(8), 24));
  EXPECT_FALSE(Fits(PeakOn(16), 24));
  // 40 GiB: off fits up to m=2 (< 4); on m=16 (the whole batch) fits.
  EXPECT_TRUE(Fits(PeakOff(2), 40));
  EXPECT_FALSE(Fits(PeakOff(4), 40));
  EXPECT_TRUE(Fits(PeakOn(16), 40));
  // 80 GiB: off fits at m=4 (58,483,090,304 x 1.1 < 76,826,227,507), not at m=8.
  EXPECT_TRUE(Fits(PeakOff(4), 80));
  EXPECT_FALSE(Fits(PeakOff(8), 80));

  const ChoiceCase cases[] = {{16, 4, 4, Checkpointing::kOn},
                              {24, 8, 2, Checkpointing::kOn},
                              {40, 16, 1, Checkpointing::kOn},
                              {80, 4, 4, Checkpointing::kOff}};
  for (const ChoiceCase& c : cases) {
    const MemoryPlan p = ChoosePlan(Job8B(Card(c.gib)));
    EXPECT_TRUE(p.fits) << c.gib << " GiB";
    EXPECT_EQ(p.micro_batch_size, c.micro) << c.gib << " GiB";
    EXPECT_EQ(p.grad_accum, c.accum) << c.gib << " GiB";
    EXPECT_EQ(p.checkpointing, c.ckpt) << c.gib << " GiB";
    EXPECT_EQ(p.micro_batch_size * p.grad_accum * 1, 16) << c.gib << " GiB";
    EXPECT_EQ(p.budget_bytes, Budget(c.gib));
    EXPECT_LE(p.breakdown.reserved, p.budget_bytes);
  }
}

// The untied input embedding (128,256 x 4096 bf16).
constexpr int64_t kEmbedding = 128256LL * 4096 * 2;  // 1,050,673,152

TEST(MemoryPlanTest, EightGigabytesFitsWithOffload) {
  static_assert(kEmbedding == 1050673152);
  // Micro 1 with checkpointing on needs 8,124,228,480 x 1.1 of a
  // 7,247,757,312 budget. Offload keeps the layer inputs and the untied
  // embedding in host memory: persistent 6,190,146,432 - 1,050,673,152 =
  // 5,139,473,280, peak in the cross-entropy backward + 50,331,648 (final
  // norm) + 33,538,048 (rows) + 1,313,341,440 (chunk) = 6,536,684,416; x 1.1 =
  // 7,190,352,858 -> 3429 x 2 MiB = 7,191,134,208 reserved, fits by 56,623,104.
  EXPECT_FALSE(Fits(8124228480, 8));
  const MemoryPlan p = ChoosePlan(Job8B(Card(8)));
  EXPECT_TRUE(p.fits) << p.reason;
  EXPECT_EQ(p.micro_batch_size, 1);
  EXPECT_EQ(p.grad_accum, 16);
  EXPECT_EQ(p.checkpointing, Checkpointing::kOffload);
  EXPECT_EQ(p.breakdown.weights, 5702296448LL - kEmbedding);
  EXPECT_EQ(p.breakdown.peak_allocated, 6536684416LL);
  EXPECT_EQ(p.breakdown.reserved, 3429 * 2 * kMiB);
  EXPECT_EQ(Budget(8) - p.breakdown.reserved, 56623104LL);
}

TEST(MemoryPlanTest, PinnedBlocksRoundToEighthsOfAPowerOfTwo) {
  EXPECT_EQ(model::PinnedBlockBytes(1), 2 * kMiB);
  EXPECT_EQ(model::PinnedBlockBytes(16 * kMiB), 16 * kMiB);  // seq 2048 x hidden 4096 x bf16
  // 3 MiB + 1: between 2 MiB and 4 MiB, classes of 256 KiB -> 13 x 256 KiB.
  EXPECT_EQ(model::PinnedBlockBytes(3 * kMiB + 1), 13 * 256 * 1024LL);
  // seq 344,064: 2,818,572,288 bytes; 2^31 <= it < 2^32, classes of 2^28 -> 11 x 2^28.
  EXPECT_EQ(model::PinnedBlockBytes(344064LL * 4096 * 2), 11 * (int64_t{1} << 28));
}

// Per token of one Llama-3-8B layer with the fused kernels, SDPA, bf16, LoRA
// r=16 on all linears. Attention half: RMSNorm input + 1/rms 8,196; q/k/v
// LoRA A input 8,192; q, k, v 12,288 + output 8,192 + fp32 logsumexp 128;
// o_proj LoRA input 8,192; four LoRA A outputs 128 -> 45,316. MLP half:
// RMSNorm 8,196; gate/up LoRA input 8,192; gate and up 57,344; down's input
// 28,672; three LoRA A outputs 96 -> 102,500.
constexpr int64_t kAttnHalf = 45316, kMlpHalf = 102500;
// Compute-dtype LoRA copies: one layer's all (16 x 81,920 params x 2 bytes)
// and its MLP's (16 x 3 x 18,432 x 2).
constexpr int64_t kLayerCasts = 2621440, kMlpCasts = 1769472;

PlanInputs Fused8B(int64_t seq) {
  PlanInputs in = Job8B(0);
  in.seq_len = seq;
  in.effective_batch_size = 1;
  in.fused_kernels = true;
  in.optimizer = "adamw";
  return in;
}

TEST(MemoryPlanTest, SelectiveKeepsTwoTensorsPerLayerAndRecomputesTheMlpInANode) {
  PlanInputs in = Fused8B(2048);
  EXPECT_EQ(LayerActivationBytesPerToken(in), kAttnHalf + kMlpHalf);
  EXPECT_EQ(SavedActivationBytesPerToken(in, Checkpointing::kSelective), 2 * 32 * 4096 * 2);
  // 8 x 2048 tokens: the MLP node's backward (16,384 x 102,500) outweighs the
  // attention half's recompute (16,384 x (45,316 + 8,192) + all LoRA copies),
  // on top of 32 layers x 2 x 16,384 x 8,192 and every MLP node's LoRA copies.
  const int64_t N = 8 * 2048;
  const Breakdown b = PlanFor(in, 8, Checkpointing::kSelective);
  ASSERT_EQ(b.peak_phase, "layer_backward");
  EXPECT_EQ(b.activations, 32 * 2 * N * 8192 + 32 * kMlpCasts + N * kMlpHalf);
  // Transient: gate and up as the recompute dequantised them (kept for their
  // backward) and down's dequantised copy, 3 x 117,440,512 bf16; the incoming
  // gradient and the node's own gradient (2 x N x 8,192), one [N, I] gradient.
  EXPECT_EQ(b.transient, 3 * 14336LL * 4096 * 2 + 2 * N * 8192 + N * 14336 * 2);
  // With LoRA dropout the model checkpoints whole layers: the plan is "on".
  in.lora_dropout = 0.1;
  EXPECT_EQ(PlanFor(in, 8, Checkpointing::kSelective).peak_allocated,
            PlanFor(in, 8, Checkpointing::kOn).peak_allocated);
}

// Above model::kKeepAttentionOutputAbove selective also keeps each layer's
// attention output and its fp32 log-sum-exp (32 heads), while the layer
// input and the fused q/k/v output wait in pinned host memory: against
// selective without kept outputs (cuDNN not first) the device holds the
// log-sum-exp more per layer and two layers' inputs and q/k/v outputs (the
// layer's own and the prefetched ones); the host holds 31 of each (the last
// layer's stay on the device).
TEST(MemoryPlanTest, SelectiveKeepsAttentionOutputsAboveTheThreshold) {
  PlanInputs in = Fused8B(8192);
  ASSERT_TRUE(KeepsAttentionOutput(in));
  const int64_t per_token = 4096 * 2 + 32 * 4;  // output (32 x 128 bf16) + log-sum-exp, one layer
  EXPECT_EQ(SavedActivationBytesPerToken(in, Checkpointing::kSelective), 32 * (4096 * 2 + per_token));
  const int64_t N = 2 * 8192;
  PlanInputs residual_only = in;
  residual_only.cudnn_attention = false;
  ASSERT_FALSE(KeepsAttentionOutput(residual_only));
  const Breakdown sel = PlanFor(in, 2, Checkpointing::kSelective),
                  res = PlanFor(residual_only, 2, Checkpointing::kSelective);
  EXPECT_EQ(sel.peak_phase, res.peak_phase);
  // The log-sum-exps, and two layers' inputs and fused q/k/v outputs (4096 +
  // 2 x 1024 columns) on the device while backward fetches them.
  const int64_t qkv = (4096 + 2 * 1024) * 2;
  EXPECT_EQ(sel.activations - res.activations, 32 * N * 32 * 4 + 2 * N * (8192 + qkv));
  EXPECT_EQ(sel.transient, res.transient);
  // 128 and 192 MiB per layer but the last: block size classes of their own.
  EXPECT_EQ(sel.host, 31 * (N * 8192) + 31 * (N * qkv));
  EXPECT_EQ(res.host, 0);
  // Without the host memory: the plan does not fit, and the fixes say how.
  in.micro_batch_size = 2;
  in.effective_batch_size = 2;
  in.checkpointing = "selective";
  in.free_bytes = int64_t{80} << 30;
  in.host_free_bytes = int64_t{2} << 30;
  const MemoryPlan plan = ChoosePlan(in);
  EXPECT_FALSE(plan.fits);
  EXPECT_GT(plan.host_shortfall_bytes, 0);
  EXPECT_NE(plan.fix.find("selective keeps the layer inputs and q/k/v outputs there"), std::string::npos) << plan.fix;
  EXPECT_NE(plan.fix.find("gradient_checkpointing: on"), std::string::npos) << plan.fix;
  // Where the model keeps the residual instead: at the threshold, with
  // packing (segment masks), in fp32, on CPU, with math attention.
  for (auto change : std::vector<std::function<void(PlanInputs&)>>{
           [](PlanInputs& p) { p.seq_len = model::kKeepAttentionOutputAbove; },
           [](PlanInputs& p) { p.packing = true; }, [](PlanInputs& p) { p.precision = "fp32"; },
           [](PlanInputs& p) { p.cuda = false; }, [](PlanInputs& p) { p.attention = AttentionKernel::kMath; },
           [](PlanInputs& p) { p.cudnn_attention = false; }}) {
    PlanInputs other = in;
    change(other);
    EXPECT_FALSE(KeepsAttentionOutput(other));
    EXPECT_EQ(SavedActivationBytesPerToken(other, Checkpointing::kSelective),
              2 * 32 * 4096 * other.ComputeBytes());
  }
}

TEST(MemoryPlanTest, LongContextOffloadChunksTheMlp) {
  // Seq 344,064 (above Unsloth's 342,733), batch 1, offload. The layer being
  // recomputed holds its fetched input and the prefetched one (2 x 8,192 per
  // token). While the MLP node differentiates: the attention half, the node's
  // input r and the layer output (2 x 8,192), all LoRA copies, one
  // 16,384-token chunk of the MLP; gradients: incoming + the node's own (2 x
  // 8,192) and the chunk's [I]. Then the attention half's backward: its
  // activations without o_proj's input (45,316 - 8,192), the incoming gradient
  // and the layer output (2 x 8,192), all LoRA copies; transient: the
  // attention output's gradient (8,192) and SDPA's backward buffers (5 x 8,192
  // + 2 x 2,048 + 128 = 45,184), plus the largest dense weight, the stacked
  // gate/up (2 x 14336x4096 bf16; offload keeps no recomputed weight for its
  // backward). The second is the peak: the chunked MLP no longer bounds the
  // length.
  const int64_t N = 344064;
  const int64_t gate_up = 2 * 14336LL * 4096 * 2;
  const int64_t mlp_phase = N * (16384 + kAttnHalf + 16384) + kLayerCasts + 16384 * kMlpHalf + gate_up +
                            2 * N * 8192 + 16384LL * 14336 * 2;
  const int64_t attn_act = N * (16384 + kAttnHalf - 8192 + 16384) + kLayerCasts;
  const int64_t attn_transient = gate_up + N * (8192 + 45184);
  EXPECT_GT(attn_act + attn_transient, mlp_phase);
  const Breakdown b = PlanFor(Fused8B(N), 1, Checkpointing::kOffload);
  ASSERT_EQ(b.peak_phase, "layer_backward");
  EXPECT_EQ(b.activations, attn_act);
  EXPECT_EQ(b.transient, attn_transient);
  // 44.63 GiB in all (44.77 GiB with the stacked gate/up and the GEMM + residual workspace); measured 47.30 GiB
  // on the H200 before fused projections and before the trainer let go
  // of the final hidden states (8,192 per token) ahead of backward. The whole
  // layer unchunked (147,816 per token kept) would need 47.4 GiB for
  // activations alone.
  // Persistent: NF4 weights without the embedding 4,651,623,296, LoRA params +
  // grads and fp32 AdamW states 2 x 335,544,320, two cuBLAS workspaces and
  // the fused GEMM + residual's.
  EXPECT_EQ(b.peak_allocated, 4651623296LL + 2 * 335544320LL + 3 * 33554432LL + attn_act + attn_transient);
  EXPECT_EQ(b.peak_allocated, 48072958848LL);
  // Host: 32 pinned blocks of 11 x 2^28 bytes and the embedding.
  EXPECT_EQ(b.host, 32 * 11 * (int64_t{1} << 28) + kEmbedding);
}

TEST(MemoryPlanTest, ShorterMicroBatchesWithAnUnchunkedMlpArePlannedFor) {
  // Collate pads a micro-batch only to its own longest example, so a plan for
  // 80,000 tokens (MLP chunked) must also hold a 65,536-token micro-batch,
  // whose MLP runs whole and needs more.
  const Breakdown at_threshold = PlanFor(Fused8B(model::kMlpChunkAbove), 1, Checkpointing::kOffload);
  const Breakdown longer = PlanFor(Fused8B(80000), 1, Checkpointing::kOffload);
  EXPECT_EQ(longer.peak_allocated, at_threshold.peak_allocated);
  EXPECT_EQ(longer.host, 32 * model::PinnedBlockBytes(80000LL * 8192) + kEmbedding);  // sized for the longest
  // Far above the threshold the chunked plan of the longest is the larger.
  EXPECT_GT(PlanFor(Fused8B(344064), 1, Checkpointing::kOffload).peak_allocated, at_threshold.peak_allocated);
}

TEST(MemoryPlanTest, OffloadMustFitHostMemoryToo) {
  // Offload, micro 1, seq 2048 holds in host memory 32 layers x 2048 x 4096 x 2
  // = 536,870,912 of layer inputs plus the 1,050,673,152-byte embedding.
  const int64_t host = 32LL * 2048 * 4096 * 2 + kEmbedding;
  EXPECT_EQ(host, 1587544064LL);
  EXPECT_EQ(PlanFor(Job8B(0), 1, Checkpointing::kOffload).host, host);
  EXPECT_EQ(PlanFor(Job8B(0), 1, Checkpointing::kOn).host, 0);
  PlanInputs in = Job8B(Card(8));  // device: only offload fits (above)
  in.host_free_bytes = 2 * kGiB;   // budget 0.9 x 2 GiB = 1,932,735,283: fits
  EXPECT_TRUE(ChoosePlan(in).fits);
  in.host_free_bytes = kGiB;  // budget 966,367,641: short by 621,176,423
  const MemoryPlan p = ChoosePlan(in);
  EXPECT_FALSE(p.fits);
  EXPECT_EQ(p.checkpointing, Checkpointing::kOffload);
  EXPECT_EQ(p.shortfall_bytes, 0);
  EXPECT_EQ(p.host_budget_bytes, 966367641LL);
  EXPECT_EQ(p.host_shortfall_bytes, host - 966367641LL);
  EXPECT_EQ(p.ShortfallText(), "host memory short by 592.4 MiB");
  EXPECT_NE(p.fix.find("of available host memory"), std::string::npos) << p.fix;
  EXPECT_EQ(p.fix.find("use a GPU with at least"), std::string::npos) << p.fix;
  // seq 512 holds 134,217,728 + 1,050,673,152 = 1,184,890,880 > the budget too:
  // no sequence length helps while the embedding alone exceeds it.
  EXPECT_EQ(p.fix.find("dataset.max_seq_length"), std::string::npos) << p.fix;
  EXPECT_NE(FormatPlan(in, p).find("host memory short by"), std::string::npos);
}

TEST(MemoryPlanTest, SixGigabytesIsShortAndSaysWhy) {
  const MemoryPlan p = ChoosePlan(Job8B(Card(6)));
  EXPECT_FALSE(p.fits);
  EXPECT_EQ(p.micro_batch_size, 1);  // the smallest plan: micro 1 + offload
  EXPECT_EQ(p.grad_accum, 16);
  EXPECT_EQ(p.checkpointing, Checkpointing::kOffload);
  // 7,191,134,208 reserved (above) against 0.9 x 5.5 GiB = 5,315,022,028.
  EXPECT_EQ(p.breakdown.reserved, 3429 * 2 * kMiB);
  EXPECT_EQ(p.shortfall_bytes, 3429 * 2 * kMiB - Budget(6));
  // No sequence length helps: persistent memory with offload plus one
  // dequantised stacked gate/up (704,643,072, see PeakOn) is 5,844,116,352 x 1.1 > the budget.
  EXPECT_FALSE(Fits(6190146432LL - kEmbedding + 704643072LL, 6));
  EXPECT_EQ(p.fix.find("dataset.max_seq_length"), std::string::npos) << p.fix;
  EXPECT_NE(p.fix.find("GPU with at least"), std::string::npos) << p.fix;
  EXPECT_NE(FormatPlan(Job8B(Card(6)), p).find("DOES NOT FIT"), std::string::npos);
}

TEST(MemoryPlanTest, NineGigabytesWithCheckpointingOnNeedsShorterSequences) {
  // Budget 0.9 x 8.5 GiB = 8,214,191,718. Checkpointing on, seq 2048, micro 1:
  // the cross-entropy backward's 8,124,228,480 (above PeakOn(1) =
  // 7,955,112,832), x 1.1 too big. seq 1024: 6,190,146,432 + 268,435,456
  // (inputs) + 25,165,824 (final norm) + 16,760,832 (rows) + 1,313,341,440
  // (chunk) = 7,813,849,984, x 1.1 too big. seq 512: the chunk shrinks to 511
  // rows (7,000,707,456 in all) and the layer backward peaks: 134,217,728
  // (inputs) + 192,872 x 512 (recomputed layer) + 2 x 8,192 x 512 (its output,
  // the MLP node's input) + 2,621,440 (LoRA copies) + 704,643,072 (dequant) +
  // 512 x 2 x (2 x 4096 + 14336) -> 7,161,836,416, x 1.1 fits. Offload at seq
  // 2048 (6,536,684,416) fits too, and is what auto picks; at seq 512 it needs
  // 7,161,836,416 - 134,217,728 (inputs) + 2 x 4,194,304 (fetched +
  // prefetched input) - 1,050,673,152 (embedding) = 5,985,334,144.
  EXPECT_FALSE(Fits(8124228480LL, 9));
  EXPECT_FALSE(Fits(7813849984LL, 9));
  EXPECT_TRUE(Fits(7161836416LL, 9));
  EXPECT_TRUE(Fits(6536684416LL, 9));
  PlanInputs shorter = Job8B(0);
  shorter.seq_len = 512;
  EXPECT_EQ(PlanFor(shorter, 1, Checkpointing::kOn).peak_allocated, 7161836416LL);
  EXPECT_EQ(PlanFor(shorter, 1, Checkpointing::kOffload).peak_allocated, 5985334144LL);
  PlanInputs on = Job8B(Card(9));
  on.checkpointing = "on";
  const MemoryPlan p = ChoosePlan(on);
  EXPECT_FALSE(p.fits);
  EXPECT_NE(p.fix.find("lower dataset.max_seq_length to 512"), std::string::npos) << p.fix;
  EXPECT_NE(p.fix.find("gradient_checkpointing: auto"), std::string::npos) << p.fix;
  // Auto: offload, and micro 2 fits there: its layer backward needs
  // PeakOn(2) - 2 x 536,870,912 + 2 x 2 x 16,777,216 - 1,050,673,152 =
  // 6,955,508,608 (x 1.1 fits; its cross-entropy backward, 5,139,473,280 + 2 x
  // (50,331,648 + 33,538,048) + 1,313,341,440 = 6,620,554,112, is lower); micro
  // 4's layer backward, 8,064,279,424 x 1.1, does not.
  EXPECT_TRUE(Fits(6955508608LL, 9));
  EXPECT_FALSE(Fits(PeakOn(4) - 4 * 536870912LL + 4 * 16777216LL * 2 - kEmbedding, 9));
  EXPECT_EQ(PlanFor(Job8B(0), 2, Checkpointing::kOffload).peak_allocated, 6955508608LL);
  const MemoryPlan a = ChoosePlan(Job8B(Card(9)));
  EXPECT_TRUE(a.fits);
  EXPECT_EQ(a.checkpointing, Checkpointing::kOffload);
  EXPECT_EQ(a.micro_batch_size, 2);
}

TEST(MemoryPlanTest, ExplicitValuesAreHonouredAndChecked) {
  PlanInputs in = Job8B(Card(24));
  in.micro_batch_size = 8;
  in.checkpointing = "off";
  const MemoryPlan p = ChoosePlan(in);
  EXPECT_EQ(p.micro_batch_size, 8);
  EXPECT_EQ(p.grad_accum, 2);
  EXPECT_EQ(p.checkpointing, Checkpointing::kOff);
  EXPECT_FALSE(p.fits);
  EXPECT_NE(p.fix.find("micro_batch_size: auto"), std::string::npos) << p.fix;

  in.checkpointing = "auto";  // micro 8 given: off does not fit, on does
  const MemoryPlan q = ChoosePlan(in);
  EXPECT_TRUE(q.fits);
  EXPECT_EQ(q.checkpointing, Checkpointing::kOn);

  in.micro_batch_size = 0;
  in.checkpointing = "on";  // largest micro-batch under "on"
  EXPECT_EQ(ChoosePlan(in).micro_batch_size, 8);
  // Offload keeps no layer inputs on the device, only the one fetched back and
  // the one prefetched, and no embedding: micro 16 peaks in the layer backward
  // at PeakOn(16) - 536,870,912 x 16 + 2 x 16,777,216 x 16 - 1,050,673,152.
  EXPECT_EQ(SavedActivationBytesPerToken(in, Checkpointing::kOffload), 0);
  EXPECT_EQ(PlanFor(in, 16, Checkpointing::kOffload).peak_allocated,
            PeakOn(16) - 536870912LL * 16 + 2 * 16777216LL * 16 - kEmbedding);
  in.cuda = false;  // CPU: "offload" is "on"
  EXPECT_EQ(PlanFor(in, 2, Checkpointing::kOffload).peak_allocated, PlanFor(in, 2, Checkpointing::kOn).peak_allocated);
}

TEST(MemoryPlanTest, EffectiveBatchStaysExactAcrossRanks) {
  PlanInputs in = Job8B(Card(40));
  in.world_size = 2;  // 8 per rank: on m=8 fits (PeakOn(8) x 1.1 < budget), off only m=2
  const MemoryPlan p = ChoosePlan(in);
  EXPECT_EQ(p.micro_batch_size, 8);
  EXPECT_EQ(p.micro_batch_size * p.grad_accum * in.world_size, 16);
  EXPECT_GT(p.breakdown.allreduce + p.breakdown.peak_allocated, 0);
  in.world_size = 3;
  EXPECT_THROW(ChoosePlan(in), PlanError);
  in.world_size = 1;
  in.micro_batch_size = 5;
  EXPECT_THROW(ChoosePlan(in), PlanError);
}

TEST(MemoryPlanTest, JsonCarriesTheBreakdown) {
  const MemoryPlan p = ChoosePlan(Job8B(Card(16)));
  const nlohmann::json j = p.ToJson();
  for (const char* k : {"weights", "lora", "optimizer", "activations", "logits", "slack"}) {
    EXPECT_TRUE(j["breakdown"].contains(k)) << k;
  }
  EXPECT_EQ(j["budget_bytes"], Budget(16));
  EXPECT_EQ(j["gradient_checkpointing"], "on");
  EXPECT_FALSE(j["reason"].get<std::string>().empty());
}

}  // namespace
}  // namespace tune::plan
