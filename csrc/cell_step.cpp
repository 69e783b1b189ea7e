// One step of a torch.nn Cell class (LSTMCell, GRUCell, RNNCell) in one call from Python: the input projection
// (an ATen addmm), the recurrence's walk over T = 1 (recurrence.cpp, every cell's own rows) and, when autograd
// records, a C++ autograd node whose backward is recurrence_backward plus the input projection's two GEMMs. A Cell
// is called once per step, so what it pays per call is the product: one Python -> C++ crossing and one backward node,
// where the layer path pays a Python autograd.Function, F.linear and the op layer's argument handling. On plain
// float32 / float64 operands (direct_operands) the step and its backward go further: the cell's walks over T = 1 on
// raw pointers with their scratch in one allocation (direct_step, direct_backward), not recurrence_forward and
// recurrence_backward, which build and check a layer's worth of tensors.
//
// A double backward (create_graph) differentiates torch's own cell maths (at::lstm_cell ...) on the saved inputs,
// as the op layer reruns the reference maths under autograd for the layers.
#include <c10/core/CPUAllocator.h>
#include <torch/autograd.h>

#include "walk.h"

namespace fastrnn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kLstm = 0, kGru = 1, kRnnTanh = 2, kRnnRelu = 3;  // cells.py kernel_id of the Cell classes' cells

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); }

bool plain_cpu(const Tensor& t, at::ScalarType dt) {
  return t.device().is_cpu() && t.scalar_type() == dt && t.is_contiguous() && t.layout() == at::kStrided;
}

// Whether A @ op(w) can go to one extension GEMM on raw pointers: float32 / float64 plain contiguous CPU matrices of
// one dtype whose inner sizes match (op(w) = w^T when trans; A = a, or a^T when trans_a: a stored as [K, M]) and whose
// sizes fit BLAS's int.
bool step_gemm_operands(const Tensor& a, const Tensor& w, bool trans, bool trans_a = false) {
  const auto dt = a.scalar_type();
  if (!(dt == at::kFloat || dt == at::kDouble) || a.dim() != 2 || w.dim() != 2) return false;
  const int64_t K = w.size(trans ? 1 : 0), N = w.size(trans ? 0 : 1);
  const int64_t M = a.size(trans_a ? 1 : 0), Ka = a.size(trans_a ? 0 : 1);
  return Ka == K && std::max({M, K, N}) <= INT_MAX && plain_cpu(a, dt) && plain_cpu(w, dt);
}

// Whether A [M, K] @ op(w) runs on the own bfloat16 kernels of few rows (small_rows_gemm_bf16): plain contiguous
// bfloat16 CPU matrices whose inner sizes match, M within has_small_bf16_gemm. ATen's bfloat16 mm / addmm run
// oneDNN there, whose temporary buffers, freed, hand a Cell's freshly freed weight gradients back to the system:
// GRUCell B=16 H=512 training page-faulted 15-130 times a step, torch's cell none.
bool small_bf16_operands(const Tensor& a, const Tensor& w, bool trans) {
  if (a.scalar_type() != at::kBFloat16 || a.dim() != 2 || w.dim() != 2) return false;
  const int64_t K = w.size(trans ? 1 : 0);
  return a.size(1) == K && plain_cpu(a, at::kBFloat16) && plain_cpu(w, at::kBFloat16) &&
         has_small_bf16_gemm(a.size(0));
}

const BF16* bf16_ptr(const Tensor& t) { return t.defined() ? static_cast<const BF16*>(t.data_ptr()) : nullptr; }

