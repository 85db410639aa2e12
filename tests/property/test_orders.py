"""Invariants of the scan orders and of MSM's window tokenisation (mtssm/_ops/orders.py)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mtssm._ops.orders import (
    ORDER_NAMES,
    apply_order,
    channel_merge,
    channel_split,
    hilbert_order,
    hilbert_orders,
    invert_order,
    restore_order,
    scan_order,
    ss2d_orders,
    window_tokenize,
    window_untokenize,
)

sizes = st.integers(min_value=1, max_value=40)
small = st.integers(min_value=1, max_value=9)
orders_settings = settings(deadline=None, max_examples=50)


def assert_4_connected(perm: torch.Tensor, H: int, W: int) -> None:
    """Every pair of consecutive cells of every row of ``perm`` shares an edge."""
    rows, cols = perm // W, perm % W
    steps = rows.diff(dim=-1).abs() + cols.diff(dim=-1).abs()
    bad = (steps != 1).nonzero()
    assert bad.numel() == 0, f"{H}x{W}: non-adjacent steps at (row, t) = {bad[:5].tolist()}"


@orders_settings
@given(name=st.sampled_from(sorted(ORDER_NAMES)), H=sizes, W=sizes)
def test_every_order_is_a_permutation(name, H, W):
    perm = scan_order(name, H, W)
    assert perm.dtype == torch.long and perm.device.type == "cpu"
    assert perm.shape == (ORDER_NAMES[name], H * W)
    assert torch.equal(perm.sort(dim=-1).values, torch.arange(H * W).expand_as(perm))


@orders_settings
@given(name=st.sampled_from(sorted(ORDER_NAMES)), H=sizes, W=sizes, data=st.data())
def test_inverse_restores(name, H, W, data):
    perm = scan_order(name, H, W)
    inv = invert_order(perm)
    steps = torch.arange(H * W).expand_as(perm)
    assert torch.equal(perm.gather(-1, inv), steps)
    assert torch.equal(inv.gather(-1, perm), steps)
    B = data.draw(st.integers(1, 3))
    x = torch.randn(B, 2, H * W, dtype=torch.float64)
    seq = apply_order(x, perm)  # (B, 2, K, L)
    assert seq.shape == (B, 2, perm.shape[0], H * W)
    for k in range(perm.shape[0]):
        assert torch.equal(apply_order(seq[:, :, k], inv[k]), x)  # gather with the inverse
        assert torch.equal(seq[:, :, k], x[..., perm[k]])
    assert torch.equal(restore_order(seq, perm), x.unsqueeze(-2).expand_as(seq))
    k = data.draw(st.integers(0, perm.shape[0] - 1))
    assert torch.equal(restore_order(apply_order(x, perm[k]), perm[k]), x)


@orders_settings
@given(H=sizes, W=sizes)
def test_hilbert_orders_are_4_connected(H, W):
    single = hilbert_order(H, W)
    assert single.shape == (H * W,) and single[0] == 0
    assert_4_connected(single.view(1, -1), H, W)
    assert_4_connected(hilbert_orders(H, W), H, W)


def test_hilbert_orders_are_4_connected_for_every_small_size():
    for H in range(1, 17):
        for W in range(1, 17):
            assert_4_connected(hilbert_orders(H, W), H, W)


@orders_settings
@given(H=sizes, W=sizes)
def test_hilbert_variants_are_rotations_of_the_curve(H, W):
    """Row k's visit-step table is the base curve's table turned by torch.rot90(., k) (PAMM)."""
    multi = hilbert_orders(H, W)
    assert torch.equal(multi[0], hilbert_order(H, W))
    for k in range(4):
        h, w = (H, W) if k % 2 == 0 else (W, H)
        base_steps = invert_order(hilbert_order(h, w)).view(h, w)
        assert torch.equal(invert_order(multi[k]).view(H, W), torch.rot90(base_steps, k, dims=(0, 1)))
    # turning the map by 180 degrees maps row-major index i to L - 1 - i
    assert torch.equal(multi[2], H * W - 1 - multi[0])
    assert torch.equal(multi[3], H * W - 1 - multi[1])


@orders_settings
@given(H=sizes, W=sizes)
def test_ss2d_orders_are_row_col_and_their_flips(H, W):
    x = torch.randn(3, H, W)
    perm = ss2d_orders(H, W)
    seq = apply_order(x.flatten(1), perm)  # (3, 4, L)
    assert torch.equal(seq[:, 0], x.flatten(1))
    assert torch.equal(seq[:, 1], x.transpose(1, 2).flatten(1))  # row-major of the transposed map
    assert torch.equal(seq[:, 2], seq[:, 0].flip(-1))
    assert torch.equal(seq[:, 3], seq[:, 1].flip(-1))
    assert torch.equal(perm, scan_order("ss2d", H, W))
    assert torch.equal(perm[:1], scan_order("row", H, W))
    assert torch.equal(perm[1:2], scan_order("col", H, W))


def patches_reference(x: torch.Tensor, s: int) -> torch.Tensor:
    """(B, C*s*s, Hs, Ws) built pixel by pixel from the zero-padded map."""
    B, C, H, W = x.shape
    Hs, Ws = -(-H // s), -(-W // s)
    padded = x.new_zeros(B, C, Hs * s, Ws * s)
    padded[:, :, :H, :W] = x
    out = x.new_empty(B, C * s * s, Hs, Ws)
    for p in range(Hs):
        for q in range(Ws):
            out[:, :, p, q] = padded[:, :, p * s : (p + 1) * s, q * s : (q + 1) * s].reshape(B, -1)
    return out


@orders_settings
@given(B=st.integers(1, 2), C=st.integers(1, 3), H=small, W=small, s=st.integers(1, 5))
def test_window_tokens_hold_their_patch(B, C, H, W, s):
    x = torch.randn(B, C, H, W)
    y = window_tokenize(x, s)
    assert y.shape == (B, C * s * s, -(-H // s), -(-W // s))
    assert torch.equal(y, patches_reference(x, s))


@orders_settings
@given(B=st.integers(1, 2), C=st.integers(1, 3), H=small, W=small, s=st.integers(1, 5))
def test_window_untokenize_inverts_tokenize(B, C, H, W, s):
    x = torch.randn(B, C, H, W)
    assert torch.equal(window_untokenize(window_tokenize(x, s), s, H, W), x)
    # on the padded size the two are mutual inverses
    Hp, Wp = -(-H // s) * s, -(-W // s) * s
    y = torch.randn(B, C * s * s, Hp // s, Wp // s)
    assert torch.equal(window_tokenize(window_untokenize(y, s, Hp, Wp), s), y)


@orders_settings
@given(B=st.integers(1, 2), C=st.integers(1, 4), H=small, W=small)
def test_window_scale_one_is_identity(B, C, H, W):
    x = torch.randn(B, C, H, W)
    assert torch.equal(window_tokenize(x, 1), x)
    assert torch.equal(window_untokenize(x, 1, H, W), x)


@orders_settings
@given(n=st.integers(1, 4), m=st.integers(1, 3), H=small, W=small)
def test_channel_split_then_merge_is_identity(n, m, H, W):
    x = torch.randn(2, n * m, H, W)
    parts = channel_split(x, n)
    assert len(parts) == n and all(p.shape == (2, m, H, W) for p in parts)
    assert torch.equal(channel_merge(parts), x)


@pytest.mark.parametrize("s", [2, 3])
def test_multi_scale_round_trip(s):
    """S, then W_s per branch, then W_s^-1 and S^-1, gives the input back (MS-Scan's plumbing)."""
    x = torch.randn(2, 6, 7, 5)
    scales = [1, s]
    branches = [window_tokenize(p, sc) for p, sc in zip(channel_split(x, len(scales)), scales)]
    back = channel_merge([window_untokenize(b, sc, 7, 5) for b, sc in zip(branches, scales)])
    assert torch.equal(back, x)


def test_padded_tokens_are_zero_and_cropped():
    x = torch.randn(1, 2, 5, 3) + 10.0  # no zeros in x
    y = window_tokenize(x, 4)  # pads to 8 x 4
    padded = F.pixel_shuffle(y, 4)
    assert padded.shape == (1, 2, 8, 4)
    assert torch.equal(padded[..., :5, :3], x)
    assert (padded[..., 5:, :] == 0).all() and (padded[..., :, 3:] == 0).all()
