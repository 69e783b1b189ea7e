// One step of a torch.nn Cell class (LSTMCell, GRUCell, RNNCell) in one call from Python: the input projection
// (an ATen addmm), the recurrence's walk over T = 1 (recurrence.cpp, every cell's own rows) and, when autograd
// records, a C++ autograd node whose backward is recurrence_backward plus the input projection's two GEMMs. A Cell
// is called once per step, so what it pays per call is the product: one Python -> C++ crossing and one backward node,
// where the layer path pays a Python autograd.Function, F.linear and the op layer's argument handling.
//
// A double backward (create_graph) differentiates torch's own cell maths (at::lstm_cell ...) on the saved inputs,
// as the op layer reruns the reference maths under autograd for the layers.
#include <torch/autograd.h>

#include "fastrnn.h"

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

// gx = x W_ih^T + b_ih: [B, G*H]. Operands that step_gemm_operands takes (and a matching b_ih) take one StepGemm call
// on b_ih's rows (the extension's own kernel up to 16 rows, else BLAS; ATen's addmm costs as much again as the step's
// own GEMM at B=1 H=64); anything else goes to ATen, whose checks and messages then apply.
Tensor input_projection(const Tensor& x, const Tensor& w_ih, const Tensor& b_ih) {
  const auto dt = x.scalar_type();
  const bool direct = step_gemm_operands(x, w_ih, /*trans=*/true) &&
                      (!b_ih.defined() || (plain_cpu(b_ih, dt) && b_ih.dim() == 1 && b_ih.size(0) == w_ih.size(0)));
  if (!direct) return b_ih.defined() ? at::addmm(b_ih, x, w_ih.t()) : at::mm(x, w_ih.t());
  const int64_t B = x.size(0), N = w_ih.size(0), K = x.size(1);
  if (dt == at::kFloat && B > kOwnGemmMinRows && own_gemm_enabled()) {
    // many rows (a layer's projection in training; up to 16, a Cell's, the unpacked kernels below win) on the own
    // kernel's panels, b_ih added as the GEMM writes gx: not a copy of b_ih into all B rows first (8 MB at T=32 B=64
    // H=256), read back by a GEMM with beta 1
    Tensor out = at::empty({B, N}, x.options());
    const StepGemm<float> wih(w_ih.data_ptr<float>(), true, N, K, /*max_m=*/B);
    if (b_ih.defined()) wih.with_bias(B, x.data_ptr<float>(), K, b_ih.data_ptr<float>(), out.data_ptr<float>(), N);
    else wih(B, x.data_ptr<float>(), K, 0.f, out.data_ptr<float>(), N);
    return out;
  }
  // (a fresh copy of b_ih's rows: at B = 1 expand(...).contiguous() would be b_ih itself, and the GEMM adds into gx)
  Tensor gx = b_ih.defined() ? b_ih.expand({B, N}).clone(at::MemoryFormat::Contiguous) : at::zeros({B, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "fastrnn_cell_input_projection", [&] {
    const StepGemm<scalar_t> wih(w_ih.data_ptr<scalar_t>(), true, N, K, /*max_m=*/0);  // used once: not packed
    wih(B, x.data_ptr<scalar_t>(), K, scalar_t(1), gx.data_ptr<scalar_t>(), N);
  });
  return gx;
}

// d x = d_gx W_ih: [B, G*H] x [G*H, I]. On plain float32 / float64 operands one StepGemm call (at B <= 16 the
// extension's own kernel, csrc/common.cpp axpy_gemm), else ATen.
Tensor input_grad(const Tensor& d_gx, const Tensor& w_ih) {
  const auto dt = d_gx.scalar_type();
  if (!step_gemm_operands(d_gx, w_ih, /*trans=*/false)) return d_gx.mm(w_ih);
  const int64_t B = d_gx.size(0), K = w_ih.size(0), N = w_ih.size(1);
  Tensor dx = at::empty({B, N}, d_gx.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "fastrnn_cell_input_grad", [&] {
    const StepGemm<scalar_t> w(w_ih.data_ptr<scalar_t>(), false, N, K, /*max_m=*/0);  // used once: not packed
    w(B, d_gx.data_ptr<scalar_t>(), K, scalar_t(0), dx.data_ptr<scalar_t>(), N);
  });
  return dx;
}

// d W_ih = d_gx^T x: [G*H, B] x [B, I]. On plain float32 / float64 operands one extension GEMM (the own kernel where
// own_gemm_enabled), else ATen.
Tensor input_weight_grad(const Tensor& d_gx, const Tensor& x) {
  const auto dt = d_gx.scalar_type();
  if (!step_gemm_operands(d_gx, x, /*trans=*/false, /*trans_a=*/true)) return d_gx.t().mm(x);
  const int64_t B = x.size(0), N = d_gx.size(1), K = x.size(1);
  Tensor dw = at::empty({N, K}, x.options());
  if (B == 0 || N == 0 || K == 0) return dw.zero_();
  AT_DISPATCH_FLOATING_TYPES(dt, "fastrnn_input_weight_grad", [&] {
    gemm(true, false, N, K, B, scalar_t(1), d_gx.data_ptr<scalar_t>(), N, x.data_ptr<scalar_t>(), K, scalar_t(0),
         dw.data_ptr<scalar_t>(), K);
  });
  return dw;
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
    const Tensor gx = input_projection(x, w_ih, b_ih.value_or(Tensor()));
    auto r = recurrence_forward(cell_id, gx.unsqueeze(0), h, c, w_hh, b_hh, c10::nullopt, c10::nullopt, false,
                                /*need_saved=*/true, bf16_gemm);
    ctx->save_for_backward({x, h, c.value_or(Tensor()), w_ih, w_hh, b_ih.value_or(Tensor()), b_hh.value_or(Tensor()),
                            r[0], r[3], r[4]});
    ctx->saved_data["cell"] = cell_id;
    ctx->saved_data["bf16_gemm"] = bf16_gemm;
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
    auto g = recurrence_backward(cell_id, d_h.view({1, B, d_h.size(1)}), at::zeros_like(d_h), opt(d_c), h, opt(c),
                                 w_hh, opt(b_hh), c10::nullopt, c10::nullopt, false, out_saved, s[8], s[9],
                                 bf16_gemm);
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
