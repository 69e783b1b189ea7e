"""State-dict conversion between fastrnn.LayerNormLSTM / LayerNormGRU and haste's (lmnt-com/haste) layers of the
same names, whose maths is the same (layer norm with eps 1e-5 on W x and on R h, for LSTM on c too; zoneout on h).

haste holds one layer, one direction, with the input on the right of the kernel and its own gate order:

    haste LayerNormLSTM        shape        fastrnn (suffix _l0)
      kernel                   [I, 4H]      weight_ih [4H, I]   transposed; gates (i, g, f, o) -> (i, f, g, o)
      recurrent_kernel         [H, 4H]      weight_hh [4H, H]   likewise
      bias                     [4H]         bias_ih [4H]        (haste has one bias: bias_hh = 0 coming in,
                                                                 bias_ih + bias_hh going out)
      gamma                    [2, 4H]      ln_ih_weight = gamma[0], ln_hh_weight = gamma[1]
      gamma_h, beta_h          [H]          ln_c_weight, ln_c_bias
    haste LayerNormGRU
      kernel, recurrent_kernel [I|H, 3H]    weight_ih, weight_hh  transposed; gates (z, r, h) -> (r, z, n)
      bias, recurrent_bias     [3H]         bias_ih, bias_hh
      gamma                    [2, 3H]      ln_ih_weight, ln_hh_weight

    m = fastrnn.LayerNormLSTM(I, H)
    m.load_state_dict(fastrnn.haste.from_haste(haste_layer.state_dict(), "lstm"))
    haste_layer.load_state_dict(fastrnn.haste.to_haste(m.state_dict(), "lstm"))
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastrnn.cells import Cell, spec

# haste's gate names, in its order, for fastrnn's normalised cells
_HASTE_GATES = {"lstm": ("i", "g", "f", "o"), "gru": ("z", "r", "n")}


def _cell(kind: str) -> tuple[Cell, tuple[int, ...]]:
    """fastrnn's cell for haste's layer `kind`, and haste's gate blocks in fastrnn's (torch's) order: fastrnn gate k
    is haste block order[k]."""
    if kind not in _HASTE_GATES:
        raise ValueError(f"kind must be 'lstm' or 'gru', got {kind!r}")
    cell = spec(f"ln_{kind}")
    return cell, tuple(_HASTE_GATES[kind].index(g) for g in cell.gates)


def _permute(v: Tensor, order: tuple[int, ...], dim: int) -> Tensor:
    blocks = v.chunk(len(order), dim)
    return torch.cat([blocks[k] for k in order], dim)


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(order.index(k) for k in range(len(order)))


def from_haste(state_dict: dict[str, Tensor], kind: str, layer: int = 0, reverse: bool = False) -> dict[str, Tensor]:
    """A haste LayerNormLSTM ("lstm") or LayerNormGRU ("gru") state dict as fastrnn parameters of one layer and
    direction (suffix _l{layer}[_reverse]), ready for load_state_dict (strict when the module has one layer)."""
    cell, order = _cell(kind)
    sd = state_dict
    sfx = f"_l{layer}{'_reverse' if reverse else ''}"
    out = {
        "weight_ih": _permute(sd["kernel"], order, 1).t(),
        "weight_hh": _permute(sd["recurrent_kernel"], order, 1).t(),
        "bias_ih": _permute(sd["bias"], order, 0),
        # haste's LSTM has one bias (b_ih + b_hh), its GRU two
        "bias_hh": torch.zeros_like(sd["bias"]) if cell.has_cell_state else _permute(sd["recurrent_bias"], order, 0),
        "ln_ih_weight": _permute(sd["gamma"][0], order, 0),
        "ln_hh_weight": _permute(sd["gamma"][1], order, 0),
    }
    if cell.has_cell_state:
        out["ln_c_weight"], out["ln_c_bias"] = sd["gamma_h"], sd["beta_h"]
    return {k + sfx: v.clone().contiguous() for k, v in out.items()}


def to_haste(state_dict: dict[str, Tensor], kind: str, layer: int = 0, reverse: bool = False) -> dict[str, Tensor]:
    """One layer and direction of a fastrnn LayerNormLSTM / LayerNormGRU state dict in haste's layout. A module
    built with bias=False converts with zero biases (haste always has them)."""
    cell, order = _cell(kind)
    inv = _inverse(order)
    sfx = f"_l{layer}{'_reverse' if reverse else ''}"

    def get(name: str) -> Tensor:
        return state_dict[name + sfx]

    w_ih, w_hh = get("weight_ih"), get("weight_hh")
    zeros = w_ih.new_zeros(w_ih.shape[0])
    b_ih = state_dict.get("bias_ih" + sfx, zeros)
    b_hh = state_dict.get("bias_hh" + sfx, zeros)
    out = {
        "kernel": _permute(w_ih.t(), inv, 1),
        "recurrent_kernel": _permute(w_hh.t(), inv, 1),
        "bias": _permute(b_ih + b_hh if cell.has_cell_state else b_ih, inv, 0),
        "gamma": torch.stack([_permute(get("ln_ih_weight"), inv, 0), _permute(get("ln_hh_weight"), inv, 0)]),
    }
    if cell.has_cell_state:
        out["gamma_h"], out["beta_h"] = get("ln_c_weight"), get("ln_c_bias")
    else:
        out["recurrent_bias"] = _permute(b_hh, inv, 0)
    return {k: v.clone().contiguous() for k, v in out.items()}
