// CPU kernels and op bodies of the megasora:: ops, included twice by csrc/ops_cpu.cpp:
// once plain and once under `#pragma GCC target("avx2,fma")`, each in its own namespace,
// so the loops are vectorized for the machine at run time without -march flags.
// Not a normal header: no include guard, and its includes come from ops_cpu.cpp.


constexpr int64_t kChunkRows = 64;

// Rows per parallel task: enough work (~32k values) to amortize scheduling.
int64_t row_grain(int64_t D) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1)); }

// ---------------------------------------------------------------- normalization forward

// Normalizes row `buf` (already in the accumulation type) in place into
// (x - mean) * rstd * w + b and returns mean and rstd through the out-params.
template <typename A>
void normalize_row(A* buf, int64_t D, A eps, bool rms, const A* w, const A* b, A& mean, A& rstd) {
  A s = 0;
  if (!rms) {
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) s += buf[d];
  }
  const A mu = rms ? A(0) : s / A(D);
  A v = 0;
#pragma omp simd reduction(+ : v)
  for (int64_t d = 0; d < D; ++d) {
    const A t = buf[d] - mu;
    v += t * t;
  }
  const A rs = A(1) / std::sqrt(v / A(D) + eps);
  for (int64_t d = 0; d < D; ++d) buf[d] = (buf[d] - mu) * rs;
  if (w != nullptr) {
    for (int64_t d = 0; d < D; ++d) buf[d] *= w[d];
  }
  if (b != nullptr) {
    for (int64_t d = 0; d < D; ++d) buf[d] += b[d];
  }
  mean = mu;
  rstd = rs;
}

// out = n * (1 + scale) + shift, or n when there is no modulation.
template <typename T, typename A>
void write_modulated(const A* n, const T* shift, const T* scale, T* out, int64_t D) {
  if (scale == nullptr) {
    for (int64_t d = 0; d < D; ++d) out[d] = T(n[d]);
    return;
  }
  for (int64_t d = 0; d < D; ++d) out[d] = T(n[d] * (A(1) + A(scale[d])) + A(shift[d]));
}

template <typename T>
struct NormFwd {
  using A = at::opmath_type<T>;
  const T* x = nullptr;
  const T* gate = nullptr;  // residual variant: normalized input is h = x + gate * y
  const T* y = nullptr;
  const T* shift = nullptr;
  const T* scale = nullptr;
  const A* w = nullptr;
  const A* b = nullptr;
  T* h = nullptr;
  T* out = nullptr;
  A* mean = nullptr;
  A* rstd = nullptr;
  A eps = 0;
  bool rms = false;
};

template <typename T>
void norm_fwd_cpu(const NormFwd<T>& p, const RowLayout& l) {
  using A = at::opmath_type<T>;
  const int64_t D = l.D;
  at::parallel_for(0, l.R, row_grain(D), [&](int64_t r0, int64_t r1) {
    std::vector<A> buf(D);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t o = r * D;
      const int64_t mo = l.rows_per_mod ? (r / l.rows_per_mod) * D : 0;
      if (p.gate != nullptr) {
        // Round h to the storage dtype first: the norm must see the residual stream as stored.
        for (int64_t d = 0; d < D; ++d) {
          const T h = T(A(p.x[o + d]) + A(p.gate[mo + d]) * A(p.y[o + d]));
          p.h[o + d] = h;
          buf[d] = A(h);
        }
      } else {
        for (int64_t d = 0; d < D; ++d) buf[d] = A(p.x[o + d]);
      }
      normalize_row(buf.data(), D, p.eps, p.rms, p.w, p.b, p.mean[r], p.rstd[r]);
      write_modulated(buf.data(), p.shift ? p.shift + mo : nullptr, p.scale ? p.scale + mo : nullptr,
                      p.out + o, D);
    }
  });
}

// ---------------------------------------------------------------- normalization backward

// Quantities reduced over rows: weight/bias grads over all rows, modulation grads over a
// sample's rows when modulation is per sample.
enum Quantity { kW = 0, kB, kShift, kScale, kGate, kNumQ };

template <typename A>
struct Partials {
  std::array<int64_t, kNumQ> slot{};  // compact index, -1 when the quantity is not needed
  int64_t chunks = 0, D = 0;
  std::vector<A> buf;

