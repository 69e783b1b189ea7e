// Elman RNN (tanh or relu): forward and backward over the whole sequence. Nothing is saved besides `out`.
// Per step: one GEMM h_{t-1} W_hh^T straight into out[t] and one fused pass that activates it in place.
#include "fastrnn.h"

namespace fastrnn {
namespace {

// Forward pass for rows [r0, r1): h holds W_hh h_{t-1} on entry and the new state on exit.
template <typename T, bool kRelu>
void rnn_fwd_rows(int64_t r0, int64_t r1, int64_t H, const T* gx, const T* bias, T* h) {
  const Vec<T> zero(T(0));
  for (int64_t r = r0; r < r1; ++r) {
    T* hr = h + r * H;
    const T* x = gx + r * H;
    vec_loop<T>(H, [&](int64_t j, int64_t n) {
      Vec<T> pre = vload(hr + j, n) + vload(x + j, n) + vload(bias + j, n);
      // relu keeps NaN (torch.relu does): select 0 only where pre < 0
      vstore(kRelu ? Vec<T>::blendv(pre, zero, pre < zero) : vtanh(pre), hr + j, n);
    });
  }
}

// Backward pass for rows [r0, r1): d_pre = (dh + d_out) * act'(h), with relu' as torch's threshold_backward
// (zero where the output is <= 0, NaN passes).
template <typename T, bool kRelu>
void rnn_bwd_rows(int64_t r0, int64_t r1, int64_t H, const T* dh, const T* d_out, const T* h, T* d_pre) {
  const Vec<T> one(T(1)), zero(T(0));
  for (int64_t r = r0; r < r1; ++r) {
    vec_loop<T>(H, [&](int64_t j, int64_t n) {
      const int64_t e = r * H + j;
      Vec<T> dht = vload(dh + e, n) + vload(d_out + e, n);
      Vec<T> ht = vload(h + e, n);
      vstore(kRelu ? Vec<T>::blendv(dht, zero, ht <= zero) : dht * (one - ht * ht), d_pre + e, n);
    });
  }
}

template <typename T, bool kRelu>
void rnn_forward_kernel(const Walk& w, int64_t H, const T* gx, const T* h0, const T* w_hh, const T* bias, T* out) {
  const int64_t B = w.B;
  const StepGemm<T> whh(w_hh, true, H, H, B);
  for (int64_t i = 0; i < w.T; ++i) {
    const int64_t t = w.step(i), n = w.bs[t], k = w.prev_rows(t);
    T* ot = out + t * B * H;
    gemm_prev(whh, k > 0 ? out + w.src(t) * B * H : nullptr, h0, k, n, H, ot, H);
    at::parallel_for(0, n, row_grain(4 * H), [&](int64_t r0, int64_t r1) {
      rnn_fwd_rows<T, kRelu>(r0, r1, H, gx + t * B * H, bias, ot);
    });
    zero_rows(ot, n, B, H);
  }
}

template <typename T, bool kRelu>
void rnn_backward_kernel(const Walk& w, int64_t H, const T* d_out, T* dh, const T* h0, const T* w_hh, const T* out,
                         T* d_gx, T* d_w_hh, T* dg0) {
  const int64_t B = w.B;
  const StepGemm<T> whh(w_hh, false, H, H, B);
  for (int64_t i = w.T - 1; i >= 0; --i) {
    const int64_t t = w.step(i), n = w.bs[t];
    T* dgt = d_gx + t * B * H;
    at::parallel_for(0, n, row_grain(4 * H), [&](int64_t r0, int64_t r1) {
      rnn_bwd_rows<T, kRelu>(r0, r1, H, dh, d_out + t * B * H, out + t * B * H, dgt);
    });
    zero_rows(dgt, n, B, H);
    whh(n, dgt, H, T(0), dh, H);
  }
  weight_grad(w, d_gx, H, out, h0, H, H, dg0, d_w_hh);
}

int64_t rnn_hidden(const Tensor& w_hh, int64_t T, int64_t B) {
  check_dtype(w_hh, "w_hh [H, H]");
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) > 0 && w_hh.size(0) == w_hh.size(1),
              "fastrnn: w_hh must have shape [H, H] with H >= 1, got ", shape_str(w_hh.sizes()));
  check_blas_size(T * B, "T * B");
  check_blas_size(w_hh.size(0), "H");
  return w_hh.size(0);
}

}  // namespace

