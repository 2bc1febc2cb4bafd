// cudaStream_t without the CUDA headers, so the kernel API (and the CPU
// references that share its argument structs) compile where CUDA is absent.
// The typedef is identical to the CUDA runtime's, so both may be included.
#ifndef TUNE_KERNELS_INCLUDE_TUNE_KERNELS_STREAM_H_
#define TUNE_KERNELS_INCLUDE_TUNE_KERNELS_STREAM_H_

struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

#endif  // TUNE_KERNELS_INCLUDE_TUNE_KERNELS_STREAM_H_
