// The time walk, written once for every cell: steps in order or reversed, packed rows (batch_sizes), rows joining
// from h0, final states, the backward walk and the weight-gradient GEMMs (cells.py: steps, prev_rows; the
// reference backend's forward/backward). A cell is a policy type (lstm.cpp, gru.cpp, rnn.cpp) that supplies only its
// pointwise forward and backward rows and describes its layout:
//
//   struct Cell {
//     static constexpr int64_t kId;                 // cells.py kernel_id
//     static constexpr const char* kName;           // cells.py name
//     static constexpr int64_t G;                   // gates: gh = h_{t-1} W_hh^T is [B, G*H]
//     static constexpr int64_t kSavedGates, kSavedExtra;  // cells.py saved_widths, in multiples of H
//     static constexpr bool kCellState;             // a second state c [B, H]; its saved extra is c_t [B, H]
//     static constexpr bool kProjection;            // takes w_hr [P, H] (h = hbar W_hr^T)
//     static constexpr bool kDghDiffers;            // the gradient reaching W_hh/b_hh differs from d_gx
//     static constexpr bool kDirectDh;              // part of d h_{t-1} bypasses W_hh (backward_rows writes it)
//     static constexpr int64_t kRowWork;            // pointwise cost of a row in units of H (parallel grain)
//     template <typename T> static void forward_rows(const FwdRows<T>&, int64_t r0, int64_t r1);
//     template <typename T> static void backward_rows(const BwdRows<T>&, int64_t r0, int64_t r1);
//   };
//
// Per step the serial work is one GEMM and one fused pointwise pass; a small step runs as row blocks that each do
// their own GEMM and pointwise pass in one parallel region (row_blocks).
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

// ---- what a cell's pointwise rows see (all pointers at row 0 of step t; a row r is [r * width, (r+1) * width)) ----
template <typename T>
struct FwdRows {
  int64_t H, P;
  int64_t k;       // rows [0, k) continue from hsrc, rows [k, n) start from h0
  const T* gx;     // [B, G*H] input projection of step t (incl. b_ih)
  const T* gh;     // [B, G*H] h_{t-1} W_hh^T; may alias gates or h (a step reads each element before it writes it)
  const T* bias;   // [G*H] b_hh (zeros without bias)
  const T* hsrc;   // [B, P] out[src(t)]
  const T* h0;     // [B, P]
  T* c;            // [B, H] running cell state: c_{t-1} in, c_t out (kCellState), else null
  T* h;            // [B, H] the new h before any projection
  T* gates;        // [B, kSavedGates*H] saved for backward, or null
  T* extra;        // [B, kSavedExtra*H] saved for backward, or null
  const T* hprev(int64_t r) const { return r < k ? hsrc + r * P : h0 + r * P; }  // h_{t-1} of row r
};

template <typename T>
struct BwdRows {
  int64_t H, P;
  int64_t k;            // as in FwdRows
  T* dh;                // [B, H] gradient of the step's new h before any projection (kDirectDh: replaced by the
                        //   part of d h_{t-1} that bypasses W_hh; the walk's GEMM adds the rest)
  const T* d_out;       // [B, H] d_out[t], added to dh by the step unless with_d_out is false (dh already holds it:
  bool with_d_out;      //   a projection's d hbar)
  const T* h;           // [B, P] out[t]
  const T* gates;       // [B, kSavedGates*H] saved at step t
  const T* extra;       // [B, kSavedExtra*H] saved at step t
  const T* extra_src;   // saved extra of step src(t) (kCellState: c_{t-1} for rows < k)
  const T* c0;          // [B, H] (kCellState)
  const T* hsrc;        // [B, P] out[src(t)]
  const T* h0;          // [B, P]
  T* dc;                // [B, H] running cell-state gradient: d c_t in, d c_{t-1} out (kCellState)
  T* d_gx;              // [B, G*H]
  T* d_gh;              // [B, G*H] gradient of gh (kDghDiffers; else the same buffer as d_gx)
  T* hbar;              // [B, H] the pre-projection h, recomputed for d_w_hr (kProjection), else null
  const T* hprev(int64_t r) const { return r < k ? hsrc + r * P : h0 + r * P; }
  const T* cprev(int64_t r) const { return r < k ? extra_src + r * H : c0 + r * H; }
};

// ---- raw arguments of one call (recurrence.cpp fills them after its checks; outputs allocated there) ----
template <typename T>
struct ForwardArgs {
  const Walk& w;
  int64_t H, P;
  bool proj, save;  // w_hr given (Cell::kProjection only); saving for backward (an empty tensor's pointer is null)
  const T *gx, *h0, *w_hh, *bias, *w_hr;  // bias: [G*H], zeros without b_hh; w_hr null without projection
  T* out;                                  // [T, B, P]
  T* h_n;                                  // [B, P]
  T* c;                                    // [B, H] c0 in, c_n out (kCellState), else null
  T *gates, *extra;                        // saved layout, or null when not saving
  T* gh;                                   // [B, G*H] scratch when gh has no home in gates or out (see forward_walk)
  T* hbar;                                 // [B, H] scratch (projection)
};

