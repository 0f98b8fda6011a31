// CUDA kernel: rotate-half RoPE on x (B, N, H, Dh) with cos/sin (N, Dh/2) in fp32.
// Pair i of a head is (x[i], x[i + Dh/2]); inverse=true rotates by -theta (the backward).
// One thread per pair, grid-stride; consecutive threads touch consecutive i, so both
// halves of a head are read and written coalesced.
#include "common.cuh"

namespace megasora::cuda {
namespace {

template <typename T>
__global__ void rope_kernel(RopeArgs a) {
  const int64_t pairs = a.B * a.N * a.H * a.half;
  const float sign = a.inverse ? -1.f : 1.f;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < pairs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = p % a.half, head = p / a.half;  // head = (b * N + n) * H + h
    const int64_t n = (head / a.H) % a.N;
    const int64_t o = head * 2 * a.half + i;
    const float c = a.cos[n * a.half + i], s = sign * a.sin[n * a.half + i];
    const float x1 = ld<T>(a.x, o), x2 = ld<T>(a.x, o + a.half);
    st<T>(a.out, o, x1 * c - x2 * s);
    st<T>(a.out, o + a.half, x2 * c + x1 * s);
  }
}

}  // namespace

cudaError_t rope(const RopeArgs& a, cudaStream_t stream) {
  const int64_t pairs = a.B * a.N * a.H * a.half;
  if (pairs == 0) return cudaSuccess;
  MEGASORA_DISPATCH(a.dtype, (rope_kernel<T><<<grid_for(pairs, 256), 256, 0, stream>>>(a)));
  return cudaGetLastError();
}

}  // namespace megasora::cuda
