// The time walk, written once for every cell: steps in order or reversed, packed rows (batch_sizes), rows joining
// from h0, final states, the backward walk and the weight-gradient GEMMs (cells.py: steps, prev_rows; the
// reference backend's forward/backward). A cell is a policy type (lstm.cpp, gru.cpp, rnn.cpp, ln_lstm.cpp, ln_gru.cpp)
// that supplies only its pointwise forward and backward rows and describes its layout:
//
//   struct Cell {
//     static constexpr int64_t kId;                 // cells.py kernel_id
//     static constexpr const char* kName;           // cells.py name
//     static constexpr int64_t G;                   // gates: gh = h_{t-1} W_hh^T is [B, G*H]
//     static constexpr int64_t kSavedGates, kSavedExtra;  // cells.py saved_widths, in multiples of H
//     static constexpr bool kCellState;             // a second state c [B, H]; its saved extra begins with c_t
//     static constexpr bool kProjection;            // takes w_hr [P, H] (h = hbar W_hr^T)
//     static constexpr bool kDghDiffers;            // the gradient reaching W_hh/b_hh differs from d_gx
//     static constexpr bool kDirectDh;              // part of d h_{t-1} bypasses W_hh (backward_rows writes it)
//     static constexpr bool kNorm;                  // layer-normalised with zoneout (cells.py "Normalised cells"),
//                                                   //   see below
//     static constexpr int64_t kRowWork;            // pointwise cost of a row in units of H (parallel grain)
//     // rows [r0, r1) x hidden units [j0, j1) of a step (every gate of those units)
//     template <typename T, typename S> static void forward_rows(const FwdRows<T, S>&, r0, r1, j0, j1);
//     template <typename T, typename S> static void backward_rows(const BwdRows<T, S>&, r0, r1, j0, j1);
//   };
//
// T is the type of the state and of all arithmetic, S that of the call's tensors (gx, out, states, weights,
// gradients): both float64 or both float32, or S = bfloat16 over T = float32 (Prec below).
//
// A kNorm cell (ln_lstm.cpp, ln_gru.cpp) gets Norm.params and the zoneout keep mask (or constant) in its rows, the
// step's GEMM without bias (gh is raw_t = h_{t-1} W_hh^T, written straight into the saved extra's raw columns when
// saving, row stride ldg), writes d_extra in backward and d raw_t into d_gh (kDghDiffers), and adds its rows' shares
// of d Norm.params to BwdRows.d_norm (its task's buffer, summed at the end of the walk). Its layer norms reduce over
// every unit of a row, so its rows are always called with [j0, j1) = [0, H): it runs on the BLAS schedule only
// (float64, float32; the bfloat16 schedule's tasks see one block of units, and make_kernels leaves those entries
// null). Everything the other cells do not use costs them nothing: the walk tests kNorm at compile time.
//
// Per step the serial work is one GEMM and one fused pointwise pass. float32/float64 (MKL/BLAS GEMMs): a small step
// runs as row blocks that each do their own GEMM and pointwise pass in one parallel region (row_blocks), a large one as
// a GEMM threaded by BLAS and then a parallel pointwise pass. bfloat16 GEMMs (Bf16Gemm, AMX): a step is one parallel
// region over blocks of hidden units, each task running the GEMM of its units' columns of every gate and then their
// pointwise pass (unit_tasks); backward's GEMM d_gates W_hh of a step runs at the start of the next step's region,
// each task first forming the columns of d h its own units need.
#pragma once

#include "fastrnn.h"

