#include "worker/trainer/train/collate.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace tune::train {

int64_t CountSupervised(const ExampleView& e) {
  return std::count_if(e.labels->begin(), e.labels->end(), [](int32_t l) { return l != kIgnoreLabel; });
}

MicroBatch Collate(const std::vector<ExampleView>& rows, int32_t pad_id, const torch::Device& device,
                   bool use_segments) {
  if (rows.empty()) throw std::invalid_argument("Collate: empty micro-batch");
  size_t longest = 0;
  const bool packed = use_segments;
  for (size_t r = 0; r < rows.size(); ++r) {
    const ExampleView& e = rows[r];
    const size_t n = e.input_ids->size();
    auto bad = [&](const char* field, size_t got) {
      return std::invalid_argument("Collate: example " + std::to_string(r) + " has " + std::to_string(got) + " " +
                                   field + " for " + std::to_string(n) + " input ids");
    };
    if (n == 0) throw std::invalid_argument("Collate: example " + std::to_string(r) + " is empty");
    if (e.labels->size() != n) throw bad("labels", e.labels->size());
    if (e.position_ids != nullptr && !e.position_ids->empty() && e.position_ids->size() != n) {
      throw bad("position ids", e.position_ids->size());
    }
    if (e.segment_ids != nullptr && !e.segment_ids->empty()) {
      if (e.segment_ids->size() != n) throw bad("segment ids", e.segment_ids->size());
    }
    longest = std::max(longest, n);
  }
  const int64_t B = static_cast<int64_t>(rows.size()), T = static_cast<int64_t>(longest);
  MicroBatch mb;
  torch::Tensor ids = torch::full({B, T}, static_cast<int64_t>(pad_id), torch::kInt64);
  torch::Tensor labels = torch::full({B, T}, static_cast<int64_t>(kIgnoreLabel), torch::kInt64);
  torch::Tensor pos = torch::arange(T, torch::kInt64).unsqueeze(0).repeat({B, 1}).contiguous();
  torch::Tensor seg = packed ? torch::full({B, T}, int64_t{-1}, torch::kInt64) : torch::Tensor();
  auto ids_a = ids.accessor<int64_t, 2>();
  auto lab_a = labels.accessor<int64_t, 2>();
  auto pos_a = pos.accessor<int64_t, 2>();
  for (int64_t b = 0; b < B; ++b) {
    const ExampleView& e = rows[static_cast<size_t>(b)];
    const int64_t n = static_cast<int64_t>(e.input_ids->size());
    const bool has_pos = e.position_ids != nullptr && !e.position_ids->empty();
    for (int64_t t = 0; t < n; ++t) {
      ids_a[b][t] = (*e.input_ids)[static_cast<size_t>(t)];
      lab_a[b][t] = (*e.labels)[static_cast<size_t>(t)];
      if (has_pos) pos_a[b][t] = (*e.position_ids)[static_cast<size_t>(t)];
    }
    if (has_pos) {  // continue counting after the last real position
      for (int64_t t = n; t < T; ++t) pos_a[b][t] = pos_a[b][n - 1] + (t - n + 1);
    }
    if (packed) {
      auto seg_a = seg.accessor<int64_t, 2>();
      const bool has_seg = e.segment_ids != nullptr && !e.segment_ids->empty();
      for (int64_t t = 0; t < n; ++t) seg_a[b][t] = has_seg ? (*e.segment_ids)[static_cast<size_t>(t)] : 0;
    }
    mb.supervised_tokens += CountSupervised(e);
    mb.input_tokens += n;
  }
  mb.input_ids = ids.to(device);
  mb.labels = labels.to(device);
  mb.position_ids = pos.to(device);
  if (packed) mb.segment_ids = seg.to(device);
  return mb;
}

}  // namespace tune::train
