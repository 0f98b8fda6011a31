// CUDA kernels: (gated residual +) adaLN modulated LayerNorm/RMSNorm, forward and backward,
// and the plain gated residual. Semantics: megasora/kernels/reference.py.
//
// Forward: one block per row, the variance an exact two-pass sum. Rows of D <= kMaxNormDim
// are cached in shared memory as fp32 (x read from global memory once); wider rows (dit-30b
// has D = 6144) are re-read from global memory on each pass instead, same arithmetic.
// Backward: a row kernel (grad of x, per-token modulation grads) and, for the sums over
// rows (weight/bias grads, per-sample modulation grads), a column kernel that writes one
// partial per chunk of rows into a workspace, then a finalize kernel that adds the chunks.
// No atomics, so results are deterministic.
#include "common.cuh"

namespace megasora::cuda {
namespace {

// The value the norm normalizes at row offset i: h as stored (the residual variant) or x.
// Each thread re-reads only elements it wrote itself, so no barrier is needed.
template <typename T>
__device__ __forceinline__ float norm_input(const NormFwdArgs& a, int64_t i) {
  return a.gate != nullptr ? ld<T>(a.h, i) : ld<T>(a.x, i);
}

template <typename T, bool kCached>
__global__ void norm_fwd_kernel(NormFwdArgs a) {
  extern __shared__ float smem[];
  float* red = smem;
  float* row = smem + 32;  // kCached only
  const int64_t D = a.D, r = blockIdx.x, o = r * D;
  const int64_t mo = a.rows_per_mod ? (r / a.rows_per_mod) * D : 0;
  float s = 0.f;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float v;
    if (a.gate != nullptr) {  // round h to the storage dtype: the norm sees h as stored
      const T h = from_float<T>(ld<T>(a.x, o + d) + ld<T>(a.gate, mo + d) * ld<T>(a.y, o + d));
      static_cast<T*>(a.h)[o + d] = h;
      v = to_float(h);
    } else {
      v = ld<T>(a.x, o + d);
    }
    if (kCached) row[d] = v;
    s += v;
  }
  const float mu = a.rms ? 0.f : block_sum(s, red) / static_cast<float>(D);
  float v2 = 0.f;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const float t = (kCached ? row[d] : norm_input<T>(a, o + d)) - mu;
    v2 += t * t;
  }
  const float rs = rsqrtf(block_sum(v2, red) / static_cast<float>(D) + a.eps);
  if (threadIdx.x == 0) {
    a.mean[r] = mu;
    a.rstd[r] = rs;
  }
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float n = ((kCached ? row[d] : norm_input<T>(a, o + d)) - mu) * rs;
    if (a.w != nullptr) n *= a.w[d];
    if (a.b != nullptr) n += a.b[d];
    if (a.scale != nullptr) n = n * (1.f + ld<T>(a.scale, mo + d)) + ld<T>(a.shift, mo + d);
    st<T>(a.out, o + d, n);
  }
}

__host__ __device__ inline bool per_sample(const NormBwdArgs& a) {
  return a.rows_per_mod > 0 && a.rows_per_mod == a.N;
}

// The normalized input xh and the gradient reaching it through modulation and weight, at
// column d of the row at offset o (modulation row at mo).
struct NormedGrad {
  float xh, g;
};

template <typename T>
__device__ __forceinline__ NormedGrad normed_grad(const NormBwdArgs& a, int64_t o, int64_t mo, int64_t d, float mu,
                                                  float rs) {
  const float xh = (ld<T>(a.xn, o + d) - mu) * rs;
  float g = ld<T>(a.gout, o + d);
  if (a.scale != nullptr) g *= 1.f + ld<T>(a.scale, mo + d);
  return {xh, g * (a.w != nullptr ? a.w[d] : 1.f)};
}