namespace fastrnn {

// ---- the walk's order over a packed sequence ----
struct Walk {
  std::vector<int64_t> bs;  // rows active at each step (non-increasing)
  int64_t T, B;
  bool reverse;
  int64_t step(int64_t i) const { return reverse ? T - 1 - i : i; }  // forward visits step(0), step(1), ...
  int64_t src(int64_t t) const { return reverse ? t + 1 : t - 1; }   // where h_{t-1} lives in out
  // How many of the n rows active at t continue from out[src(t)]; rows [k, n) start from h0.
  int64_t prev_rows(int64_t t) const {
    int64_t n = bs[t];
    if (reverse) return t + 1 < T ? std::min(n, bs[t + 1]) : 0;
    return t > 0 ? n : 0;
  }
  // Steps at which row b is active: [0, length(b)), as rows are sorted by length.
  int64_t length(int64_t b) const {
    return std::partition_point(bs.begin(), bs.end(), [b](int64_t n) { return n > b; }) - bs.begin();
  }
  // The step at which row b starts from its h0 (and c0): 0 forward, its own last step in reverse; -1 when the row is
  // never active.
  int64_t first_step(int64_t b) const {
    const int64_t len = length(b);
    return len == 0 ? -1 : reverse ? len - 1 : 0;
  }
  // The step whose output is row b's final state: len - 1 forward, 0 in reverse; -1 when the row is never active.
  int64_t last_step(int64_t b) const {
    const int64_t len = length(b);
    return len == 0 ? -1 : reverse ? 0 : len - 1;
  }
};

// ---- how a call computes ----
// T: state and arithmetic; S: the call's tensors; kBf16Gemm: the step GEMMs on bfloat16 operands (Bf16Gemm) instead
// of StepGemm<T>.
template <typename T_, typename S_, bool kBf16Gemm_>
struct Prec {
  using T = T_;
  using S = S_;
  static constexpr bool kBf16Gemm = kBf16Gemm_;
};
using PrecF64 = Prec<double, double, false>;
using PrecF32 = Prec<float, float, false>;
using PrecF32Bf16Gemm = Prec<float, float, true>;  // float32 with bfloat16 GEMMs (opt-in)
using PrecBf16 = Prec<float, BF16, true>;

// ---- what a cell's pointwise rows see (all pointers at row 0 of step t; a row r is [r * width, (r+1) * width)) ----
template <typename T, typename S = T>
struct FwdRows {
  int64_t H, P;
  int64_t k;       // rows [0, k) continue from hsrc, rows [k, n) start from h0
  const S* gx;     // [B, G*H] input projection of step t (incl. b_ih)
  const T* gh;     // [B, G*H] h_{t-1} W_hh^T; may alias gates or h (a step reads each element before it writes it)
  int64_t ldg;     // gh's row stride: G*H, or kSavedExtra*H where a kNorm cell's gh lies in its saved extra
  const T* bias;   // [G*H] b_hh (zeros without bias)
  const S* hsrc;   // [B, P] out[src(t)]
  const S* h0;     // [B, P]
  T* c;            // [B, H] running cell state: c_{t-1} in, c_t out (kCellState), else null
  S* h;            // [B, H] the new h before any projection
  T* gates;        // [B, kSavedGates*H] saved for backward, or null
  T* extra;        // [B, kSavedExtra*H] saved for backward, or null
  // kNorm only (else null / unused):
  const T* norm;   // [norm_width*H] Norm.params
  const S* mask;   // [B, H] zoneout keep mask of step t, or null: every element keeps `keep`
  T keep;
  const S* hprev(int64_t r) const { return r < k ? hsrc + r * P : h0 + r * P; }  // h_{t-1} of row r
};

template <typename T, typename S = T>
struct BwdRows {
  int64_t H, P;
  int64_t k;            // as in FwdRows
  T* dh;                // [B, H] gradient of the step's new h before any projection (kDirectDh: replaced by the
                        //   part of d h_{t-1} that bypasses W_hh; the walk's GEMM adds the rest)
  const S* d_out;       // [B, H] d_out[t], added to dh by the step unless with_d_out is false (dh already holds it:
  bool with_d_out;      //   a projection's d hbar)
  const S* h;           // [B, P] out[t]
  const T* gates;       // [B, kSavedGates*H] saved at step t
  const T* extra;       // [B, kSavedExtra*H] saved at step t
  const T* extra_src;   // saved extra of step src(t) (kCellState: c_{t-1} for rows < k, its first H columns)
  int64_t lde;          // the saved extra's row stride, kSavedExtra*H
  const T* c0;          // [B, H] (kCellState)
  const S* hsrc;        // [B, P] out[src(t)]
  const S* h0;          // [B, P]
  T* dc;                // [B, H] running cell-state gradient: d c_t in, d c_{t-1} out (kCellState)
  S* d_gx;              // [B, G*H]
  S* d_gh;              // [B, G*H] gradient of gh (kDghDiffers; else the same buffer as d_gx)
  S* hbar;              // [B, H] the pre-projection h, recomputed for d_w_hr (kProjection), else null
  // kNorm only (else null / unused):
  const T* norm;        // [norm_width*H] Norm.params
  const S* mask;        // [B, H] zoneout keep mask of step t, or null: `keep`
  T keep;
  S* d_extra;           // [B, H] Grads.d_extra of step t
  T* d_norm;            // [norm_width*H] the task's partial d Norm.params, which its rows add to
  const S* hprev(int64_t r) const { return r < k ? hsrc + r * P : h0 + r * P; }
  const T* cprev(int64_t r) const { return r < k ? extra_src + r * lde : c0 + r * H; }
};

// ---- raw arguments of one call (recurrence.cpp fills them after its checks; outputs allocated there) ----
template <typename T, typename S = T>
struct ForwardArgs {
  const Walk& w;
  int64_t H, P;
  bool proj, save;       // w_hr given (Cell::kProjection only); saving for backward (an empty tensor's pointer is null)
  const S *gx, *h0, *w_hh, *w_hr;  // w_hr null without projection
  const T* bias;                   // [G*H] b_hh, zeros without it
  S* out;                          // [T, B, P]
  S* h_n;                          // [B, P]
  T* c;                            // [B, H] c0 in, c_n out (kCellState), else null
  T *gates, *extra;                // saved layout, or null when not saving
  T* gh;                           // [B, G*H] scratch when gh has no home in gates or out (see forward_walk)
  S* hbar;                         // [B, H] scratch (projection)
  T* pout;                         // [B, P] scratch (projection, S != T): the projection before rounding to S
  const T* norm;                   // [norm_width*H] Norm.params (kNorm), else null
  const S* mask;                   // [T, B, H] zoneout keep mask (kNorm), or null: `keep`
  T keep;
  // Where step t's gx is when the walk's caller makes gx as the walk goes (layer_forward: in chunks of steps), else
  // null: gx above.
  const std::function<const S*(int64_t)>* gx_of = nullptr;
  const S* gx_at(int64_t t, int64_t row_width) const { return gx_of ? (*gx_of)(t) : gx + t * row_width; }
};

template <typename T, typename S = T>
struct BackwardArgs {
  const Walk& w;
  int64_t H, P;
  bool proj;
  const S *d_out, *h0;
  const T* c0;          // [B, H] (kCellState)
  const S *w_hh, *w_hr, *out;
  const T *gates, *extra;
  T* dh;                // [B, P] d_h_n in, d_h0 out
  T* dc;                // [B, H] d_c_n in, d_c0 out (kCellState)
  S* d_gx;              // [T, B, G*H]
  S* d_gh;              // [T, B, G*H] (kDghDiffers), else null: d_gx reaches W_hh
  T* d_w_hh;            // [G*H, P]
  T* d_w_hr;            // [P, H] (projection)
  S *dhfull, *hbar;     // [T, B, P], [T, B, H] scratch (projection)
  T* dhbar;             // [B, H] scratch (projection)
  S* dg0;               // [B, G*H] scratch
  const T* norm;        // [norm_width*H] Norm.params (kNorm), else null
  const S* mask;        // [T, B, H] zoneout keep mask (kNorm), or null: `keep`
  T keep;
  S* d_extra;           // [T, B, H] Grads.d_extra (kNorm), else null
  T* d_norm;            // [norm_width*H] d Norm.params (kNorm), else null
  // d_w_hh [G*H, P] in the call's own type, written in place of d_w_hh when given: a bfloat16 walk of one step whose
  // B rows has_small_bf16_gemm takes (recurrence_backward decides), else null
  S* d_w_hh_s = nullptr;
};

// ---- helpers of the walk ----

// gh[0:n] = h_{t-1} @ w^T for the n rows of step t: rows [0, k) from hsrc (out[src]), rows [k, n) from h0.
template <typename T>
inline void gemm_prev(const StepGemm<T>& w, const T* hsrc, const T* h0, int64_t k, int64_t n, int64_t P, T* gh,
                      int64_t ldg) {
  if (k > 0) w(k, hsrc, P, T(0), gh, ldg);
  if (n > k) w(n - k, h0 + k * P, P, T(0), gh + k * ldg, ldg);
}

// gemm_prev for rows [r0, r1) only: a thread runs the GEMM of its block of rows and then that block's pointwise
// pass, so a step is one parallel region instead of MKL's threading followed by a second region.
template <typename T>
inline void gemm_prev_rows(const StepGemm<T>& w, const T* hsrc, const T* h0, int64_t k, int64_t r0, int64_t r1,
                           int64_t P, T* gh, int64_t ldg) {
  const int64_t a1 = std::min(r1, k);
  if (a1 > r0) w(a1 - r0, hsrc + r0 * P, P, T(0), gh + r0 * ldg, ldg);
  const int64_t b0 = std::max(r0, k);
  if (r1 > b0) w(r1 - b0, h0 + b0 * P, P, T(0), gh + b0 * ldg, ldg);
}

// Rows per block when a block does its own GEMM (2*K*N flops a row) and pointwise pass: about 2^18 flops.
inline int64_t fused_grain(int64_t K, int64_t N) {
  return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(2 * K * N, 1));
}

