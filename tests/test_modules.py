"""The drop-in promise outside the numbers: constructor, parameters, init, state_dict, repr, copying,
serialisation, device/dtype moves, convert(), DDP."""

from __future__ import annotations

import copy
import inspect
import io

import pytest
import torch
from torch import nn

import fastrnn
from tests.helpers import assert_close

KINDS = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"]
CTOR = {
    "LSTM": [
        dict(input_size=5, hidden_size=7, num_layers=2, bidirectional=True, proj_size=3),
        dict(input_size=5, hidden_size=7, bias=False, batch_first=True, dropout=0.2, num_layers=2),
    ],
    "GRU": [
        dict(input_size=5, hidden_size=7, num_layers=3, bidirectional=True),
        dict(input_size=1, hidden_size=2, bias=False),
    ],
    "RNN": [
        dict(input_size=5, hidden_size=7, nonlinearity="relu", num_layers=2),
        dict(input_size=3, hidden_size=4, bidirectional=True),
    ],
    "LSTMCell": [dict(input_size=5, hidden_size=7), dict(input_size=5, hidden_size=7, bias=False)],
    "GRUCell": [dict(input_size=5, hidden_size=7), dict(input_size=2, hidden_size=3, bias=False)],
    "RNNCell": [dict(input_size=5, hidden_size=7, nonlinearity="relu"), dict(input_size=5, hidden_size=7)],
}
PAIRS = [pytest.param(k, kw, id=f"{k}-{i}") for k in KINDS for i, kw in enumerate(CTOR[k])]


@pytest.mark.parametrize("kind,kw", PAIRS)
def test_same_parameters_init_and_repr(kind, kw):
    torch.manual_seed(0)
    ref = getattr(nn, kind)(**kw)
    after_ref = torch.rand(1)
    torch.manual_seed(0)
    fast = getattr(fastrnn, kind)(**kw)
    after_fast = torch.rand(1)
    assert isinstance(fast, getattr(nn, kind))
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for (n, p), (_, q) in zip(fast.named_parameters(), ref.named_parameters()):
        assert p.shape == q.shape and torch.equal(p, q), n
    assert torch.equal(after_ref, after_fast), "construction must consume the RNG exactly as torch.nn"
    assert repr(fast) == repr(ref)
    assert "backend='reference'" in repr(getattr(fastrnn, kind)(**kw, backend="reference"))


def test_positional_constructor_arguments():
    torch.manual_seed(0)
    ref = nn.RNN(3, 4, 2, "relu", False, True, 0.0, True)
    torch.manual_seed(0)
    fast = fastrnn.RNN(3, 4, 2, "relu", False, True, 0.0, True)
    assert repr(fast) == repr(ref)
    assert fast.nonlinearity == "relu" and fast.batch_first and fast.bidirectional and not fast.bias


@pytest.mark.parametrize("kind,kw", PAIRS)
def test_state_dict_both_ways(kind, kw):
    ref = getattr(nn, kind)(**kw)
    fast = getattr(fastrnn, kind)(**kw)
    fast.load_state_dict(ref.state_dict())
    for (n, p), (_, q) in zip(fast.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(p, q), n
    ref2 = getattr(nn, kind)(**kw)
    ref2.load_state_dict(fast.state_dict())
    assert list(ref2.state_dict()) == list(fast.state_dict())


def test_signature_mentions_backend():
    for kind in KINDS:
        assert "backend" in inspect.signature(getattr(fastrnn, kind).__init__).parameters


def _run(m, kind, dtype=torch.float32):
    torch.manual_seed(1)
    if kind.endswith("Cell"):
        x = torch.randn(3, m.input_size).to(dtype)
    else:
        x = torch.randn(4, 3, m.input_size).to(dtype)
        if m.batch_first:
            x = x.transpose(0, 1)
    out = m(x)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("kind,kw", PAIRS)
def test_deepcopy_save_load_to(kind, kw):
    m = getattr(fastrnn, kind)(**kw, backend="reference").eval()
    want = _run(m, kind)
    assert_close(_run(copy.deepcopy(m), kind), want, rtol=0, atol=0, name="deepcopy")
    buf = io.BytesIO()
    torch.save(nn.Sequential(m), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)[0]
    assert type(loaded) is type(m) and loaded.backend == "reference"
    assert_close(_run(loaded, kind), want, rtol=0, atol=0, name="torch.load")
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf)  # torch's default weights_only=True
    assert_close(_run(loaded, kind), want, rtol=0, atol=0, name="torch.load weights_only")
    d = copy.deepcopy(m).double()
    assert all(p.dtype == torch.float64 for p in d.parameters())
    assert_close(_run(d, kind, torch.float64), want.double(), torch.float32, 4, "double()")
    assert _run(m.to("cpu"), kind).shape == want.shape
    if hasattr(m, "flatten_parameters"):
        m.flatten_parameters()
        assert_close(_run(m, kind), want, rtol=0, atol=0, name="after flatten_parameters")


