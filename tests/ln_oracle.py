"""A plain-torch statement of the layer-normalised cells' formulas (the oracle of tests/test_layernorm.py).

Written from the formulas alone (no fastrnn code): per layer and direction, per sequence, step by step.
"""

from __future__ import annotations

import torch

EPS = 1e-5


def N(v):
    mu = v.mean(-1, keepdim=True)
    var = v.var(-1, unbiased=False, keepdim=True)
    return (v - mu) / torch.sqrt(var + EPS)


def lstm_step(x, h, c, p, m):
    a = p["ln_ih_weight"] * N(x @ p["weight_ih"].t()) + p.get("bias_ih", 0)
    a = a + p["ln_hh_weight"] * N(h @ p["weight_hh"].t()) + p.get("bias_hh", 0)
    i, f, g, o = a.chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    hbar = torch.sigmoid(o) * torch.tanh(p["ln_c_weight"] * N(c) + p["ln_c_bias"])
    return h + m * (hbar - h), c


def gru_step(x, h, c, p, m):
    ax = p["ln_ih_weight"] * N(x @ p["weight_ih"].t()) + p.get("bias_ih", 0)
    ah = p["ln_hh_weight"] * N(h @ p["weight_hh"].t()) + p.get("bias_hh", 0)
    xr, xz, xn = ax.chunk(3, -1)
    hr, hz, hn = ah.chunk(3, -1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    hbar = (1 - z) * n + z * h
    return h + m * (hbar - h), c


def run(kind, module, x, lengths, h0, c0, masks):
    """x [B, T, I] (batch first, padded), lengths [B] -> out [B, T, D*H] (zero past each length), h_n, c_n.
    masks[k]: zoneout keep [T, B, H] for layer*D + d, or a float (eval: 1 - p)."""
    step = lstm_step if kind == "lstm" else gru_step
    D = 2 if module.bidirectional else 1
    B, T, _ = x.shape
    H = module.hidden_size
    inp = x
    h_n, c_n = [], []
    for layer in range(module.num_layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            sfx = f"_l{layer}{'_reverse' if d else ''}"
            p = {n[: -len(sfx)]: v for n, v in module.named_parameters() if n.endswith(sfx)}
            out = x.new_zeros(B, T, H)
            hs, cs = [], []
            for b in range(B):
                h, c = h0[k, b], c0[k, b] if c0 is not None else None
                ts = range(lengths[b] - 1, -1, -1) if d else range(lengths[b])
                for t in ts:
                    m = masks[k] if isinstance(masks[k], float) else masks[k][t, b]
                    h, c = step(inp[b, t], h, c, p, m)
                    out[b, t] = h
                hs.append(h)
                cs.append(c)
            outs.append(out)
            h_n.append(torch.stack(hs))
            if c0 is not None:
                c_n.append(torch.stack(cs))
        inp = torch.cat(outs, -1)
    return inp, torch.stack(h_n), (torch.stack(c_n) if c0 is not None else None)
