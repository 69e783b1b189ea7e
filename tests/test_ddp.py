"""DistributedDataParallel across two processes (gloo on 127.0.0.1): each rank takes half the batch, and the
averaged gradients equal the single-process gradients of the full batch."""

from __future__ import annotations

import datetime
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastrnn
from tests.conftest import KERNEL_BACKENDS

BACKEND = "cpp" if "cpp" in KERNEL_BACKENDS else "reference"
B, T = 6, 5


def _model() -> nn.Module:
    torch.manual_seed(0)
    return fastrnn.convert(nn.Sequential(nn.LSTM(3, 4, num_layers=2), _First(), nn.GRU(4, 4)), backend=BACKEND)


class _First(nn.Module):
    def forward(self, x):
        return x[0]


def _loss(model, x):
    out, _ = model(x)
    return out.pow(2).mean()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(T, B, 3, generator=g, dtype=torch.float64)


def _worker(rank: int, port: int, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    try:
        model = nn.parallel.DistributedDataParallel(_model().double())
        x = _data()[:, rank * (B // 2) : (rank + 1) * (B // 2)]
        _loss(model, x).backward()  # DDP averages the two half-batch means: the full-batch mean's gradient
        if rank == 0:
            torch.save([p.grad for p in model.module.parameters()], out_path)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_equals_full_batch(tmp_path):
    out_path = str(tmp_path / "grads.pt")
    ctx = mp.spawn(_worker, args=(_free_port(), out_path), nprocs=2, join=False, daemon=False)
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=5):  # raises if a rank failed
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the two DDP ranks did not finish within 180 s")
    got = torch.load(out_path)
    model = _model().double()
    _loss(model, _data()).backward()
    for (name, p), g in zip(model.named_parameters(), got, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12, msg=f"DDP gradient of {name}")
