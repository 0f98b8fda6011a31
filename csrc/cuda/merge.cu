// CUDA kernels: merge two softmax-attention partials (out, lse) over disjoint key sets, fp32.
//   lse = logaddexp(lse_a, lse_b) (stable; rows with both -inf stay -inf and give 0)
//   out = wa * out_a + wb * out_b,  wa = exp(lse_a - lse), wb = exp(lse_b - lse)
// Backward (wa + wb = 1): g_out_a = wa * g, g_lse_a = wa * (wb * <g, out_a - out_b> + g_lse),
// and symmetrically for b. Forward is elementwise (each thread recomputes its row's
// weights: two exps are cheaper than a second pass); backward is one warp per row.
#include "common.cuh"

namespace megasora::cuda {
namespace {

__device__ __forceinline__ float merged_lse(float a, float b) {
  const float hi = fmaxf(a, b), lo = fminf(a, b);
  if (!isfinite(hi)) return hi;
  return hi + log1pf(expf(lo - hi));
}

__device__ __forceinline__ float finite_or_zero(float v) { return isfinite(v) ? v : 0.f; }

template <typename T>
__global__ void merge_fwd_kernel(MergeArgs a) {
  const int64_t n = a.R * a.D;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / a.D;
    const float la = a.lse_a[r], lb = a.lse_b[r];
    const float l = merged_lse(la, lb), ls = finite_or_zero(l);
    if (i % a.D == 0) a.lse_out[r] = l;
    a.out[i] = expf(la - ls) * ld<T>(a.out_a, i) + expf(lb - ls) * ld<T>(a.out_b, i);
  }
}

template <typename T>
__global__ void merge_bwd_kernel(MergeArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t r = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5; r < a.R; r += warps) {
    const float ls = finite_or_zero(a.lse[r]);
    const float wa = expf(a.lse_a[r] - ls), wb = expf(a.lse_b[r] - ls);
    float dot = 0.f;
    for (int64_t d = lane; d < a.D; d += 32) {
      const int64_t i = r * a.D + d;
      const float g = a.grad_out[i];
      st<T>(a.grad_out_a, i, wa * g);
      st<T>(a.grad_out_b, i, wb * g);
      dot += g * (ld<T>(a.out_a, i) - ld<T>(a.out_b, i));
    }
    dot = warp_sum(dot);
    if (lane == 0) {
      a.grad_lse_a[r] = wa * (wb * dot + a.grad_lse[r]);
      a.grad_lse_b[r] = wb * (a.grad_lse[r] - wa * dot);
    }
  }
}

}  // namespace

cudaError_t merge_fwd(const MergeArgs& a, cudaStream_t stream) {
  if (a.R * a.D == 0) return cudaSuccess;
  MEGASORA_DISPATCH(a.dtype, (merge_fwd_kernel<T><<<grid_for(a.R * a.D, 256), 256, 0, stream>>>(a)));
  return cudaGetLastError();
}

cudaError_t merge_bwd(const MergeArgs& a, cudaStream_t stream) {
  if (a.R * a.D == 0) return cudaSuccess;
  MEGASORA_DISPATCH(a.dtype, (merge_bwd_kernel<T><<<grid_for(a.R * 32, 256), 256, 0, stream>>>(a)));
  return cudaGetLastError();
}

}  // namespace megasora::cuda