std::vector<Tensor> rnn_forward(const Tensor& gx, const Tensor& h0, const Tensor& w_hh, const OptTensor& b_hh,
                                const OptTensor& batch_sizes, bool reverse, bool relu) {
  check_dtype(gx, "gx [T, B, H]");
  TORCH_CHECK(gx.dim() == 3, "fastrnn: gx must have shape [T, B, H], got ", shape_str(gx.sizes()));
  const auto dt = gx.scalar_type();
  const int64_t T = gx.size(0), B = gx.size(1), H = rnn_hidden(w_hh, T, B);
  check_tensor(gx, "gx [T, B, H]", {T, B, H}, dt);
  check_tensor(h0, "h0 [B, H]", {B, H}, dt);
  check_tensor(w_hh, "w_hh [H, H]", {H, H}, dt);
  check_opt(b_hh, "b_hh [H]", {H}, dt);
  const Walk w{batch_sizes_vec(batch_sizes, T, B), T, B, reverse};

  auto opts = gx.options();
  Tensor out = new_output({T, B, H}, opts);
  Tensor h_n = new_output({B, H}, opts);
  Tensor bias = b_hh.has_value() && b_hh->defined() ? *b_hh : at::zeros({H}, opts);
  AT_DISPATCH_FLOATING_TYPES(dt, "fastrnn_rnn_forward", [&] {
    using T_ = scalar_t;
    auto run = relu ? rnn_forward_kernel<T_, true> : rnn_forward_kernel<T_, false>;
    run(w, H, gx.data_ptr<T_>(), h0.data_ptr<T_>(), w_hh.data_ptr<T_>(), bias.data_ptr<T_>(), out.data_ptr<T_>());
    final_state<T_>(w, out.data_ptr<T_>(), h0.data_ptr<T_>(), H, h_n.data_ptr<T_>());
  });
  return {out, h_n};
}

std::vector<Tensor> rnn_backward(const Tensor& d_out, const Tensor& d_h_n, const Tensor& h0, const Tensor& w_hh,
                                 const OptTensor& b_hh, const OptTensor& batch_sizes, bool reverse, const Tensor& out,
                                 bool relu) {
  check_dtype(out, "out [T, B, H]");
  TORCH_CHECK(out.dim() == 3, "fastrnn: out must have shape [T, B, H], got ", shape_str(out.sizes()));
  const auto dt = out.scalar_type();
  const int64_t T = out.size(0), B = out.size(1), H = rnn_hidden(w_hh, T, B);
  check_tensor(out, "out [T, B, H]", {T, B, H}, dt);
  check_tensor(d_out, "d_out [T, B, H]", {T, B, H}, dt);
  check_tensor(d_h_n, "d_h_n [B, H]", {B, H}, dt);
  check_tensor(h0, "h0 [B, H]", {B, H}, dt);
  check_tensor(w_hh, "w_hh [H, H]", {H, H}, dt);
  check_opt(b_hh, "b_hh [H]", {H}, dt);
  const Walk w{batch_sizes_vec(batch_sizes, T, B), T, B, reverse};

  auto opts = out.options();
  Tensor d_gx = new_output({T, B, H}, opts);
  Tensor dh = d_h_n.clone();
  Tensor d_w_hh = new_output({H, H}, opts);
  Tensor dg0 = at::empty({B, H}, opts);
  AT_DISPATCH_FLOATING_TYPES(dt, "fastrnn_rnn_backward", [&] {
    using T_ = scalar_t;
    auto run = relu ? rnn_backward_kernel<T_, true> : rnn_backward_kernel<T_, false>;
    run(w, H, d_out.data_ptr<T_>(), dh.data_ptr<T_>(), h0.data_ptr<T_>(), w_hh.data_ptr<T_>(), out.data_ptr<T_>(),
        d_gx.data_ptr<T_>(), d_w_hh.data_ptr<T_>(), dg0.data_ptr<T_>());
  });
  Tensor d_b_hh = b_hh.has_value() && b_hh->defined() ? d_gx.view({T * B, H}).sum(0) : Tensor();
  return {d_gx, dh, d_w_hh, d_b_hh};
}

}  // namespace fastrnn