def test_functional_call_and_weight_swap():
    """Weights replaced after construction (functional_call, direct assignment) are the ones used."""
    m = fastrnn.GRU(3, 4)
    ref = nn.GRU(3, 4)
    x = torch.randn(5, 2, 3)
    params = dict(ref.named_parameters())
    out_f, _ = torch.func.functional_call(m, params, (x,))
    assert_close(out_f, ref(x)[0], torch.float32, 5, "functional_call")
    m.weight_hh_l0 = nn.Parameter(ref.weight_hh_l0.detach().clone())
    m.weight_ih_l0, m.bias_ih_l0, m.bias_hh_l0 = ref.weight_ih_l0, ref.bias_ih_l0, ref.bias_hh_l0
    assert_close(m(x)[0], ref(x)[0], torch.float32, 5, "assigned weights")


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.enc = nn.LSTM(6, 8, num_layers=2, bidirectional=True, batch_first=True)
        self.dec = nn.ModuleList([nn.GRU(16, 5), nn.RNN(5, 4, nonlinearity="relu")])
        self.cell = nn.LSTMCell(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, tokens):
        x, _ = self.enc(self.emb(tokens))
        x, _ = self.dec[0](x.transpose(0, 1))
        x, _ = self.dec[1](x)
        h, c = self.cell(x[-1])
        return self.head(h)


def test_convert_keeps_weights_mode_and_outputs():
    torch.manual_seed(0)
    model = Tagger().eval()
    tokens = torch.randint(0, 20, (3, 5))
    want = model(tokens)
    params_before = {n: p for n, p in model.named_parameters()}
    converted = fastrnn.convert(model, backend="reference")
    assert converted is model
    assert type(model.enc) is fastrnn.LSTM and type(model.dec[0]) is fastrnn.GRU
    assert type(model.dec[1]) is fastrnn.RNN and type(model.cell) is fastrnn.LSTMCell
    assert model.enc.backend == "reference" and not model.enc.training
    for n, p in model.named_parameters():
        assert p is params_before[n], f"{n} must be the same Parameter object (optimizers keep working)"
    assert_close(model(tokens), want, torch.float32, 5, "converted model")
    top = fastrnn.convert(nn.GRU(3, 4).double())
    assert type(top) is fastrnn.GRU and top.weight_hh_l0.dtype == torch.float64
    assert fastrnn.GRU.from_torch(nn.GRU(3, 4), backend="reference").backend == "reference"
    with pytest.raises(TypeError):
        fastrnn.LSTM.from_torch(nn.GRU(3, 4))


def test_convert_leaves_user_subclasses_alone():
    class MyLSTM(nn.LSTM):
        pass

    m = nn.Sequential(MyLSTM(3, 4))
    fastrnn.convert(m)
    assert type(m[0]) is MyLSTM


def test_convert_trains_like_torch():
    """A few optimizer steps on a converted copy follow torch.nn's losses."""
    torch.manual_seed(0)
    model = Tagger()
    fast_model = fastrnn.convert(copy.deepcopy(model))
    tokens = torch.randint(0, 20, (4, 6))
    target = torch.randint(0, 2, (4,))
    losses = []
    for m in (model, fast_model):
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        run = []
        for _ in range(5):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(tokens), target)
            loss.backward()
            nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            run.append(loss.item())
        losses.append(torch.tensor(run))
    assert_close(losses[1], losses[0], torch.float32, 10, "training losses")