// Whether a step of n rows runs as row blocks that each do their GEMM and pointwise pass (one parallel region),
// or as one GEMM threaded by MKL followed by a parallel pointwise pass. Measured at 2 threads (LSTM): below
// 2^24 flops a step the blocks win (H=64, B=64: 0.72x -> 1.03x torch); above, MKL's own split of a large GEMM
// beats rows split in two (B=16, H=512: 1.19x with MKL, 0.86x with blocks).
inline bool row_blocks(int64_t n, int64_t K, int64_t N) { return n * 2 * K * N < (int64_t(1) << 24); }

// Rows per parallel chunk so that a chunk carries enough pointwise work to pay for waking a thread.
inline int64_t row_grain(int64_t per_row) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(per_row, 1)); }

template <typename T>
inline void zero_rows(T* p, int64_t from, int64_t to, int64_t width) {
  if (to > from && width > 0) std::fill(p + from * width, p + to * width, T(0));
}

// d_w[GH,P] = sum over steps and rows of dg[t,b]^T h_{t-1}[b]: two GEMMs over all T*B rows (rows a step does not
// touch hold zeros in dg and in out). dg: [T,B,GH] with row stride ldg; dg0: [B,GH] scratch. S operands (bfloat16:
// MKL's bfloat16 GEMM), T accumulation. d_w_s: d_w in S instead (one step, bfloat16: small_k_gemm_bf16), else null.
template <typename T, typename S>
inline void weight_grad(const Walk& w, const S* dg, int64_t ldg, const S* out, const S* h0, int64_t GH, int64_t P,
                        S* dg0, T* d_w, S* d_w_s = nullptr) {
  const int64_t T_ = w.T, B = w.B;
  if (GH == 0 || P == 0) return;  // d_w is empty
  if constexpr (std::is_same_v<S, BF16>) {
    if (d_w_s != nullptr) {  // one step: every row starts from h0, so d_w = dg[0]^T h0, one GEMM rounded once
      TORCH_INTERNAL_ASSERT(T_ == 1 && w.bs[0] == B, "fastrnn: a weight gradient in bfloat16 is one full step's");
      return small_k_gemm_bf16(GH, P, B, dg, ldg, h0, P, d_w_s, P);
    }
  }
  // Rows that continue: forward pairs dg[1:] with out[:-1], reverse pairs dg[:-1] with out[1:]; a row that
  // starts from h0 at step t meets a zero row of out there, so it contributes nothing.
  T beta = T(0);
  if (T_ > 1 && B > 0) {
    const S* g = w.reverse ? dg : dg + B * ldg;
    const S* h = w.reverse ? out + B * P : out;
    gemm(true, false, GH, P, (T_ - 1) * B, T(1), g, ldg, h, P, T(0), d_w, P);
    beta = T(1);
  }
  // Rows that start from h0: gather each row's gradient at its first step.
  for (int64_t b = 0; b < B; ++b) {
    const int64_t s = w.first_step(b);
    S* dst = dg0 + b * GH;
    if (s < 0) {
      std::fill(dst, dst + GH, S(0));
    } else {
      const S* src = dg + (s * B + b) * ldg;
      std::copy(src, src + GH, dst);
    }
  }
  if (B > 0) gemm(true, false, GH, P, B, T(1), dg0, GH, h0, P, beta, d_w, P);
  else std::fill(d_w, d_w + GH * P, T(0));
}

// h_n[b]: each row's state at its last step, h0 for rows never active.
template <typename S>
inline void final_state(const Walk& w, const S* out, const S* h0, int64_t P, S* h_n) {
  if (P == 0) return;
  for (int64_t b = 0; b < w.B; ++b) {
    const int64_t t = w.last_step(b);
    const S* src = t < 0 ? h0 + b * P : out + (t * w.B + b) * P;
    std::copy(src, src + P, h_n + b * P);
  }
}

// dst[r, c0:c1] = src[r, c0:c1] rounded to S, rows [r0, r1).
template <typename T, typename S>
inline void store_rows(const T* src, S* dst, int64_t ld, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  for (int64_t r = r0; r < r1; ++r)
    vec_range<T>(c0, c1, [&](int64_t j, int64_t cnt) { vstore(vload(src + r * ld + j, cnt), dst + r * ld + j, cnt); });
}

