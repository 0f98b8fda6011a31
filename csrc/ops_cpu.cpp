// megasora:: custom operators: schemas and CPU implementations.
//
// One translation unit on purpose (compile time). The kernels and op bodies live in
// cpu/ops_impl.h, compiled twice here (baseline x86-64 and AVX2+FMA) and picked by the
// CPU at load time. Every op reads its inputs once,
// computes in fp32 (fp64 for fp64 inputs, so gradcheck works) and rounds once on write.
// Semantics are those of megasora/kernels/reference.py. Inputs are made contiguous at the
// op boundary (a copy only when they are not). Autograd and fake (meta) kernels are
// registered from Python in megasora/kernels/fused.py.
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

#include "layout.h"

// `import megasora._C` loads this library, which registers the ops with the dispatcher.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace megasora {

namespace cpu_base {
#include "cpu/ops_impl.h"
}  // namespace cpu_base

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace cpu_avx2 {
#include "cpu/ops_impl.h"
}  // namespace cpu_avx2
#pragma GCC pop_options

bool cpu_has_avx2() {
  __builtin_cpu_init();  // op registration runs in a static constructor
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#define MEGASORA_CPU_PICK(name) (cpu_has_avx2() ? &cpu_avx2::name : &cpu_base::name)
#else
#define MEGASORA_CPU_PICK(name) (&cpu_base::name)
#endif

TORCH_LIBRARY(megasora, m) {
  m.def("modulated_norm_fwd(Tensor x, Tensor? shift, Tensor? scale, Tensor? weight, Tensor? bias, float eps, "
        "bool rms) -> (Tensor, Tensor, Tensor)");
  m.def("modulated_norm_bwd(Tensor grad_out, Tensor x, Tensor mean, Tensor rstd, Tensor? scale, Tensor? weight, "
        "Tensor? bias, bool rms) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("gated_residual_fwd(Tensor x, Tensor gate, Tensor y) -> Tensor");
  m.def("gated_residual_bwd(Tensor grad_h, Tensor gate, Tensor y) -> (Tensor, Tensor)");
  m.def("gated_residual_modulated_norm_fwd(Tensor x, Tensor gate, Tensor y, Tensor shift, Tensor scale, "
        "Tensor? weight, Tensor? bias, float eps, bool rms) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gated_residual_modulated_norm_bwd(Tensor? grad_h, Tensor grad_out, Tensor h, Tensor gate, Tensor y, "
        "Tensor mean, Tensor rstd, Tensor scale, Tensor? weight, Tensor? bias, bool rms) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("apply_rope(Tensor x, Tensor cos, Tensor sin, bool inverse) -> Tensor");
  m.def("merge_attention_partials_fwd(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) -> (Tensor, Tensor)");
  m.def("merge_attention_partials_bwd(Tensor grad_out, Tensor grad_lse, Tensor out_a, Tensor lse_a, "
        "Tensor out_b, Tensor lse_b, Tensor lse) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(megasora, CPU, m) {
  m.impl("modulated_norm_fwd", MEGASORA_CPU_PICK(modulated_norm_fwd));
  m.impl("modulated_norm_bwd", MEGASORA_CPU_PICK(modulated_norm_bwd));
  m.impl("gated_residual_fwd", MEGASORA_CPU_PICK(gated_residual_fwd));
  m.impl("gated_residual_bwd", MEGASORA_CPU_PICK(gated_residual_bwd));
  m.impl("gated_residual_modulated_norm_fwd", MEGASORA_CPU_PICK(gated_residual_modulated_norm_fwd));
  m.impl("gated_residual_modulated_norm_bwd", MEGASORA_CPU_PICK(gated_residual_modulated_norm_bwd));
  m.impl("apply_rope", MEGASORA_CPU_PICK(apply_rope));
  m.impl("merge_attention_partials_fwd", MEGASORA_CPU_PICK(merge_attention_partials_fwd));
  m.impl("merge_attention_partials_bwd", MEGASORA_CPU_PICK(merge_attention_partials_bwd));
}

}  // namespace megasora