// gx [B, N] = x [B, K] W_ih^T (+ b_ih [N]) on raw pointers.
template <typename T>
void project_rows(int64_t B, int64_t N, int64_t K, const T* x, const T* w_ih, const T* b_ih, T* gx) {
  if constexpr (std::is_same_v<T, float>) {
    if (B > kOnceMaxUnpackedRows && own_gemm_enabled()) {
      // many rows (a layer's projection in training; up to 32, the unpacked kernels below win) on the own kernel's
      // panels, b_ih added as the GEMM writes gx: not a copy of b_ih into all B rows first (8 MB at T=32 B=64
      // H=256), read back by a GEMM with beta 1
      const StepGemm<float> wih(w_ih, true, N, K, /*max_m=*/B);
      if (b_ih != nullptr) wih.with_bias(B, x, K, b_ih, gx, N);
      else wih(B, x, K, 0.f, gx, N);
      return;
    }
  }
  for (int64_t r = 0; r < B; ++r) {
    if (b_ih != nullptr) std::copy(b_ih, b_ih + N, gx + r * N);
    else std::fill(gx + r * N, gx + (r + 1) * N, T(0));
  }
  const StepGemm<T> wih(w_ih, true, N, K, /*max_m=*/0);  // used once: not packed
  wih(B, x, K, T(1), gx, N);
}

// dx [B, N] = d_gx [B, K] W_ih [K, N] on raw pointers.
template <typename T>
void input_grad_rows(int64_t B, int64_t N, int64_t K, const T* d_gx, const T* w_ih, T* dx) {
  const StepGemm<T> w(w_ih, false, N, K, /*max_m=*/0);  // used once: not packed
  w(B, d_gx, K, T(0), dx, N);
}

// dw [N, K] = d_gx [B, N]^T x [B, K] on raw pointers.
template <typename T>
void input_weight_grad_rows(int64_t B, int64_t N, int64_t K, const T* d_gx, const T* x, T* dw) {
  if (B == 0 || N == 0 || K == 0) return std::fill(dw, dw + N * K, T(0));
  gemm(true, false, N, K, B, T(1), d_gx, N, x, K, T(0), dw, K);
}