// ---- the normalised cells' rows (ln_lstm.cpp, ln_gru.cpp): N(v) = (v - mean v) / sqrt(var v + eps) over a row ----

constexpr double kNormEps = 1e-5;  // reference.EPS

// Norm.params' length in units of H (cells.py norm_width): ln_hh and b_hh (G*H each), then ln_c and b_c (H each) for a
// cell with a cell state; 0 for a cell without normalisation.
template <typename Cell>
constexpr int64_t norm_width() {
  return Cell::kNorm ? 2 * Cell::G + (Cell::kCellState ? 2 : 0) : 0;
}

// The sum of a vector's lanes.
template <typename T>
inline T hsum(const Vec<T>& v) {
  T tmp[Vec<T>::size()];
  v.store(tmp);
  T s = T(0);
  for (int64_t i = 0; i < Vec<T>::size(); ++i) s += tmp[i];
  return s;
}

// v with the lanes [cnt, size) zeroed: a vec_range tail's lanes past the row, before they enter a row's sum.
template <typename T>
inline Vec<T> vhead(const Vec<T>& v, int64_t cnt) {
  return cnt == Vec<T>::size() ? v : Vec<T>::set(Vec<T>(T(0)), v, cnt);
}

// A row's layer-norm statistics: mean and 1 / sqrt(biased variance + eps) (two passes, as reference._norm).
template <typename T>
struct RowStats {
  T mu, rstd;
  Vec<T> hat(const Vec<T>& v) const { return (v - Vec<T>(mu)) * Vec<T>(rstd); }  // N(v) of these lanes
};

template <typename T>
inline RowStats<T> row_stats(const T* v, int64_t n) {
  if (n <= 0) return {T(0), T(1) / std::sqrt(T(kNormEps))};
  Vec<T> acc(T(0));
  vec_range<T>(0, n, [&](int64_t j, int64_t cnt) { acc = acc + vload(v + j, cnt); });  // a short load is zero-filled
  const T mu = hsum(acc) / T(n);
  const Vec<T> m(mu);
  Vec<T> sq(T(0));
  vec_range<T>(0, n, [&](int64_t j, int64_t cnt) {
    const Vec<T> d = vhead(vload(v + j, cnt) - m, cnt);
    sq = sq + d * d;
  });
  return {mu, T(1) / std::sqrt(hsum(sq) / T(n) + T(kNormEps))};
}

// The sums a layer norm's backward needs (reference._norm_bwd): sum dy and sum dy * N(v) over a row, gathered piece
// by piece; then dv = rstd * (dy - mean dy - N(v) * mean(dy N(v))).
template <typename T>
struct NormBack {
  Vec<T> s1{T(0)}, s2{T(0)};
  void add(const Vec<T>& dy, const Vec<T>& vhat, int64_t cnt) {
    const Vec<T> d = vhead(dy, cnt);
    s1 = s1 + d;
    s2 = s2 + d * vhead(vhat, cnt);
  }
  struct Means {
    Vec<T> dy, dyhat, rstd;
    Vec<T> dv(const Vec<T>& dy_, const Vec<T>& vhat) const { return rstd * (dy_ - dy - vhat * dyhat); }
  };
  Means means(int64_t n, T rstd) const {
    const T inv = n > 0 ? T(1) / T(n) : T(0);
    return {Vec<T>(hsum(s1) * inv), Vec<T>(hsum(s2) * inv), Vec<T>(rstd)};
  }
};

// A normalised cell's last pass over a row of raw = h_{t-1} W_hh^T [G*H], where ah = gain * N(raw) + bias and d ah is
// given by gate blocks (block q at dah[q], H wide): d raw into draw through the layer norm's backward (nb: its sums
// of d N(raw) = d ah * gain, gathered by the passes before; rs: raw's statistics), and the row's share of d gain
// (+= d ah * N(raw)) and d bias (+= d ah) added to the task's partial sums.
template <typename T, typename S>
inline void norm_back_row(const NormBack<T>& nb, const RowStats<T>& rs, int64_t G, int64_t H, const S* const* dah,
                          const T* gain, const T* raw, S* draw, T* d_gain, T* d_bias) {
  const auto mn = nb.means(G * H, rs.rstd);
  for (int64_t q = 0; q < G; ++q) {
    vec_range<T>(0, H, [&](int64_t j, int64_t n) {
      const int64_t e = q * H + j;
      const Vec<T> d = vload(dah[q] + j, n), hat = rs.hat(vload(raw + e, n));
      vstore(mn.dv(d * vload(gain + e, n), hat), draw + e, n);
      vstore(vload(d_gain + e, n) + d * hat, d_gain + e, n);
      vstore(vload(d_bias + e, n) + d, d_bias + e, n);
    });
  }
}

// ---- the BLAS schedule's tasks over the rows of a step ----

// Rows [0, n) cut as at::parallel_for(0, n, grain) cuts them (at most a chunk a thread, chunks of equal size but the
// last), each chunk with its index: a task index names the same rows whichever thread runs it, so sums a task gathers
// in its own buffer come out the same run to run (for a given thread count).
// threads: at::get_num_threads(), read once per call; the tasks number at most that.
struct RowTasks {
  int64_t count, rows;  // tasks, rows per task but the last
};

inline RowTasks row_tasks(int64_t n, int64_t grain, int64_t threads) {
  if (n <= 0) return {0, 1};
  const int64_t count = n <= grain || threads <= 1 || at::in_parallel_region()
                            ? 1
                            : std::min(threads, (n + grain - 1) / grain);
  const int64_t rows = (n + count - 1) / count;
  return {(n + rows - 1) / rows, rows};
}

// body(r0, r1, task) for every task of row_tasks(n, grain, threads), over the threads.
template <typename F>
inline void run_row_tasks(int64_t n, int64_t grain, int64_t threads, const F& body) {
  const RowTasks rt = row_tasks(n, grain, threads);
  at::parallel_for(0, rt.count, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) body(i * rt.rows, std::min(n, (i + 1) * rt.rows), i);
  });
}

