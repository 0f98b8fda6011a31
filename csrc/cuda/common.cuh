// Device helpers shared by the .cu files: fp32 load/store of the activation dtypes,
// block reductions and dtype dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launch.h"

namespace megasora::cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

template <typename T>
__device__ __forceinline__ float ld(const void* p, int64_t i) {
  return to_float(static_cast<const T*>(p)[i]);
}

template <typename T>
__device__ __forceinline__ void st(void* p, int64_t i, float v) {
  static_cast<T*>(p)[i] = from_float<T>(v);
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32); every thread gets the total.
// `red` is 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // red may still be read by the previous call
  if (lane == 0) red[wid] = v;
  __syncthreads();
  return warp_sum(lane < nw ? red[lane] : 0.f);
}

// Threads for one row of D values: ~4 values per thread, whole warps, at most 512.
inline int row_threads(int64_t D) {
  int64_t t = ((D / 4 + 31) / 32) * 32;
  return static_cast<int>(t < 32 ? 32 : (t > 512 ? 512 : t));
}

inline unsigned int grid_for(int64_t n, int threads) {
  int64_t blocks = (n + threads - 1) / threads;
  const int64_t cap = 65535LL * 32;  // grid-stride loops cover the rest
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

// Runs the statements with T bound to the C++ type of `dtype`, then reports launch errors.
#define MEGASORA_DISPATCH(dtype, ...)                                  \
  do {                                                                 \
    switch (dtype) {                                                   \
      case ::megasora::cuda::DType::kFloat32: {                        \
        using T = float;                                               \
        __VA_ARGS__;                                                   \
        break;                                                         \
      }                                                                \
      case ::megasora::cuda::DType::kBFloat16: {                       \
        using T = __nv_bfloat16;                                       \
        __VA_ARGS__;                                                   \
        break;                                                         \
      }                                                                \
      case ::megasora::cuda::DType::kFloat16: {                        \
        using T = __half;                                              \
        __VA_ARGS__;                                                   \
        break;                                                         \
      }                                                                \
      default:                                                         \
        return cudaErrorInvalidValue;                                  \
    }                                                                  \
  } while (0)

}  // namespace megasora::cuda
