// The status every kernel entry point returns. Kernels never throw and never
// exit: argument errors are detected on the host before any launch and
// reported with a message naming the argument; CUDA and cuBLAS failures carry
// the library's own error string. Messages are static strings (no allocation,
// safe to keep).
#ifndef TUNE_KERNELS_INCLUDE_TUNE_KERNELS_STATUS_H_
#define TUNE_KERNELS_INCLUDE_TUNE_KERNELS_STATUS_H_

namespace tune::kernels {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,  // a size, stride, pointer or alignment the contract rules out
  kCudaError,        // a launch or runtime call failed (message: cudaGetErrorString)
  kCublasError,      // a cuBLAS call failed (message: cublasGetStatusString)
  kUnsupported,      // valid arguments the library offers no algorithm for; nothing ran, another path may
};

struct Status {
  StatusCode code = StatusCode::kOk;
  const char* message = "ok";
  bool ok() const { return code == StatusCode::kOk; }
};

inline Status OkStatus() { return {}; }
inline Status InvalidArgument(const char* message) { return {StatusCode::kInvalidArgument, message}; }

inline const char* StatusCodeName(StatusCode code) {
  switch (code) {
    case StatusCode::kOk: return "ok";
    case StatusCode::kInvalidArgument: return "invalid argument";
    case StatusCode::kCudaError: return "CUDA error";
    case StatusCode::kCublasError: return "cuBLAS error";
    case StatusCode::kUnsupported: return "unsupported";
  }
  return "unknown";
}

}  // namespace tune::kernels

#endif  // TUNE_KERNELS_INCLUDE_TUNE_KERNELS_STATUS_H_