  Partials(const std::array<bool, kNumQ>& need, int64_t chunks_, int64_t D_) : chunks(chunks_), D(D_) {
    int64_t n = 0;
    for (int q = 0; q < kNumQ; ++q) slot[q] = need[q] ? n++ : -1;
    buf.assign(n * chunks * D, A(0));
  }
  A* at(int q, int64_t c) { return slot[q] < 0 ? nullptr : buf.data() + (slot[q] * chunks + c) * D; }

  // Sum of the chunks of every sample into out (B, D), or of all chunks when per_sample is false.
  template <typename T>
  void reduce(int q, const RowLayout& l, bool per_sample, T* out) {
    if (slot[q] < 0 || out == nullptr) return;
    const int64_t groups = per_sample ? l.B : 1;
    const int64_t per_group = per_sample ? l.chunks_per_sample : l.chunks;
    at::parallel_for(0, groups * D, 1024, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t g = i / D, d = i % D;
        A s = 0;
        for (int64_t k = 0; k < per_group; ++k) s += at(q, g * per_group + k)[d];
        out[i] = T(s);
      }
    });
  }
};

template <typename T>
struct NormBwd {
  using A = at::opmath_type<T>;
  const T* gout = nullptr;  // grad of the normalized output
  const T* gh = nullptr;    // residual variant: grad of h from its other uses (may be null)
  const T* xn = nullptr;    // the normalized input (x, or h for the residual variant)
  const A* mean = nullptr;
  const A* rstd = nullptr;
  const T* scale = nullptr;
  const A* w = nullptr;
  const A* b = nullptr;
  const T* gate = nullptr;  // residual variant
  const T* y = nullptr;     // residual variant
  T* gx = nullptr;
  T* gy = nullptr;
  T* gshift = nullptr;
  T* gscale = nullptr;
  T* ggate = nullptr;
  A* gw = nullptr;
  A* gb = nullptr;
  bool rms = false;
};

// Per-task scratch: xhat and the grad wrt xhat of one row, and w / b with the
// "no weight" / "no bias" cases filled in (1 and 0) so the inner loops have no branches.
template <typename A>
struct RowScratch {
  std::vector<A> xhat, gxh, w, b;
  RowScratch(int64_t D, const A* w_, const A* b_) : xhat(D), gxh(D), w(D, A(1)), b(D, A(0)) {
    if (w_ != nullptr) std::copy(w_, w_ + D, w.begin());
    if (b_ != nullptr) std::copy(b_, b_ + D, b.begin());
  }
};

template <typename T>
void norm_bwd_row(const NormBwd<T>& p, const RowLayout& l, bool per_sample, int64_t r, int64_t c,
                  Partials<at::opmath_type<T>>& part, RowScratch<at::opmath_type<T>>& s) {
  using A = at::opmath_type<T>;
  const int64_t D = l.D, o = r * D;
  const int64_t mo = l.rows_per_mod ? (r / l.rows_per_mod) * D : 0;
  const A mu = p.mean[r], rs = p.rstd[r];
  A* xhat = s.xhat.data();
  A* gxh = s.gxh.data();
  const A* w = s.w.data();
  const A* b = s.b.data();
  for (int64_t d = 0; d < D; ++d) xhat[d] = (A(p.xn[o + d]) - mu) * rs;
  for (int64_t d = 0; d < D; ++d) gxh[d] = A(p.gout[o + d]);
  if (p.scale != nullptr) {
    if (per_sample) {
      A* ps = part.at(kShift, c);
      A* pc = part.at(kScale, c);
      for (int64_t d = 0; d < D; ++d) {
        ps[d] += gxh[d];
        pc[d] += gxh[d] * (xhat[d] * w[d] + b[d]);
      }
    } else {
      for (int64_t d = 0; d < D; ++d) {
        p.gshift[o + d] = T(gxh[d]);
        p.gscale[o + d] = T(gxh[d] * (xhat[d] * w[d] + b[d]));
      }
    }
    for (int64_t d = 0; d < D; ++d) gxh[d] *= A(1) + A(p.scale[mo + d]);
  }
  if (A* pw = part.at(kW, c)) {
    for (int64_t d = 0; d < D; ++d) pw[d] += gxh[d] * xhat[d];
  }
  if (A* pb = part.at(kB, c)) {
    for (int64_t d = 0; d < D; ++d) pb[d] += gxh[d];
  }
  A s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
  for (int64_t d = 0; d < D; ++d) {
    gxh[d] *= w[d];
    s1 += gxh[d];
    s2 += gxh[d] * xhat[d];
  }
  const A m1 = p.rms ? A(0) : s1 / A(D), m2 = s2 / A(D);
  for (int64_t d = 0; d < D; ++d) gxh[d] = rs * (gxh[d] - m1 - xhat[d] * m2);  // now grad of xn
  if (p.gh != nullptr) {
    for (int64_t d = 0; d < D; ++d) gxh[d] += A(p.gh[o + d]);
  }
  for (int64_t d = 0; d < D; ++d) p.gx[o + d] = T(gxh[d]);
  if (p.gate == nullptr) return;
  for (int64_t d = 0; d < D; ++d) p.gy[o + d] = T(A(p.gate[mo + d]) * gxh[d]);
  if (per_sample) {
    A* pg = part.at(kGate, c);
    for (int64_t d = 0; d < D; ++d) pg[d] += gxh[d] * A(p.y[o + d]);
  } else {
    for (int64_t d = 0; d < D; ++d) p.ggate[o + d] = T(gxh[d] * A(p.y[o + d]));
  }
}