template <typename T>
struct BackwardArgs {
  const Walk& w;
  int64_t H, P;
  bool proj;
  const T *d_out, *h0, *c0, *w_hh, *w_hr, *out, *gates, *extra;
  T* dh;                // [B, P] d_h_n in, d_h0 out
  T* dc;                // [B, H] d_c_n in, d_c0 out (kCellState)
  T* d_gx;              // [T, B, G*H]
  T* d_gh;              // [T, B, G*H] (kDghDiffers), else null: d_gx reaches W_hh
  T* d_w_hh;            // [G*H, P]
  T* d_w_hr;            // [P, H] (projection)
  T *dhfull, *hbar;     // [T, B, P], [T, B, H] scratch (projection)
  T* dhbar;             // [B, H] scratch (projection)
  T* dg0;               // [B, G*H] scratch
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
// touch hold zeros in dg and in out). dg: [T,B,GH] with row stride ldg; dg0: [B,GH] scratch.
template <typename T>
inline void weight_grad(const Walk& w, const T* dg, int64_t ldg, const T* out, const T* h0, int64_t GH, int64_t P,
                        T* dg0, T* d_w) {
  const int64_t T_ = w.T, B = w.B;
  if (GH == 0 || P == 0) return;  // d_w is empty
  // Rows that continue: forward pairs dg[1:] with out[:-1], reverse pairs dg[:-1] with out[1:]; a row that
  // starts from h0 at step t meets a zero row of out there, so it contributes nothing.
  T beta = T(0);
  if (T_ > 1 && B > 0) {
    const T* g = w.reverse ? dg : dg + B * ldg;
    const T* h = w.reverse ? out + B * P : out;
    gemm(true, false, GH, P, (T_ - 1) * B, T(1), g, ldg, h, P, T(0), d_w, P);
    beta = T(1);
  }
  // Rows that start from h0: gather each row's gradient at its first step.
  for (int64_t b = 0; b < B; ++b) {
    const int64_t s = w.first_step(b);
    T* dst = dg0 + b * GH;
    if (s < 0) {
      std::fill(dst, dst + GH, T(0));
    } else {
      const T* src = dg + (s * B + b) * ldg;
      std::copy(src, src + GH, dst);
    }
  }
  if (B > 0) gemm(true, false, GH, P, B, T(1), dg0, GH, h0, P, beta, d_w, P);
  else std::fill(d_w, d_w + GH * P, T(0));
}

// h_n[b]: each row's state at its last step, h0 for rows never active.
template <typename T>
inline void final_state(const Walk& w, const T* out, const T* h0, int64_t P, T* h_n) {
  if (P == 0) return;
  for (int64_t b = 0; b < w.B; ++b) {
    const int64_t t = w.last_step(b);
    const T* src = t < 0 ? h0 + b * P : out + (t * w.B + b) * P;
    std::copy(src, src + P, h_n + b * P);
  }
}

// ---- the walk ----

// Where a step's gh = h_{t-1} W_hh^T goes: into the saved gates of step t when they have gh's layout, or into the
// new h of a one-gate cell without projection, the step activating it in place there; else into a scratch [B, G*H].
// (recurrence.cpp allocates the scratch from the same two rules.)
constexpr bool gh_in_gates(int64_t G, int64_t saved_gates) { return saved_gates == G; }
constexpr bool gh_in_h(int64_t G, bool proj) { return G == 1 && !proj; }

template <typename Cell, typename T>
void forward_walk(const ForwardArgs<T>& a) {
  constexpr int64_t G = Cell::G;
  const Walk& w = a.w;
  const int64_t B = w.B, H = a.H, P = a.P, GH = G * H, WG = Cell::kSavedGates * H, WE = Cell::kSavedExtra * H;
  const bool proj = Cell::kProjection && a.proj;
  const StepGemm<T> whh(a.w_hh, true, GH, P, B), whr(a.w_hr, true, P, H, proj ? B : 0);
  for (int64_t i = 0; i < w.T; ++i) {
    const int64_t t = w.step(i), n = w.bs[t], k = w.prev_rows(t);
    const T* hsrc = k > 0 ? a.out + w.src(t) * B * P : nullptr;
    T* ot = a.out + t * B * P;
    T* hdst = proj ? a.hbar : ot;
    T* st = a.save && WG ? a.gates + t * B * WG : nullptr;
    T* et = a.save && WE ? a.extra + t * B * WE : nullptr;
    T* gh = gh_in_gates(G, Cell::kSavedGates) && a.save ? st : gh_in_h(G, proj) ? hdst : a.gh;
    const FwdRows<T> s{H, P, k, a.gx + t * B * GH, gh, a.bias, hsrc, a.h0, a.c, hdst, st, et};
    if (row_blocks(n, P, GH)) {
      at::parallel_for(0, n, fused_grain(P, GH), [&](int64_t r0, int64_t r1) {
        gemm_prev_rows(whh, hsrc, a.h0, k, r0, r1, P, gh, GH);
        Cell::forward_rows(s, r0, r1);
      });
    } else {
      gemm_prev(whh, hsrc, a.h0, k, n, P, gh, GH);
      at::parallel_for(0, n, row_grain(Cell::kRowWork * H), [&](int64_t r0, int64_t r1) {
        Cell::forward_rows(s, r0, r1);
      });
    }
    if (proj) whr(n, a.hbar, H, T(0), ot, P);
    zero_rows(ot, n, B, P);
    if (st) zero_rows(st, n, B, WG);
    if (et) zero_rows(et, n, B, WE);
  }
  final_state(w, a.out, a.h0, P, a.h_n);
}

template <typename Cell, typename T>
void backward_walk(const BackwardArgs<T>& a) {
  static_assert(!(Cell::kProjection && Cell::kDirectDh), "a direct d h_{t-1} would live in P-space with a projection");
  static_assert(!Cell::kCellState || Cell::kSavedExtra == 1, "a cell state is saved as extra c_t [T, B, H]");
  constexpr int64_t G = Cell::G;
  const Walk& w = a.w;
  const int64_t B = w.B, H = a.H, P = a.P, GH = G * H, WG = Cell::kSavedGates * H, WE = Cell::kSavedExtra * H;
  const bool proj = Cell::kProjection && a.proj;
  T* const d_gh = Cell::kDghDiffers ? a.d_gh : a.d_gx;  // what reaches W_hh and b_hh
  const T beta = Cell::kDirectDh ? T(1) : T(0);          // the GEMM adds to the step's direct part, or replaces dh
  const StepGemm<T> whh(a.w_hh, false, P, GH, B), whr(a.w_hr, false, H, P, proj ? B : 0);
  for (int64_t i = w.T - 1; i >= 0; --i) {
    const int64_t t = w.step(i), n = w.bs[t], k = w.prev_rows(t);
    const T* dot = a.d_out + t * B * P;
    T* dxt = a.d_gx + t * B * GH;
    T* dgt = d_gh + t * B * GH;
    T* hbt = proj ? a.hbar + t * B * H : nullptr;
    if (proj) {
      // gradient of the projected output, kept for d_w_hr, then taken back through w_hr
      T* dhf = a.dhfull + t * B * P;
      for (int64_t e = 0; e < n * P; ++e) dhf[e] = a.dh[e] + dot[e];
      zero_rows(dhf, n, B, P);
      whr(n, dhf, P, T(0), a.dhbar, H);
    }
    const T* src_out = k > 0 ? a.out + w.src(t) * B * P : nullptr;
    const T* src_extra = k > 0 ? a.extra + w.src(t) * B * WE : nullptr;
    const BwdRows<T> s{H, P, k, proj ? a.dhbar : a.dh, dot, !proj, a.out + t * B * P,
                       a.gates + t * B * WG, a.extra + t * B * WE, src_extra, a.c0, src_out, a.h0, a.dc, dxt, dgt,
                       hbt};
    const bool blocks = row_blocks(n, GH, P);
    at::parallel_for(0, n, blocks ? fused_grain(GH, P) : row_grain(Cell::kRowWork * H), [&](int64_t r0, int64_t r1) {
      Cell::backward_rows(s, r0, r1);
      if (blocks) whh(r1 - r0, dgt + r0 * GH, GH, beta, a.dh + r0 * P, P);  // d h_{t-1} of these rows
    });
    if (!blocks) whh(n, dgt, GH, beta, a.dh, P);
    zero_rows(dxt, n, B, GH);
    if (Cell::kDghDiffers) zero_rows(dgt, n, B, GH);
    if (hbt) zero_rows(hbt, n, B, H);
  }
  weight_grad(w, d_gh, GH, a.out, a.h0, GH, P, a.dg0, a.d_w_hh);
  if (proj) gemm(true, false, P, H, w.T * B, T(1), a.dhfull, P, a.hbar, H, T(0), a.d_w_hr, H);
}

// ---- one cell's entry in the kernel table (recurrence.cpp), indexed by kernel_id ----
struct CellKernels {
  int64_t id;
  const char* name;
  int64_t G, saved_gates, saved_extra;
  bool cell_state, projection, dgh_differs;
  void (*forward_f)(const ForwardArgs<float>&);
  void (*forward_d)(const ForwardArgs<double>&);
  void (*backward_f)(const BackwardArgs<float>&);
  void (*backward_d)(const BackwardArgs<double>&);
};

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
          &forward_walk<Cell, float>,
          &forward_walk<Cell, double>,
          &backward_walk<Cell, float>,
          &backward_walk<Cell, double>};
}

// Defined by the per-cell sources.
const CellKernels& lstm_kernels();
const CellKernels& gru_kernels();
const CellKernels& rnn_tanh_kernels();
const CellKernels& rnn_relu_kernels();

}  // namespace fastrnn
