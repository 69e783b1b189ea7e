// Layer-normalised LSTM with zoneout on h (cells.py, "Normalised cells"; reference._ln_lstm_fwd/_ln_lstm_bwd): the
// pointwise step of the walk (walk.h) over whole rows. Norm.params = [ln_hh (4H) | b_hh (4H) | ln_c (H) | b_c (H)].
//   ah = ln_hh * N(raw) + b_hh, raw = h_{t-1} W_hh^T ; (i, f, g, o) = split(gx + ah) ; c_t = f c + i g
//   hbar = o tanh(ln_c * N(c_t) + b_c) ; h_t = h_{t-1} + m (hbar - h_{t-1})
// Saved: gates [T,B,4H] activated (i, f, g, o), extra [T,B,5H] (c_t | raw_t). Backward: d_gx = d(i, f, g, o) before
// activation, d_gh = d raw_t (through the layer norm), d_extra = d(ln_c * N(c_t) + b_c).
#include "walk.h"

namespace fastrnn {
namespace {

struct LnLstm {
  static constexpr int64_t kId = 4;
  static constexpr const char* kName = "ln_lstm";
  static constexpr int64_t G = 4;
  static constexpr int64_t kSavedGates = 4, kSavedExtra = 5;
  // d_gh is d raw_t, not d_gx; (1 - m) dh reaches h_{t-1} directly
  static constexpr bool kCellState = true, kProjection = false, kDghDiffers = true, kDirectDh = true;
  static constexpr bool kNorm = true;
  static constexpr int64_t kRowWork = 8;  // two layer norms besides the gates

  // Whole rows (j0 = 0, j1 = H). Three passes a row: raw's statistics; i, f, g and c_t; c_t's statistics, then o
  // (computed here rather than kept from the first pass, which has nowhere to keep it when not saving) and h.
  template <typename T, typename S>
  static void forward_rows(const FwdRows<T, S>& s, int64_t r0, int64_t r1, int64_t, int64_t) {
    const int64_t H = s.H, GH = 4 * H;
    const T *ln_hh = s.norm, *b_hh = s.norm + GH, *ln_c = s.norm + 2 * GH, *b_c = s.norm + 2 * GH + H;
    const Vec<T> keep(s.keep);
    for (int64_t r = r0; r < r1; ++r) {
      const S* x = s.gx + r * GH;
      const T* raw = s.gh + r * s.ldg;
      const S* hp = s.hprev(r);
      const S* mr = s.mask ? s.mask + r * H : nullptr;
      T* cr = s.c + r * H;
      S* hr = s.h + r * H;
      T* sg = s.gates ? s.gates + r * GH : nullptr;
      T* se = s.extra ? s.extra + r * 5 * H : nullptr;
      const RowStats<T> st = row_stats(raw, GH);
      auto pre = [&](int64_t q, int64_t j, int64_t n) {
        const int64_t e = q * H + j;
        return vload(x + e, n) + (vload(ln_hh + e, n) * st.hat(vload(raw + e, n)) + vload(b_hh + e, n));
      };
      vec_range<T>(0, H, [&](int64_t j, int64_t n) {
        const Vec<T> i = vsigmoid<T>(pre(0, j, n)), f = vsigmoid<T>(pre(1, j, n)), g = vtanh<T>(pre(2, j, n));
        const Vec<T> cn = f * vload(cr + j, n) + i * g;
        vstore(cn, cr + j, n);
        if (sg) {
          vstore(i, sg + j, n);
          vstore(f, sg + H + j, n);
          vstore(g, sg + 2 * H + j, n);
        }
        if (se) vstore(cn, se + j, n);
      });
      const RowStats<T> cs = row_stats<T>(cr, H);
      vec_range<T>(0, H, [&](int64_t j, int64_t n) {
        const Vec<T> o = vsigmoid<T>(pre(3, j, n));
        const Vec<T> tc = vtanh<T>(vload(ln_c + j, n) * cs.hat(vload(cr + j, n)) + vload(b_c + j, n));
        const Vec<T> p = vload(hp + j, n), m = mr ? vload(mr + j, n) : keep;
        vstore(p + m * (o * tc - p), hr + j, n);
        if (sg) vstore(o, sg + 3 * H + j, n);
      });
    }
  }

