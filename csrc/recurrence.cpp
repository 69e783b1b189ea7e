// The entry points, one forward and one backward for every cell, dispatched on cells.py's kernel_id through one table
// (kernels_for). Each checks every argument (shape, dtype, device, contiguity, batch_sizes) before it touches any
// tensor memory, allocates the outputs and runs the cell's walk (walk.h) on raw pointers.
#include "walk.h"

#include <cmath>
#include <cstdlib>
#include <iterator>
#include <optional>

namespace fastrnn {
namespace {

// The kernel table: index = kernel_id.
const CellKernels* cell_or_null(int64_t cell_id) {
  static const CellKernels* const table[] = {&lstm_kernels(),     &gru_kernels(),     &rnn_tanh_kernels(),
                                             &rnn_relu_kernels(), &ln_lstm_kernels(), &ln_gru_kernels()};
  if (cell_id < 0 || cell_id >= int64_t(std::size(table))) return nullptr;
  TORCH_INTERNAL_ASSERT(table[cell_id]->id == cell_id, "fastrnn: the kernel table holds ", table[cell_id]->name,
                        " at ", cell_id);
  return table[cell_id];
}

}  // namespace

const CellKernels& kernels_for(int64_t cell_id) {
  const CellKernels* k = cell_or_null(cell_id);
  TORCH_CHECK(k != nullptr, "fastrnn: unknown cell id ", cell_id, " (fastrnn.cells kernel_id)");
  return *k;
}

namespace {

// "4H" for a four-gate cell, "H" for one gate: the symbolic width of gx, gh and w_hh's rows.
std::string width_sym(int64_t w) { return w == 1 ? "H" : std::to_string(w) + "H"; }

// The arguments' names with their symbolic shapes for the check messages ("gx [T, B, 4H]"), built once per cell so a
// call does not pay for strings it only needs when it fails.
struct ArgNames {
  std::string gx, h0, w_hh, b_hh, out, d_out, d_h_n, gates, extra, norm;
};

std::string saved_name(const CellKernels& k, const char* name, int64_t width) {
  return width ? std::string(name) + " [T, B, " + width_sym(width) + "] (saved by forward)"
               : std::string(name) + " [0] (" + k.name + " saves none)";
}

const ArgNames& arg_names(const CellKernels& k) {
  static const auto table = [] {
    std::vector<ArgNames> v;
    for (int64_t id = 0;; ++id) {
      const CellKernels* c = cell_or_null(id);
      if (c == nullptr) return v;
      const std::string gh = width_sym(c->G), p = c->projection ? "P" : "H";
      const std::string norm = "norm [" + width_sym(c->norm_width) + "] (Norm.params: ln_hh_weight | b_hh" +
                               (c->cell_state ? " | ln_c_weight | ln_c_bias)" : ")");
      v.push_back({"gx [T, B, " + gh + "]", "h0 [B, " + p + "]", "w_hh [" + gh + ", " + p + "]", "b_hh [" + gh + "]",
                   "out [T, B, " + p + "]", "d_out [T, B, " + p + "]", "d_h_n [B, " + p + "]",
                   saved_name(*c, "gates", c->saved_gates), saved_name(*c, "extra", c->saved_extra), norm});
    }
  }();
  return table[k.id];
}

struct Sizes {
  int64_t T, B, H, P;
  bool proj;
};

// The call's sizes, fixed by w_hh [G*H, P] and w_hr [P, H] (cells with a projection; else P == H). H == 0 (and
// T == 0, B == 0) are valid: every tensor then has zero elements where that size appears.
Sizes call_sizes(const CellKernels& k, int64_t T, int64_t B, at::ScalarType dt, const Tensor& w_hh,
                 const OptTensor& w_hr) {
  // (the messages are built only when a check fails)
  const char* p = k.projection ? "P" : "H";
  TORCH_CHECK(w_hh.defined(), "fastrnn: w_hh is required");
  TORCH_CHECK(w_hh.scalar_type() == dt, "fastrnn: w_hh must have dtype ", dt, ", got ", w_hh.scalar_type());
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) % k.G == 0, "fastrnn: w_hh must have shape [", width_sym(k.G), ", ", p,
              "] for ", k.name, ", got ", shape_str(w_hh.sizes()));
  const int64_t H = w_hh.size(0) / k.G, P = w_hh.size(1);
  const bool proj = w_hr.has_value() && w_hr->defined();
  if (proj) {
    TORCH_CHECK(k.projection, "fastrnn: ", k.name, " has no projection: w_hr must be None");
    check_tensor(*w_hr, "w_hr [P, H]", {P, H}, dt);
  } else {
    TORCH_CHECK(P == H, "fastrnn: w_hh must have shape [", width_sym(k.G), ", H] = [", k.G * H, ", ", H, "]",
                k.projection ? " without w_hr" : "", " for ", k.name, ", got ", shape_str(w_hh.sizes()));
  }
  check_blas_size(T * B, "T * B");
  check_blas_size(k.G * H, "G * H (rows of w_hh)");
  check_blas_size(P, "P (columns of w_hh)");
  return {T, B, H, P, proj};
}

