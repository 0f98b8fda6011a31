// Launchers of the CUDA kernels: plain pointers and sizes, no torch headers, so every
// .cu file compiles standalone with nvcc (CI does, without a GPU). The torch binding
// (ops_cuda.cpp) validates shapes, allocates outputs and calls these on the current stream.
//
// All statistics, weights, cos/sin, lse and merged outputs are fp32; activations are
// fp32, bf16 or fp16 (DType). Every tensor is contiguous.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace megasora::cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Reduced quantities of the norm backward, in the order of the workspace slices.
enum Quantity : int { kW = 0, kB, kShift, kScale, kGate, kNumQ };

struct NormFwdArgs {
  const void* x = nullptr;
  const void* gate = nullptr;  // residual variant: normalize h = x + gate * y
  const void* y = nullptr;
  const void* shift = nullptr;  // null: no modulation
  const void* scale = nullptr;
  const float* w = nullptr;
  const float* b = nullptr;
  void* h = nullptr;
  void* out = nullptr;
  float* mean = nullptr;
  float* rstd = nullptr;
  int64_t R = 0, D = 0, rows_per_mod = 0;
  float eps = 0.f;
  bool rms = false;
  DType dtype = DType::kFloat32;
};

// Backward of (gated residual +) modulated norm, and, with xn == null, of the plain gated
// residual (then gout is grad_h and only gy / ggate are produced).
struct NormBwdArgs {
  const void* gout = nullptr;
  const void* gh = nullptr;
  const void* xn = nullptr;
  const float* mean = nullptr;
  const float* rstd = nullptr;
  const void* scale = nullptr;
  const float* w = nullptr;
  const float* b = nullptr;
  const void* gate = nullptr;
  const void* y = nullptr;
  void* gx = nullptr;
  void* gy = nullptr;
  void* gshift = nullptr;
  void* gscale = nullptr;
  void* ggate = nullptr;
  float* gw = nullptr;
  float* gb = nullptr;
  float* workspace = nullptr;  // kNumQ * chunks * D floats
  int64_t R = 0, D = 0, B = 1, N = 0, rows_per_mod = 0, chunk_rows = 1, chunks_per_sample = 0;
  bool rms = false;
  DType dtype = DType::kFloat32;
};

struct RopeArgs {
  const void* x = nullptr;
  const float* cos = nullptr;  // (N, Dh/2)
  const float* sin = nullptr;
  void* out = nullptr;
  int64_t B = 0, N = 0, H = 0, half = 0;
  bool inverse = false;
  DType dtype = DType::kFloat32;
};

struct MergeArgs {
  const void* out_a = nullptr;
  const void* out_b = nullptr;
  const float* lse_a = nullptr;
  const float* lse_b = nullptr;
  const float* lse = nullptr;       // backward: the merged lse
  const float* grad_out = nullptr;  // backward
  const float* grad_lse = nullptr;  // backward
  float* out = nullptr;             // forward
  float* lse_out = nullptr;         // forward
  void* grad_out_a = nullptr;       // backward
  void* grad_out_b = nullptr;
  float* grad_lse_a = nullptr;
  float* grad_lse_b = nullptr;
  int64_t R = 0, D = 0;
  DType dtype = DType::kFloat32;
};

// Largest row the norm kernels cache in shared memory (backward keeps two fp32 rows); wider
// rows take the uncached kernels, which re-read global memory on each pass (any D works).
constexpr int64_t kMaxNormDim = 6080;  // (2 * D + 32) fp32 must fit in 48 KiB

cudaError_t norm_fwd(const NormFwdArgs& a, cudaStream_t stream);
cudaError_t norm_bwd(const NormBwdArgs& a, cudaStream_t stream);
cudaError_t gated_residual_fwd(const void* x, const void* gate, const void* y, void* h, int64_t R, int64_t D,
                               int64_t rows_per_mod, DType dtype, cudaStream_t stream);
cudaError_t gated_residual_bwd(const NormBwdArgs& a, cudaStream_t stream);
cudaError_t rope(const RopeArgs& a, cudaStream_t stream);
cudaError_t merge_fwd(const MergeArgs& a, cudaStream_t stream);
cudaError_t merge_bwd(const MergeArgs& a, cudaStream_t stream);

}  // namespace megasora::cuda
