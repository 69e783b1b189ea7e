// GRU: forward and backward over the whole sequence, torch's n = tanh(gx_n + r * (W_hn h + b_hn)).
// Per step: one GEMM h_{t-1} W_hh^T and one fused pass over the gates.
#include "fastrnn.h"

namespace fastrnn {
namespace {

// Forward pass for rows [r0, r1) of step t. gx, gh: [B,3H] (gh may alias gates); bias [3H]; hprev(r): h_{t-1}
// of row r; h: [B,H] out[t]; gates [B,3H] (r, z, n) and extra [B,H] (W_hn h + b_hn) of step t or null.
template <typename T, typename HPrev>
void gru_fwd_rows(int64_t r0, int64_t r1, int64_t H, const T* gx, const T* gh, const T* bias, const HPrev& hprev,
                  T* h, T* gates, T* extra) {
  const int64_t GH = 3 * H;
  for (int64_t row = r0; row < r1; ++row) {
    const T* x = gx + row * GH;
    const T* g = gh + row * GH;
    const T* hp = hprev(row);
    T* hr = h + row * H;
    T* sg = gates ? gates + row * GH : nullptr;
    T* se = extra ? extra + row * H : nullptr;
    vec_loop<T>(H, [&](int64_t j, int64_t n) {
      Vec<T> r = vsigmoid(vload(x + j, n) + vload(g + j, n) + vload(bias + j, n));
      Vec<T> z = vsigmoid(vload(x + H + j, n) + vload(g + H + j, n) + vload(bias + H + j, n));
      Vec<T> hh = vload(g + 2 * H + j, n) + vload(bias + 2 * H + j, n);
      Vec<T> nn = vtanh(vload(x + 2 * H + j, n) + r * hh);
      Vec<T> p = vload(hp + j, n);
      vstore(nn + z * (p - nn), hr + j, n);
      if (sg) {
        vstore(r, sg + j, n);
        vstore(z, sg + H + j, n);
        vstore(nn, sg + 2 * H + j, n);
      }
      if (se) vstore(hh, se + j, n);
    });
  }
}

// Backward pass for rows [r0, r1) of step t (reference.backward, gru branch). dh: [B,H] incoming gradient of h_t,
// replaced by its direct part dht*z (the GEMM adds d_gh W_hh); d_gx, d_gh: [B,3H] of step t.
template <typename T, typename HPrev>
void gru_bwd_rows(int64_t r0, int64_t r1, int64_t H, T* dh, const T* d_out, const T* gates, const T* extra,
                  const HPrev& hprev, T* d_gx, T* d_gh) {
  const int64_t GH = 3 * H;
  const Vec<T> one(T(1));
  for (int64_t row = r0; row < r1; ++row) {
    const T* sg = gates + row * GH;
    const T* hh = extra + row * H;
    const T* hp = hprev(row);
    T* dhr = dh + row * H;
    T* dx = d_gx + row * GH;
    T* dg = d_gh + row * GH;
    vec_loop<T>(H, [&](int64_t j, int64_t n) {
      Vec<T> dht = vload(dhr + j, n) + vload(d_out + row * H + j, n);
      Vec<T> r = vload(sg + j, n), z = vload(sg + H + j, n), nn = vload(sg + 2 * H + j, n);
      Vec<T> dn = dht * (one - z) * (one - nn * nn);
      Vec<T> dr = dn * vload(hh + j, n) * r * (one - r);
      Vec<T> dz = dht * (vload(hp + j, n) - nn) * z * (one - z);
      vstore(dr, dx + j, n);
      vstore(dz, dx + H + j, n);
      vstore(dn, dx + 2 * H + j, n);
      vstore(dr, dg + j, n);
      vstore(dz, dg + H + j, n);
      vstore(dn * r, dg + 2 * H + j, n);
      vstore(dht * z, dhr + j, n);
    });
  }
}

template <typename T>
void gru_forward_kernel(const Walk& w, int64_t H, const T* gx, const T* h0, const T* w_hh, const T* bias, T* out,
                        T* gates, T* extra, T* gh_buf) {
  const int64_t B = w.B, GH = 3 * H;
  const StepGemm<T> whh(w_hh, true, GH, H, B);
  for (int64_t i = 0; i < w.T; ++i) {
    const int64_t t = w.step(i), n = w.bs[t], k = w.prev_rows(t);
    const T* hsrc = k > 0 ? out + w.src(t) * B * H : nullptr;
    T* gh = gates ? gates + t * B * GH : gh_buf;
    gemm_prev(whh, hsrc, h0, k, n, H, gh, GH);
    T* ot = out + t * B * H;
    T* et = extra ? extra + t * B * H : nullptr;
    auto hprev = [&](int64_t r) { return r < k ? hsrc + r * H : h0 + r * H; };
    at::parallel_for(0, n, row_grain(GH), [&](int64_t r0, int64_t r1) {
      gru_fwd_rows(r0, r1, H, gx + t * B * GH, gh, bias, hprev, ot, gates ? gh : nullptr, et);
    });
    zero_rows(ot, n, B, H);
    if (gates) zero_rows(gh, n, B, GH);
    if (et) zero_rows(et, n, B, H);
  }
}

template <typename T>
void gru_backward_kernel(const Walk& w, int64_t H, const T* d_out, T* dh, const T* h0, const T* w_hh, const T* out,
                         const T* gates, const T* extra, T* d_gx, T* d_gh, T* d_w_hh, T* dg0) {
  const int64_t B = w.B, GH = 3 * H;
  const StepGemm<T> whh(w_hh, false, H, GH, B);
  for (int64_t i = w.T - 1; i >= 0; --i) {
    const int64_t t = w.step(i), n = w.bs[t], k = w.prev_rows(t);
    const T* hsrc = k > 0 ? out + w.src(t) * B * H : nullptr;
    auto hprev = [&](int64_t r) { return r < k ? hsrc + r * H : h0 + r * H; };
    T* dxt = d_gx + t * B * GH;
    T* dgt = d_gh + t * B * GH;
    at::parallel_for(0, n, row_grain(GH), [&](int64_t r0, int64_t r1) {
      gru_bwd_rows(r0, r1, H, dh, d_out + t * B * H, gates + t * B * GH, extra + t * B * H, hprev, dxt, dgt);
    });
    zero_rows(dxt, n, B, GH);
    zero_rows(dgt, n, B, GH);
    whh(n, dgt, GH, T(1), dh, H);
  }
  weight_grad(w, d_gh, GH, out, h0, GH, H, dg0, d_w_hh);
}

int64_t gru_hidden(const Tensor& w_hh, int64_t T, int64_t B) {
  check_dtype(w_hh, "w_hh [3H, H]");
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(1) > 0 && w_hh.size(0) == 3 * w_hh.size(1),
              "fastrnn: w_hh must have shape [3H, H] with H >= 1, got ", shape_str(w_hh.sizes()));
  check_blas_size(T * B, "T * B");
  check_blas_size(w_hh.size(0), "3H");
  return w_hh.size(1);
}

}  // namespace