// c0-like arguments: required by cells with a cell state, refused by the others.
void check_state(const CellKernels& k, const OptTensor& c, const char* what, at::IntArrayRef shape,
                 at::ScalarType dt) {
  const bool given = c.has_value() && c->defined();
  if (k.cell_state) {
    TORCH_CHECK(given, "fastrnn: ", what, " is required for ", k.name, " (expected shape ", shape_str(shape), ")");
    check_tensor(*c, what, shape, dt);
  } else {
    TORCH_CHECK(!given, "fastrnn: ", k.name, " has no cell state: ", what, " must be None");
  }
}

// What forward saves for backward (cells.py saved_shapes): [T, B, width*H], or empty [0] where the cell saves none.
at::DimVector saved_shape(int64_t width, const Sizes& s) {
  if (width == 0) return {0};
  return {s.T, s.B, width * s.H};
}

// The type of the state, the saved activations and the accumulation: float32 for a bfloat16 call (cells.saved_dtype).
at::ScalarType acc_type(at::ScalarType dt) { return dt == at::kBFloat16 ? at::kFloat : dt; }


// What a walk of precision Pr (walk.h's Prec) is handed: its argument types, the call's tensors as pointers of the
// call's type S or of the state's T (null for an undefined tensor), and a normalised cell's Norm (params, zoneout
// mask, keep; null pointers for the other cells, as for a mask not given).
template <typename Pr_>
struct Call {
  using Pr = Pr_;
  using T = typename Pr::T;
  using S = typename Pr::S;
  using Forward = ForwardArgs<T, S>;
  using Backward = BackwardArgs<T, S>;
  const T* norm;
  const S* mask;
  T keep;

  static const S* in(const Tensor& t) { return t.defined() ? reinterpret_cast<const S*>(t.data_ptr()) : nullptr; }
  static S* out(const Tensor& t) { return t.defined() ? reinterpret_cast<S*>(t.data_ptr()) : nullptr; }
  static const T* in_acc(const Tensor& t) { return t.defined() ? reinterpret_cast<const T*>(t.data_ptr()) : nullptr; }
  static T* out_acc(const Tensor& t) { return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr; }
};

// f(Call<Pr>{...}) for this call's precision: float64, float32 (optionally with bfloat16 GEMMs), or bfloat16.
template <typename F>
void dispatch(const CellKernels& k, at::ScalarType dt, bool bf16_gemm, const OptTensor& norm, const OptTensor& zmask,
              double zkeep, const F& f) {
  const Tensor params = k.norm ? *norm : Tensor(), mask = k.norm && given(zmask) ? *zmask : Tensor();
  auto call = [&](auto pr) {
    using C = Call<decltype(pr)>;
    return f(C{C::in_acc(params), C::in(mask), typename C::T(zkeep)});
  };
  switch (dt) {
    case at::kDouble: return call(PrecF64{});
    case at::kFloat: return bf16_gemm ? call(PrecF32Bf16Gemm{}) : call(PrecF32{});
    case at::kBFloat16: return call(PrecBf16{});
    default: TORCH_CHECK(false, "fastrnn: no cpp kernel for ", dt);
  }
}

