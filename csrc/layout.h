// Shape logic shared by the CPU and CUDA bindings of the megasora:: ops.
//
// Every op sees its input as R rows of D contiguous values. Modulation tensors
// (shift, scale, gate) are (B, 1, D) "per sample" or (B, N, D) "per token"; row r then
// reads modulation row r / rows_per_mod. Gradients of per-sample modulation are column
// sums over a sample's N rows; both backends reduce them in fixed chunks of rows that
// never straddle two samples, so results do not depend on the thread count.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace megasora {

struct RowLayout {
  int64_t R = 0;             // rows
  int64_t D = 0;             // values per row (last dim)
  int64_t B = 1;             // samples
  int64_t N = 0;             // rows per sample
  int64_t rows_per_mod = 0;  // N (per sample), 1 (per token), 0 (no modulation)
  int64_t chunk_rows = 0;    // rows per reduction chunk
  int64_t chunks_per_sample = 0;
  int64_t chunks = 0;
};

inline void check_mod(const at::Tensor& x, const at::Tensor& mod, const char* name) {
  TORCH_CHECK(x.dim() == 3, "megasora: modulated ops need x of shape (B, N, D), got ", x.sizes());
  TORCH_CHECK(mod.dim() == 3 && mod.size(0) == x.size(0) && mod.size(2) == x.size(2) &&
                  (mod.size(1) == 1 || mod.size(1) == x.size(1)),
              "megasora: ", name, " must be (B, 1, D) or (B, N, D) for x ", x.sizes(), ", got ",
              mod.sizes());
  TORCH_CHECK(mod.scalar_type() == x.scalar_type(), "megasora: ", name, " dtype ",
              mod.scalar_type(), " differs from x dtype ", x.scalar_type());
}

// `mod` is any one of the modulation tensors; callers check that the others match it.
inline RowLayout make_layout(const at::Tensor& x, const std::optional<at::Tensor>& mod,
                             int64_t chunk_rows) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "megasora: empty last dim, got ", x.sizes());
  RowLayout l;
  l.D = x.size(-1);
  l.R = x.numel() / l.D;
  if (mod.has_value()) {
    l.B = x.size(0);
    l.N = x.size(1);
    l.rows_per_mod = mod->size(1) == 1 ? l.N : 1;
  } else {
    l.B = 1;
    l.N = l.R;
  }
  l.chunk_rows = chunk_rows;
  l.chunks_per_sample = l.N == 0 ? 0 : (l.N + chunk_rows - 1) / chunk_rows;
  l.chunks = l.B * l.chunks_per_sample;
  return l;
}

// Accumulation dtype: fp64 stays fp64 (for gradcheck), everything else is fp32.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_acc(const std::optional<at::Tensor>& t, const at::Tensor& x, const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(-1), "megasora: ", name, " must be (D,), got ",
              t->sizes());
  TORCH_CHECK(t->scalar_type() == acc_dtype(x.scalar_type()), "megasora: ", name,
              " must be in the accumulation dtype ", acc_dtype(x.scalar_type()), ", got ",
              t->scalar_type());
}

inline std::optional<at::Tensor> contig(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return t->contiguous();
}

template <typename T>
inline const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// Placeholder for "no gradient": an empty tensor keeps the op schemas free of optional returns.
inline at::Tensor none_like(const at::Tensor& x) { return at::empty({0}, x.options()); }

}  // namespace megasora
