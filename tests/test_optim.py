"""ccnf.optim.AdamW must reproduce torch.optim.AdamW bit for bit (the study's metrics depend
on it: swapping the optimizer must not change a single trained weight)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ccnf.optim import AdamW


def _train(make_opt, steps: int = 25) -> list[torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(7, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = make_opt(list(net.parameters()))
    gen = torch.Generator().manual_seed(1)
    for i in range(steps):
        for group in opt.param_groups:  # the warm-up schedules change each group's lr per step
            group["lr"] = group.get("initial_lr", 1e-2) * (i + 1) / steps
        x = torch.randn(32, 7, generator=gen)
        loss = net(x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("weight_decay", [0.0, 1e-5, 0.1])
def test_adamw_is_bit_identical_to_torch(weight_decay: float) -> None:
    ours = _train(lambda ps: AdamW(ps, lr=1e-2, weight_decay=weight_decay))
    ref = _train(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=weight_decay))
    changed = _train(lambda ps: AdamW(ps, lr=1e-2, weight_decay=weight_decay), steps=24)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(ours, changed, strict=True))


def test_a_second_group_trains_at_its_own_rate_as_torch_does() -> None:
    """add_param_group (the class adapters' learning rate) matches torch's parameter groups."""

    def ours(ps: list[torch.nn.Parameter]) -> AdamW:
        opt = AdamW(ps[:2], lr=1e-2, weight_decay=1e-5)
        opt.add_param_group(ps[2:], lr=1e-1)
        return opt

    def torch_groups(ps: list[torch.nn.Parameter]) -> torch.optim.AdamW:
        return torch.optim.AdamW([{"params": ps[:2], "initial_lr": 1e-2},
                                  {"params": ps[2:], "lr": 1e-1, "initial_lr": 1e-1}],
                                 lr=1e-2, weight_decay=1e-5)

    mine, ref = _train(ours, steps=20), _train(torch_groups, steps=20)
    assert all(torch.equal(a, b) for a, b in zip(mine, ref, strict=True))
    one_rate = _train(lambda ps: AdamW(ps, lr=1e-2, weight_decay=1e-5), steps=20)
    assert not torch.equal(mine[2], one_rate[2])  # the second group's rate did matter


def test_frozen_parameters_are_untouched() -> None:
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(3))
    opt = AdamW([a, b], lr=0.1, weight_decay=0.1)
    (a * 2).sum().backward()  # b gets no gradient
    opt.step()
    assert not torch.equal(a, torch.ones(3))
    assert torch.equal(b, torch.ones(3))


def test_training_does_not_import_dynamo() -> None:
    code = (
        "import sys, torch; from ccnf.optim import AdamW; import ccnf.train\n"
        "p = torch.nn.Parameter(torch.ones(2)); o = AdamW([p], lr=0.1, weight_decay=0.0)\n"
        "p.sum().backward(); o.step(); print('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