std::vector<Tensor> gru_forward(const Tensor& gx, const Tensor& h0, const Tensor& w_hh, const OptTensor& b_hh,
                                const OptTensor& batch_sizes, bool reverse, bool need_saved) {
  check_dtype(gx, "gx [T, B, 3H]");
  TORCH_CHECK(gx.dim() == 3, "fastrnn: gx must have shape [T, B, 3H], got ", shape_str(gx.sizes()));
  const auto dt = gx.scalar_type();
  const int64_t T = gx.size(0), B = gx.size(1), H = gru_hidden(w_hh, T, B);
  check_tensor(gx, "gx [T, B, 3H]", {T, B, 3 * H}, dt);
  check_tensor(h0, "h0 [B, H]", {B, H}, dt);
  check_tensor(w_hh, "w_hh [3H, H]", {3 * H, H}, dt);
  check_opt(b_hh, "b_hh [3H]", {3 * H}, dt);
  const Walk w{batch_sizes_vec(batch_sizes, T, B), T, B, reverse};

  auto opts = gx.options();
  Tensor out = new_output({T, B, H}, opts);
  Tensor h_n = new_output({B, H}, opts);
  Tensor gates = need_saved ? new_output({T, B, 3 * H}, opts) : at::empty({0}, opts);
  Tensor extra = need_saved ? new_output({T, B, H}, opts) : at::empty({0}, opts);
  Tensor gh = need_saved ? Tensor() : at::empty({B, 3 * H}, opts);
  Tensor bias = b_hh.has_value() && b_hh->defined() ? *b_hh : at::zeros({3 * H}, opts);
  AT_DISPATCH_FLOATING_TYPES(dt, "fastrnn_gru_forward", [&] {
    using T_ = scalar_t;
    auto ptr = [](const Tensor& x) { return x.defined() ? x.data_ptr<T_>() : nullptr; };
    gru_forward_kernel<T_>(w, H, ptr(gx), ptr(h0), ptr(w_hh), ptr(bias), ptr(out), need_saved ? ptr(gates) : nullptr,
                           need_saved ? ptr(extra) : nullptr, ptr(gh));
    final_state<T_>(w, ptr(out), ptr(h0), H, ptr(h_n));
  });
  return {out, h_n, gates, extra};
}

