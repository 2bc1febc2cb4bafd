// Seeded normal(0, scale) bf16 inputs for the kernel tests (CPU reference
// tests and the GPU comparisons draw the same values from the same seed).
#ifndef TUNE_TESTS_UNIT_KERNELS_RANDOM_BF16_H_
#define TUNE_TESTS_UNIT_KERNELS_RANDOM_BF16_H_

#include <cstdint>
#include <random>
#include <vector>

#include "kernels/reference/reference.h"

namespace tune::kernels::test_data {

inline std::vector<uint16_t> RandomBf16(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<uint16_t> out(n);
  for (auto& v : out) v = ref::FloatToBf16(dist(gen));
  return out;
}

}  // namespace tune::kernels::test_data

#endif  // TUNE_TESTS_UNIT_KERNELS_RANDOM_BF16_H_