template <typename T>
void norm_bwd_cpu(const NormBwd<T>& p, const RowLayout& l) {
  using A = at::opmath_type<T>;
  const int64_t D = l.D;
  const bool per_sample = l.rows_per_mod > 0 && l.rows_per_mod == l.N;
  const bool mod = p.scale != nullptr && per_sample;
  const bool gate = p.gate != nullptr && per_sample;
  Partials<A> part({p.gw != nullptr, p.gb != nullptr, mod, mod, gate}, l.chunks, D);
  at::parallel_for(0, l.chunks, 1, [&](int64_t c0, int64_t c1) {
    RowScratch<A> scratch(D, p.w, p.b);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c / l.chunks_per_sample;
      const int64_t r0 = b * l.N + (c % l.chunks_per_sample) * l.chunk_rows;
      const int64_t r1 = std::min(r0 + l.chunk_rows, (b + 1) * l.N);
      for (int64_t r = r0; r < r1; ++r) norm_bwd_row(p, l, per_sample, r, c, part, scratch);
    }
  });
  part.reduce(kW, l, false, p.gw);
  part.reduce(kB, l, false, p.gb);
  part.reduce(kShift, l, true, mod ? p.gshift : nullptr);
  part.reduce(kScale, l, true, mod ? p.gscale : nullptr);
  part.reduce(kGate, l, true, gate ? p.ggate : nullptr);
}

// ---------------------------------------------------------------- op bodies