template <typename T, bool kCached>
__global__ void norm_bwd_rows(NormBwdArgs a) {
  extern __shared__ float smem[];
  float* red = smem;
  float* xhat = smem + 32;  // kCached only
  float* gxh = xhat + a.D;
  const int64_t D = a.D, r = blockIdx.x, o = r * D;
  const int64_t mo = a.rows_per_mod ? (r / a.rows_per_mod) * D : 0;
  const bool by_sample = per_sample(a);
  const float mu = a.mean[r], rs = a.rstd[r];
  float s1 = 0.f, s2 = 0.f;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const NormedGrad n = normed_grad<T>(a, o, mo, d, mu, rs);
    if (a.scale != nullptr && !by_sample) {
      const float g = ld<T>(a.gout, o + d);
      st<T>(a.gshift, o + d, g);
      st<T>(a.gscale, o + d, g * (n.xh * (a.w != nullptr ? a.w[d] : 1.f) + (a.b != nullptr ? a.b[d] : 0.f)));
    }
    if (kCached) {
      xhat[d] = n.xh;
      gxh[d] = n.g;
    }
    s1 += n.g;
    s2 += n.g * n.xh;
  }
  const float inv_d = 1.f / static_cast<float>(D);
  const float m1 = a.rms ? 0.f : block_sum(s1, red) * inv_d;
  const float m2 = block_sum(s2, red) * inv_d;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const NormedGrad n = kCached ? NormedGrad{xhat[d], gxh[d]} : normed_grad<T>(a, o, mo, d, mu, rs);
    float g = rs * (n.g - m1 - n.xh * m2);
    if (a.gh != nullptr) g += ld<T>(a.gh, o + d);
    st<T>(a.gx, o + d, g);
    if (a.gate != nullptr) {
      st<T>(a.gy, o + d, ld<T>(a.gate, mo + d) * g);
      if (!by_sample) st<T>(a.ggate, o + d, g * ld<T>(a.y, o + d));
    }
  }
}

// Thread per column d, block row per chunk of rows: partial sums of the reduced quantities.
// The gate grad reads the finished grad of h (gtot): a.gx for the norm, a.gout for the
// plain gated residual (xn == null).
template <typename T>
__global__ void norm_bwd_columns(NormBwdArgs a) {
  const int64_t D = a.D, d = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x, c = blockIdx.y;
  if (d >= D) return;
  const int64_t chunks = a.B * a.chunks_per_sample, b = c / a.chunks_per_sample;
  const int64_t r0 = b * a.N + (c % a.chunks_per_sample) * a.chunk_rows;
  const int64_t r1 = min(r0 + a.chunk_rows, (b + 1) * a.N);
  const bool by_sample = per_sample(a);
  const bool mod = a.scale != nullptr && by_sample, gate = a.gate != nullptr && by_sample;
  const void* gtot = a.xn != nullptr ? a.gx : a.gout;
  const float w = a.w != nullptr ? a.w[d] : 1.f, bias = a.b != nullptr ? a.b[d] : 0.f;
  float sw = 0.f, sb = 0.f, ssh = 0.f, ssc = 0.f, sg = 0.f;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * D + d;
    if (a.xn != nullptr) {
      const float xh = (ld<T>(a.xn, o) - a.mean[r]) * a.rstd[r];
      const float g = ld<T>(a.gout, o);
      const float gs = a.scale != nullptr ? g * (1.f + ld<T>(a.scale, (r / a.rows_per_mod) * D + d)) : g;
      sw += gs * xh;
      sb += gs;
      ssh += g;
      ssc += g * (xh * w + bias);
    }
    if (gate) sg += ld<T>(gtot, o) * ld<T>(a.y, o);
  }
  float* ws = a.workspace;
  if (a.gw != nullptr) ws[(kW * chunks + c) * D + d] = sw;
  if (a.gb != nullptr) ws[(kB * chunks + c) * D + d] = sb;
  if (mod) {
    ws[(kShift * chunks + c) * D + d] = ssh;
    ws[(kScale * chunks + c) * D + d] = ssc;
  }
  if (gate) ws[(kGate * chunks + c) * D + d] = sg;
}

// out[g, d] = sum over the chunks of group g (a sample, or all rows when groups == 1).
template <typename OutT>
__global__ void sum_chunks(const float* part, OutT* out, int64_t groups, int64_t per_group, int64_t D) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < groups * D;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g = i / D, d = i % D;
    float s = 0.f;
    for (int64_t k = 0; k < per_group; ++k) s += part[(g * per_group + k) * D + d];
    static_cast<OutT*>(out)[i] = from_float<OutT>(s);
  }
}

template <typename OutT>
void finalize(const NormBwdArgs& a, Quantity q, void* out, bool by_sample, cudaStream_t stream) {
  if (out == nullptr) return;
  const int64_t chunks = a.B * a.chunks_per_sample;
  const int64_t groups = by_sample ? a.B : 1, per_group = by_sample ? a.chunks_per_sample : chunks;
  sum_chunks<OutT><<<grid_for(groups * a.D, 256), 256, 0, stream>>>(a.workspace + q * chunks * a.D,
                                                                      static_cast<OutT*>(out), groups, per_group, a.D);
}