// gx = x W_ih^T + b_ih: [B, G*H]. Operands that step_gemm_operands takes (and a matching b_ih) take one StepGemm call
// on b_ih's rows (the extension's own kernel up to 16 rows, else BLAS; ATen's addmm costs as much again as the step's
// own GEMM at B=1 H=64); anything else goes to ATen, whose checks and messages then apply.
Tensor input_projection(const Tensor& x, const Tensor& w_ih, const Tensor& b_ih) {
  const auto dt = x.scalar_type();
  const bool bias_ok =
      !b_ih.defined() || (plain_cpu(b_ih, dt) && b_ih.dim() == 1 && b_ih.size(0) == w_ih.size(0));
  const bool direct = step_gemm_operands(x, w_ih, /*trans=*/true) && bias_ok;
  if (!direct && small_bf16_operands(x, w_ih, /*trans=*/true) && bias_ok) {
    Tensor gx = at::empty({x.size(0), w_ih.size(0)}, x.options());
    small_rows_gemm_bf16(x.size(0), w_ih.size(0), x.size(1), bf16_ptr(x), bf16_ptr(w_ih), true, bf16_ptr(b_ih),
                         static_cast<BF16*>(gx.data_ptr()));
    return gx;
  }
  if (!direct) return b_ih.defined() ? at::addmm(b_ih, x, w_ih.t()) : at::mm(x, w_ih.t());
  const int64_t B = x.size(0), N = w_ih.size(0), K = x.size(1);
  Tensor gx = at::empty({B, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "fastrnn_cell_input_projection", [&] {
    project_rows<scalar_t>(B, N, K, x.data_ptr<scalar_t>(), w_ih.data_ptr<scalar_t>(),
                           b_ih.defined() ? b_ih.data_ptr<scalar_t>() : nullptr, gx.data_ptr<scalar_t>());
  });
  return gx;
}

// d x = d_gx W_ih: [B, G*H] x [G*H, I]. On plain float32 / float64 operands one StepGemm call (at B <= 16 the
// extension's own kernel, csrc/common.cpp axpy_gemm), else ATen.
Tensor input_grad(const Tensor& d_gx, const Tensor& w_ih) {
  const auto dt = d_gx.scalar_type();
  if (small_bf16_operands(d_gx, w_ih, /*trans=*/false)) {
    Tensor dx = at::empty({d_gx.size(0), w_ih.size(1)}, d_gx.options());
    small_rows_gemm_bf16(d_gx.size(0), w_ih.size(1), w_ih.size(0), bf16_ptr(d_gx), bf16_ptr(w_ih), false, nullptr,
                         static_cast<BF16*>(dx.data_ptr()));
    return dx;
  }
  if (!step_gemm_operands(d_gx, w_ih, /*trans=*/false)) return d_gx.mm(w_ih);
  const int64_t B = d_gx.size(0), K = w_ih.size(0), N = w_ih.size(1);
  Tensor dx = at::empty({B, N}, d_gx.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "fastrnn_cell_input_grad", [&] {
    input_grad_rows<scalar_t>(B, N, K, d_gx.data_ptr<scalar_t>(), w_ih.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>());
  });
  return dx;
}

// d W_ih = d_gx^T x: [G*H, B] x [B, I]. On plain float32 / float64 operands one extension GEMM (the own kernel where
// own_gemm_enabled), else ATen.
Tensor input_weight_grad(const Tensor& d_gx, const Tensor& x) {
  const auto dt = d_gx.scalar_type();
  if (dt == at::kBFloat16 && d_gx.dim() == 2 && x.dim() == 2 && d_gx.size(0) == x.size(0) &&
      plain_cpu(d_gx, dt) && plain_cpu(x, dt) && has_small_bf16_gemm(x.size(0))) {
    // a bfloat16 step of few rows: written in bfloat16 at once, as recurrence_backward writes d_w_hh (ATen's mm
    // allocates three [G*H, I] buffers here)
    const int64_t B = x.size(0), N = d_gx.size(1), K = x.size(1);
    Tensor dw = new_output({N, K}, x.options());
    small_k_gemm_bf16(N, K, B, bf16_ptr(d_gx), N, bf16_ptr(x), K, static_cast<BF16*>(dw.data_ptr()), K);
    return dw;
  }
  if (!step_gemm_operands(d_gx, x, /*trans=*/false, /*trans_a=*/true)) return d_gx.t().mm(x);
  const int64_t B = x.size(0), N = d_gx.size(1), K = x.size(1);
  Tensor dw = at::empty({N, K}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "fastrnn_input_weight_grad", [&] {
    input_weight_grad_rows<scalar_t>(B, N, K, d_gx.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                     dw.data_ptr<scalar_t>());
  });
  return dw;
}

// Whether a step can run direct_step (and its backward direct_backward): every operand a plain contiguous CPU tensor
// of x's dtype (float32 or float64) with the shapes of a Cell of k's gates (w_hh [G*H, H], w_ih [G*H, I], biases
// [G*H]), states as check_torch_cell_args found them. Anything else takes the general path, whose checks say what is
// wrong.
bool direct_operands(const CellKernels& k, const Tensor& x, const Tensor& h, const OptTensor& c, const Tensor& w_ih,
                     const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh) {
  const auto dt = x.scalar_type();
  if (!(dt == at::kFloat || dt == at::kDouble)) return false;
  const int64_t H = w_hh.size(1), GH = k.G * H;
  auto plain = [&](const Tensor& t) { return plain_cpu(t, dt); };
  auto bias = [&](const OptTensor& b) { return !given(b) || (plain(*b) && b->dim() == 1 && b->size(0) == GH); };
  return plain(x) && plain(h) && (!given(c) || plain(*c)) && given(c) == k.cell_state && plain(w_ih) &&
         plain(w_hh) && w_hh.size(0) == GH && w_ih.size(0) == GH && bias(b_ih) && bias(b_hh) &&
         std::max({x.size(0), x.size(1), GH, H}) <= INT_MAX;
}

// CellStep's backward without create_graph, on operands direct_operands took (s: the saved x, h, c, w_ih, w_hh, b_ih,
// b_hh, out, gates, extra): the cell's backward walk over T = 1 (walk.h) on raw pointers, its scratch (d_gx, d_gh,
// the gathered d_gates) one CPU allocation, then d x, d W_ih and the bias gradients straight from d_gx. need: whether
// x, w_ih and b_ih want gradients. recurrence_backward would also check a layer's arguments again, build its d_out
// of zeros and d_gx as tensors, and sum the biases through ATen.
template <typename T>
variable_list direct_backward(const CellKernels& k, const variable_list& s, const Tensor& d_h, const Tensor& d_c,
                              const bool* need) {
  const Tensor &x = s[0], &h = s[1], &c = s[2], &w_ih = s[3], &w_hh = s[4], &b_ih = s[5], &b_hh = s[6];
  const int64_t B = x.size(0), I = x.size(1), H = w_hh.size(1), GH = k.G * H;
  const int64_t n_dg = B * GH, n_dgh = k.dgh_differs ? B * GH : 0;
  const c10::DataPtr buf = c10::GetCPUAllocator()->allocate((2 * n_dg + n_dgh) * sizeof(T));
  T* d_gx = static_cast<T*>(buf.get());
  T *dg0 = d_gx + n_dg, *d_gh = k.dgh_differs ? dg0 + n_dg : nullptr;
  const auto opts = x.options();
  // the running d h starts at zero and the step adds d_out = d h' to it; d c runs from d c' to d c0
  Tensor dh0 = at::empty({B, H}, opts), dc0, d_w_hh = new_output({GH, H}, opts);
  std::fill(dh0.data_ptr<T>(), dh0.data_ptr<T>() + B * H, T(0));
  if (k.cell_state) {
    dc0 = at::empty({B, H}, opts);
    std::copy(d_c.data_ptr<T>(), d_c.data_ptr<T>() + B * H, dc0.data_ptr<T>());
  }
  auto ptr = [](const Tensor& t) { return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr; };
  const Walk w{std::vector<int64_t>(1, B), 1, B, false};
  const BackwardArgs<T> a{w, H, H, false, d_h.data_ptr<T>(), h.data_ptr<T>(), ptr(c), w_hh.data_ptr<T>(), nullptr,
                          s[7].data_ptr<T>(), ptr(s[8]), ptr(s[9]), dh0.data_ptr<T>(), ptr(dc0), d_gx, d_gh,
                          d_w_hh.data_ptr<T>(), nullptr, nullptr, nullptr, nullptr, dg0, nullptr, nullptr, T(1),
                          nullptr, nullptr};
  if constexpr (std::is_same_v<T, float>) k.backward.run<PrecF32>(a);
  else k.backward.run<PrecF64>(a);
  // forward's arguments: cell_id, x, h, c, w_ih, w_hh, b_ih, b_hh, bf16_gemm
  variable_list out(9);
  if (need[0]) {
    out[1] = at::empty({B, I}, opts);
    input_grad_rows<T>(B, I, GH, d_gx, w_ih.data_ptr<T>(), out[1].data_ptr<T>());
  }
  out[2] = dh0;
  out[3] = dc0;
  if (need[1]) {
    out[4] = at::empty({GH, I}, opts);
    input_weight_grad_rows<T>(B, GH, I, d_gx, x.data_ptr<T>(), out[4].data_ptr<T>());
  }
  out[5] = d_w_hh;
  if (b_ih.defined() && need[2]) {
    out[6] = at::empty({GH}, opts);
    column_sums(d_gx, B, GH, out[6].data_ptr<T>());
  }
  if (b_hh.defined()) {
    out[7] = at::empty({GH}, opts);
    column_sums(k.dgh_differs ? d_gh : d_gx, B, GH, out[7].data_ptr<T>());
  }
  return out;
}

// One step on operands direct_operands took: the cell's walk over T = 1 (walk.h) on raw pointers, its scratch (gx, the
// walk's gh and h_n) one CPU allocation, and only tensors that leave the call: h' (and c'), and when saving for
// CellStep's backward the step's out, gates and extra (out [B, H], the others [1, B, width * H] or [0] where the cell
// saves none) -> h', c'|undefined, gates, extra, out. The saved out is not the h' returned (the walk's h_n, a copy):
// as with torch's cells, h' may be changed in place before backward. recurrence_forward would also build a layer's
// tensors (out [1, B, H], h_n, a copy of b_ih's rows, the view of gx as [1, B, G*H]) and redo the checks: at B = 1
// H = 64 about half of an RNNCell call's microseconds in C++.
template <typename T>
std::vector<Tensor> direct_step(const CellKernels& k, const Tensor& x, const Tensor& h, const OptTensor& c,
                                const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                                bool save) {
  const int64_t B = x.size(0), I = x.size(1), H = w_hh.size(1), GH = k.G * H;
  const auto opts = x.options();
  Tensor gates = save && k.saved_gates ? new_output({1, B, k.saved_gates * H}, opts) : Tensor();
  Tensor extra = save && k.saved_extra ? new_output({1, B, k.saved_extra * H}, opts) : Tensor();
  const bool gh_home = (save && gh_in_gates(k.G, k.saved_gates)) || gh_in_h(k.G, /*proj=*/false, /*same_type=*/true);
  const int64_t n_gx = B * GH, n_gh = gh_home ? 0 : B * GH, n_hn = save ? 0 : B * H, n_bias = given(b_hh) ? 0 : GH;
  const c10::DataPtr buf = c10::GetCPUAllocator()->allocate((n_gx + n_gh + n_hn + n_bias) * sizeof(T));
  T* gx = static_cast<T*>(buf.get());
  T *gh = gx + n_gx, *h_n = gh + n_gh, *zeros = h_n + n_hn;
  std::fill(zeros, zeros + n_bias, T(0));
  project_rows<T>(B, GH, I, x.data_ptr<T>(), w_ih.data_ptr<T>(), given(b_ih) ? b_ih->data_ptr<T>() : nullptr, gx);
  Tensor out = new_output({B, H}, opts), h_new = save ? at::empty({B, H}, opts) : out;
  if (save) h_n = h_new.data_ptr<T>();
  Tensor c_new;  // the walk's running cell state: c0 in, c' out
  if (k.cell_state) {
    c_new = at::empty({B, H}, opts);
    std::copy(c->data_ptr<T>(), c->data_ptr<T>() + B * H, c_new.data_ptr<T>());
  }
  auto ptr = [](const Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
  const Walk w{std::vector<int64_t>(1, B), 1, B, false};
  const ForwardArgs<T> a{w, H, H, false, save, gx, h.data_ptr<T>(), w_hh.data_ptr<T>(), nullptr,
                         given(b_hh) ? b_hh->data_ptr<T>() : zeros, out.data_ptr<T>(), h_n, ptr(c_new), ptr(gates),
                         ptr(extra), gh_home ? nullptr : gh, nullptr, nullptr, nullptr, nullptr, T(1)};
  if constexpr (std::is_same_v<T, float>) k.forward.run<PrecF32>(a);
  else k.forward.run<PrecF64>(a);
  if (save) {
    if (!gates.defined()) gates = at::empty({0}, opts);
    if (!extra.defined()) extra = at::empty({0}, opts);
  }
  return {h_new, c_new, gates, extra, out};
}

// torch's own maths of the step, differentiable: what a double backward differentiates.
variable_list torch_cell(int64_t cell_id, const Tensor& x, const Tensor& h, const Tensor& c, const Tensor& w_ih,
                         const Tensor& w_hh, const Tensor& b_ih, const Tensor& b_hh) {
  switch (cell_id) {
    case kLstm: {
      auto hc = at::lstm_cell(x, {h, c}, w_ih, w_hh, opt(b_ih), opt(b_hh));
      return {std::get<0>(hc), std::get<1>(hc)};
    }
    case kGru: return {at::gru_cell(x, h, w_ih, w_hh, opt(b_ih), opt(b_hh))};
    case kRnnTanh: return {at::rnn_tanh_cell(x, h, w_ih, w_hh, opt(b_ih), opt(b_hh))};
    default: return {at::rnn_relu_cell(x, h, w_ih, w_hh, opt(b_ih), opt(b_hh))};
  }
}

struct CellStep : public torch::autograd::Function<CellStep> {
  // c, b_ih, b_hh: None where absent. -> h' (and c' for lstm)
  static variable_list forward(AutogradContext* ctx, int64_t cell_id, const Tensor& x, const Tensor& h,
                               const OptTensor& c, const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                               const OptTensor& b_hh, bool bf16_gemm) {
    ctx->saved_data["cell"] = cell_id;
    ctx->saved_data["bf16_gemm"] = bf16_gemm;
    const CellKernels& k = kernels_for(cell_id);
    if (!bf16_gemm && direct_operands(k, x, h, c, w_ih, w_hh, b_ih, b_hh)) {
      std::vector<Tensor> r;
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastrnn_cell_step", [&] {
        r = direct_step<scalar_t>(k, x, h, c, w_ih, w_hh, b_ih, b_hh, /*save=*/true);
      });
      ctx->save_for_backward({x, h, c.value_or(Tensor()), w_ih, w_hh, b_ih.value_or(Tensor()),
                              b_hh.value_or(Tensor()), r[4], r[2], r[3]});
      if (k.cell_state) return {r[0], r[1]};
      return {r[0]};
    }
    const Tensor gx = input_projection(x, w_ih, b_ih.value_or(Tensor()));
    auto r = recurrence_forward(cell_id, gx.unsqueeze(0), h, c, w_hh, b_hh, c10::nullopt, c10::nullopt, false,
                                /*need_saved=*/true, bf16_gemm);
    ctx->save_for_backward({x, h, c.value_or(Tensor()), w_ih, w_hh, b_ih.value_or(Tensor()), b_hh.value_or(Tensor()),
                            r[0], r[3], r[4]});
    if (cell_id == kLstm) return {r[1], r[2]};
    return {r[1]};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int64_t cell_id = ctx->saved_data["cell"].toInt();
    const bool bf16_gemm = ctx->saved_data["bf16_gemm"].toBool();
    const auto s = ctx->get_saved_variables();
    const Tensor &x = s[0], &h = s[1], &c = s[2], &w_ih = s[3], &w_hh = s[4], &b_ih = s[5], &b_hh = s[6];
    // forward's arguments: cell_id, x, h, c, w_ih, w_hh, b_ih, b_hh, bf16_gemm (needs_input_grad counts tensors only)
    variable_list out(9);
    if (at::GradMode::is_enabled()) {  // create_graph: gradients that are themselves differentiable
      const Tensor in[] = {x, h, c, w_ih, w_hh, b_ih, b_hh};
      variable_list inputs;
      std::vector<int> where;
      for (int i = 0; i < 7; ++i) {
        if (in[i].defined() && in[i].requires_grad()) {
          inputs.push_back(in[i]);
          where.push_back(i);
        }
      }
      const variable_list outs = torch_cell(cell_id, x, h, c, w_ih, w_hh, b_ih, b_hh);
      const variable_list g =
          torch::autograd::grad(outs, inputs, variable_list(grads.begin(), grads.begin() + outs.size()),
                                /*retain_graph=*/true, /*create_graph=*/true, /*allow_unused=*/true);
      for (size_t i = 0; i < where.size(); ++i) out[where[i] + 1] = g[i];
      return out;
    }
    const Tensor& out_saved = s[7];
    const int64_t B = x.size(0);
    const Tensor d_h = grads[0].contiguous();
    const Tensor d_c = cell_id == kLstm ? grads[1].contiguous() : Tensor();
    const CellKernels& k = kernels_for(cell_id);
    if (!bf16_gemm && direct_operands(k, x, h, opt(c), w_ih, w_hh, opt(b_ih), opt(b_hh)) &&
        plain_cpu(d_h, x.scalar_type()) && (!d_c.defined() || plain_cpu(d_c, x.scalar_type()))) {
      const bool need[] = {ctx->needs_input_grad(0), ctx->needs_input_grad(3),
                          b_ih.defined() && ctx->needs_input_grad(5)};
      variable_list g;
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastrnn_cell_step_backward", [&] {
        g = direct_backward<scalar_t>(k, s, d_h, d_c, need);
      });
      return g;
    }
    // (a direct forward saved h' [B, H] and its saved tensors as [1, B, width]; recurrence_backward takes T = 1)
    auto g = recurrence_backward(cell_id, d_h.view({1, B, d_h.size(1)}), at::zeros_like(d_h), opt(d_c), h, opt(c),
                                 w_hh, opt(b_hh), c10::nullopt, c10::nullopt, false, out_saved.view({1, B, -1}), s[8],
                                 s[9], bf16_gemm);
    const Tensor d_gx = g[0].view({B, g[0].size(2)});
    if (ctx->needs_input_grad(0)) out[1] = input_grad(d_gx, w_ih);
    out[2] = g[1];
    out[3] = g[2];
    if (ctx->needs_input_grad(3)) out[4] = input_weight_grad(d_gx, x);
    out[5] = g[3];
    if (b_ih.defined() && ctx->needs_input_grad(5)) out[6] = d_gx.sum(0);
    out[7] = g[4];
    return out;
  }
};