// The recurrent half of a forward call, which recurrence_forward and layer_forward share: h0 [B, P], c0 [B, H] (cells
// with a cell state), w_hh [G*H, P], b_hh [G*H]?.
void check_recurrent_args(const CellKernels& k, const ArgNames& names, const Sizes& s, at::ScalarType dt,
                          const Tensor& h0, const OptTensor& c0, const Tensor& w_hh, const OptTensor& b_hh) {
  const int64_t GH = k.G * s.H;
  check_tensor(h0, names.h0.c_str(), {s.B, s.P}, dt);
  check_state(k, c0, "c0 [B, H]", {s.B, s.H}, dt);
  check_tensor(w_hh, names.w_hh.c_str(), {GH, s.P}, dt);
  check_opt(b_hh, names.b_hh.c_str(), {GH}, dt);
}

void check_bf16_gemm(bool bf16_gemm, at::ScalarType dt) {
  TORCH_CHECK(!bf16_gemm || dt == at::kFloat || dt == at::kBFloat16,
              "fastrnn: bf16_gemm is for float32 (bfloat16 calls always run bfloat16 GEMMs), got ", dt);
}

// The normalised cells' arguments (cells.Norm: params, mask, keep), refused by the other cells. A normalised cell
// runs float64 and float32 only (its layer norms need whole rows, which the bfloat16 GEMMs' tasks do not have:
// fastrnn.backends.cpp widens bfloat16 to float32 for it) and takes its b_hh inside norm.
void check_norm(const CellKernels& k, const ArgNames& names, const Sizes& s, at::ScalarType dt, bool bf16_gemm,
                const OptTensor& b_hh, const OptTensor& norm, const OptTensor& zmask, double zkeep) {
  if (!k.norm) {
    TORCH_CHECK(!given(norm), "fastrnn: ", k.name, " is not layer-normalised: norm must be None");
    TORCH_CHECK(!given(zmask), "fastrnn: ", k.name, " has no zoneout: zmask must be None");
    return;
  }
  TORCH_CHECK(dt != at::kBFloat16, "fastrnn: ", k.name, " has no bfloat16 kernel: its layer norms need whole rows ",
              "(fastrnn.backends.cpp runs bfloat16 on the float32 kernels)");
  TORCH_CHECK(!bf16_gemm, "fastrnn: ", k.name, " runs no bfloat16 GEMMs (its layer norms need whole rows): ",
              "bf16_gemm must be false");
  TORCH_CHECK(!given(b_hh), "fastrnn: ", k.name, " takes its b_hh inside norm (Norm.params): b_hh must be None");
  TORCH_CHECK(given(norm), "fastrnn: ", names.norm, " is required for ", k.name, " (expected shape [",
              k.norm_width * s.H, "])");
  check_tensor(*norm, names.norm.c_str(), {k.norm_width * s.H}, dt);
  check_opt(zmask, "zmask [T, B, H] (the zoneout keep mask)", {s.T, s.B, s.H}, dt);
  TORCH_CHECK(std::isfinite(zkeep), "fastrnn: zkeep (the zoneout keep constant) must be finite, got ", zkeep);
}

}  // namespace

