// Device helpers shared by the kernels: bf16 <-> fp32 on uint16_t storage,
// 16-byte vector access, block reductions and launch-status plumbing.
#ifndef TUNE_KERNELS_SRC_COMMON_CUH_
#define TUNE_KERNELS_SRC_COMMON_CUH_

#include <cublas_api.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "tune/kernels/status.h"

namespace tune::kernels::detail {

__device__ __forceinline__ float Bf16ToF32(uint16_t v) { return __uint_as_float(static_cast<uint32_t>(v) << 16); }

__device__ __forceinline__ uint16_t F32ToBf16(float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

// Rounds to bf16 and back: the value a torch bf16 tensor op would store.
__device__ __forceinline__ float RoundBf16(float v) { return Bf16ToF32(F32ToBf16(v)); }

// Eight bf16 values moved as one 16-byte access.
struct alignas(16) Bf16x8 {
  uint16_t v[8];
};

__host__ __device__ __forceinline__ bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Rows starting at p every `stride` bf16 elements all start 16-byte aligned
// (what the 8-wide vector paths need, with a row length % 8 == 0).
inline bool RowsAligned16(const void* p, int64_t stride) { return Aligned16(p) && stride % 8 == 0; }

// Whether a grid-stride loop over `items` with `grid` blocks of `threads`
// can count in 32 bits: its last increment stays below 2^32.
inline bool FitsIn32(int64_t items, int grid, int threads) {
  return items + int64_t{grid} * threads < (int64_t{1} << 32);
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024). `scratch` holds
// 32 floats; the result is returned to every thread.
__device__ __forceinline__ float BlockSum(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

inline Status CudaStatus(cudaError_t err) {
  if (err == cudaSuccess) return OkStatus();
  return {StatusCode::kCudaError, cudaGetErrorString(err)};
}

// Status of the launch just made (configuration errors; not the kernel's run).
inline Status LaunchStatus() { return CudaStatus(cudaGetLastError()); }

// cuBLAS and cuBLASLt share the status type and its strings.
inline Status CublasStatus(cublasStatus_t st) {
  if (st == CUBLAS_STATUS_SUCCESS) return OkStatus();
  return {StatusCode::kCublasError, cublasGetStatusString(st)};
}

// A library handle (cuBLAS, cuBLASLt) for the current device, one per host
// thread (handles are not thread-safe), made by create(Handle*) -> Status on
// first use and never destroyed: the driver reclaims them at exit, when
// destroying could race the CUDA context's own teardown.
template <typename Handle, typename Create>
Status ThreadDeviceHandle(Create create, Handle* out) {
  constexpr int kMaxDevices = 64;
  thread_local Handle handles[kMaxDevices] = {};
  int device = 0;
  Status s = CudaStatus(cudaGetDevice(&device));
  if (!s.ok()) return s;
  if (device < 0 || device >= kMaxDevices) return InvalidArgument("cuBLAS handle: device index above 63");
  if (handles[device] == nullptr) {
    s = create(&handles[device]);
    if (!s.ok()) return s;
  }
  *out = handles[device];
  return OkStatus();
}

__host__ __device__ inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Multiprocessors of the current device (cached per device).
int SmCount();

// A grid size for grid-stride loops: enough blocks to fill the device a few
// times over, never more than the work needs.
int GridFor(int64_t work_items, int threads_per_block);

}  // namespace tune::kernels::detail

#endif  // TUNE_KERNELS_SRC_COMMON_CUH_
