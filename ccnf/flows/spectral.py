"""Linear layer with a switchable spectral normalisation (stabilizer 1).

W_sn = g * W / sigma(W), sigma estimated by power iteration (one step per training forward, as
in Miyato et al. 2018). The switch lets a study turn it off on task 0 only and on from task 1.

g is a fixed gain, 1 unless the layer was switched on *absorbing* its current spectral norm
(:meth:`SNLinear.switch_on`): then g = sigma(W) at the switch, so the effective weight is
exactly what it was before (no jump in log p), and from then on the layer's Lipschitz constant
stays pinned at that value however W moves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SNLinear(nn.Module):
    """y = x W_eff^T + b, W_eff = g * W / sigma(W) while ``enabled``, else W.

    x: (N, in_features) -> (N, out_features).
    """

    def __init__(self, in_features: int, out_features: int, *, enabled: bool = True) -> None:
        super().__init__()
        layer = nn.Linear(in_features, out_features)
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = nn.Parameter(layer.bias.detach().clone())
        self.register_buffer("u", F.normalize(torch.randn(out_features), dim=0))
        self.register_buffer("enabled", torch.tensor(enabled))
        self.register_buffer("gain", torch.tensor(1.0))
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def sigma(self) -> torch.Tensor:
        """Current spectral-norm estimate u^T W v (differentiable in W)."""
        if self.training:
            with torch.no_grad():
                v = F.normalize(self.weight.t() @ self.u, dim=0)
                self.u.copy_(F.normalize(self.weight @ v, dim=0))
        with torch.no_grad():
            u = self.u.clone()  # later forwards update self.u in place; autograd keeps this one
            v = F.normalize(self.weight.t() @ u, dim=0)
        return u @ (self.weight @ v)

    @torch.no_grad()
    def switch_on(self, absorb: bool) -> None:
        """Enable spectral norm now. ``absorb``: set u to W's exact top left singular vector
        and g = sigma(W), so that g * W / sigma(W) == W (the effective weight does not move);
        otherwise the weight jumps from W to W / sigma(W)."""
        if bool(self.enabled):
            return
        u_svd, s_svd, _ = torch.linalg.svd(self.weight.double(), full_matrices=False)
        top = u_svd[:, 0].to(self.u.dtype)
        # the sign of a singular vector is arbitrary; u^T W v is the same for +u and -u
        self.u.copy_(top)
        if absorb:
            self.gain.fill_(float(s_svd[0]))
        self.enabled.fill_(True)

    def effective_weight(self) -> torch.Tensor:
        if self.training or torch.is_grad_enabled():
            return self._normalized() if bool(self.enabled) else self.weight
        # Inference (eval mode, no autograd): the normalized weight is the same tensor until W,
        # u, g or the switch change, so it is computed once instead of at every forward. Tensor
        # versions count in-place writes (optimizer steps, load_state_dict), which invalidates
        # the cache.
        key = (self.weight._version, self.u._version, self.enabled._version, self.gain._version,
               self.weight.data_ptr(), self.u.data_ptr(), self.weight.device)
        if self._cache is None or self._cache[0] != key:
            w = self._normalized() if bool(self.enabled) else self.weight
            self._cache = (key, w)
        return self._cache[1]

    def _normalized(self) -> torch.Tensor:
        # sigma / g: with g = 1 this is exactly W / sigma(W), the plain spectral norm
        return self.weight / (self.sigma() / self.gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)
