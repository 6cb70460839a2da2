"""numbattn.torch on CUDA tensors: outputs and gradients against torch's SDPA
autograd run on the CPU in float64, with every option, strided views, a
stride-0 dout, and a busy side stream. Needs a real GPU and a CUDA build of
torch: skipped on the simulator (it cannot read torch's device memory)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import numbattn.torch as nt  # noqa: E402
from numbattn.cuda import backend  # noqa: E402
from numbattn.reference import relative_error  # noqa: E402
from tests.test_torch import CASES, case_kwargs, sdpa  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or backend.simulator(),
    reason="needs a CUDA build of torch and a real GPU (not the simulator)",
)
TOL = {torch.float32: 2e-5, torch.float64: 1e-11}


def _on(dev, kw):
    """Options with tensors (bias, mask) moved to ``dev``; lengths stay where they are."""
    return {n: (x.to(dev) if n in ("bias", "mask") else x) for n, x in kw.items()}


def _check(label, dtype, got, ref):
    for what, x, y in zip(("out", "dq", "dk", "dv"), got, ref):
        assert x.device.type == "cuda" and x.dtype == dtype, f"{label} {what}"
        err = relative_error(x.detach().cpu().double().numpy(), y.detach().numpy())
        assert err <= TOL[dtype], f"{label} {what}: relative error {err:.2e} vs SDPA"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", ["plain", "causal-wide", "causal-tall", "mqa", "combo",
                                  "diagonal-0", "diagonal-batch"])  # fmt: skip
def test_matches_sdpa_on_cuda(name, dtype):
    rng = np.random.default_rng(len(name))
    b, h, hk, nq, nk, d, dv, case = CASES[name]
    kw = case_kwargs(rng, case, torch.float64, b, h, nq, nk)
    host = [torch.from_numpy(rng.standard_normal(s)) for s in
            ((b, h, nq, d), (b, hk, nk, d), (b, hk, nk, dv), (b, h, nq, dv))]  # fmt: skip
    q, k, v = (x.to("cuda", dtype).requires_grad_(True) for x in host[:3])
    dout = host[3].to("cuda", dtype)
    out = nt.attention(q, k, v, **_on("cuda", {n: _cast(x, dtype) for n, x in kw.items()}))
    got = (out, *torch.autograd.grad(out, (q, k, v), dout))
    hq, hk_, hv = (x.clone().requires_grad_(True) for x in host[:3])
    ref = sdpa(hq, hk_, hv, **kw)
    _check(name, dtype, got, (ref, *torch.autograd.grad(ref, (hq, hk_, hv), host[3])))


def _cast(x, dtype):
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_strided_views_stride0_dout_and_side_stream(dtype):
    """(B, N, 3, H, d) projection views, ``out.sum()`` (a stride-0 dout), on a
    side stream kept busy before its inputs are written: a launch on any
    other stream would read them unwritten."""
    b, n, h, d = 2, 9, 2, 8
    x_host = torch.from_numpy(np.random.default_rng(7).standard_normal((b, n, 3, h, d)))
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        x = (x_host.to("cuda", dtype) * 1.0).requires_grad_(True)
        q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
        out = nt.attention(q, k, v, causal=True)
        out.sum().backward()
    torch.cuda.synchronize()
    xr = x_host.clone().requires_grad_(True)
    ref = sdpa(*(xr[:, :, i].transpose(1, 2) for i in range(3)), causal=True)
    ref.sum().backward()
    for what, got, want in (("out", out, ref), ("dx", x.grad, xr.grad)):
        err = relative_error(got.detach().cpu().double().numpy(), want.detach().numpy())
        assert err <= TOL[dtype], f"{what}: relative error {err:.2e} vs SDPA"


def test_gradcheck_float64_cuda():
    rng = np.random.default_rng(11)
    q, k, v = (torch.from_numpy(rng.standard_normal(s)).cuda().requires_grad_(True)
               for s in ((1, 2, 5, 3), (1, 1, 7, 3), (1, 1, 7, 2)))  # fmt: skip
    assert torch.autograd.gradcheck(lambda q, k, v: nt.attention(q, k, v, causal=True), (q, k, v))