template <typename T>
void column_reductions(const NormBwdArgs& a, cudaStream_t stream) {
  const bool by_sample = per_sample(a);
  const bool need = a.gw != nullptr || a.gb != nullptr || (by_sample && (a.scale != nullptr || a.gate != nullptr));
  const int64_t chunks = a.B * a.chunks_per_sample;
  if (!need || chunks == 0) return;
  const dim3 grid(static_cast<unsigned int>((a.D + 255) / 256), static_cast<unsigned int>(chunks));
  norm_bwd_columns<T><<<grid, 256, 0, stream>>>(a);
  finalize<float>(a, kW, a.gw, false, stream);
  finalize<float>(a, kB, a.gb, false, stream);
  if (by_sample && a.scale != nullptr) {
    finalize<T>(a, kShift, a.gshift, true, stream);
    finalize<T>(a, kScale, a.gscale, true, stream);
  }
  if (by_sample && a.gate != nullptr) finalize<T>(a, kGate, a.ggate, true, stream);
}

template <typename T>
__global__ void gated_residual_fwd_kernel(const void* x, const void* gate, const void* y, void* h, int64_t n,
                                          int64_t D, int64_t rows_per_mod) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t mo = (i / D / rows_per_mod) * D + i % D;
    st<T>(h, i, ld<T>(x, i) + ld<T>(gate, mo) * ld<T>(y, i));
  }
}

// grad_y = gate * grad_h, and the per-token gate grad grad_h * y.
template <typename T>
__global__ void gated_residual_bwd_kernel(NormBwdArgs a) {
  const int64_t n = a.R * a.D;
  const bool by_sample = per_sample(a);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t mo = (i / a.D / a.rows_per_mod) * a.D + i % a.D;
    const float g = ld<T>(a.gout, i);
    st<T>(a.gy, i, ld<T>(a.gate, mo) * g);
    if (!by_sample) st<T>(a.ggate, i, g * ld<T>(a.y, i));
  }
}

}  // namespace

cudaError_t norm_fwd(const NormFwdArgs& a, cudaStream_t stream) {
  if (a.R == 0) return cudaSuccess;
  const int threads = row_threads(a.D);
  const auto blocks = static_cast<unsigned int>(a.R);
  if (a.D <= kMaxNormDim) {
    const size_t smem = (a.D + 32) * sizeof(float);
    MEGASORA_DISPATCH(a.dtype, (norm_fwd_kernel<T, true><<<blocks, threads, smem, stream>>>(a)));
  } else {
    MEGASORA_DISPATCH(a.dtype, (norm_fwd_kernel<T, false><<<blocks, threads, 32 * sizeof(float), stream>>>(a)));
  }
  return cudaGetLastError();
}

cudaError_t norm_bwd(const NormBwdArgs& a, cudaStream_t stream) {
  if (a.R == 0) return cudaSuccess;
  const int threads = row_threads(a.D);
  const auto blocks = static_cast<unsigned int>(a.R);
  // Row kernel first: the column kernel's gate grad reads the finished grad of h.
  if (a.D <= kMaxNormDim) {
    const size_t smem = (2 * a.D + 32) * sizeof(float);
    MEGASORA_DISPATCH(a.dtype, norm_bwd_rows<T, true><<<blocks, threads, smem, stream>>>(a);
                      column_reductions<T>(a, stream));
  } else {
    MEGASORA_DISPATCH(a.dtype, norm_bwd_rows<T, false><<<blocks, threads, 32 * sizeof(float), stream>>>(a);
                      column_reductions<T>(a, stream));
  }
  return cudaGetLastError();
}

cudaError_t gated_residual_fwd(const void* x, const void* gate, const void* y, void* h, int64_t R, int64_t D,
                               int64_t rows_per_mod, DType dtype, cudaStream_t stream) {
  const int64_t n = R * D;
  if (n == 0) return cudaSuccess;
  MEGASORA_DISPATCH(dtype, (gated_residual_fwd_kernel<T><<<grid_for(n, 256), 256, 0, stream>>>(
                               x, gate, y, h, n, D, rows_per_mod)));
  return cudaGetLastError();
}

cudaError_t gated_residual_bwd(const NormBwdArgs& a, cudaStream_t stream) {
  if (a.R == 0) return cudaSuccess;
  MEGASORA_DISPATCH(a.dtype, gated_residual_bwd_kernel<T><<<grid_for(a.R * a.D, 256), 256, 0, stream>>>(a);
                    column_reductions<T>(a, stream));
  return cudaGetLastError();
}

}  // namespace megasora::cuda
