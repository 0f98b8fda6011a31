// CUDA implementations of the megasora:: ops (schemas live in csrc/ops_cpu.cpp, loaded
// first as megasora._C). This file only validates, allocates outputs with torch's caching
// allocator and calls the launchers in launch.h on the current stream.
#include <Python.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/launch.h"
#include "layout.h"

extern "C" PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace megasora {
namespace {

namespace mc = ::megasora::cuda;

mc::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return mc::DType::kFloat32;
    case at::kBFloat16: return mc::DType::kBFloat16;
    case at::kHalf: return mc::DType::kFloat16;
    default: TORCH_CHECK(false, "megasora CUDA ops support float32, bfloat16 and float16, got ", t.scalar_type());
  }
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

const void* ptr(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }
const float* fptr(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

// Rows per reduction chunk: about 512 chunks in all (enough blocks to fill a GPU, a small
// workspace), never fewer than one per sample.
int64_t chunk_rows(const at::Tensor& x, const std::optional<at::Tensor>& mod) {
  const int64_t B = mod.has_value() ? x.size(0) : 1;
  const int64_t N = x.numel() / x.size(-1) / std::max<int64_t>(B, 1);
  const int64_t per_sample = std::max<int64_t>(1, 512 / std::max<int64_t>(B, 1));
  return std::max<int64_t>(1, (N + per_sample - 1) / per_sample);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> modulated_norm_fwd(
    const at::Tensor& x_, const std::optional<at::Tensor>& shift_, const std::optional<at::Tensor>& scale_,
    const std::optional<at::Tensor>& weight_, const std::optional<at::Tensor>& bias_, double eps, bool rms) {
  TORCH_CHECK(shift_.has_value() == scale_.has_value(), "megasora: shift and scale go together");
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const auto shift = contig(shift_), scale = contig(scale_), weight = contig(weight_), bias = contig(bias_);
  if (scale) {
    check_mod(x, *shift, "shift");
    check_mod(x, *scale, "scale");
    TORCH_CHECK(shift->sizes() == scale->sizes(), "megasora: shift and scale shapes differ");
  }
  check_acc(weight, x, "weight");
  check_acc(bias, x, "bias");
  const RowLayout l = make_layout(x, scale, 1);
  at::Tensor out = at::empty_like(x);
  at::Tensor mean = at::empty({l.R}, x.options().dtype(at::kFloat)), rstd = at::empty_like(mean);
  mc::NormFwdArgs a;
  a.x = x.data_ptr();
  a.shift = ptr(shift);
  a.scale = ptr(scale);
  a.w = fptr(weight);
  a.b = fptr(bias);
  a.out = out.data_ptr();
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.R = l.R;
  a.D = l.D;
  a.rows_per_mod = l.rows_per_mod;
  a.eps = static_cast<float>(eps);
  a.rms = rms;
  a.dtype = dtype_of(x);
  C10_CUDA_CHECK(mc::norm_fwd(a, stream()));
  return {out, mean, rstd};
}

// Fills the parts of the backward args shared by every norm backward.
mc::NormBwdArgs bwd_args(const RowLayout& l, const at::Tensor& x, at::Tensor& workspace, bool rms) {
  mc::NormBwdArgs a;
  workspace = at::empty({mc::kNumQ * l.chunks * l.D}, x.options().dtype(at::kFloat));
  a.workspace = workspace.data_ptr<float>();
  a.R = l.R;
  a.D = l.D;
  a.B = l.B;
  a.N = l.N;
  a.rows_per_mod = l.rows_per_mod;
  a.chunk_rows = l.chunk_rows;
  a.chunks_per_sample = l.chunks_per_sample;
  a.rms = rms;
  a.dtype = dtype_of(x);
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> modulated_norm_bwd(
    const at::Tensor& grad_out_, const at::Tensor& x_, const at::Tensor& mean_, const at::Tensor& rstd_,
    const std::optional<at::Tensor>& scale_, const std::optional<at::Tensor>& weight_,
    const std::optional<at::Tensor>& bias_, bool rms) {
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor g = grad_out_.contiguous(), x = x_.contiguous();
  const at::Tensor mean = mean_.contiguous(), rstd = rstd_.contiguous();
  const auto scale = contig(scale_), weight = contig(weight_), bias = contig(bias_);
  TORCH_CHECK(g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type(), "megasora: grad_out must match x");
  if (scale) check_mod(x, *scale, "scale");
  check_acc(weight, x, "weight");
  check_acc(bias, x, "bias");
  const RowLayout l = make_layout(x, scale, chunk_rows(x, scale));
  at::Tensor gx = at::empty_like(x);
  at::Tensor gshift = scale ? at::empty_like(*scale) : none_like(x);
  at::Tensor gscale = scale ? at::empty_like(*scale) : none_like(x);
  at::Tensor gw = weight ? at::empty_like(*weight) : none_like(mean);
  at::Tensor gb = bias ? at::empty_like(*bias) : none_like(mean);
  at::Tensor ws;
  mc::NormBwdArgs a = bwd_args(l, x, ws, rms);
  a.gout = g.data_ptr();
  a.xn = x.data_ptr();
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.scale = ptr(scale);
  a.w = fptr(weight);
  a.b = fptr(bias);
  a.gx = gx.data_ptr();
  a.gshift = scale ? gshift.data_ptr() : nullptr;
  a.gscale = scale ? gscale.data_ptr() : nullptr;
  a.gw = weight ? gw.data_ptr<float>() : nullptr;
  a.gb = bias ? gb.data_ptr<float>() : nullptr;
  C10_CUDA_CHECK(mc::norm_bwd(a, stream()));
  return {gx, gshift, gscale, gw, gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_residual_modulated_norm_fwd(
    const at::Tensor& x_, const at::Tensor& gate_, const at::Tensor& y_, const at::Tensor& shift_,
    const at::Tensor& scale_, const std::optional<at::Tensor>& weight_, const std::optional<at::Tensor>& bias_,
    double eps, bool rms) {
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), gate = gate_.contiguous(), y = y_.contiguous();
  const at::Tensor shift = shift_.contiguous(), scale = scale_.contiguous();
  const auto weight = contig(weight_), bias = contig(bias_);
  check_mod(x, gate, "gate");
  check_mod(x, shift, "shift");
  check_mod(x, scale, "scale");
  TORCH_CHECK(gate.sizes() == scale.sizes() && shift.sizes() == scale.sizes(),
              "megasora: gate, shift and scale must have the same shape");
  TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type(), "megasora: y must match x");
  check_acc(weight, x, "weight");
  check_acc(bias, x, "bias");
  const RowLayout l = make_layout(x, scale, 1);
  at::Tensor h = at::empty_like(x), out = at::empty_like(x);
  at::Tensor mean = at::empty({l.R}, x.options().dtype(at::kFloat)), rstd = at::empty_like(mean);
  mc::NormFwdArgs a;
  a.x = x.data_ptr();
  a.gate = gate.data_ptr();
  a.y = y.data_ptr();
  a.shift = shift.data_ptr();
  a.scale = scale.data_ptr();
  a.w = fptr(weight);
  a.b = fptr(bias);
  a.h = h.data_ptr();
  a.out = out.data_ptr();
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.R = l.R;
  a.D = l.D;
  a.rows_per_mod = l.rows_per_mod;
  a.eps = static_cast<float>(eps);
  a.rms = rms;
  a.dtype = dtype_of(x);
  C10_CUDA_CHECK(mc::norm_fwd(a, stream()));
  return {h, out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_residual_modulated_norm_bwd(const std::optional<at::Tensor>& grad_h_, const at::Tensor& grad_out_,
                                  const at::Tensor& h_, const at::Tensor& gate_, const at::Tensor& y_,
                                  const at::Tensor& mean_, const at::Tensor& rstd_, const at::Tensor& scale_,
                                  const std::optional<at::Tensor>& weight_,
                                  const std::optional<at::Tensor>& bias_, bool rms) {
  const c10::cuda::CUDAGuard guard(h_.device());
  const auto gh = contig(grad_h_);
  const at::Tensor g = grad_out_.contiguous(), h = h_.contiguous(), gate = gate_.contiguous();
  const at::Tensor y = y_.contiguous(), mean = mean_.contiguous(), rstd = rstd_.contiguous();
  const at::Tensor scale = scale_.contiguous();
  const auto weight = contig(weight_), bias = contig(bias_);
  check_mod(h, gate, "gate");
  check_mod(h, scale, "scale");
  TORCH_CHECK(gate.sizes() == scale.sizes(), "megasora: gate and scale must have the same shape");
  TORCH_CHECK(g.sizes() == h.sizes() && y.sizes() == h.sizes(), "megasora: grad_out and y must match h");
  if (gh) TORCH_CHECK(gh->sizes() == h.sizes(), "megasora: grad_h must match h");
  check_acc(weight, h, "weight");
  check_acc(bias, h, "bias");
  const RowLayout l = make_layout(h, scale, chunk_rows(h, scale));
  at::Tensor gx = at::empty_like(h), gy = at::empty_like(h);
  at::Tensor ggate = at::empty_like(gate), gshift = at::empty_like(scale), gscale = at::empty_like(scale);
  at::Tensor gw = weight ? at::empty_like(*weight) : none_like(mean);
  at::Tensor gb = bias ? at::empty_like(*bias) : none_like(mean);
  at::Tensor ws;
  mc::NormBwdArgs a = bwd_args(l, h, ws, rms);
  a.gout = g.data_ptr();
  a.gh = ptr(gh);
  a.xn = h.data_ptr();
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.scale = scale.data_ptr();
  a.w = fptr(weight);
  a.b = fptr(bias);
  a.gate = gate.data_ptr();
  a.y = y.data_ptr();
  a.gx = gx.data_ptr();
  a.gy = gy.data_ptr();
  a.gshift = gshift.data_ptr();
  a.gscale = gscale.data_ptr();
  a.ggate = ggate.data_ptr();
  a.gw = weight ? gw.data_ptr<float>() : nullptr;
  a.gb = bias ? gb.data_ptr<float>() : nullptr;
  C10_CUDA_CHECK(mc::norm_bwd(a, stream()));
  return {gx, ggate, gy, gshift, gscale, gw, gb};
}

at::Tensor gated_residual_fwd(const at::Tensor& x_, const at::Tensor& gate_, const at::Tensor& y_) {
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), gate = gate_.contiguous(), y = y_.contiguous();
  check_mod(x, gate, "gate");
  TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type(), "megasora: y must match x");
  const RowLayout l = make_layout(x, gate, 1);
  at::Tensor h = at::empty_like(x);
  C10_CUDA_CHECK(mc::gated_residual_fwd(x.data_ptr(), gate.data_ptr(), y.data_ptr(), h.data_ptr(), l.R, l.D,
                                        l.rows_per_mod, dtype_of(x), stream()));
  return h;
}

std::tuple<at::Tensor, at::Tensor> gated_residual_bwd(const at::Tensor& grad_h_, const at::Tensor& gate_,
                                                      const at::Tensor& y_) {
  const c10::cuda::CUDAGuard guard(y_.device());
  const at::Tensor g = grad_h_.contiguous(), gate = gate_.contiguous(), y = y_.contiguous();
  check_mod(y, gate, "gate");
  TORCH_CHECK(g.sizes() == y.sizes() && g.scalar_type() == y.scalar_type(), "megasora: grad_h must match y");
  const RowLayout l = make_layout(y, gate, chunk_rows(y, gate));
  at::Tensor ggate = at::empty_like(gate), gy = at::empty_like(y), ws;
  mc::NormBwdArgs a = bwd_args(l, y, ws, false);
  a.gout = g.data_ptr();
  a.gate = gate.data_ptr();
  a.y = y.data_ptr();
  a.gy = gy.data_ptr();
  a.ggate = ggate.data_ptr();
  C10_CUDA_CHECK(mc::gated_residual_bwd(a, stream()));
  return {ggate, gy};
}

at::Tensor apply_rope(const at::Tensor& x_, const at::Tensor& cos_, const at::Tensor& sin_, bool inverse) {
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), cos = cos_.contiguous(), sin = sin_.contiguous();
  TORCH_CHECK(x.dim() == 4 && x.size(3) % 2 == 0, "megasora: apply_rope needs x (B, N, H, Dh) with even Dh, got ",
              x.sizes());
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == x.size(1) && cos.size(1) == x.size(3) / 2 &&
                  sin.sizes() == cos.sizes() && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "megasora: cos/sin must be fp32 (N, Dh/2), got ", cos.sizes(), " and ", sin.sizes());
  at::Tensor out = at::empty_like(x);
  mc::RopeArgs a;
  a.x = x.data_ptr();
  a.cos = cos.data_ptr<float>();
  a.sin = sin.data_ptr<float>();
  a.out = out.data_ptr();
  a.B = x.size(0);
  a.N = x.size(1);
  a.H = x.size(2);
  a.half = x.size(3) / 2;
  a.inverse = inverse;
  a.dtype = dtype_of(x);
  C10_CUDA_CHECK(mc::rope(a, stream()));
  return out;
}

void check_merge(const at::Tensor& oa, const at::Tensor& la, const at::Tensor& ob, const at::Tensor& lb) {
  TORCH_CHECK(oa.dim() >= 1 && oa.sizes() == ob.sizes() && oa.scalar_type() == ob.scalar_type(),
              "megasora: out_a and out_b must have the same shape and dtype");
  TORCH_CHECK(la.sizes() == oa.sizes().slice(0, oa.dim() - 1) && lb.sizes() == la.sizes(),
              "megasora: lse must be out.shape[:-1], got ", la.sizes(), " for out ", oa.sizes());
  TORCH_CHECK(la.scalar_type() == at::kFloat && lb.scalar_type() == at::kFloat, "megasora: lse must be float32");
}

std::tuple<at::Tensor, at::Tensor> merge_attention_partials_fwd(const at::Tensor& oa_, const at::Tensor& la_,
                                                                const at::Tensor& ob_, const at::Tensor& lb_) {
  const c10::cuda::CUDAGuard guard(oa_.device());
  const at::Tensor oa = oa_.contiguous(), la = la_.contiguous(), ob = ob_.contiguous(), lb = lb_.contiguous();
  check_merge(oa, la, ob, lb);
  at::Tensor out = at::empty(oa.sizes(), la.options()), lse = at::empty_like(la);
  mc::MergeArgs a;
  a.out_a = oa.data_ptr();
  a.out_b = ob.data_ptr();
  a.lse_a = la.data_ptr<float>();
  a.lse_b = lb.data_ptr<float>();
  a.out = out.data_ptr<float>();
  a.lse_out = lse.data_ptr<float>();
  a.R = la.numel();
  a.D = oa.size(-1);
  a.dtype = dtype_of(oa);
  C10_CUDA_CHECK(mc::merge_fwd(a, stream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_attention_partials_bwd(
    const at::Tensor& gout_, const at::Tensor& glse_, const at::Tensor& oa_, const at::Tensor& la_,
    const at::Tensor& ob_, const at::Tensor& lb_, const at::Tensor& lse_) {
  const c10::cuda::CUDAGuard guard(oa_.device());
  const at::Tensor gout = gout_.contiguous(), glse = glse_.contiguous(), lse = lse_.contiguous();
  const at::Tensor oa = oa_.contiguous(), la = la_.contiguous(), ob = ob_.contiguous(), lb = lb_.contiguous();
  check_merge(oa, la, ob, lb);
  TORCH_CHECK(gout.sizes() == oa.sizes() && gout.scalar_type() == at::kFloat && glse.sizes() == la.sizes() &&
                  glse.scalar_type() == at::kFloat && lse.sizes() == la.sizes(),
              "megasora: merge grads must be float32 and match the outputs");
  at::Tensor goa = at::empty_like(oa), gob = at::empty_like(ob), gla = at::empty_like(la), glb = at::empty_like(lb);
  mc::MergeArgs a;
  a.out_a = oa.data_ptr();
  a.out_b = ob.data_ptr();
  a.lse_a = la.data_ptr<float>();
  a.lse_b = lb.data_ptr<float>();
  a.lse = lse.data_ptr<float>();
  a.grad_out = gout.data_ptr<float>();
  a.grad_lse = glse.data_ptr<float>();
  a.grad_out_a = goa.data_ptr();
  a.grad_out_b = gob.data_ptr();
  a.grad_lse_a = gla.data_ptr<float>();
  a.grad_lse_b = glb.data_ptr<float>();
  a.R = la.numel();
  a.D = oa.size(-1);
  a.dtype = dtype_of(oa);
  C10_CUDA_CHECK(mc::merge_bwd(a, stream()));
  return {goa, gla, gob, glb};
}

}  // namespace

TORCH_LIBRARY_IMPL(megasora, CUDA, m) {
  m.impl("modulated_norm_fwd", &modulated_norm_fwd);
  m.impl("modulated_norm_bwd", &modulated_norm_bwd);
  m.impl("gated_residual_fwd", &gated_residual_fwd);
  m.impl("gated_residual_bwd", &gated_residual_bwd);
  m.impl("gated_residual_modulated_norm_fwd", &gated_residual_modulated_norm_fwd);
  m.impl("gated_residual_modulated_norm_bwd", &gated_residual_modulated_norm_bwd);
  m.impl("apply_rope", &apply_rope);
  m.impl("merge_attention_partials_fwd", &merge_attention_partials_fwd);
  m.impl("merge_attention_partials_bwd", &merge_attention_partials_bwd);
}

}  // namespace megasora