// ---- the bfloat16-GEMM schedule: a step's region is tasks of one block of hidden units (Bf16Gemm::kBlock columns
// of every gate) x one chunk of rows ----

// A's rows for Bf16Gemm::run: [0, k) at lo, the rest at hi, row stride ld; staged once when the GEMM needs it.
struct GemmRows {
  const BF16 *lo, *hi;
  int64_t k, ld;
};

template <typename S>
inline GemmRows gemm_rows(const Bf16Gemm& g, const S* lo, const S* hi, int64_t k, int64_t n, int64_t ld) {
  if constexpr (std::is_same_v<S, BF16>) {
    if (!g.stages(false)) return {lo, hi, k, ld};
  }
  if (n == 0) return {nullptr, nullptr, 0, ld};
  const BF16* p = g.stage(lo, hi, k, n, ld);
  return {p, p, n, g.staged_ld()};
}

// Packing W for AMX costs about two passes over it; a single step of few rows (a cell, T = 1) reads W once either
// way, so it runs on W as it is.
inline bool repays_packing(const Walk& w) { return w.T > 1 || w.B >= 32; }

// MKL's packed copy of W (StepGemm) costs a pass over W; a single step (a Cell, T = 1) reads W once, so it runs on
// W as it is (LSTMCell B=16 H=512: the pack alone was a third of the call).
inline bool packs_w(const Walk& w) { return w.T > 1; }

// A thread's share of a region should carry about this many flops: waking a thread costs a few microseconds, and AMX
// runs 2^20 flops in about one.
constexpr int64_t kTaskFlops = int64_t(1) << 21;
// What reading one byte of a task's W block costs, in flops of the same time: AMX's ~1 TFLOP/s a core against its L2's
// ~100 GB/s. A block's bytes (K x its columns in bfloat16) equal its flops per row, so a task of `rows` rows costs
// flops_per_row * (rows + kWeightByteFlops). Counting flops alone ran a B = 1 step on one thread: LSTM H=512 read
// all 2 MB of packed W_hh from one core's 2 MB L2 each step (40 us a step, against 11 us split over both cores).
constexpr int64_t kWeightByteFlops = 10;

struct UnitTasks {
  int64_t nb, rows, n, count, grain;  // unit blocks, rows per chunk, rows in all, tasks, tasks per thread at least
  // task i: rows [r0, r1) of unit block b; consecutive tasks share a chunk of rows, so a thread keeps its blocks of W
  void at(int64_t i, int64_t& r0, int64_t& r1, int64_t& b) const {
    b = i % nb;
    r0 = (i / nb) * rows;
    r1 = std::min(n, r0 + rows);
  }
};

// Tasks for n rows and nb unit blocks, each block-row costing flops_per_row: rows are split only when there are fewer
// blocks than threads, into chunks of 16 rows or more (an AMX tile's height).
inline UnitTasks unit_tasks(int64_t n, int64_t nb, int64_t flops_per_row) {
  if (n <= 0 || nb <= 0) return {std::max<int64_t>(nb, 1), 1, 0, 0, 1};
  const int64_t threads = at::get_num_threads();
  int64_t chunks = 1;
  if (nb < threads) chunks = std::max<int64_t>(1, std::min(threads / nb, n / 16));
  const int64_t rows = (n + chunks - 1) / chunks;
  chunks = (n + rows - 1) / rows;
  const int64_t cost = flops_per_row * (rows + kWeightByteFlops);
  const int64_t grain = std::max<int64_t>(1, kTaskFlops / std::max<int64_t>(cost, 1));
  return {nb, rows, n, nb * chunks, grain};
}

// body(r0, r1, b) for every task of ut (rows [r0, r1) of unit block b), over the threads; a thread ends its use of
// g's AMX tiles once its share of the region is done.
template <typename F>
inline void run_tasks(const UnitTasks& ut, const Bf16Gemm& g, const F& body) {
  at::parallel_for(0, ut.count, ut.grain, [&](int64_t i0, int64_t i1) {
    for (int64_t task = i0; task < i1; ++task) {
      int64_t r0, r1, b;
      ut.at(task, r0, r1, b);
      body(r0, r1, b);
    }
    g.release();
  });
}

// ---- the walk ----

// Where a step's gh = h_{t-1} W_hh^T goes: into the saved extra of a normalised cell (which saves it as raw_t), into
// the saved gates of step t when they have gh's layout, or into the new h of a one-gate cell without projection whose
// out has gh's type, the step activating it in place there; else into a scratch [B, G*H]. (recurrence.cpp allocates
// the scratch from the same rules.)
constexpr bool gh_in_gates(int64_t G, int64_t saved_gates) { return saved_gates == G; }
constexpr bool gh_in_h(int64_t G, bool proj, bool same_type) { return G == 1 && !proj && same_type; }
// A normalised cell saves raw_t = gh itself (extra's columns [H, (G+1)H)): when saving, the GEMM writes it there.
constexpr bool gh_in_extra(bool norm) { return norm; }