std::tuple<at::Tensor, at::Tensor, at::Tensor> modulated_norm_fwd(
    const at::Tensor& x_, const std::optional<at::Tensor>& shift_, const std::optional<at::Tensor>& scale_,
    const std::optional<at::Tensor>& weight_, const std::optional<at::Tensor>& bias_, double eps, bool rms) {
  TORCH_CHECK(shift_.has_value() == scale_.has_value(), "megasora: shift and scale go together");
  const at::Tensor x = x_.contiguous();
  const auto shift = contig(shift_), scale = contig(scale_), weight = contig(weight_), bias = contig(bias_);
  if (scale) {
    check_mod(x, *shift, "shift");
    check_mod(x, *scale, "scale");
    TORCH_CHECK(shift->sizes() == scale->sizes(), "megasora: shift and scale shapes differ");
  }
  check_acc(weight, x, "weight");
  check_acc(bias, x, "bias");
  const RowLayout l = make_layout(x, scale, kChunkRows);
  at::Tensor out = at::empty_like(x);
  const auto acc = x.options().dtype(acc_dtype(x.scalar_type()));
  at::Tensor mean = at::empty({l.R}, acc), rstd = at::empty({l.R}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "modulated_norm_fwd", [&] {
    using A = at::opmath_type<scalar_t>;
    NormFwd<scalar_t> p;
    p.x = x.data_ptr<scalar_t>();
    p.shift = opt_ptr<scalar_t>(shift);
    p.scale = opt_ptr<scalar_t>(scale);
    p.w = opt_ptr<A>(weight);
    p.b = opt_ptr<A>(bias);
    p.out = out.data_ptr<scalar_t>();
    p.mean = mean.data_ptr<A>();
    p.rstd = rstd.data_ptr<A>();
    p.eps = A(eps);
    p.rms = rms;
    norm_fwd_cpu(p, l);
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> modulated_norm_bwd(
    const at::Tensor& grad_out_, const at::Tensor& x_, const at::Tensor& mean_, const at::Tensor& rstd_,
    const std::optional<at::Tensor>& scale_, const std::optional<at::Tensor>& weight_,
    const std::optional<at::Tensor>& bias_, bool rms) {
  const at::Tensor g = grad_out_.contiguous(), x = x_.contiguous();
  const at::Tensor mean = mean_.contiguous(), rstd = rstd_.contiguous();
  const auto scale = contig(scale_), weight = contig(weight_), bias = contig(bias_);
  TORCH_CHECK(g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type(), "megasora: grad_out must match x");
  if (scale) check_mod(x, *scale, "scale");
  check_acc(weight, x, "weight");
  check_acc(bias, x, "bias");
  const RowLayout l = make_layout(x, scale, kChunkRows);
  at::Tensor gx = at::empty_like(x);
  at::Tensor gshift = scale ? at::empty_like(*scale) : none_like(x);
  at::Tensor gscale = scale ? at::empty_like(*scale) : none_like(x);
  at::Tensor gw = weight ? at::empty_like(*weight) : none_like(mean);
  at::Tensor gb = bias ? at::empty_like(*bias) : none_like(mean);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "modulated_norm_bwd", [&] {
    using A = at::opmath_type<scalar_t>;
    NormBwd<scalar_t> p;
    p.gout = g.data_ptr<scalar_t>();
    p.xn = x.data_ptr<scalar_t>();
    p.mean = mean.data_ptr<A>();
    p.rstd = rstd.data_ptr<A>();
    p.scale = opt_ptr<scalar_t>(scale);
    p.w = opt_ptr<A>(weight);
    p.b = opt_ptr<A>(bias);
    p.gx = gx.data_ptr<scalar_t>();
    p.gshift = scale ? gshift.data_ptr<scalar_t>() : nullptr;
    p.gscale = scale ? gscale.data_ptr<scalar_t>() : nullptr;
    p.gw = weight ? gw.data_ptr<A>() : nullptr;
    p.gb = bias ? gb.data_ptr<A>() : nullptr;
    p.rms = rms;
    norm_bwd_cpu(p, l);
  });
  return {gx, gshift, gscale, gw, gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_residual_modulated_norm_fwd(
    const at::Tensor& x_, const at::Tensor& gate_, const at::Tensor& y_, const at::Tensor& shift_,
    const at::Tensor& scale_, const std::optional<at::Tensor>& weight_, const std::optional<at::Tensor>& bias_,
    double eps, bool rms) {
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
  const RowLayout l = make_layout(x, scale, kChunkRows);
  at::Tensor h = at::empty_like(x), out = at::empty_like(x);
  const auto acc = x.options().dtype(acc_dtype(x.scalar_type()));
  at::Tensor mean = at::empty({l.R}, acc), rstd = at::empty({l.R}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gated_residual_modulated_norm_fwd", [&] {
    using A = at::opmath_type<scalar_t>;
    NormFwd<scalar_t> p;
    p.x = x.data_ptr<scalar_t>();
    p.gate = gate.data_ptr<scalar_t>();
    p.y = y.data_ptr<scalar_t>();
    p.shift = shift.data_ptr<scalar_t>();
    p.scale = scale.data_ptr<scalar_t>();
    p.w = opt_ptr<A>(weight);
    p.b = opt_ptr<A>(bias);
    p.h = h.data_ptr<scalar_t>();
    p.out = out.data_ptr<scalar_t>();
    p.mean = mean.data_ptr<A>();
    p.rstd = rstd.data_ptr<A>();
    p.eps = A(eps);
    p.rms = rms;
    norm_fwd_cpu(p, l);
  });
  return {h, out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_residual_modulated_norm_bwd(const std::optional<at::Tensor>& grad_h_, const at::Tensor& grad_out_,
                                  const at::Tensor& h_, const at::Tensor& gate_, const at::Tensor& y_,
                                  const at::Tensor& mean_, const at::Tensor& rstd_, const at::Tensor& scale_,
                                  const std::optional<at::Tensor>& weight_,
                                  const std::optional<at::Tensor>& bias_, bool rms) {
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
  const RowLayout l = make_layout(h, scale, kChunkRows);
  at::Tensor gx = at::empty_like(h), gy = at::empty_like(h);
  at::Tensor ggate = at::empty_like(gate), gshift = at::empty_like(scale), gscale = at::empty_like(scale);
  at::Tensor gw = weight ? at::empty_like(*weight) : none_like(mean);
  at::Tensor gb = bias ? at::empty_like(*bias) : none_like(mean);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "gated_residual_modulated_norm_bwd", [&] {
    using A = at::opmath_type<scalar_t>;
    NormBwd<scalar_t> p;
    p.gout = g.data_ptr<scalar_t>();
    p.gh = opt_ptr<scalar_t>(gh);
    p.xn = h.data_ptr<scalar_t>();
    p.mean = mean.data_ptr<A>();
    p.rstd = rstd.data_ptr<A>();
    p.scale = scale.data_ptr<scalar_t>();
    p.w = opt_ptr<A>(weight);
    p.b = opt_ptr<A>(bias);
    p.gate = gate.data_ptr<scalar_t>();
    p.y = y.data_ptr<scalar_t>();
    p.gx = gx.data_ptr<scalar_t>();
    p.gy = gy.data_ptr<scalar_t>();
    p.gshift = gshift.data_ptr<scalar_t>();
    p.gscale = gscale.data_ptr<scalar_t>();
    p.ggate = ggate.data_ptr<scalar_t>();
    p.gw = weight ? gw.data_ptr<A>() : nullptr;
    p.gb = bias ? gb.data_ptr<A>() : nullptr;
    p.rms = rms;
    norm_bwd_cpu(p, l);
  });
  return {gx, ggate, gy, gshift, gscale, gw, gb};
}

// ---------------------------------------------------------------- gated residual

at::Tensor gated_residual_fwd(const at::Tensor& x_, const at::Tensor& gate_, const at::Tensor& y_) {
  const at::Tensor x = x_.contiguous(), gate = gate_.contiguous(), y = y_.contiguous();
  check_mod(x, gate, "gate");
  TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type(), "megasora: y must match x");
  const RowLayout l = make_layout(x, gate, kChunkRows);
  at::Tensor h = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gated_residual_fwd", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t *px = x.data_ptr<scalar_t>(), *pg = gate.data_ptr<scalar_t>(), *py = y.data_ptr<scalar_t>();
    scalar_t* ph = h.data_ptr<scalar_t>();
    const int64_t D = l.D;
    at::parallel_for(0, l.R, row_grain(D), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t o = r * D, mo = (r / l.rows_per_mod) * D;
        for (int64_t d = 0; d < D; ++d) ph[o + d] = scalar_t(A(px[o + d]) + A(pg[mo + d]) * A(py[o + d]));
      }
    });
  });
  return h;
}

