// LSTM (optionally with proj_size): forward and backward over the whole sequence.
// Per step: one GEMM h_{t-1} W_hh^T (+ one for the projection) and one fused pass over the gates.
#include "fastrnn.h"

namespace fastrnn {
namespace {

// Forward pass for rows [r0, r1) of step t. gx, gh: [B,4H] (gh may alias gates); bias [4H]; c: [B,H] running
// cell state (c_{t-1} in, c_t out); h: [B,H] o*tanh(c_t) (out[t] without projection, else the pre-projection
// buffer); gates [B,4H] and extra [B,H] of step t or null.
template <typename T>
void lstm_fwd_rows(int64_t r0, int64_t r1, int64_t H, const T* gx, const T* gh, const T* bias, T* c, T* h, T* gates,
                   T* extra) {
  const int64_t GH = 4 * H;
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = gx + r * GH;
    const T* g = gh + r * GH;
    T* cr = c + r * H;
    T* hr = h + r * H;
    T* sg = gates ? gates + r * GH : nullptr;
    T* se = extra ? extra + r * H : nullptr;
    vec_loop<T>(H, [&](int64_t j, int64_t n) {
      auto pre = [&](int64_t q) { return vload(x + q * H + j, n) + vload(g + q * H + j, n) + vload(bias + q * H + j, n); };
      Vec<T> i = vsigmoid(pre(0)), f = vsigmoid(pre(1)), gg = vtanh(pre(2)), o = vsigmoid(pre(3));
      Vec<T> cn = f * vload(cr + j, n) + i * gg;
      vstore(cn, cr + j, n);
      vstore(o * vtanh(cn), hr + j, n);
      if (sg) {
        vstore(i, sg + j, n);
        vstore(f, sg + H + j, n);
        vstore(gg, sg + 2 * H + j, n);
        vstore(o, sg + 3 * H + j, n);
      }
      if (se) vstore(cn, se + j, n);
    });
  }
}

// Backward pass for rows [r0, r1) of step t (reference.backward, lstm branch). dh: [B,P] incoming gradient of
// h_t (used with d_out when there is no projection, P == H) or dhbar: [B,H] gradient of o*tanh(c_t) after the
// projection; dc: [B,H] running cell gradient; cprev(r): c_{t-1} of row r. Writes d_gates [B,4H] and, with a
// projection, hbar [B,H] = o*tanh(c_t) for d_w_hr.
template <typename T, typename CPrev>
void lstm_bwd_rows(int64_t r0, int64_t r1, int64_t H, const T* dh, const T* d_out, const T* dhbar, const T* gates,
                   const T* extra, const CPrev& cprev, T* dc, T* d_gates, T* hbar) {
  const int64_t GH = 4 * H;
  const Vec<T> one(T(1));
  for (int64_t r = r0; r < r1; ++r) {
    const T* sg = gates + r * GH;
    const T* ct = extra + r * H;
    const T* cp = cprev(r);
    T* dcr = dc + r * H;
    T* dg = d_gates + r * GH;
    vec_loop<T>(H, [&](int64_t j, int64_t n) {
      Vec<T> dht = dhbar ? vload(dhbar + r * H + j, n) : vload(dh + r * H + j, n) + vload(d_out + r * H + j, n);
      Vec<T> i = vload(sg + j, n), f = vload(sg + H + j, n), g = vload(sg + 2 * H + j, n), o = vload(sg + 3 * H + j, n);
      Vec<T> tc = vtanh(vload(ct + j, n));
      Vec<T> dct = vload(dcr + j, n) + dht * o * (one - tc * tc);
      vstore(dct * g * i * (one - i), dg + j, n);
      vstore(dct * vload(cp + j, n) * f * (one - f), dg + H + j, n);
      vstore(dct * i * (one - g * g), dg + 2 * H + j, n);
      vstore(dht * tc * o * (one - o), dg + 3 * H + j, n);
      vstore(dct * f, dcr + j, n);
      if (hbar) vstore(o * tc, hbar + r * H + j, n);
    });
  }
}

template <typename T>
void lstm_forward_kernel(const Walk& w, int64_t H, int64_t P, const T* gx, const T* h0, const T* w_hh, const T* bias,
                         const T* w_hr, T* out, T* c, T* gates, T* extra, T* gh_buf, T* hbar) {
  const int64_t B = w.B, GH = 4 * H;
  const StepGemm<T> whh(w_hh, true, GH, P, B), whr(w_hr, true, P, H, w_hr ? B : 0);
  for (int64_t i = 0; i < w.T; ++i) {
    const int64_t t = w.step(i), n = w.bs[t], k = w.prev_rows(t);
    T* gh = gates ? gates + t * B * GH : gh_buf;
    const T* hsrc = k > 0 ? out + w.src(t) * B * P : nullptr;
    T* ot = out + t * B * P;
    T* hdst = w_hr ? hbar : ot;
    T* st = gates ? gates + t * B * GH : nullptr;
    T* et = extra ? extra + t * B * H : nullptr;
    if (row_blocks(n, P, GH)) {
      at::parallel_for(0, n, fused_grain(P, GH), [&](int64_t r0, int64_t r1) {
        gemm_prev_rows(whh, hsrc, h0, k, r0, r1, P, gh, GH);
        lstm_fwd_rows(r0, r1, H, gx + t * B * GH, gh, bias, c, hdst, st, et);
      });
    } else {
      gemm_prev(whh, hsrc, h0, k, n, P, gh, GH);
      at::parallel_for(0, n, row_grain(GH), [&](int64_t r0, int64_t r1) {
        lstm_fwd_rows(r0, r1, H, gx + t * B * GH, gh, bias, c, hdst, st, et);
      });
    }
    if (w_hr) whr(n, hbar, H, T(0), ot, P);
    zero_rows(ot, n, B, P);
    if (st) zero_rows(st, n, B, GH);
    if (et) zero_rows(et, n, B, H);
  }
}

template <typename T>
void lstm_backward_kernel(const Walk& w, int64_t H, int64_t P, const T* d_out, T* dh, T* dc, const T* h0,
                          const T* c0, const T* w_hh, const T* w_hr, const T* out, const T* gates, const T* extra,
                          T* d_gx, T* d_w_hh, T* d_w_hr, T* dhfull, T* hbar, T* dhbar, T* dg0) {
  const int64_t B = w.B, GH = 4 * H;
  const StepGemm<T> whh(w_hh, false, P, GH, B), whr(w_hr, false, H, P, w_hr ? B : 0);
  for (int64_t i = w.T - 1; i >= 0; --i) {
    const int64_t t = w.step(i), n = w.bs[t], k = w.prev_rows(t);
    const T* dot = d_out + t * B * P;
    T* dgt = d_gx + t * B * GH;
    T* hbt = w_hr ? hbar + t * B * H : nullptr;
    if (w_hr) {
      // gradient of the projected output, kept for d_w_hr, then taken back through w_hr
      T* dhf = dhfull + t * B * P;
      for (int64_t e = 0; e < n * P; ++e) dhf[e] = dh[e] + dot[e];
      zero_rows(dhf, n, B, P);
      whr(n, dhf, P, T(0), dhbar, H);
    }
    const T* ext = extra + t * B * H;
    const T* cprev_src = k > 0 ? extra + w.src(t) * B * H : nullptr;
    auto cprev = [&](int64_t r) { return r < k ? cprev_src + r * H : c0 + r * H; };
    const bool blocks = row_blocks(n, GH, P);
    at::parallel_for(0, n, blocks ? fused_grain(GH, P) : row_grain(GH), [&](int64_t r0, int64_t r1) {
      lstm_bwd_rows(r0, r1, H, dh, dot, w_hr ? dhbar : nullptr, gates + t * B * GH, ext, cprev, dc, dgt, hbt);
      if (blocks) whh(r1 - r0, dgt + r0 * GH, GH, T(0), dh + r0 * P, P);  // d h_{t-1} of these rows
    });
    if (!blocks) whh(n, dgt, GH, T(0), dh, P);
    zero_rows(dgt, n, B, GH);
    if (hbt) zero_rows(hbt, n, B, H);
  }
  weight_grad(w, d_gx, GH, out, h0, GH, P, dg0, d_w_hh);
  if (w_hr) gemm(true, false, P, H, w.T * B, T(1), dhfull, P, hbar, H, T(0), d_w_hr, H);
}

struct LstmSizes {
  int64_t T, B, H, P;
};

// Checks shared by forward and backward; returns the sizes fixed by w_hh [4H, P] and w_hr [P, H].
LstmSizes lstm_sizes(const Tensor& w_hh, const OptTensor& w_hr, int64_t T, int64_t B) {
  check_dtype(w_hh, "w_hh [4H, P]");
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) > 0 && w_hh.size(0) % 4 == 0 && w_hh.size(1) > 0,
              "fastrnn: w_hh must have shape [4H, P] with H, P >= 1, got ", shape_str(w_hh.sizes()));
  const int64_t H = w_hh.size(0) / 4, P = w_hh.size(1);
  if (w_hr.has_value() && w_hr->defined()) {
    check_tensor(*w_hr, "w_hr [P, H]", {P, H}, w_hh.scalar_type());
  } else {
    TORCH_CHECK(P == H, "fastrnn: w_hh must have shape [4H, H] = [", 4 * H, ", ", H, "] without w_hr, got ",
                shape_str(w_hh.sizes()));
  }
  check_blas_size(T * B, "T * B");
  check_blas_size(4 * H, "4H");
  return {T, B, H, P};
}

}  // namespace