std::vector<Tensor> recurrence_forward(int64_t cell_id, const Tensor& gx, const Tensor& h0, const OptTensor& c0,
                                       const Tensor& w_hh, const OptTensor& b_hh, const OptTensor& w_hr,
                                       const OptTensor& batch_sizes, bool reverse, bool need_saved, bool bf16_gemm,
                                       const OptTensor& norm, const OptTensor& zmask, double zkeep) {
  const CellKernels& k = kernels_for(cell_id);
  const ArgNames& names = arg_names(k);
  check_dtype(gx, names.gx.c_str());
  TORCH_CHECK(gx.dim() == 3, "fastrnn: gx must have shape [T, B, ", width_sym(k.G), "], got ", shape_str(gx.sizes()));
  const auto dt = gx.scalar_type();
  const Sizes s = call_sizes(k, gx.size(0), gx.size(1), dt, w_hh, w_hr);
  const int64_t T = s.T, B = s.B, H = s.H, P = s.P, GH = k.G * H;
  check_tensor(gx, names.gx.c_str(), {T, B, GH}, dt);
  check_recurrent_args(k, names, s, dt, h0, c0, w_hh, b_hh);
  check_bf16_gemm(bf16_gemm, dt);
  check_norm(k, names, s, dt, bf16_gemm, b_hh, norm, zmask, zkeep);
  const Walk w{batch_sizes_vec(batch_sizes, T, B), T, B, reverse};

  const auto opts = gx.options(), acc = opts.dtype(acc_type(dt));
  const bool same = acc_type(dt) == dt;
  Tensor out = new_output({T, B, P}, opts);
  Tensor h_n = new_output({B, P}, opts);
  Tensor c = k.cell_state ? c0->to(acc, false, true) : Tensor();  // running cell state (acc), c_n at the end
  Tensor gates = need_saved && k.saved_gates ? new_output(saved_shape(k.saved_gates, s), acc) : at::empty({0}, acc);
  Tensor extra = need_saved && k.saved_extra ? new_output(saved_shape(k.saved_extra, s), acc) : at::empty({0}, acc);
  const bool gh_home = (need_saved && (gh_in_extra(k.norm) || gh_in_gates(k.G, k.saved_gates))) ||
                       (!gh_in_extra(k.norm) && gh_in_h(k.G, s.proj, same));
  Tensor gh_buf = gh_home ? Tensor() : at::empty({B, GH}, acc);
  Tensor hbar = s.proj ? at::empty({B, H}, opts) : Tensor();
  Tensor pout = s.proj && !same ? at::empty({B, P}, acc) : Tensor();
  Tensor bias = b_hh.has_value() && b_hh->defined() ? b_hh->to(acc) : at::zeros({GH}, acc);
  const Tensor w_hr_t = s.proj ? *w_hr : Tensor();
  dispatch(k, dt, bf16_gemm, norm, zmask, zkeep, [&](auto call) {
    using C = decltype(call);
    const typename C::Forward a{w, H, P, s.proj, need_saved, C::in(gx), C::in(h0), C::in(w_hh), C::in(w_hr_t),
                                C::in_acc(bias), C::out(out), C::out(h_n), C::out_acc(c), C::out_acc(gates),
                                C::out_acc(extra), C::out_acc(gh_buf), C::out(hbar), C::out_acc(pout), call.norm,
                                call.mask, call.keep};
    k.forward.run<typename C::Pr>(a);
  });
  return {out, h_n, same ? c : (c.defined() ? c.to(dt) : c), gates, extra};
}

namespace {

// layer_forward's projection: one GEMM while gx is at most kWholeProjectionBytes (below the 32 MB from which glibc
// maps each allocation afresh), else chunks of about kChunkBytes (GEMMs of many rows still, reusing one buffer).
// Chunks as small as a core's L2 (1 MB) were measured too: their GEMMs of few rows lost more than the cache won
// (bfloat16 LSTM T=32 B=64 H=512: 7.6 -> 8.6 ms).
constexpr int64_t kWholeProjectionBytes = int64_t(16) << 20, kChunkBytes = int64_t(8) << 20;

int64_t chunk_steps(int64_t T, int64_t B, int64_t GH, int64_t elem) {
  // FASTRNN_CPP_CHUNK_STEPS=n: chunks of n steps (tests: many chunks at small shapes; timing)
  if (const char* v = std::getenv("FASTRNN_CPP_CHUNK_STEPS")) {
    const long n = std::strtol(v, nullptr, 10);
    if (n > 0) return std::max<int64_t>(1, std::min<int64_t>(T, n));
  }
  const int64_t step_bytes = std::max<int64_t>(B * GH * elem, 1);
  if (T * step_bytes <= kWholeProjectionBytes) return std::max<int64_t>(T, 1);
  return std::max<int64_t>(1, std::min(T, kChunkBytes / step_bytes));
}

}  // namespace