template <typename Cell, typename Pr>
void forward_walk(const ForwardArgs<typename Pr::T, typename Pr::S>& a) {
  using T = typename Pr::T;
  using S = typename Pr::S;
  constexpr bool kSame = std::is_same_v<S, T>;
  constexpr int64_t G = Cell::G, kB = Bf16Gemm::kBlock;
  const Walk& w = a.w;
  const int64_t B = w.B, H = a.H, P = a.P, GH = G * H, WG = Cell::kSavedGates * H, WE = Cell::kSavedExtra * H;
  const bool proj = Cell::kProjection && a.proj;
  // gh's row stride: a kNorm cell's saved extra holds raw_t = gh after its first H columns
  const int64_t ldg = gh_in_extra(Cell::kNorm) && a.save ? WE : GH;
  auto step_ptrs = [&](int64_t t, S*& ot, S*& hdst, T*& st, T*& et, T*& gh) {
    ot = a.out + t * B * P;
    hdst = proj ? a.hbar : ot;
    st = a.save && WG ? a.gates + t * B * WG : nullptr;
    et = a.save && WE ? a.extra + t * B * WE : nullptr;
    if constexpr (gh_in_extra(Cell::kNorm)) {
      gh = a.save ? et + H : a.gh;
    } else {
      gh = gh_in_gates(G, Cell::kSavedGates) && a.save ? st : a.gh;
      if constexpr (kSame) {
        if (!(gh_in_gates(G, Cell::kSavedGates) && a.save) && gh_in_h(G, proj, true)) gh = hdst;
      }
    }
  };
  auto mask_of = [&](int64_t t) -> const S* { return Cell::kNorm && a.mask ? a.mask + t * B * H : nullptr; };
  if constexpr (Pr::kBf16Gemm) {
    static_assert(!Cell::kNorm, "a normalised cell needs whole rows: it has no bfloat16-GEMM schedule");
    const bool pack = repays_packing(w);
    const Bf16Gemm whh(a.w_hh, true, GH, P, H, pack), whr(a.w_hr, true, proj ? P : 0, H, P, pack);
    for (int64_t i = 0; i < w.T; ++i) {
      const int64_t t = w.step(i), n = w.bs[t], k = w.prev_rows(t);
      const S* hsrc = k > 0 ? a.out + w.src(t) * B * P : nullptr;
      S *ot, *hdst;
      T *st, *et, *gh;
      step_ptrs(t, ot, hdst, st, et, gh);
      const FwdRows<T, S> s{H, P, k, a.gx_at(t, B * GH), gh, GH, a.bias, hsrc, a.h0, a.c, hdst, st, et,
                            nullptr, nullptr, T(1)};
      const GemmRows A = gemm_rows(whh, hsrc, a.h0, k, n, P);
      const UnitTasks ut = unit_tasks(n, whh.blocks(), 2 * P * G * kB);
      run_tasks(ut, whh, [&](int64_t r0, int64_t r1, int64_t b) {
        for (int64_t q = 0; q < G; ++q)
          whh.run(A.lo, A.hi, A.k, A.ld, r0, r1, whh.col0(q, b), whh.col1(q, b), false, gh, GH);
        Cell::forward_rows(s, r0, r1, whh.col0(0, b), whh.col1(0, b));
      });
      if (proj) {
        T* pdst;
        if constexpr (kSame) pdst = ot;
        else pdst = a.pout;
        const GemmRows Ah = gemm_rows(whr, a.hbar, a.hbar, n, n, H);
        const UnitTasks pt = unit_tasks(n, whr.blocks(), 2 * H * kB);
        run_tasks(pt, whr, [&](int64_t r0, int64_t r1, int64_t b) {
          whr.run(Ah.lo, Ah.hi, Ah.k, Ah.ld, r0, r1, whr.col0(0, b), whr.col1(0, b), false, pdst, P);
          if constexpr (!kSame) store_rows(pdst, ot, P, r0, r1, whr.col0(0, b), whr.col1(0, b));
        });
      }
      zero_rows(ot, n, B, P);
      if (st) zero_rows(st, n, B, WG);
      if (et) zero_rows(et, n, B, WE);
    }
  } else {
    static_assert(kSame, "BLAS GEMMs run on the state's own type");
    const int64_t pm = packs_w(w) ? B : 0;  // rows MKL packs W for, 0: W as it is
    const StepGemm<T> whh(a.w_hh, true, GH, P, pm), whr(a.w_hr, true, P, H, proj ? pm : 0);
    for (int64_t i = 0; i < w.T; ++i) {
      const int64_t t = w.step(i), n = w.bs[t], k = w.prev_rows(t);
      const T* hsrc = k > 0 ? a.out + w.src(t) * B * P : nullptr;
      T *ot, *hdst, *st, *et, *gh;
      step_ptrs(t, ot, hdst, st, et, gh);
      const FwdRows<T> s{H, P, k, a.gx_at(t, B * GH), gh, ldg, a.bias, hsrc, a.h0, a.c, hdst, st, et,
                         a.norm, mask_of(t), a.keep};
      if (row_blocks(n, P, GH)) {
        at::parallel_for(0, n, fused_grain(P, GH), [&](int64_t r0, int64_t r1) {
          gemm_prev_rows(whh, hsrc, a.h0, k, r0, r1, P, gh, ldg);
          Cell::forward_rows(s, r0, r1, 0, H);
        });
      } else {
        gemm_prev(whh, hsrc, a.h0, k, n, P, gh, ldg);
        at::parallel_for(0, n, row_grain(Cell::kRowWork * H), [&](int64_t r0, int64_t r1) {
          Cell::forward_rows(s, r0, r1, 0, H);
        });
      }
      if (proj) whr(n, a.hbar, H, T(0), ot, P);
      zero_rows(ot, n, B, P);
      if (st) zero_rows(st, n, B, WG);
      if (et) zero_rows(et, n, B, WE);
    }
  }
  final_state(w, a.out, a.h0, P, a.h_n);
}

