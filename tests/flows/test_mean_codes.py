"""flow.class_mean_bits: a class's mean map in b bits a value (ccnf.flows.mean_codes)."""

from __future__ import annotations

import pytest
import torch

from ccnf.config import FlowConfig
from ccnf.flows.ccnf import CCNF
from ccnf.flows.mean_codes import bytes_per_position, dequantize_rows, quantize_map
from ccnf.models.ccnf import ccnf_spec


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("channels", [5, 8])
def test_codes_round_trip_within_half_a_step_and_pack_to_b_bits(bits: int, channels: int) -> None:
    """Every value comes back within step / 2 of itself, the extremes of each channel
    exactly, a constant channel exactly; a position's codes take ceil(D b / 8) bytes."""
    torch.manual_seed(0)
    r = torch.randn(12, channels) * torch.linspace(0.1, 3.0, channels)
    r[:, 1] = 0.7  # a constant channel: step 0
    low, step, codes = quantize_map(r, bits)
    assert codes.dtype == torch.uint8 and codes.shape == (12, -(-channels * bits // 8))
    assert bytes_per_position(channels, bits) == codes.shape[1]
    back = dequantize_rows(low.expand(12, -1), step.expand(12, -1), codes, bits, channels)
    assert back.shape == (12, channels)
    assert bool(((back - r).abs() <= step / 2 + 1e-5).all())
    torch.testing.assert_close(back.min(0).values, r.min(0).values)
    torch.testing.assert_close(back.max(0).values, r.max(0).values)
    assert step[1] == 0 and torch.equal(back[:, 1], r[:, 1])
    # the packing is the plain little-end-first layout: decode the bytes by hand
    per_byte = 8 // bits
    by_hand = torch.tensor([[(int(codes[p, j // per_byte]) >> (bits * (j % per_byte)))
                             & (2 ** bits - 1) for j in range(channels)] for p in range(12)])
    torch.testing.assert_close(low + by_hand.float() * step, back)


def test_bits_outside_the_packable_set_are_refused() -> None:
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_map(torch.randn(4, 3), 3)
    kw = dict(class_norm=True, class_norm_mean="position")
    with pytest.raises(ValueError, match="class_mean_bits"):
        FlowConfig(**kw, class_mean_bits=3)


def test_a_quantized_map_scores_as_the_whole_map_it_decodes_to() -> None:
    """The flow subtracts mu + the decoded rest at each vector's position: log p and the
    inverse equal those of the whole-map flow given that map; the map costs P ceil(D b / 8)
    bytes plus three D-vectors, later classes start neutral, checkpoints keep it."""
    torch.manual_seed(0)
    kw = dict(n_couplings=2, hidden_dim=8, embedding_dim=2, pos_dim=4, warmup_steps=0,
              class_norm=True, class_norm_mean="position")
    grid, d = [[3, 4]], 6
    maps, std = torch.randn(12, d) * 3, torch.rand(d) + 0.5
    errors = {}
    for bits in (2, 4, 8):
        net = CCNF([d], grid, ccnf_spec(FlowConfig(**kw, class_mean_bits=bits), [d]),
                   n_classes=2).eval()
        net.set_class_stats(0, 1, maps, std)
        kept = net.class_mean_map(0, 1)
        errors[bits] = float((kept - maps).abs().max())
        assert net.class_mean_0.shape == (2, d) and net.class_mean_codes_0.dtype == torch.uint8
        assert net.class_mean_codes_0.shape == (2, 12, -(-d * bits // 8))
        whole = CCNF([d], grid, ccnf_spec(FlowConfig(**kw), [d]), n_classes=2).eval()
        state = {k: v for k, v in net.state_dict().items() if not k.startswith("class_mean")}
        whole.load_state_dict(state, strict=False)
        whole.set_class_stats(0, 1, kept, std)
        x, y, pos = torch.randn(12, d), torch.ones(12, dtype=torch.long), torch.arange(12)
        got = net.forward_level(0, x, y, pos)
        torch.testing.assert_close(got.log_prob, whole.forward_level(0, x, y, pos).log_prob)
        torch.testing.assert_close(net.inverse_level(0, got.z, y, pos), x, atol=1e-4, rtol=1e-4)
    assert errors[8] < errors[4] < errors[2]
    assert errors[8] < 0.05
    net.add_classes(1)
    assert net.class_mean_codes_0.shape[0] == 3 and not net.class_mean_codes_0[2].any()
    restored = CCNF.from_checkpoint(net.checkpoint(), net.cfg)
    torch.testing.assert_close(restored.class_mean_map(0, 1), net.class_mean_map(0, 1))
