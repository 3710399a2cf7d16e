"""flow.class_mean_bits: a class's mean map in b bits a value (ccnf.flows.mean_codes)."""

from __future__ import annotations

import pytest
import torch

from ccnf.config import FlowConfig
from ccnf.flows.ccnf import CCNF
from ccnf.flows.mean_codes import (
    LEVELS_DTYPE,
    bytes_per_position,
    decode_with_levels,
    dequantize_rows,
    lloyd_levels,
    quantize_map,
)
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


def _skewed(points: int, channels: int) -> torch.Tensor:
    """A mean-map residual like a real one: most values near 0, a few far out."""
    torch.manual_seed(1)
    r = torch.randn(points, channels) * 0.2
    r[: points // 20] += torch.randn(points // 20, channels).abs() * 6
    return r


@pytest.mark.parametrize("bits", [2, 4])
def test_lloyd_levels_beat_an_even_grid_and_code_each_value_to_its_nearest_level(
    bits: int,
) -> None:
    """On skewed values the Lloyd-Max levels give less squared error than min-to-max levels
    with the same codes; every value decodes to the stored level nearest to it; a constant
    channel comes back exactly; levels are float16 and ascending."""
    r = _skewed(200, 6)
    r[:, 2] = -0.25  # constant channel (exact in float16)
    levels, codes = lloyd_levels(r, bits)
    assert levels.dtype == LEVELS_DTYPE and levels.shape == (6, 2 ** bits)
    assert bool((levels[:, 1:] >= levels[:, :-1]).all())
    assert codes.shape == (200, bytes_per_position(6, bits))
    back = decode_with_levels(levels[None], torch.zeros(200, dtype=torch.long), codes, bits)
    nearest = (r.unsqueeze(-1) - levels.float().unsqueeze(0)).abs().min(dim=-1).values
    torch.testing.assert_close((back - r).abs(), nearest)
    assert torch.equal(back[:, 2], r[:, 2])
    low, step, even_codes = quantize_map(r, bits)
    even = dequantize_rows(low.expand(200, -1), step.expand(200, -1), even_codes, bits, 6)
    assert float(((back - r) ** 2).sum()) < 0.7 * float(((even - r) ** 2).sum())


def test_decoding_reads_each_rows_own_class_levels() -> None:
    """Rows of different classes with the same codes decode through their own levels."""
    levels = torch.stack([torch.arange(12.0).reshape(3, 4), -torch.arange(12.0).reshape(3, 4)])
    codes = quantize_map(torch.tensor([[0.0, 1.0, 3.0], [0.0, 1.0, 3.0]]), 2)[2]
    # the even grid of [0, 1, 3] per column is a single value: every code is 0 here
    y = torch.tensor([0, 1])
    got = decode_with_levels(levels.to(LEVELS_DTYPE), y, codes, 2)
    torch.testing.assert_close(got, torch.tensor([[0.0, 4.0, 8.0], [-0.0, -4.0, -8.0]]))


def test_lloyd_mean_map_scores_as_the_whole_map_it_decodes_to() -> None:
    """flow.class_mean_quantizer: lloyd keeps levels (C, D, 2^b) float16 instead of offset and
    step; log p equals the whole-map flow given the decoded map, its error is below the even
    grid's, new classes start neutral and a checkpoint restores the map exactly."""
    torch.manual_seed(0)
    kw = dict(n_couplings=2, hidden_dim=8, embedding_dim=2, pos_dim=4, warmup_steps=0,
              class_norm=True, class_norm_mean="position", class_mean_bits=2)
    grid, d = [[5, 8]], 6
    maps, std = _skewed(40, d), torch.rand(d) + 0.5
    errors = {}
    for quantizer in ("uniform", "lloyd"):
        cfg = FlowConfig(**kw, class_mean_quantizer=quantizer)
        net = CCNF([d], grid, ccnf_spec(cfg, [d]), n_classes=2).eval()
        net.set_class_stats(0, 1, maps, std)
        errors[quantizer] = float(((net.class_mean_map(0, 1) - maps) ** 2).sum())
    assert not hasattr(net, "class_mean_low_0") and not hasattr(net, "class_mean_step_0")
    assert net.class_mean_levels_0.shape == (2, d, 4)
    assert net.class_mean_levels_0.dtype == LEVELS_DTYPE
    assert errors["lloyd"] < errors["uniform"]
    kept = net.class_mean_map(0, 1)
    whole = CCNF([d], grid, ccnf_spec(FlowConfig(**{**kw, "class_mean_bits": None}), [d]),
                 n_classes=2).eval()
    whole.load_state_dict(
        {k: v for k, v in net.state_dict().items() if not k.startswith("class_mean")},
        strict=False)
    whole.set_class_stats(0, 1, kept, std)
    x, y, pos = torch.randn(40, d), torch.ones(40, dtype=torch.long), torch.arange(40)
    got = net.forward_level(0, x, y, pos)
    torch.testing.assert_close(got.log_prob, whole.forward_level(0, x, y, pos).log_prob)
    net.add_classes(1)
    assert net.class_mean_levels_0.shape[0] == 3 and not net.class_mean_levels_0[2].any()
    restored = CCNF.from_checkpoint(net.checkpoint(), net.cfg)
    assert torch.equal(restored.class_mean_map(0, 1), net.class_mean_map(0, 1))