template <typename Cell, typename Pr>
void backward_walk(const BackwardArgs<typename Pr::T, typename Pr::S>& a) {
  using T = typename Pr::T;
  using S = typename Pr::S;
  static_assert(!(Cell::kProjection && Cell::kDirectDh), "a direct d h_{t-1} would live in P-space with a projection");
  static_assert(!Cell::kCellState || Cell::kSavedExtra == 1 || Cell::kNorm,
                "a cell state is saved as extra c_t [T, B, H] (a normalised cell's: its first H columns)");
  constexpr int64_t G = Cell::G, kB = Bf16Gemm::kBlock;
  const Walk& w = a.w;
  const int64_t B = w.B, H = a.H, P = a.P, GH = G * H, WG = Cell::kSavedGates * H, WE = Cell::kSavedExtra * H;
  const bool proj = Cell::kProjection && a.proj;
  S* const d_gh = Cell::kDghDiffers ? a.d_gh : a.d_gx;  // what reaches W_hh and b_hh
  auto rows_of = [&](int64_t t, int64_t k) {
    const S* src_out = k > 0 ? a.out + w.src(t) * B * P : nullptr;
    const T* src_extra = k > 0 ? a.extra + w.src(t) * B * WE : nullptr;
    const S* mask = Cell::kNorm && a.mask ? a.mask + t * B * H : nullptr;
    S* d_extra = Cell::kNorm ? a.d_extra + t * B * H : nullptr;
    return BwdRows<T, S>{H, P, k, proj ? a.dhbar : a.dh, a.d_out + t * B * P, !proj, a.out + t * B * P,
                         a.gates + t * B * WG, a.extra + t * B * WE, src_extra, WE, a.c0, src_out, a.h0, a.dc,
                         a.d_gx + t * B * GH, d_gh + t * B * GH, proj ? a.hbar + t * B * H : nullptr,
                         a.norm, mask, a.keep, d_extra, nullptr};
  };
  auto zero_step = [&](int64_t t, int64_t n) {
    zero_rows(a.d_gx + t * B * GH, n, B, GH);
    if (Cell::kDghDiffers) zero_rows(d_gh + t * B * GH, n, B, GH);
    if (Cell::kNorm) zero_rows(a.d_extra + t * B * H, n, B, H);
    if (proj) zero_rows(a.hbar + t * B * H, n, B, H);
  };
  if constexpr (Pr::kBf16Gemm) {
    static_assert(!Cell::kNorm, "a normalised cell needs whole rows: it has no bfloat16-GEMM schedule");
    // d h_{t-1} = d_gh_t W_hh (+ the direct part kDirectDh left in dh) runs in the next step's region: a task first
    // forms the columns of d h its units need, from the rows of the step walked before ("pending").
    const bool pack = repays_packing(w);
    const Bf16Gemm whh(a.w_hh, false, P, GH, P, pack), whr(a.w_hr, false, proj ? H : 0, P, H, pack);
    const S* pend = nullptr;
    int64_t pend_n = 0;
    auto pending = [&](const GemmRows& A, int64_t r0, int64_t r1, int64_t b) {
      whh.run(A.lo, A.hi, A.k, A.ld, r0, std::min(r1, pend_n), whh.col0(0, b), whh.col1(0, b), Cell::kDirectDh, a.dh,
              P);
    };
    for (int64_t i = w.T - 1; i >= 0; --i) {
      const int64_t t = w.step(i), n = w.bs[t], k = w.prev_rows(t);
      const BwdRows<T, S> s = rows_of(t, k);
      const GemmRows A = gemm_rows(whh, pend, pend, pend_n, pend_n, GH);
      const UnitTasks ut = unit_tasks(std::max(n, pend_n), whh.blocks(), 2 * GH * kB);
      if (proj) {
        // the projected output's gradient, kept for d_w_hr, then taken back through w_hr for the units' pass
        S* dhf = a.dhfull + t * B * P;
        const S* dot = a.d_out + t * B * P;
        run_tasks(ut, whh, [&](int64_t r0, int64_t r1, int64_t b) {
          pending(A, r0, r1, b);
          for (int64_t r = r0; r < std::min(r1, n); ++r)
            vec_range<T>(whh.col0(0, b), whh.col1(0, b), [&](int64_t j, int64_t cnt) {
              vstore(vload(a.dh + r * P + j, cnt) + vload(dot + r * P + j, cnt), dhf + r * P + j, cnt);
            });
        });
        zero_rows(dhf, n, B, P);
        const GemmRows D = gemm_rows(whr, dhf, dhf, n, n, P);
        const UnitTasks ht = unit_tasks(n, whr.blocks(), 2 * P * kB);
        run_tasks(ht, whr, [&](int64_t r0, int64_t r1, int64_t b) {
          whr.run(D.lo, D.hi, D.k, D.ld, r0, r1, whr.col0(0, b), whr.col1(0, b), false, a.dhbar, H);
          Cell::backward_rows(s, r0, r1, whr.col0(0, b), whr.col1(0, b));
        });
      } else {
        run_tasks(ut, whh, [&](int64_t r0, int64_t r1, int64_t b) {
          pending(A, r0, r1, b);
          Cell::backward_rows(s, r0, std::min(r1, n), whh.col0(0, b), whh.col1(0, b));
        });
      }
      pend = d_gh + t * B * GH;
      pend_n = n;
      zero_step(t, n);
    }
    // the first step's GEMM: d h0
    const GemmRows A = gemm_rows(whh, pend, pend, pend_n, pend_n, GH);
    const UnitTasks ut = unit_tasks(pend_n, whh.blocks(), 2 * GH * kB);
    run_tasks(ut, whh, [&](int64_t r0, int64_t r1, int64_t b) { pending(A, r0, r1, b); });
  } else {
    static_assert(std::is_same_v<S, T>, "BLAS GEMMs run on the state's own type");
    const T beta = Cell::kDirectDh ? T(1) : T(0);  // the GEMM adds to the step's direct part, or replaces dh
    const int64_t pm = packs_w(w) ? B : 0;
    const StepGemm<T> whh(a.w_hh, false, P, GH, pm), whr(a.w_hr, false, H, P, proj ? pm : 0);
    // d Norm.params: each task of a step adds its rows' shares to the buffer of its index (row_tasks), summed in index
    // order at the end, so the result does not depend on which thread ran what
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads()), NW = norm_width<Cell>() * H;
    const int64_t ldn = (NW + 15) / 16 * 16;  // tasks' buffers a cache line apart or more
    std::vector<T> d_norm_parts(threads * ldn, T(0));
    for (int64_t i = w.T - 1; i >= 0; --i) {
      const int64_t t = w.step(i), n = w.bs[t], k = w.prev_rows(t);
      const T* dot = a.d_out + t * B * P;
      T* dgt = d_gh + t * B * GH;
      if (proj) {
        // gradient of the projected output, kept for d_w_hr, then taken back through w_hr
        T* dhf = a.dhfull + t * B * P;
        for (int64_t e = 0; e < n * P; ++e) dhf[e] = a.dh[e] + dot[e];
        zero_rows(dhf, n, B, P);
        whr(n, dhf, P, T(0), a.dhbar, H);
      }
      const BwdRows<T> s = rows_of(t, k);
      const bool blocks = row_blocks(n, GH, P);
      const int64_t grain = blocks ? fused_grain(GH, P) : row_grain(Cell::kRowWork * H);
      run_row_tasks(n, grain, threads, [&](int64_t r0, int64_t r1, int64_t task) {
        if constexpr (Cell::kNorm) {
          BwdRows<T> st = s;
          st.d_norm = d_norm_parts.data() + task * ldn;
          Cell::backward_rows(st, r0, r1, 0, H);
        } else {
          Cell::backward_rows(s, r0, r1, 0, H);
        }
        if (blocks) whh(r1 - r0, dgt + r0 * GH, GH, beta, a.dh + r0 * P, P);  // d h_{t-1} of these rows
      });
      if (!blocks) whh(n, dgt, GH, beta, a.dh, P);
      zero_step(t, n);
    }
    if constexpr (Cell::kNorm) {
      std::copy(d_norm_parts.begin(), d_norm_parts.begin() + NW, a.d_norm);
      for (int64_t task = 1; task < threads; ++task) {
        const T* part = d_norm_parts.data() + task * ldn;
        vec_range<T>(0, NW, [&](int64_t j, int64_t n) {
          vstore(vload(a.d_norm + j, n) + vload(part + j, n), a.d_norm + j, n);
        });
      }
    }
  }
  weight_grad(w, d_gh, GH, a.out, a.h0, GH, P, a.dg0, a.d_w_hh, a.d_w_hh_s);
  if (proj) gemm(true, false, P, H, w.T * B, T(1), a.dhfull, P, a.hbar, H, T(0), a.d_w_hr, H);
}