  // reference._ln_lstm_bwd. dh becomes the direct part (1 - m) dht of d h_{t-1}, to which the walk's GEMM adds
  // d raw W_hh; dc becomes d c_{t-1}. Passes a row: d_extra (= d(ln_c N(c_t) + b_c), with its shares of d ln_c and
  // d b_c), the o gate and the sums of c_t's norm; the other gates, d c_{t-1} and the sums of raw's norm; d raw with
  // the shares of d ln_hh and d b_hh (d ah = d_gx).
  template <typename T, typename S>
  static void backward_rows(const BwdRows<T, S>& s, int64_t r0, int64_t r1, int64_t, int64_t) {
    const int64_t H = s.H, GH = 4 * H;
    const T *ln_hh = s.norm, *ln_c = s.norm + 2 * GH, *b_c = s.norm + 2 * GH + H;
    T *d_ln_c = s.d_norm + 2 * GH, *d_b_c = s.d_norm + 2 * GH + H;
    const Vec<T> one(T(1)), keep(s.keep);
    for (int64_t r = r0; r < r1; ++r) {
      const T* sg = s.gates + r * GH;
      const T* ct = s.extra + r * s.lde;
      const T* raw = ct + H;
      const T* cp = s.cprev(r);
      const S* dout = s.d_out + r * H;
      const S* mr = s.mask ? s.mask + r * H : nullptr;
      T* dhr = s.dh + r * H;
      T* dcr = s.dc + r * H;
      S* dx = s.d_gx + r * GH;
      S* dg = s.d_gh + r * GH;
      S* dex = s.d_extra + r * H;
      const RowStats<T> cs = row_stats(ct, H), rs = row_stats(raw, GH);
      NormBack<T> nc, nr;  // c_t's norm, raw's norm
      vec_range<T>(0, H, [&](int64_t j, int64_t n) {
        const Vec<T> dht = vload(dhr + j, n) + vload(dout + j, n);
        const Vec<T> m = mr ? vload(mr + j, n) : keep;
        const Vec<T> dhb = m * dht;
        const Vec<T> lc = vload(ln_c + j, n), chat = cs.hat(vload(ct + j, n));
        const Vec<T> tc = vtanh<T>(lc * chat + vload(b_c + j, n));
        const Vec<T> o = vload(sg + 3 * H + j, n);
        const Vec<T> dcp = dhb * o * (one - tc * tc);
        vstore(dcp, dex + j, n);
        vstore(vload(d_ln_c + j, n) + dcp * chat, d_ln_c + j, n);
        vstore(vload(d_b_c + j, n) + dcp, d_b_c + j, n);
        nc.add(dcp * lc, chat, n);
        const Vec<T> d_o = dhb * tc * o * (one - o);
        vstore(d_o, dx + 3 * H + j, n);
        nr.add(d_o * vload(ln_hh + 3 * H + j, n), rs.hat(vload(raw + 3 * H + j, n)), n);
        vstore((one - m) * dht, dhr + j, n);
      });
      const auto mc = nc.means(H, cs.rstd);
      vec_range<T>(0, H, [&](int64_t j, int64_t n) {
        const Vec<T> chat = cs.hat(vload(ct + j, n));
        const Vec<T> dct = vload(dcr + j, n) + mc.dv(vload(dex + j, n) * vload(ln_c + j, n), chat);
        const Vec<T> i = vload(sg + j, n), f = vload(sg + H + j, n), g = vload(sg + 2 * H + j, n);
        const Vec<T> d[3] = {dct * g * i * (one - i), dct * vload(cp + j, n) * f * (one - f), dct * i * (one - g * g)};
        for (int64_t q = 0; q < 3; ++q) {
          vstore(d[q], dx + q * H + j, n);
          nr.add(d[q] * vload(ln_hh + q * H + j, n), rs.hat(vload(raw + q * H + j, n)), n);
        }
        vstore(dct * f, dcr + j, n);
      });
      const S* const dah[4] = {dx, dx + H, dx + 2 * H, dx + 3 * H};
      norm_back_row(nr, rs, 4, H, dah, ln_hh, raw, dg, s.d_norm, s.d_norm + GH);
    }
  }
};

}  // namespace

const CellKernels& ln_lstm_kernels() {
  static const CellKernels k = make_kernels<LnLstm>();
  return k;
}

}  // namespace fastrnn