// Returns (grad_gate, grad_y); grad_x is grad_h itself and needs no kernel.
std::tuple<at::Tensor, at::Tensor> gated_residual_bwd(const at::Tensor& grad_h_, const at::Tensor& gate_,
                                                      const at::Tensor& y_) {
  const at::Tensor g = grad_h_.contiguous(), gate = gate_.contiguous(), y = y_.contiguous();
  check_mod(y, gate, "gate");
  TORCH_CHECK(g.sizes() == y.sizes() && g.scalar_type() == y.scalar_type(), "megasora: grad_h must match y");
  const RowLayout l = make_layout(y, gate, kChunkRows);
  const bool per_sample = l.rows_per_mod == l.N;
  at::Tensor ggate = at::empty_like(gate), gy = at::empty_like(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "gated_residual_bwd", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t *pgr = g.data_ptr<scalar_t>(), *pg = gate.data_ptr<scalar_t>(), *py = y.data_ptr<scalar_t>();
    scalar_t *pgg = ggate.data_ptr<scalar_t>(), *pgy = gy.data_ptr<scalar_t>();
    const int64_t D = l.D;
    Partials<A> part({false, false, false, false, per_sample}, l.chunks, D);
    at::parallel_for(0, l.chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b = c / l.chunks_per_sample;
        const int64_t r0 = b * l.N + (c % l.chunks_per_sample) * l.chunk_rows;
        const int64_t r1 = std::min(r0 + l.chunk_rows, (b + 1) * l.N);
        A* acc = part.at(kGate, c);
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t o = r * D, mo = (r / l.rows_per_mod) * D;
          for (int64_t d = 0; d < D; ++d) {
            const A gr = A(pgr[o + d]);
            pgy[o + d] = scalar_t(A(pg[mo + d]) * gr);
            const A gg = gr * A(py[o + d]);
            if (per_sample) {
              acc[d] += gg;
            } else {
              pgg[o + d] = scalar_t(gg);
            }
          }
        }
      }
    });
    part.reduce(kGate, l, true, per_sample ? pgg : nullptr);
  });
  return {ggate, gy};
}