std::vector<Tensor> lstm_forward(const Tensor& gx, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
                                 const OptTensor& b_hh, const OptTensor& w_hr, const OptTensor& batch_sizes,
                                 bool reverse, bool need_saved) {
  check_dtype(gx, "gx [T, B, 4H]");
  TORCH_CHECK(gx.dim() == 3, "fastrnn: gx must have shape [T, B, 4H], got ", shape_str(gx.sizes()));
  const auto dt = gx.scalar_type();
  TORCH_CHECK(w_hh.defined() && w_hh.scalar_type() == dt, "fastrnn: w_hh must have dtype ", dt);
  const LstmSizes s = lstm_sizes(w_hh, w_hr, gx.size(0), gx.size(1));
  const int64_t T = s.T, B = s.B, H = s.H, P = s.P;
  check_tensor(gx, "gx [T, B, 4H]", {T, B, 4 * H}, dt);
  check_tensor(h0, "h0 [B, P]", {B, P}, dt);
  check_tensor(c0, "c0 [B, H]", {B, H}, dt);
  check_tensor(w_hh, "w_hh [4H, P]", {4 * H, P}, dt);
  check_opt(b_hh, "b_hh [4H]", {4 * H}, dt);
  const Walk w{batch_sizes_vec(batch_sizes, T, B), T, B, reverse};
  const bool proj = w_hr.has_value() && w_hr->defined();

  auto opts = gx.options();
  Tensor out = new_output({T, B, P}, opts);
  Tensor c = c0.clone();  // running cell state, c_n at the end
  Tensor h_n = new_output({B, P}, opts);
  Tensor gates = need_saved ? new_output({T, B, 4 * H}, opts) : at::empty({0}, opts);
  Tensor extra = need_saved ? new_output({T, B, H}, opts) : at::empty({0}, opts);
  Tensor gh = need_saved ? Tensor() : at::empty({B, 4 * H}, opts);
  Tensor hbar = proj ? at::empty({B, H}, opts) : Tensor();
  Tensor bias = b_hh.has_value() && b_hh->defined() ? *b_hh : at::zeros({4 * H}, opts);
  AT_DISPATCH_FLOATING_TYPES(dt, "fastrnn_lstm_forward", [&] {
    using T_ = scalar_t;
    auto ptr = [](const Tensor& x) { return x.defined() ? x.data_ptr<T_>() : nullptr; };
    lstm_forward_kernel<T_>(w, H, P, ptr(gx), ptr(h0), ptr(w_hh), ptr(bias), proj ? ptr(*w_hr) : nullptr, ptr(out),
                            ptr(c), need_saved ? ptr(gates) : nullptr, need_saved ? ptr(extra) : nullptr, ptr(gh),
                            ptr(hbar));
    final_state<T_>(w, ptr(out), ptr(h0), P, ptr(h_n));
  });
  return {out, h_n, c, gates, extra};
}