// ---- one cell's entry in the kernel table (recurrence.cpp), indexed by kernel_id ----

// A cell's walks of one direction (Args: ForwardArgs or BackwardArgs) in the four precisions of a call, null where the
// cell has none (a normalised cell's bfloat16-GEMM ones; the entry points refuse those calls first).
template <template <typename, typename> class Args>
struct Walks {
  void (*f64)(const Args<double, double>&);
  void (*f32)(const Args<float, float>&);
  void (*f32_bf16_gemm)(const Args<float, float>&);  // float32, bfloat16 GEMMs
  void (*bf16)(const Args<float, BF16>&);

  // The walk of precision Pr (walk.h's Prec) on a.
  template <typename Pr>
  void run(const Args<typename Pr::T, typename Pr::S>& a) const {
    const auto fn = [this] {
      if constexpr (std::is_same_v<Pr, PrecF64>) return f64;
      else if constexpr (std::is_same_v<Pr, PrecF32>) return f32;
      else if constexpr (std::is_same_v<Pr, PrecF32Bf16Gemm>) return f32_bf16_gemm;
      else return bf16;
    }();
    TORCH_INTERNAL_ASSERT(fn != nullptr, "fastrnn: no kernel of this precision for the cell");
    fn(a);
  }
};

struct CellKernels {
  int64_t id;
  const char* name;
  int64_t G, saved_gates, saved_extra;
  bool cell_state, projection, dgh_differs;
  bool norm;           // layer-normalised with zoneout: takes Norm.params and a keep mask, returns d_extra
  int64_t norm_width;  // Norm.params [norm_width * H] (cells.py norm_width), 0 without norm
  Walks<ForwardArgs> forward;
  Walks<BackwardArgs> backward;
};

// The walks of one precision, or null where the cell has none (kNorm on the bfloat16-GEMM schedule).
template <typename Cell, typename Pr>
constexpr auto forward_fn() -> void (*)(const ForwardArgs<typename Pr::T, typename Pr::S>&) {
  if constexpr (Cell::kNorm && Pr::kBf16Gemm) return nullptr;
  else return &forward_walk<Cell, Pr>;
}
template <typename Cell, typename Pr>
constexpr auto backward_fn() -> void (*)(const BackwardArgs<typename Pr::T, typename Pr::S>&) {
  if constexpr (Cell::kNorm && Pr::kBf16Gemm) return nullptr;
  else return &backward_walk<Cell, Pr>;
}

template <typename Cell>
CellKernels make_kernels() {
  return {Cell::kId,
          Cell::kName,
          Cell::G,
          Cell::kSavedGates,
          Cell::kSavedExtra,
          Cell::kCellState,
          Cell::kProjection,
          Cell::kDghDiffers,
          Cell::kNorm,
          norm_width<Cell>(),
          {forward_fn<Cell, PrecF64>(), forward_fn<Cell, PrecF32>(), forward_fn<Cell, PrecF32Bf16Gemm>(),
           forward_fn<Cell, PrecBf16>()},
          {backward_fn<Cell, PrecF64>(), backward_fn<Cell, PrecF32>(), backward_fn<Cell, PrecF32Bf16Gemm>(),
           backward_fn<Cell, PrecBf16>()}};
}

// Defined by the per-cell sources.
const CellKernels& lstm_kernels();
const CellKernels& gru_kernels();
const CellKernels& rnn_tanh_kernels();
const CellKernels& rnn_relu_kernels();
const CellKernels& ln_lstm_kernels();
const CellKernels& ln_gru_kernels();
// The kernel table's entry for cells.py's kernel_id (recurrence.cpp); a RuntimeError for an unknown id.
const CellKernels& kernels_for(int64_t cell_id);

}  // namespace fastrnn