// ---------------------------------------------------------------- rope

// x (B, N, H, Dh); cos, sin (N, Dh/2). inverse=true rotates by -theta (the backward).
at::Tensor apply_rope(const at::Tensor& x_, const at::Tensor& cos_, const at::Tensor& sin_, bool inverse) {
  const at::Tensor x = x_.contiguous(), cos = cos_.contiguous(), sin = sin_.contiguous();
  TORCH_CHECK(x.dim() == 4 && x.size(3) % 2 == 0, "megasora: apply_rope needs x (B, N, H, Dh) with even Dh, got ",
              x.sizes());
  const int64_t B = x.size(0), N = x.size(1), H = x.size(2), half = x.size(3) / 2;
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == N && cos.size(1) == half && sin.sizes() == cos.sizes(),
              "megasora: cos/sin must be (N, Dh/2) = (", N, ", ", half, "), got ", cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(cos.scalar_type() == acc_dtype(x.scalar_type()) && sin.scalar_type() == cos.scalar_type(),
              "megasora: cos/sin must be ", acc_dtype(x.scalar_type()));
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "apply_rope", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* px = x.data_ptr<scalar_t>();
    const A *pc = cos.data_ptr<A>(), *ps = sin.data_ptr<A>();
    scalar_t* po = out.data_ptr<scalar_t>();
    const A sign = inverse ? A(-1) : A(1);
    at::parallel_for(0, B * N, row_grain(H * 2 * half), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const A* c = pc + (r % N) * half;
        const A* s = ps + (r % N) * half;
        for (int64_t hh = 0; hh < H; ++hh) {
          const int64_t o = (r * H + hh) * 2 * half;
          for (int64_t i = 0; i < half; ++i) {
            const A x1 = A(px[o + i]), x2 = A(px[o + half + i]), si = sign * s[i];
            po[o + i] = scalar_t(x1 * c[i] - x2 * si);
            po[o + half + i] = scalar_t(x2 * c[i] + x1 * si);
          }
        }
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------- ring-attention merge

// lse = logaddexp(lse_a, lse_b) written so that -inf rows stay -inf without NaNs.
template <typename A>
A merged_lse(A a, A b) {
  const A hi = std::max(a, b), lo = std::min(a, b);
  if (!std::isfinite(hi)) return hi;
  return hi + std::log1p(std::exp(lo - hi));
}

template <typename A>
A finite_or_zero(A v) {
  return std::isfinite(v) ? v : A(0);
}

void check_merge(const at::Tensor& oa, const at::Tensor& la, const at::Tensor& ob, const at::Tensor& lb) {
  TORCH_CHECK(oa.dim() >= 1 && oa.sizes() == ob.sizes() && oa.scalar_type() == ob.scalar_type(),
              "megasora: out_a and out_b must have the same shape and dtype");
  TORCH_CHECK(la.sizes() == oa.sizes().slice(0, oa.dim() - 1) && lb.sizes() == la.sizes(),
              "megasora: lse must be out.shape[:-1], got ", la.sizes(), " for out ", oa.sizes());
  TORCH_CHECK(la.scalar_type() == acc_dtype(oa.scalar_type()) && lb.scalar_type() == la.scalar_type(),
              "megasora: lse must be ", acc_dtype(oa.scalar_type()));
}

std::tuple<at::Tensor, at::Tensor> merge_attention_partials_fwd(const at::Tensor& oa_, const at::Tensor& la_,
                                                                const at::Tensor& ob_, const at::Tensor& lb_) {
  const at::Tensor oa = oa_.contiguous(), la = la_.contiguous(), ob = ob_.contiguous(), lb = lb_.contiguous();
  check_merge(oa, la, ob, lb);
  const int64_t D = oa.size(-1), R = la.numel();
  at::Tensor out = at::empty(oa.sizes(), la.options()), lse = at::empty_like(la);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, oa.scalar_type(), "merge_attention_partials_fwd", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t *pa = oa.data_ptr<scalar_t>(), *pb = ob.data_ptr<scalar_t>();
    const A *pla = la.data_ptr<A>(), *plb = lb.data_ptr<A>();
    A *po = out.data_ptr<A>(), *pl = lse.data_ptr<A>();
    at::parallel_for(0, R, row_grain(D), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const A l = merged_lse(pla[r], plb[r]), ls = finite_or_zero(l);
        const A wa = std::exp(pla[r] - ls), wb = std::exp(plb[r] - ls);
        pl[r] = l;
        for (int64_t d = 0; d < D; ++d) po[r * D + d] = wa * A(pa[r * D + d]) + wb * A(pb[r * D + d]);
      }
    });
  });
  return {out, lse};
}

