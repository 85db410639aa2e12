"""Every scan op inside one module: torch.compile(fullgraph=True) and torch.export round trips."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
from torch import nn

from mtssm.nn import functional as F


class EveryScan(nn.Module):
    """Uses selective_scan (with D, z, delta_bias, initial/last state), selective_scan_2d with the
    SS2D and Hilbert orders, and MSM's window tokenisation. x: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, c: int = 4, n: int = 3) -> None:
        super().__init__()
        self.c, self.n = c, n
        self.proj = nn.Linear(c, 4 * (c + 2 * n))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1).float()).repeat(4 * c, 1))
        self.D = nn.Parameter(torch.ones(4 * c))
        self.bias = nn.Parameter(torch.zeros(4 * c))
        self.init = nn.Parameter(torch.zeros(1, c, n))

    def _params(self, x):
        b, c, h, w = x.shape
        p = self.proj(x.flatten(2).transpose(1, 2)).view(b, h * w, 4, c + 2 * self.n)
        p = p.permute(0, 2, 3, 1)  # (b, 4, c + 2n, L)
        return p[:, :, :c], p[:, :, c : c + self.n], p[:, :, c + self.n :]

    def forward(self, x):
        b, c, h, w = x.shape
        A = -torch.exp(self.A_log)
        delta, B, C = self._params(x)
        y = F.selective_scan_2d(x, delta, A, B, C, self.D, self.bias, order="ss2d")
        y = y + F.selective_scan_2d(x, delta, A, B, C, self.D, self.bias, order="hilbert")
        u = x.flatten(2)
        out, last = F.selective_scan(u, delta[:, 0], A[:c], B[:, :1], C[:, :1], self.D[:c],
                                     u, self.bias[:c], True, True,
                                     self.init.expand(b, -1, -1).contiguous())
        tok = F.window_tokenize(y, 2)
        tok = tok * torch.sigmoid(tok.mean(1, keepdim=True))
        y = F.window_untokenize(tok, 2, h, w)
        return y + out.view(b, c, h, w) + last.sum(-1)[..., None, None]


def _inputs():
    torch.manual_seed(0)
    return torch.randn(2, 4, 5, 6)


def test_compile_fullgraph_no_break_same_outputs_and_grads():
    model = EveryScan()
    x = _inputs()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager_out, comp_out = model(x1), compiled(x2)
    torch.testing.assert_close(comp_out, eager_out, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(eager_out)
    ge = torch.autograd.grad((eager_out * w).sum(), [x1, *model.parameters()])
    gc = torch.autograd.grad((comp_out * w).sum(), [x2, *model.parameters()])
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_compile_inductor_matches_eager():
    model = EveryScan()
    x = _inputs()
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_export_save_load_in_fresh_process(tmp_path):
    model = EveryScan().eval()
    x = _inputs()
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)
    path = tmp_path / "every_scan.pt2"
    torch.export.save(program, path)
    torch.save({"x": x, "y": model(x).detach()}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import torch, mtssm  # mtssm registers torch.ops.mtssm.* before loading
        program = torch.export.load({str(path)!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        torch.testing.assert_close(program.module()(io["x"]), io["y"], rtol=1e-5, atol=1e-5)
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