def test_ddp_single_process(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        ref = nn.LSTM(3, 4)
        m = nn.parallel.DistributedDataParallel(fastrnn.LSTM.from_torch(copy.deepcopy(ref)))
        x = torch.randn(5, 2, 3)
        m(x)[0].sum().backward()
        ref(x)[0].sum().backward()
        for (n, p), q in zip(m.module.named_parameters(), ref.parameters()):
            assert_close(p.grad, q.grad, torch.float32, 5, n)
    finally:
        dist.destroy_process_group()


class WordLM(nn.Module):
    """The shape of PyTorch's word_language_model example: embedding, a multi-layer RNN with dropout whose
    hidden state is carried (detached) from batch to batch, a decoder."""

    def __init__(self, rnn_type, ntoken=30, ninp=8, nhid=10, nlayers=2, dropout=0.3):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        if rnn_type in ("LSTM", "GRU"):
            self.rnn = getattr(nn, rnn_type)(ninp, nhid, nlayers, dropout=dropout)
        else:
            self.rnn = nn.RNN(
                ninp, nhid, nlayers, nonlinearity={"RNN_TANH": "tanh", "RNN_RELU": "relu"}[rnn_type], dropout=dropout
            )
        self.decoder = nn.Linear(nhid, ntoken)
        self.rnn_type, self.nhid, self.nlayers = rnn_type, nhid, nlayers

    def forward(self, input, hidden):
        output, hidden = self.rnn(self.drop(self.encoder(input)), hidden)
        return self.decoder(self.drop(output)), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        h = weight.new_zeros(self.nlayers, bsz, self.nhid)
        return (h, weight.new_zeros(self.nlayers, bsz, self.nhid)) if self.rnn_type == "LSTM" else h


def _repackage(h):
    return h.detach() if isinstance(h, torch.Tensor) else tuple(_repackage(v) for v in h)


@pytest.mark.parametrize("rnn_type", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
def test_word_language_model_trains_identically(rnn_type):
    """Train mode with dropout, carried hidden state, SGD with clipping: the converted model's losses
    follow torch.nn's (dropout draws included), whatever backend auto-selection picks here."""
    torch.manual_seed(0)
    data = torch.randint(0, 30, (41, 4))
    model = WordLM(rnn_type)
    fast = fastrnn.convert(copy.deepcopy(model))
    assert isinstance(fast.rnn, fastrnn.modules.FASTRNN_CLASSES)
    curves = []
    for m in (model, fast):
        torch.manual_seed(1)
        m.train()
        hidden = m.init_hidden(4)
        losses = []
        for i in range(0, 40, 8):
            x, y = data[i : i + 8], data[i + 1 : i + 9]
            hidden = _repackage(hidden)
            m.zero_grad()
            out, hidden = m(x, hidden)
            loss = nn.functional.cross_entropy(out.view(-1, 30), y.reshape(-1))
            loss.backward()
            nn.utils.clip_grad_norm_(m.parameters(), 0.25)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(p.grad, alpha=-1.0)
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
    assert_close(curves[1], curves[0], torch.float32, 40, "loss curve")


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
def test_autocast_cpu_dtypes_follow_torch(kind):
    """Under CPU autocast fastrnn's outputs have torch.nn's dtypes, and values within bfloat16 rounding of
    torch's (torch itself lowers at least the GEMMs to bfloat16 there)."""
    torch.manual_seed(0)
    ref = getattr(nn, kind)(4, 6)
    fast = getattr(fastrnn, kind)(4, 6)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 4) if not kind.endswith("Cell") else torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = flat_first(ref(x)), flat_first(fast(x))
    assert got.dtype == want.dtype
    assert_close(got, want, torch.float32, 5, "autocast output", rtol=3e-2, atol=3e-2)


def flat_first(out):
    return out[0] if isinstance(out, tuple) else out