struct Linear : public torch::autograd::Function<Linear> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w, const OptTensor& b) {
    ctx->save_for_backward({x, w});
    ctx->saved_data["bias"] = b.has_value() && b->defined();
    return input_projection(x, w, b.value_or(Tensor()));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const Tensor &x = s[0], &w = s[1], d = grads[0].contiguous();
    const bool grad_mode = at::GradMode::is_enabled();  // create_graph: ATen's differentiable mm
    variable_list out(3);
    if (ctx->needs_input_grad(0)) out[0] = grad_mode ? d.mm(w) : input_grad(d, w);
    if (ctx->needs_input_grad(1)) out[1] = grad_mode ? d.t().mm(x) : input_weight_grad(d, x);
    if (ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(2)) out[2] = d.sum(0);
    return out;
  }
};

std::string dtype_name(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

// What torch's _VF.*_cell checks of a step's sizes, dtypes and devices, with its messages (RuntimeError), before any
// memory is touched: so the Python side of a Cell call need not (functional.cell_step's fast path).
void check_torch_cell_args(const Tensor& x, const Tensor& h, const OptTensor& c, const Tensor& w_ih,
                           const Tensor& w_hh) {
  TORCH_CHECK(w_hh.dim() == 2, "fastrnn: cell_step takes w_hh [G*H, H], got ", shape_str(w_hh.sizes()));
  const int64_t H = w_hh.size(1);
  TORCH_CHECK(x.size(1) == w_ih.size(1), "input has inconsistent input_size: got ", x.size(1), " expected ",
              w_ih.size(1));
  auto state = [&](const Tensor& s, int i) {
    TORCH_CHECK(s.dim() == 2, "fastrnn: cell_step takes hidden", i, " [B, H], got ", shape_str(s.sizes()));
    TORCH_CHECK(s.size(0) == x.size(0), "Input batch size ", x.size(0), " doesn't match hidden", i, " batch size ",
                s.size(0));
    TORCH_CHECK(s.size(1) == H, "hidden", i, " has inconsistent hidden_size: got ", s.size(1), ", expected ", H);
    TORCH_CHECK(s.scalar_type() == x.scalar_type(), "hidden", i, " dtype ", dtype_name(s.scalar_type()),
                " does not match input dtype ", dtype_name(x.scalar_type()));
    TORCH_CHECK(s.device() == x.device(), "hidden", i, " is on ", s.device(), " but input is on ", x.device(),
                "; expected both on one device");
  };
  state(h, 0);
  if (c.has_value() && c->defined()) state(*c, 1);
}

}  // namespace