std::vector<Tensor> lstm_backward(const Tensor& d_out, const Tensor& d_h_n, const Tensor& d_c_n, const Tensor& h0,
                                  const Tensor& c0, const Tensor& w_hh, const OptTensor& b_hh, const OptTensor& w_hr,
                                  const OptTensor& batch_sizes, bool reverse, const Tensor& out, const Tensor& gates,
                                  const Tensor& extra) {
  check_dtype(out, "out [T, B, P]");
  TORCH_CHECK(out.dim() == 3, "fastrnn: out must have shape [T, B, P], got ", shape_str(out.sizes()));
  const auto dt = out.scalar_type();
  TORCH_CHECK(w_hh.defined() && w_hh.scalar_type() == dt, "fastrnn: w_hh must have dtype ", dt);
  const LstmSizes s = lstm_sizes(w_hh, w_hr, out.size(0), out.size(1));
  const int64_t T = s.T, B = s.B, H = s.H, P = s.P;
  check_tensor(out, "out [T, B, P]", {T, B, P}, dt);
  check_tensor(d_out, "d_out [T, B, P]", {T, B, P}, dt);
  check_tensor(d_h_n, "d_h_n [B, P]", {B, P}, dt);
  check_tensor(d_c_n, "d_c_n [B, H]", {B, H}, dt);
  check_tensor(h0, "h0 [B, P]", {B, P}, dt);
  check_tensor(c0, "c0 [B, H]", {B, H}, dt);
  check_opt(b_hh, "b_hh [4H]", {4 * H}, dt);
  check_tensor(gates, "gates [T, B, 4H] (saved by forward)", {T, B, 4 * H}, dt);
  check_tensor(extra, "extra [T, B, H] (saved by forward)", {T, B, H}, dt);
  const Walk w{batch_sizes_vec(batch_sizes, T, B), T, B, reverse};
  const bool proj = w_hr.has_value() && w_hr->defined();

  auto opts = out.options();
  Tensor d_gx = new_output({T, B, 4 * H}, opts);
  Tensor dh = d_h_n.clone();  // running gradient of the state, d_h0 at the end
  Tensor dc = d_c_n.clone();
  Tensor d_w_hh = new_output({4 * H, P}, opts);
  Tensor d_w_hr = proj ? new_output({P, H}, opts) : Tensor();
  Tensor dhfull = proj ? at::empty({T, B, P}, opts) : Tensor();
  Tensor hbar = proj ? at::empty({T, B, H}, opts) : Tensor();
  Tensor dhbar = proj ? at::empty({B, H}, opts) : Tensor();
  Tensor dg0 = at::empty({B, 4 * H}, opts);
  AT_DISPATCH_FLOATING_TYPES(dt, "fastrnn_lstm_backward", [&] {
    using T_ = scalar_t;
    auto ptr = [](const Tensor& x) { return x.defined() ? x.data_ptr<T_>() : nullptr; };
    lstm_backward_kernel<T_>(w, H, P, ptr(d_out), ptr(dh), ptr(dc), ptr(h0), ptr(c0), ptr(w_hh),
                             proj ? ptr(*w_hr) : nullptr, ptr(out), ptr(gates), ptr(extra), ptr(d_gx), ptr(d_w_hh),
                             ptr(d_w_hr), ptr(dhfull), ptr(hbar), ptr(dhbar), ptr(dg0));
  });
  Tensor d_b_hh = b_hh.has_value() && b_hh->defined() ? d_gx.view({T * B, 4 * H}).sum(0) : Tensor();
  return {d_gx, dh, dc, d_w_hh, d_b_hh, d_w_hr};
}

}  // namespace fastrnn
