"""Example-based tests of mtssm/_ops/orders.py: hand-checked orders, bad input, autograd, tracing."""

import pytest
import torch

from mtssm._ops.orders import (
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


def classic_hilbert(n: int) -> torch.Tensor:
    """Row-major indices of the textbook Hilbert curve on an n x n grid (n a power of two).

    The iterative d -> (x, y) conversion (Wikipedia "Hilbert curve"); x is the column, y the row.
    """
    out = []
    for d in range(n * n):
        x = y = 0
        t = d
        s = 1
        while s < n:
            rx = 1 & (t // 2)
            ry = 1 & (t ^ rx)
            if ry == 0:
                if rx == 1:
                    x, y = s - 1 - x, s - 1 - y
                x, y = y, x
            x += s * rx
            y += s * ry
            t //= 4
            s *= 2
        out.append(y * n + x)
    return torch.tensor(out)


def test_ss2d_orders_2x3_by_hand():
    # 0 1 2
    # 3 4 5
    expected = torch.tensor(
        [
            [0, 1, 2, 3, 4, 5],  # row-major
            [0, 3, 1, 4, 2, 5],  # column-major
            [5, 4, 3, 2, 1, 0],  # row-major reversed
            [5, 2, 4, 1, 3, 0],  # column-major reversed
        ]
    )
    assert torch.equal(ss2d_orders(2, 3), expected)


def test_hilbert_2x3_and_3x2_by_hand():
    # 2 x 3: W odd, H even -> the curve runs along H: right along row 0, left along row 1.
    assert torch.equal(hilbert_order(2, 3), torch.tensor([0, 1, 2, 5, 4, 3]))
    # 3 x 2 (cells 0 1 / 2 3 / 4 5): runs along W=2: down column 0, up column 1.
    assert torch.equal(hilbert_order(3, 2), torch.tensor([0, 2, 4, 5, 3, 1]))


def test_hilbert_orders_2x3_by_hand():
    expected = torch.tensor(
        [
            [0, 1, 2, 5, 4, 3],  # the curve
            [3, 4, 5, 2, 1, 0],  # the 3 x 2 curve turned 90 degrees counter-clockwise
            [5, 4, 3, 0, 1, 2],  # the curve turned 180 degrees
            [2, 1, 0, 3, 4, 5],  # the 3 x 2 curve turned 270 degrees counter-clockwise
        ]
    )
    assert torch.equal(hilbert_orders(2, 3), expected)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_hilbert_is_the_classic_curve_on_powers_of_two(n):
    assert torch.equal(hilbert_order(n, n), classic_hilbert(n))


@pytest.mark.parametrize("H, W", [(4, 5), (5, 4), (12, 15), (15, 12), (1, 7), (7, 1)])
def test_hilbert_is_4_connected_where_plain_gilbert2d_steps_diagonally(H, W):
    # plain gilbert2d runs along the longer side and steps diagonally when it is odd and the
    # shorter side even; the curve here must not.
    perm = hilbert_orders(H, W)
    rows, cols = perm // W, perm % W
    assert ((rows.diff(dim=-1).abs() + cols.diff(dim=-1).abs()) == 1).all()


def test_orders_are_fresh_cpu_copies():
    a = scan_order("hilbert", 6, 5)
    a.zero_()
    b = scan_order("hilbert", 6, 5)
    assert b.device.type == "cpu" and b.dtype == torch.long
    assert torch.equal(b.sort(dim=-1).values, torch.arange(30).expand(4, 30))


def test_invert_order_by_hand():
    perm = torch.tensor([[2, 0, 1], [0, 1, 2]])
    assert torch.equal(invert_order(perm), torch.tensor([[1, 2, 0], [0, 1, 2]]))


def test_apply_and_restore_by_hand():
    x = torch.tensor([[10.0, 11.0, 12.0]])
    perm = torch.tensor([[2, 0, 1], [1, 2, 0]])
    seq = apply_order(x, perm)
    assert torch.equal(seq, torch.tensor([[[12.0, 10.0, 11.0], [11.0, 12.0, 10.0]]]))
    assert torch.equal(restore_order(seq, perm), x.expand(2, 3).unsqueeze(0))


def test_apply_and_restore_gradients():
    perm = scan_order("hilbert", 3, 4)
    x = torch.randn(2, 12, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: apply_order(t, perm), (x,))
    y = torch.randn(1, 4, 12, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: restore_order(t, perm), (y,))


def test_perm_follows_the_input_device():
    x = torch.empty(2, 3, 20, device="meta")
    perm = scan_order("ss2d", 4, 5)  # on the CPU
    assert apply_order(x, perm).shape == (2, 3, 4, 20)
    assert restore_order(torch.empty(2, 4, 20, device="meta"), perm).device.type == "meta"


def test_scan_order_op_passes_opcheck():
    torch.library.opcheck(torch.ops.mtssm.scan_order.default, ("hilbert", 3, 5))
    for name in ["ss2d", "hilbert", "row", "col", "hilbert1"]:
        assert torch.equal(torch.ops.mtssm.scan_order(name, 3, 5), scan_order(name, 3, 5))


def test_export_with_dynamic_spatial_size():
    """torch.export traces the orders with symbolic H, W; the program works at another size."""

    class Scan(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            H, W = x.shape[-2:]
            perm = scan_order("hilbert", H, W)
            seq = apply_order(x.flatten(2), perm) * 2.0
            return restore_order(seq, perm).sum(-2).unflatten(-1, (H, W))

    dims = {2: torch.export.Dim("H", min=2, max=64), 3: torch.export.Dim("W", min=2, max=64)}
    program = torch.export.export(Scan(), (torch.randn(1, 2, 5, 7),), dynamic_shapes=(dims,))
    x = torch.randn(1, 2, 9, 6)
    torch.testing.assert_close(program.module()(x), Scan()(x))
    torch.testing.assert_close(program.module()(x), 8.0 * x)


def test_compile_fullgraph_keeps_spatial_size_symbolic():
    """torch.compile traces every helper without a graph break and without recompiling per size."""

    def ms_scan_plumbing(x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        perm = scan_order("hilbert", H, W)
        seq = restore_order(apply_order(x.flatten(2), perm) * 2.0, perm).sum(-2)
        a, b = channel_split(x, 2)
        tokens = window_untokenize(window_tokenize(a, 3) + 1.0, 3, H, W)
        return seq.unflatten(-1, (H, W)) + channel_merge([tokens, b])

    compiled = torch.compile(ms_scan_plumbing, fullgraph=True, dynamic=True, backend="eager")
    x = torch.randn(2, 4, 5, 7)
    torch.testing.assert_close(compiled(x), ms_scan_plumbing(x))
    with torch.compiler.set_stance("fail_on_recompile"):
        for shape in [(2, 4, 6, 9), (3, 4, 8, 8)]:
            x = torch.randn(shape)
            torch.testing.assert_close(compiled(x), ms_scan_plumbing(x))


def one_line_error(exc_type, match, fn, *args):
    with pytest.raises(exc_type, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "exc_type, match, fn, args",
    [
        (ValueError, "unknown scan order 'zigzag'; valid names: ss2d, hilbert", scan_order, ("zigzag", 2, 2)),
        (ValueError, "H must be a positive int, got 0", scan_order, ("ss2d", 0, 2)),
        (ValueError, "W must be a positive int, got -3", hilbert_orders, (2, -3)),
        (TypeError, "H must be a positive int, got float", ss2d_orders, (2.5, 2)),
        (TypeError, "W must be a positive int, got bool", hilbert_order, (2, True)),
        (TypeError, "perm must be a LongTensor", invert_order, (torch.tensor([0.0, 1.0]),)),
        (ValueError, r"perm must have shape \(L,\) or \(K, L\)", invert_order, (torch.zeros(2, 2, 2, dtype=torch.long),)),
        (ValueError, r"perm must hold a permutation of range\(3\)", invert_order, (torch.tensor([0, 0, 2]),)),
        (ValueError, r"x must have shape \(\.\.\., L\) = \(\.\.\., 6\)", apply_order, (torch.randn(2, 5), torch.arange(6))),
        (ValueError, r"y must have shape \(\.\.\., K, L\) = \(\.\.\., 4, 6\)", restore_order, (torch.randn(2, 6), scan_order("ss2d", 2, 3))),
        (ValueError, r"x must have shape \(B, C, H, W\), got \(3, 4, 4\)", window_tokenize, (torch.randn(3, 4, 4), 2)),
        (ValueError, "s must be a positive int, got 0", window_tokenize, (torch.randn(1, 1, 4, 4), 0)),
        (TypeError, "s must be a positive int, got float", window_tokenize, (torch.randn(1, 1, 4, 4), 2.0)),
        (TypeError, "x must be a Tensor", window_tokenize, ([[1.0]], 2)),
        (ValueError, r"y must have shape \(B, C \* 4, 3, 2\) for s=2, H=5, W=3", window_untokenize, (torch.randn(1, 4, 2, 2), 2, 5, 3)),
        (ValueError, r"y must have shape \(B, C \* 4, 2, 2\)", window_untokenize, (torch.randn(1, 6, 2, 2), 2, 4, 4)),
        (ValueError, "x has C=5 channels, which n=2 does not divide", channel_split, (torch.randn(1, 5, 2, 2), 2)),
        (ValueError, "xs must be a non-empty sequence", channel_merge, ([],)),
    ],
)
def test_bad_input_gives_a_one_line_error(exc_type, match, fn, args):
    one_line_error(exc_type, match, fn, *args)
