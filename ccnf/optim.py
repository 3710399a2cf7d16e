"""AdamW (decoupled weight decay, Loshchilov & Hutter 2019) for the flow training loops.

Why not ``torch.optim.AdamW``: its constructor imports ``torch._dynamo`` (about 1.3 s of
every training process, five per study run, and a study is many such runs), and the loops here
need none of its options. The arithmetic is the same single-tensor update, in the same order,
so the trained weights are bit-identical (``tests/test_optim.py`` checks this against torch).

For each parameter p with gradient g, at step t (1-based), learning rate lr, decay wd:

    p <- p * (1 - lr * wd)
    m <- m + (1 - beta1) * (g - m)
    v <- beta2 * v + (1 - beta2) * g * g
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class AdamW:
    """Parameter groups, each with its own ``lr`` (changed between steps by the schedules;
    ``initial_lr`` keeps the group's own): the constructor's, and any :meth:`add_param_group`
    adds."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        *,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.param_groups: list[dict[str, Any]] = []
        self._defaults = {"weight_decay": weight_decay, "betas": betas, "eps": eps}
        self.add_param_group(params, lr=lr)
        # per parameter: [step count, m (first moment), v (second moment)]
        self.state: dict[torch.nn.Parameter, list[Any]] = {}

    def add_param_group(self, params: Iterable[torch.nn.Parameter], *, lr: float) -> None:
        """A further group at learning rate ``lr`` (same decay, betas and eps)."""
        self.param_groups.append(
            {"params": list(params), "lr": lr, "initial_lr": lr, **self._defaults})

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """Update every parameter that has a gradient."""
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state.get(p)
                if state is None:
                    state = self.state[p] = [0, torch.zeros_like(p), torch.zeros_like(p)]
                state[0] += 1
                t, m, v = state
                grad = p.grad
                if wd != 0:
                    p.mul_(1 - lr * wd)
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                # t as a float, as torch keeps its step count (beta ** 3.0 vs ** 3 may differ)
                bias_correction1 = 1 - beta1 ** float(t)
                bias_correction2_sqrt = (1 - beta2 ** float(t)) ** 0.5
                denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
                p.addcdiv_(m, denom, value=-lr / bias_correction1)