std::vector<Tensor> layer_forward(int64_t cell_id, const Tensor& x, const Tensor& w_ih, const OptTensor& b_ih,
                                  const Tensor& h0, const OptTensor& c0, const Tensor& w_hh, const OptTensor& b_hh,
                                  bool reverse, bool bf16_gemm) {
  const CellKernels& k = kernels_for(cell_id);
  TORCH_CHECK(!k.norm, "fastrnn: layer_forward runs the plain cells; ", k.name, " takes recurrence_forward");
  const ArgNames& names = arg_names(k);
  check_dtype(x, "x [T, B, I]");
  TORCH_CHECK(x.dim() == 3, "fastrnn: x must have shape [T, B, I], got ", shape_str(x.sizes()));
  const auto dt = x.scalar_type();
  const Sizes s = call_sizes(k, x.size(0), x.size(1), dt, w_hh, c10::nullopt);
  const int64_t T = s.T, B = s.B, H = s.H, P = s.P, GH = k.G * H, I = x.size(2);
  const std::string w_ih_name = "w_ih [" + width_sym(k.G) + ", I]", b_ih_name = "b_ih [" + width_sym(k.G) + "]";
  check_tensor(x, "x [T, B, I]", {T, B, I}, dt);
  check_tensor(w_ih, w_ih_name.c_str(), {GH, I}, dt);
  check_opt(b_ih, b_ih_name.c_str(), {GH}, dt);
  check_recurrent_args(k, names, s, dt, h0, c0, w_hh, b_hh);  // w_hh's contiguity too: the walk reads it dense
  check_bf16_gemm(bf16_gemm, dt);
  check_blas_size(I, "I (columns of w_ih)");
  const Walk w{batch_sizes_vec(c10::nullopt, T, B), T, B, reverse};

  const auto opts = x.options(), acc = opts.dtype(acc_type(dt));
  const bool same = acc_type(dt) == dt;
  Tensor out = new_output({T, B, P}, opts);
  Tensor h_n = new_output({B, P}, opts);
  Tensor c = k.cell_state ? c0->to(acc, false, true) : Tensor();
  const bool gh_home = !gh_in_extra(k.norm) && gh_in_h(k.G, s.proj, same);
  Tensor gh_buf = gh_home ? Tensor() : at::empty({B, GH}, acc);
  // As functional.rnn does for the op layer, so that a call computes the same bits on either path (fastrnn.record
  // reruns a call on the op layer): in bfloat16, where the gates add gx and gh (d_gx reaches W_hh unchanged), b_ih
  // joins b_hh in the step's bias, b_hh + b_ih in the call's dtype, and the GEMM skips addmm's copy of b_ih into
  // every row; GRU (its n gate scales only h W_hn^T + b_hn by r) and the other dtypes keep b_ih in gx.
  const bool fold = !k.dgh_differs && dt == at::kBFloat16 && given(b_ih) && given(b_hh);
  Tensor bias = given(b_hh) ? (fold ? (*b_hh + *b_ih) : *b_hh).to(acc) : at::zeros({GH}, acc);
  const int64_t Tc = chunk_steps(T, B, GH, x.element_size());
  Tensor buf = at::empty({Tc * B, GH}, opts);
  const Tensor x2 = x.view({T * B, I}), w_ih_t = w_ih.t();
  // float32 on the own GEMM (own_gemm_enabled): W_ih packed once for every chunk, b_ih added as the GEMM writes gx
  // (up to kOnceMaxUnpackedRows rows in all: one chunk, whose GEMM reads W_ih as it is)
  std::optional<StepGemm<float>> own;
  if (dt == at::kFloat && own_gemm_enabled())
    own.emplace(w_ih.data_ptr<float>(), true, GH, I, T * B <= kOnceMaxUnpackedRows ? 0 : Tc * B);
  int64_t chunk = -1;
  // gx of step t: its chunk is projected when the walk first reaches one of its steps (the walk visits the steps in
  // order or in reverse, so each chunk once), on the calling thread between the walk's parallel regions.
  auto project = [&](int64_t t) -> const void* {
    const int64_t ct = t / Tc;
    if (ct != chunk) {
      chunk = ct;
      const int64_t t0 = ct * Tc, t1 = std::min(T, t0 + Tc);
      Tensor dst = buf.narrow(0, 0, (t1 - t0) * B);
      const Tensor src = x2.narrow(0, t0 * B, (t1 - t0) * B);
      if (own && given(b_ih))
        own->with_bias(src.size(0), src.data_ptr<float>(), I, b_ih->data_ptr<float>(), dst.data_ptr<float>(), GH);
      else if (own) (*own)(src.size(0), src.data_ptr<float>(), I, 0.f, dst.data_ptr<float>(), GH);
      else if (!fold && given(b_ih)) at::addmm_out(dst, *b_ih, src, w_ih_t);
      else at::mm_out(dst, src, w_ih_t);
    }
    return static_cast<const char*>(buf.data_ptr()) + (t - chunk * Tc) * B * GH * x.element_size();
  };
  dispatch(k, dt, bf16_gemm, c10::nullopt, c10::nullopt, 1.0, [&](auto call) {
    using C = decltype(call);
    using S = typename C::S;
    const std::function<const S*(int64_t)> gx_of = [&](int64_t t) { return static_cast<const S*>(project(t)); };
    typename C::Forward a{w, H, P, false, false, nullptr, C::in(h0), C::in(w_hh), nullptr, C::in_acc(bias),
                          C::out(out), C::out(h_n), C::out_acc(c), nullptr, nullptr, C::out_acc(gh_buf), nullptr,
                          nullptr, nullptr, nullptr, typename C::T(1)};
    a.gx_of = &gx_of;
    k.forward.run<typename C::Pr>(a);
  });
  return {out, h_n, same ? c : (c.defined() ? c.to(dt) : c)};
}