std::vector<Tensor> cell_step(int64_t cell_id, const Tensor& x, const Tensor& h, const OptTensor& c,
                              const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                              bool bf16_gemm) {
  TORCH_CHECK(cell_id >= kLstm && cell_id <= kRnnRelu, "fastrnn: cell_step runs the Cell classes' cells (kernel_id ",
              kLstm, "..", kRnnRelu, "), got ", cell_id);
  TORCH_CHECK(x.dim() == 2 && w_ih.dim() == 2, "fastrnn: cell_step takes x [B, I] and w_ih [G*H, I], got ",
              shape_str(x.sizes()), " and ", shape_str(w_ih.sizes()));
  check_torch_cell_args(x, h, c, w_ih, w_hh);
  // the walk takes contiguous states and W_hh (a copy here is part of the graph when autograd records)
  const Tensor hh = h.contiguous(), whh = w_hh.contiguous();
  const OptTensor cc = c.has_value() && c->defined() ? OptTensor(c->contiguous()) : OptTensor();
  const OptTensor bh = b_hh.has_value() && b_hh->defined() ? OptTensor(b_hh->contiguous()) : OptTensor();
  const OptTensor& bi = b_ih;
  auto grad_of = [](const OptTensor& t) { return t.has_value() && t->requires_grad(); };
  const bool records = at::GradMode::is_enabled() &&
                       (x.requires_grad() || hh.requires_grad() || grad_of(cc) || w_ih.requires_grad() ||
                        whh.requires_grad() || grad_of(bi) || grad_of(bh));
  if (records) return CellStep::apply(cell_id, x, hh, cc, w_ih, whh, bi, bh, bf16_gemm);
  const CellKernels& k = kernels_for(cell_id);
  if (!bf16_gemm && direct_operands(k, x, hh, cc, w_ih, whh, bi, bh)) {
    std::vector<Tensor> r;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastrnn_cell_step", [&] {
      r = direct_step<scalar_t>(k, x, hh, cc, w_ih, whh, bi, bh, /*save=*/false);
    });
    if (k.cell_state) return {r[0], r[1]};
    return {r[0]};
  }
  auto r = recurrence_forward(cell_id, input_projection(x, w_ih, bi.value_or(Tensor())).unsqueeze(0), hh, cc, whh, bh,
                              c10::nullopt, c10::nullopt, false, /*need_saved=*/false, bf16_gemm);
  if (cell_id == kLstm) return {r[1], r[2]};
  return {r[1]};
}

Tensor linear(const Tensor& x, const Tensor& w, const OptTensor& b) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "fastrnn: linear takes x [rows, I] and w [N, I], got ",
              shape_str(x.sizes()), " and ", shape_str(w.sizes()));
  const bool bias = b.has_value() && b->defined();
  const bool records =
      at::GradMode::is_enabled() && (x.requires_grad() || w.requires_grad() || (bias && b->requires_grad()));
  // a strided x (a layer's batch_first input, a slice) is copied once, so that it too takes the extension's GEMMs
  const Tensor xc = x.contiguous();
  if (records) return Linear::apply(xc, w, b);
  return input_projection(xc, w, bias ? *b : Tensor());
}

}  // namespace fastrnn