std::vector<Tensor> gru_backward(const Tensor& d_out, const Tensor& d_h_n, const Tensor& h0, const Tensor& w_hh,
                                 const OptTensor& b_hh, const OptTensor& batch_sizes, bool reverse, const Tensor& out,
                                 const Tensor& gates, const Tensor& extra) {
  check_dtype(out, "out [T, B, H]");
  TORCH_CHECK(out.dim() == 3, "fastrnn: out must have shape [T, B, H], got ", shape_str(out.sizes()));
  const auto dt = out.scalar_type();
  const int64_t T = out.size(0), B = out.size(1), H = gru_hidden(w_hh, T, B);
  check_tensor(out, "out [T, B, H]", {T, B, H}, dt);
  check_tensor(d_out, "d_out [T, B, H]", {T, B, H}, dt);
  check_tensor(d_h_n, "d_h_n [B, H]", {B, H}, dt);
  check_tensor(h0, "h0 [B, H]", {B, H}, dt);
  check_tensor(w_hh, "w_hh [3H, H]", {3 * H, H}, dt);
  check_opt(b_hh, "b_hh [3H]", {3 * H}, dt);
  check_tensor(gates, "gates [T, B, 3H] (saved by forward)", {T, B, 3 * H}, dt);
  check_tensor(extra, "extra [T, B, H] (saved by forward)", {T, B, H}, dt);
  const Walk w{batch_sizes_vec(batch_sizes, T, B), T, B, reverse};

  auto opts = out.options();
  Tensor d_gx = new_output({T, B, 3 * H}, opts);
  Tensor d_gh = at::empty({T, B, 3 * H}, opts);  // d_gx with the n block scaled by r: what reaches W_hh
  Tensor dh = d_h_n.clone();
  Tensor d_w_hh = new_output({3 * H, H}, opts);
  Tensor dg0 = at::empty({B, 3 * H}, opts);
  AT_DISPATCH_FLOATING_TYPES(dt, "fastrnn_gru_backward", [&] {
    using T_ = scalar_t;
    gru_backward_kernel<T_>(w, H, d_out.data_ptr<T_>(), dh.data_ptr<T_>(), h0.data_ptr<T_>(), w_hh.data_ptr<T_>(),
                            out.data_ptr<T_>(), gates.data_ptr<T_>(), extra.data_ptr<T_>(), d_gx.data_ptr<T_>(),
                            d_gh.data_ptr<T_>(), d_w_hh.data_ptr<T_>(), dg0.data_ptr<T_>());
  });
  Tensor d_b_hh = b_hh.has_value() && b_hh->defined() ? d_gh.view({T * B, 3 * H}).sum(0) : Tensor();
  return {d_gx, dh, d_w_hh, d_b_hh};
}

}  // namespace fastrnn
