// Turns tokenised examples into padded micro-batch tensors.
//
// Rows are right-padded to the longest example of the micro-batch: input ids
// with the pad id, labels with -100 (never supervised), position ids continue
// counting (harmless: padded positions come after every real token, and with
// causal attention no real token attends to them). Segment ids are produced
// only with `use_segments` (packing); padded positions get -1, a segment no
// real token belongs to. Without packing they would only cost a mask.
#ifndef TUNE_WORKER_TRAINER_TRAIN_COLLATE_H_
#define TUNE_WORKER_TRAINER_TRAIN_COLLATE_H_

#include <cstdint>
#include <vector>

#include <torch/torch.h>

namespace tune::train {

constexpr int32_t kIgnoreLabel = -100;

// A view of one tokenised example (the data library's Example fields).
struct ExampleView {
  const std::vector<int32_t>* input_ids = nullptr;
  const std::vector<int32_t>* labels = nullptr;        // same length; -100 = not supervised
  const std::vector<int32_t>* position_ids = nullptr;  // empty or null: 0..T-1
  const std::vector<int32_t>* segment_ids = nullptr;   // empty or null: no packing
};

struct MicroBatch {
  torch::Tensor input_ids;     // int64 [B, T]
  torch::Tensor labels;        // int64 [B, T]
  torch::Tensor position_ids;  // int64 [B, T]
  torch::Tensor segment_ids;   // int64 [B, T] or undefined
  int64_t supervised_tokens = 0;  // labels != -100
  int64_t input_tokens = 0;       // real (non-pad) tokens
};

// Number of supervised labels of one example.
int64_t CountSupervised(const ExampleView& e);

// Throws std::invalid_argument on empty input or mismatched lengths.
MicroBatch Collate(const std::vector<ExampleView>& rows, int32_t pad_id, const torch::Device& device,
                   bool use_segments);

}  // namespace tune::train

#endif  // TUNE_WORKER_TRAINER_TRAIN_COLLATE_H_