// out = wa*oa + wb*ob with wa + wb = 1, so d out/d lse_a = wa*(oa - out) = wa*wb*(oa - ob).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_attention_partials_bwd(
    const at::Tensor& gout_, const at::Tensor& glse_, const at::Tensor& oa_, const at::Tensor& la_,
    const at::Tensor& ob_, const at::Tensor& lb_, const at::Tensor& lse_) {
  const at::Tensor gout = gout_.contiguous(), glse = glse_.contiguous(), lse = lse_.contiguous();
  const at::Tensor oa = oa_.contiguous(), la = la_.contiguous(), ob = ob_.contiguous(), lb = lb_.contiguous();
  check_merge(oa, la, ob, lb);
  TORCH_CHECK(gout.sizes() == oa.sizes() && gout.scalar_type() == la.scalar_type() &&
                  glse.sizes() == la.sizes() && glse.scalar_type() == la.scalar_type() && lse.sizes() == la.sizes(),
              "megasora: merge grads must be in the accumulation dtype and match the outputs");
  const int64_t D = oa.size(-1), R = la.numel();
  at::Tensor goa = at::empty_like(oa), gob = at::empty_like(ob), gla = at::empty_like(la), glb = at::empty_like(lb);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, oa.scalar_type(), "merge_attention_partials_bwd", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t *pa = oa.data_ptr<scalar_t>(), *pb = ob.data_ptr<scalar_t>();
    const A *pla = la.data_ptr<A>(), *plb = lb.data_ptr<A>(), *pl = lse.data_ptr<A>();
    const A *pgo = gout.data_ptr<A>(), *pgl = glse.data_ptr<A>();
    scalar_t *pga = goa.data_ptr<scalar_t>(), *pgb = gob.data_ptr<scalar_t>();
    A *pgla = gla.data_ptr<A>(), *pglb = glb.data_ptr<A>();
    at::parallel_for(0, R, row_grain(D), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const A ls = finite_or_zero(pl[r]);
        const A wa = std::exp(pla[r] - ls), wb = std::exp(plb[r] - ls);
        A dot = 0;  // sum_d g * (oa - ob)
        _Pragma("omp simd reduction(+ : dot)")  // inside a macro argument: no #pragma
        for (int64_t d = 0; d < D; ++d) {
          const int64_t i = r * D + d;
          const A g = pgo[i];
          pga[i] = scalar_t(wa * g);
          pgb[i] = scalar_t(wb * g);
          dot += g * (A(pa[i]) - A(pb[i]));
        }
        pgla[r] = wa * (wb * dot + pgl[r]);
        pglb[r] = wb * (pgl[r] - wa * dot);
      }
    });
  });
  return {goa, gla, gob, glb};
}