std::vector<Tensor> recurrence_backward(int64_t cell_id, const Tensor& d_out, const Tensor& d_h_n,
                                        const OptTensor& d_c_n, const Tensor& h0, const OptTensor& c0,
                                        const Tensor& w_hh, const OptTensor& b_hh, const OptTensor& w_hr,
                                        const OptTensor& batch_sizes, bool reverse, const Tensor& out,
                                        const Tensor& gates, const Tensor& extra, bool bf16_gemm,
                                        const OptTensor& norm, const OptTensor& zmask, double zkeep) {
  const CellKernels& k = kernels_for(cell_id);
  const ArgNames& names = arg_names(k);
  check_dtype(out, names.out.c_str());
  TORCH_CHECK(out.dim() == 3, "fastrnn: out must have shape [T, B, ", k.projection ? "P" : "H", "], got ",
              shape_str(out.sizes()));
  const auto dt = out.scalar_type();
  const Sizes s = call_sizes(k, out.size(0), out.size(1), dt, w_hh, w_hr);
  const int64_t T = s.T, B = s.B, H = s.H, P = s.P, GH = k.G * H;
  check_tensor(out, names.out.c_str(), {T, B, P}, dt);
  check_tensor(d_out, names.d_out.c_str(), {T, B, P}, dt);
  check_tensor(d_h_n, names.d_h_n.c_str(), {B, P}, dt);
  check_state(k, d_c_n, "d_c_n [B, H]", {B, H}, dt);
  check_tensor(h0, names.h0.c_str(), {B, P}, dt);
  check_state(k, c0, "c0 [B, H]", {B, H}, dt);
  check_tensor(w_hh, names.w_hh.c_str(), {GH, P}, dt);
  check_opt(b_hh, names.b_hh.c_str(), {GH}, dt);
  const auto acc_dt = acc_type(dt);
  check_tensor(gates, names.gates.c_str(), saved_shape(k.saved_gates, s), acc_dt);
  check_tensor(extra, names.extra.c_str(), saved_shape(k.saved_extra, s), acc_dt);
  check_bf16_gemm(bf16_gemm, dt);
  check_norm(k, names, s, dt, bf16_gemm, b_hh, norm, zmask, zkeep);
  const Walk w{batch_sizes_vec(batch_sizes, T, B), T, B, reverse};

  const auto opts = out.options(), acc = opts.dtype(acc_dt);
  const bool same = acc_dt == dt;
  Tensor d_gx = new_output({T, B, GH}, opts);
  Tensor d_gh = k.dgh_differs ? at::empty({T, B, GH}, opts) : Tensor();  // what reaches W_hh, if not d_gx
  Tensor dh = d_h_n.to(acc, false, true);                               // running d h (acc), d_h0 at the end
  Tensor dc = k.cell_state ? d_c_n->to(acc, false, true) : Tensor();
  Tensor c0a = k.cell_state ? c0->to(acc) : Tensor();
  // a bfloat16 step (a Cell's, or a one-step layer's) writes d_w_hh in bfloat16 at once (walk.h weight_grad)
  const bool dw_in_s = dt == at::kBFloat16 && T == 1 && !s.proj && w.bs[0] == B && has_small_bf16_gemm(B);
  Tensor d_w_hh = new_output({GH, P}, dw_in_s ? opts : acc);
  Tensor d_w_hr = s.proj ? new_output({P, H}, acc) : Tensor();
  Tensor dhfull = s.proj ? at::empty({T, B, P}, opts) : Tensor();
  Tensor hbar = s.proj ? at::empty({T, B, H}, opts) : Tensor();
  Tensor dhbar = s.proj ? at::empty({B, H}, acc) : Tensor();
  Tensor dg0 = at::empty({B, GH}, opts);
  Tensor d_extra = k.norm ? new_output({T, B, H}, opts) : Tensor();
  Tensor d_norm = k.norm ? new_output({k.norm_width * H}, acc) : Tensor();
  const Tensor w_hr_t = s.proj ? *w_hr : Tensor();
  dispatch(k, dt, bf16_gemm, norm, zmask, zkeep, [&](auto call) {
    using C = decltype(call);
    const typename C::Backward a{w, H, P, s.proj, C::in(d_out), C::in(h0), C::in_acc(c0a), C::in(w_hh), C::in(w_hr_t),
                                 C::in(out), C::in_acc(gates), C::in_acc(extra), C::out_acc(dh), C::out_acc(dc),
                                 C::out(d_gx), C::out(d_gh), dw_in_s ? nullptr : C::out_acc(d_w_hh),
                                 C::out_acc(d_w_hr), C::out(dhfull), C::out(hbar), C::out_acc(dhbar), C::out(dg0),
                                 call.norm, call.mask, call.keep, C::out(d_extra), C::out_acc(d_norm),
                                 dw_in_s ? C::out(d_w_hh) : nullptr};
    k.backward.run<typename C::Pr>(a);
  });
  const Tensor& dg = k.dgh_differs ? d_gh : d_gx;
  Tensor d_b_hh;
  if (b_hh.has_value() && b_hh->defined()) {
    if (same) {
      d_b_hh = dg.view({T * B, GH}).sum(0);
    } else {
      d_b_hh = at::empty({GH}, acc);
      column_sums(static_cast<const BF16*>(dg.data_ptr()), T * B, GH, d_b_hh.data_ptr<float>());
    }
  }
  auto back = [&](const Tensor& t) { return same || !t.defined() ? t : t.to(dt); };
  return {d_gx, back(dh), back(dc), back(d_w_hh), back(d_b_hh), back(d_w_hr), d_extra, d_norm};
}

std::tuple<std::string, int64_t, int64_t, int64_t, bool, bool, int64_t> cell_info(int64_t cell_id) {
  const CellKernels& k = kernels_for(cell_id);
  return {k.name, k.G, k.saved_gates, k.saved_extra, k.cell_state, k.projection, k.norm_width};
}

}  // namespace fastrnn
