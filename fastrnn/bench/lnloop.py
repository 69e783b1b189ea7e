"""The yardstick of the layer-normalised cells, which torch.nn lacks: the plain-PyTorch loop a user would write
for them (one layer, one direction, eager), over a fastrnn LayerNormLSTM / LayerNormGRU's own parameters.

In a bench run it takes torch.nn's place for `ln_lstm` / `ln_gru` (the `torch.nn` rows of those cells: every
ratio's denominator and the correctness oracle), and `compile` is torch.compile of its step. It states the
formulas of fastrnn/cells.py ("Normalised cells") directly with F.layer_norm, without zoneout (the bench runs
zoneout=0), and shares no code with fastrnn's backends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-5


def ln_lstm_step(gx_t: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, ln_hh: Tensor, b_hh: Tensor, ln_c: Tensor,
                 b_c: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
    a = gx_t + F.layer_norm(h @ w_hh.t(), (w_hh.shape[0],), ln_hh, b_hh, EPS)
    i, f, g, o = a.chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(F.layer_norm(c, (c.shape[1],), ln_c, b_c, EPS)), c


def ln_gru_step(gx_t: Tensor, h: Tensor, w_hh: Tensor, ln_hh: Tensor, b_hh: Tensor) -> Tensor:
    xr, xz, xn = gx_t.chunk(3, 1)
    hr, hz, hn = F.layer_norm(h @ w_hh.t(), (w_hh.shape[0],), ln_hh, b_hh, EPS).chunk(3, 1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h


def _params(m: nn.Module) -> dict[str, Tensor]:
    return {n[: -len("_l0")]: p for n, p in m.named_parameters() if n.endswith("_l0")}


def run(m: nn.Module, x: Tensor, h0: Tensor, c0: Tensor | None, step=None) -> tuple[Tensor, Tensor, Tensor | None]:
    """x [T, B, I], h0 / c0 [B, H] -> out [T, B, H], h_n, c_n; `step` replaces the step function (torch.compile)."""
    p = _params(m)
    lstm = c0 is not None
    step = step or (ln_lstm_step if lstm else ln_gru_step)
    gx = F.layer_norm(x @ p["weight_ih"].t(), (p["weight_ih"].shape[0],), p["ln_ih_weight"], p.get("bias_ih"), EPS)
    b_hh = p.get("bias_hh")
    h, c, outs = h0, c0, []
    for t in range(x.shape[0]):
        if lstm:
            h, c = step(gx[t], h, c, p["weight_hh"], p["ln_hh_weight"], b_hh, p["ln_c_weight"], p["ln_c_bias"])
        else:
            h = step(gx[t], h, p["weight_hh"], p["ln_hh_weight"], b_hh)
        outs.append(h)
    return torch.stack(outs), h, c


class LayerNormLoop(nn.Module):
    """The eager loop as a module with torch.nn.LSTM's / GRU's calling convention (x [T, B, I], hx), holding the
    parameters of the fastrnn module it stands beside, under the same names."""

    def __init__(self, module: nn.Module):
        super().__init__()
        for name, p in module.named_parameters():
            self.register_parameter(name, p)

    def forward(self, x: Tensor, hx):
        lstm = isinstance(hx, tuple)
        h0, c0 = (hx[0][0], hx[1][0]) if lstm else (hx[0], None)
        out, h, c = run(self, x, h0, c0)
        return out, ((h[None], c[None]) if lstm else h[None])
