// Deterministic data order and sharding.
//
// The training stream is the concatenation of epochs; epoch e visits the
// dataset in a permutation drawn from (seed, e) with a platform-independent
// generator (SplitMix64 + Fisher-Yates with unbiased bounded draws), so every
// rank, every attempt and every machine sees the same order. Step s (1-based)
// consumes stream positions [(s-1)*E, s*E) where E is the effective batch;
// within a step, rank r takes positions j with j % world == r. Hence the
// global batch of a step does not depend on the world size, and 2 ranks x
// micro-batch 2 sees exactly the examples of 1 rank x micro-batch 4.
// The data position after step s is (epoch, index) = divmod(s*E, N).
#ifndef TUNE_WORKER_TRAINER_TRAIN_SAMPLER_H_
#define TUNE_WORKER_TRAINER_TRAIN_SAMPLER_H_

#include <cstdint>
#include <vector>

namespace tune::train {

struct DataPosition {
  int64_t epoch = 0;  // 0-based epoch of the next example to read
  int64_t index = 0;  // index within that epoch's permutation
};

// A permutation of [0, n) from (seed, epoch); identical everywhere.
std::vector<int64_t> EpochPermutation(int64_t n, uint64_t seed, int64_t epoch);

class StepSampler {
 public:
  // Throws std::invalid_argument when num_examples or effective_batch <= 0.
  StepSampler(int64_t num_examples, int64_t effective_batch, uint64_t seed);

  // Dataset indices of step `step` (1-based), in stream order (size E).
  std::vector<int64_t> StepIndices(int64_t step);
  // Position of the first example of step `step` (1-based).
  DataPosition PositionBeforeStep(int64_t step) const;
  // Steps needed for `epochs` passes over the data (at least 1).
  int64_t StepsForEpochs(double epochs) const;

  int64_t num_examples() const { return n_; }
  int64_t effective_batch() const { return batch_; }

 private:
  const std::vector<int64_t>& Permutation(int64_t epoch);

  int64_t n_;
  int64_t batch_;
  uint64_t seed_;
  int64_t cached_epoch_ = -1;
  std::vector<int64_t> cached_;
};

// The part of `step_indices` rank `rank` of `world` trains on: positions j
// with j % world == rank, in order.
std::vector<int64_t> RankShard(const std::vector<int64_t>& step_indices, int rank, int world);

// Splits a rank's shard into consecutive micro-batches of `micro` examples.
std::vector<std::vector<int64_t>> MicroBatches(const std::vector<int64_t>& shard, int micro);

}  // namespace tune::train

#endif  // TUNE_WORKER_TRAINER_TRAIN_SAMPLER_H_
