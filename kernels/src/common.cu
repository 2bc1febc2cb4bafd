#include <algorithm>
#include <mutex>

#include "kernels/src/common.cuh"

namespace tune::kernels::detail {

int SmCount() {
  static std::mutex mu;
  static int sm_count[64] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) device = 0;
  int sms;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (sm_count[device] == 0 &&
        cudaDeviceGetAttribute(&sm_count[device], cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      sm_count[device] = 132;  // an H100/H200's count; only the grid size depends on it
    }
    sms = sm_count[device];
  }
  return sms;
}

int GridFor(int64_t work_items, int threads_per_block) {
  const int sms = SmCount();
  const int64_t needed = CeilDiv(std::max<int64_t>(work_items, 1), threads_per_block);
  return static_cast<int>(std::min<int64_t>(needed, int64_t{sms} * 8));
}

}  // namespace tune::kernels::detail
