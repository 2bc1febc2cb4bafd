#include "worker/trainer/train/sampler.h"

#include <cmath>
#include <numeric>
#include <stdexcept>
#include <utility>

namespace tune::train {
namespace {

uint64_t SplitMix64(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Uniform in [0, bound) without modulo bias (rejection of the short tail).
uint64_t Bounded(uint64_t* state, uint64_t bound) {
  const uint64_t limit = UINT64_MAX - (UINT64_MAX % bound);
  uint64_t x;
  do {
    x = SplitMix64(state);
  } while (x >= limit);
  return x % bound;
}

}  // namespace

std::vector<int64_t> EpochPermutation(int64_t n, uint64_t seed, int64_t epoch) {
  std::vector<int64_t> perm(static_cast<size_t>(n));
  std::iota(perm.begin(), perm.end(), int64_t{0});
  // Mix seed and epoch so neighbouring epochs/seeds give unrelated streams.
  uint64_t state = seed * 0x9e3779b97f4a7c15ULL ^ (static_cast<uint64_t>(epoch) + 0x632be59bd9b4e019ULL);
  SplitMix64(&state);
  for (int64_t i = n - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(Bounded(&state, static_cast<uint64_t>(i) + 1));
    std::swap(perm[static_cast<size_t>(i)], perm[static_cast<size_t>(j)]);
  }
  return perm;
}

StepSampler::StepSampler(int64_t num_examples, int64_t effective_batch, uint64_t seed)
    : n_(num_examples), batch_(effective_batch), seed_(seed) {
  if (n_ <= 0) throw std::invalid_argument("the dataset has no examples to train on");
  if (batch_ <= 0) throw std::invalid_argument("effective batch size must be > 0");
}

const std::vector<int64_t>& StepSampler::Permutation(int64_t epoch) {
  if (epoch != cached_epoch_) {
    cached_ = EpochPermutation(n_, seed_, epoch);
    cached_epoch_ = epoch;
  }
  return cached_;
}

std::vector<int64_t> StepSampler::StepIndices(int64_t step) {
  std::vector<int64_t> out;
  out.reserve(static_cast<size_t>(batch_));
  const int64_t start = (step - 1) * batch_;
  for (int64_t k = start; k < start + batch_; ++k) {
    out.push_back(Permutation(k / n_)[static_cast<size_t>(k % n_)]);
  }
  return out;
}

DataPosition StepSampler::PositionBeforeStep(int64_t step) const {
  const int64_t k = (step - 1) * batch_;
  return DataPosition{k / n_, k % n_};
}

int64_t StepSampler::StepsForEpochs(double epochs) const {
  const double steps = std::ceil(epochs * static_cast<double>(n_) / static_cast<double>(batch_));
  return std::max<int64_t>(1, static_cast<int64_t>(steps));
}

std::vector<int64_t> RankShard(const std::vector<int64_t>& step_indices, int rank, int world) {
  std::vector<int64_t> out;
  for (size_t j = static_cast<size_t>(rank); j < step_indices.size(); j += static_cast<size_t>(world)) {
    out.push_back(step_indices[j]);
  }
  return out;
}

std::vector<std::vector<int64_t>> MicroBatches(const std::vector<int64_t>& shard, int micro) {
  std::vector<std::vector<int64_t>> out;
  for (size_t i = 0; i < shard.size(); i += static_cast<size_t>(micro)) {
    out.emplace_back(shard.begin() + static_cast<long>(i),
                     shard.begin() + static_cast<long>(std::min(shard.size(), i + static_cast<size_t>(micro))));
  }
  return out;
}

}  // namespace tune::train
