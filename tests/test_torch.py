"""numbattn.torch: the autograd adapter on CPU tensors.

Gradients are checked three ways: ``torch.autograd.gradcheck`` (finite
differences of numbattn's own forward) in float64 for every option; against
torch's ``scaled_dot_product_attention`` autograd in float32 and float64 (the
same options expressed as an explicit SDPA mask, since torch's ``is_causal``
is top-left aligned and numbattn's causal bottom-right); and a short training
loop whose loss curve must match the same model on SDPA. Tensors must reach
numbattn without copies (a spy records the arrays numbattn receives).
Tiles are shrunk for the whole module, so tiny shapes take multi-tile paths.
Skipped when torch is not installed (CI installs a CPU torch).
"""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import numbattn  # noqa: E402
import numbattn.torch as nt  # noqa: E402
from numbattn.reference import relative_error  # noqa: E402

F = torch.nn.functional
DTYPES = (torch.float64, torch.float32)
#: ||numbattn - torch SDPA|| / ||SDPA||, outputs and gradients (both sides
#: carry their own rounding, so a little above the reference tolerances).
TOL = {torch.float32: 2e-5, torch.float64: 1e-11}
GUIDE = Path(__file__).resolve().parents[1] / "docs" / "backward.md"


@pytest.fixture(scope="module", autouse=True)
def _small_tiles():
    """Every CPU tile knob tiny (query-like 3, key-like 5): multi-tile paths and tails."""
    with pytest.MonkeyPatch.context() as mp:
        for name in dir(numbattn.config):
            if name.startswith("CPU_") and name.endswith("_TILE"):
                mp.setattr(numbattn.config, name, 3 if "QUERY" in name else 5)
        yield


def randn(rng, shape, dtype, grad=False):
    t = torch.from_numpy(rng.standard_normal(shape)).to(dtype)
    return t.requires_grad_(grad)


def qkv(rng, dtype, b=2, h=2, hk=None, nq=4, nk=5, d=3, dv=2):
    hk = h if hk is None else hk
    return (
        randn(rng, (b, h, nq, d), dtype, True),
        randn(rng, (b, hk, nk, d), dtype, True),
        randn(rng, (b, hk, nk, dv), dtype, True),
    )


def visibility(q, k, *, causal=False, key_lengths=None, query_lengths=None, mask=None,
               window=None, bias=None, diagonal=None):  # fmt: skip
    """numbattn's visibility as an explicit (B, 1|H, Nq, Nk) bool tensor, and the
    (B, 1, Nq, 1) rows that see at least one key (others are zeros in numbattn)."""
    b, nq, nk = q.shape[0], q.shape[-2], k.shape[-2]
    qlen = torch.as_tensor(np.asarray(nq if query_lengths is None else query_lengths))
    klen = torch.as_tensor(np.asarray(nk if key_lengths is None else key_lengths))
    qlen, klen = (x.expand(b).reshape(b, 1, 1, 1) for x in (qlen, klen))
    i = torch.arange(nq).reshape(1, 1, nq, 1)
    j = torch.arange(nk).reshape(1, 1, 1, nk)
    if diagonal is None:
        diag = i + (klen - qlen)  # bottom-right, per sequence
    else:
        diag = i + torch.as_tensor(np.asarray(diagonal)).expand(b).reshape(b, 1, 1, 1)
    vis = (j < klen) & (i < qlen)
    left, right = window if window is not None else (-1, -1)
    right = 0 if causal else right
    if left >= 0:
        vis = vis & (j >= diag - left)
    if right >= 0:
        vis = vis & (j <= diag + right)
    if mask is not None:
        vis = vis & mask
    if bias is not None:
        vis = vis & torch.isfinite(bias)
    return vis, vis.any(-1, keepdim=True)


def sdpa(q, k, v, *, scale=None, causal=False, key_lengths=None, query_lengths=None,
         bias=None, mask=None, window=None, diagonal=None):  # fmt: skip
    """The same attention through torch's SDPA autograd.

    Grouped-query heads are repeated (autograd sums their gradients back);
    rows that see no key get an all-visible row whose output is then zeroed
    (numbattn writes zeros there and gives them zero gradients).
    """
    group = q.shape[-3] // k.shape[-3]
    if group > 1:
        k, v = (x.repeat_interleave(group, dim=-3) for x in (k, v))
    plain = all(x is None for x in (key_lengths, query_lengths, window, mask, bias))
    top_left = (diagonal is None and q.shape[-2] == k.shape[-2]) or (
        isinstance(diagonal, int) and diagonal == 0
    )
    if plain and (not causal or top_left):  # torch's is_causal is top-left aligned
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    vis, rows = visibility(q, k, causal=causal, key_lengths=key_lengths,
                           query_lengths=query_lengths, mask=mask, window=window, bias=bias,
                           diagonal=diagonal)  # fmt: skip
    vis = vis | ~rows
    add = torch.zeros((), dtype=q.dtype) if bias is None else bias.detach()
    attn_mask = torch.where(vis, add, torch.tensor(-torch.inf, dtype=q.dtype))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale) * rows


def case_kwargs(rng, case, dtype, b, h, nq, nk, finite=True):
    """Keyword arguments of one named option case. ``finite``: no -inf in the bias."""
    kw = {}
    if "scale" in case:
        kw["scale"] = 0.7
    if "causal" in case:
        kw["causal"] = True
    if "lengths" in case:  # a torch tensor and a NumPy array
        kw["key_lengths"] = torch.tensor([nk, max(nk - 3, 1)], dtype=torch.int32)[:b]
        kw["query_lengths"] = np.array([nq - 1, nq])[:b]
    if "bias" in case:  # (H, Nq, Nk), broadcast over the batch
        bias = randn(rng, (h, nq, nk), dtype)
        if not finite:
            bias[torch.from_numpy(rng.random((h, nq, nk)) < 0.2)] = -torch.inf
            bias[0, 1, :] = -torch.inf
        kw["bias"] = bias
    if "mask" in case:  # (B, 1, 1, Nk) key mask and a (Nq, Nk) pattern
        mask = torch.from_numpy(rng.random((nq, nk)) < 0.7)
        kw["mask"] = mask & torch.from_numpy(rng.random((b, 1, 1, nk)) < 0.8)
    if "window" in case:
        kw["window"] = (1, 1) if "causal" not in case else (2, -1)
    if "diag0" in case:  # top-left: torch's is_causal
        kw["diagonal"] = 0
    if "diagb" in case:  # one per batch element, as a tensor
        kw["diagonal"] = torch.tensor([1, -2])[:b]
    return kw


#: name: (B, H, Hk, Nq, Nk, d, dv, options)
CASES = {
    "plain": (2, 2, 2, 4, 5, 3, 2, ""),
    "scale": (1, 2, 2, 4, 4, 3, 3, "scale"),
    "causal-square": (2, 2, 2, 5, 5, 3, 2, "causal"),
    "causal-wide": (1, 2, 2, 3, 7, 3, 2, "causal"),
    "causal-tall": (1, 2, 2, 7, 3, 3, 2, "causal"),  # the first 4 rows see nothing
    "lengths": (2, 2, 2, 4, 6, 3, 2, "lengths"),
    "bias": (2, 2, 2, 4, 5, 3, 2, "bias"),
    "mask": (2, 2, 2, 4, 5, 3, 2, "mask"),
    "window": (1, 2, 2, 6, 6, 3, 2, "window"),
    "gqa": (1, 4, 2, 4, 5, 3, 2, ""),
    "mqa": (2, 3, 1, 4, 5, 2, 3, "causal"),
    "combo": (2, 4, 2, 5, 7, 3, 2, "scale causal lengths bias mask window"),
    "diagonal-0": (1, 2, 2, 4, 7, 3, 2, "causal diag0"),  # is_causal with Nq != Nk
    "diagonal-tall": (1, 2, 2, 7, 4, 3, 2, "causal diag0"),
    "diagonal-batch": (2, 2, 1, 5, 5, 3, 2, "window lengths diagb"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck_float64(name, rng):
    """Finite differences of numbattn's forward against its backward, every option."""
    b, h, hk, nq, nk, d, dv, case = CASES[name]
    q, k, v = qkv(rng, torch.float64, b, h, hk, nq, nk, d, dv)
    kw = case_kwargs(rng, case, torch.float64, b, h, nq, nk, finite=False)
    assert torch.autograd.gradcheck(lambda q, k, v: nt.attention(q, k, v, **kw), (q, k, v))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_sdpa(name, dtype, rng):
    """Output and q, k, v gradients against torch's SDPA autograd, for a random dout."""
    b, h, hk, nq, nk, d, dv, case = CASES[name]
    q, k, v = qkv(rng, dtype, b, h, hk, nq, nk, d, dv)
    kw = case_kwargs(rng, case, dtype, b, h, nq, nk)
    dout = randn(rng, (b, h, nq, dv), dtype)
    got = nt.attention(q, k, v, **kw)
    grads = torch.autograd.grad(got, (q, k, v), dout)
    ref = sdpa(q, k, v, **kw)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    for what, x, y in zip(("out", "dq", "dk", "dv"), (got, *grads), (ref, *ref_grads)):
        assert x.dtype == dtype and x.shape == y.shape, what
        assert torch.isfinite(x).all(), what
        err = relative_error(x.detach().numpy(), y.detach().numpy())
        assert err <= TOL[dtype], f"{name} {what}: relative error {err:.2e} vs SDPA"


def test_fully_masked_rows_have_zero_gradients(rng):
    """Rows past query_lengths, and rows that see no key, give zero gradient, never NaN."""
    q, k, v = qkv(rng, torch.float64, b=2, nq=6, nk=3)
    # batch 0: rows 0-2 see nothing (causal, Nq > Nk); batch 1: rows 2-5 are past its length
    kw = {"causal": True, "query_lengths": [6, 2]}
    out = nt.attention(q, k, v, **kw)
    out.backward(randn(rng, out.shape, torch.float64))
    assert (out[0, :, :3] == 0).all() and (out[1, :, 2:] == 0).all()
    assert (q.grad[0, :, :3] == 0).all() and (q.grad[1, :, 2:] == 0).all()
    assert (q.grad[0, :, 4:] != 0).all() and (q.grad[1, :, :2] != 0).all()  # row 3: one key
    for g in (q.grad, k.grad, v.grad):
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("shape", [(2, 2, 3, 0), (0, 2, 3, 4), (2, 2, 0, 4)], ids=str)
def test_empty_dimensions(shape, rng):
    """Nk = 0 (no row sees a key: zeros, zero gradients), B = 0, Nq = 0."""
    b, h, nq, nk = shape
    q, k, v = qkv(rng, torch.float64, b=b, h=h, nq=nq, nk=nk, d=4, dv=5)
    out = nt.attention(q, k, v)
    assert out.shape == (b, h, nq, 5) and (out == 0).all()
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and (t.grad == 0).all()


class Tiny(torch.nn.Module):
    """One causal self-attention layer: fused qkv projection, output projection."""

    def __init__(self, attend, width=8, heads=2):
        super().__init__()
        self.attend, self.heads = attend, heads
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width)

    def forward(self, x):
        b, n, w = x.shape
        # (B, N, 3, H, dh) -> three (B, H, N, dh) strided views, not copies
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).unbind(2)
        o = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(o.transpose(1, 2).reshape(b, n, w))


def _losses(attend, dtype, steps=6):
    torch.manual_seed(0)
    model = Tiny(attend).to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 8, generator=gen, dtype=dtype)
    y = torch.randn(3, 7, 8, generator=gen, dtype=dtype)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return np.array(losses)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_training_loop_matches_sdpa(dtype):
    """A few Adam steps of a tiny attention model: same loss curve as with SDPA."""
    ours = _losses(lambda q, k, v: nt.attention(q, k, v, causal=True), dtype)
    theirs = _losses(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), dtype)
    assert ours[-1] < 0.9 * ours[0], f"the model does not learn: {ours}"
    tol = {torch.float32: 1e-4, torch.float64: 1e-10}[dtype]
    np.testing.assert_allclose(ours, theirs, rtol=tol)


def _spy(monkeypatch):
    """Record the arguments numbattn.attention and numbattn.attention_backward receive."""
    seen = {}
    for name in ("attention", "attention_backward"):
        real = getattr(numbattn, name)

        def spy(*args, _real=real, _name=name, **kw):
            seen[_name] = (args, kw)
            return _real(*args, **kw)

        monkeypatch.setattr(numbattn, name, spy)
    return seen


def _same_memory(arr, t):
    """``arr`` (what numbattn got) is ``t``'s memory with ``t``'s strides: no copy."""
    assert isinstance(arr, np.ndarray)
    assert arr.__array_interface__["data"][0] == t.data_ptr()
    assert arr.strides == tuple(s * t.element_size() for s in t.stride())
    assert arr.shape == tuple(t.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_inputs_and_grads_are_not_copied(dtype, rng, monkeypatch):
    """Transposed, stride-0 and offset views, and a stride-0 dout (``out.sum()``),
    reach numbattn as views of the same memory; gradients still match SDPA."""
    b, n, h, d = 2, 5, 4, 3
    x = randn(rng, (b, n, 3, h, d), dtype, True)  # a fused (B, N, 3, H, d) projection
    k0 = randn(rng, (b, n, d), dtype, True)  # one key head, broadcast over H with stride 0
    mask = torch.from_numpy(rng.random((1, 1, 1, n)) < 0.8).expand(b, h, n, n)

    def inputs(x, k0):
        q = x[:, :, 0].transpose(1, 2)
        k = k0[:, None].expand(b, h, n, d)
        v = x[:, :, 2, :, 1:].transpose(1, 2)  # offset, dv = d - 1
        return q, k, v

    seen = _spy(monkeypatch)
    q, k, v = inputs(x, k0)
    out = nt.attention(q, k, v, mask=mask, causal=True)
    out.sum().backward()
    args, kw = seen["attention"]
    for arr, t in zip(args, (q, k, v)):
        _same_memory(arr, t)
    _same_memory(kw["mask"], mask)
    args, kw = seen["attention_backward"]
    for arr, t in zip(args, (q, k, v)):
        _same_memory(arr, t)
    dout = args[5]
    assert dout.shape == (b, h, n, d - 1) and dout.strides == (0, 0, 0, 0)

    xr, k0r = (t.detach().clone().requires_grad_(True) for t in (x, k0))
    sdpa(*inputs(xr, k0r), mask=mask, causal=True).sum().backward()
    for what, got, ref in (("x", x.grad, xr.grad), ("k0", k0.grad, k0r.grad)):
        err = relative_error(got.numpy(), ref.numpy())
        assert err <= TOL[dtype], f"d{what}: relative error {err:.2e} vs SDPA"


def test_neg_view_is_resolved(rng):
    """torch's lazy negation bit (which no array interface carries) is honoured."""
    q, k, v = qkv(rng, torch.float64)
    neg = torch._neg_view(q.detach().neg()).requires_grad_(True)
    assert neg.is_neg()
    out = nt.attention(neg, k, v)
    ref = nt.attention(q, k, v)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.backward(torch.ones_like(out))
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(neg.grad, q.grad, rtol=0, atol=0)


def test_needs_input_grad(rng, monkeypatch):
    """Gradients only for the inputs that require them; no graph when none does."""
    q, k, v = qkv(rng, torch.float64)
    k, v = k.detach(), v.detach()
    out = nt.attention(q, k, v)
    (dq,) = torch.autograd.grad(out, (q,), torch.ones_like(out))
    ref = sdpa(q, k, v)
    (ref_dq,) = torch.autograd.grad(ref, (q,), torch.ones_like(ref))
    assert relative_error(dq.numpy(), ref_dq.numpy()) <= TOL[torch.float64]
    v.requires_grad_(True)
    out = nt.attention(q.detach(), k, v)
    out.sum().backward()
    assert v.grad is not None and k.grad is None
    seen = _spy(monkeypatch)
    out = nt.attention(q.detach(), k, v.detach())
    assert out.grad_fn is None and not out.requires_grad
    with torch.no_grad():
        assert nt.attention(q, k, v).grad_fn is None
    assert "attention_backward" not in seen


@pytest.mark.parametrize("dout_requires_grad", [True, False])
def test_double_backward_is_refused(rng, dout_requires_grad):
    """Differentiating the gradients raises, also for a gradient penalty, whose
    upstream gradient (``ones``) does not require grad."""
    q, k, v = qkv(rng, torch.float64)
    out = nt.attention(q, k, v)
    dout = torch.ones_like(out, requires_grad=dout_requires_grad)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout, create_graph=True)
    assert dq.requires_grad and dk.requires_grad and dv.requires_grad
    ref = torch.autograd.grad(sdpa(q, k, v), (q, k, v), torch.ones_like(out))
    for got, want in zip((dq, dk, dv), ref):
        assert relative_error(got.detach().numpy(), want.numpy()) <= TOL[torch.float64]
    penalty = dq.square().sum() + dk.square().sum()
    with pytest.raises(RuntimeError, match=r"numbattn\.torch\.attention has no double backward"):
        penalty.backward()
    # Without create_graph the gradients carry no graph, as for any function.
    out = nt.attention(q, k, v)
    (dq,) = torch.autograd.grad(out, (q,), torch.ones_like(out))
    assert not dq.requires_grad


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_torch_compile_fullgraph(rng, backend):
    """A registered custom op: torch.compile(fullgraph=True) traces through it
    (no graph break), with lengths as a tensor, and gives the eager output
    and gradients."""
    q, k, v = qkv(rng, torch.float64)
    kl = torch.tensor([5, 3])

    def loss(q, k, v):
        return (nt.attention(q, k, v, causal=True, key_lengths=kl, window=(2, -1)).sin() * 2).sum()

    torch._dynamo.reset()
    want = loss(q, k, v)
    want_grads = torch.autograd.grad(want, (q, k, v))
    got = torch.compile(loss, backend=backend, fullgraph=True)(q, k, v)
    grads = torch.autograd.grad(got, (q, k, v))
    tol = 0 if backend != "inductor" else 1e-13  # inductor fuses the sin/sum around the op
    assert abs((got - want).item()) <= tol * abs(want.item())
    for name, a, b in zip("qkv", grads, want_grads):
        assert relative_error(a.numpy(), b.numpy()) <= tol, name


def test_window_sides_past_int64_are_unbounded(rng):
    """Window sides larger than the op's int64 schema holds mean unbounded, as in numbattn."""
    q, k, v = qkv(rng, torch.float64)
    got = nt.attention(q, k, v, window=(10**30, 2**70))
    want = numbattn.attention(*(t.detach().numpy() for t in (q, k, v)))
    assert relative_error(got.detach().numpy(), want) <= TOL[torch.float64]


def test_opcheck(rng):
    """torch.library.opcheck: schema, fake (meta) implementations, autograd
    registration and AOT dispatch with dynamic shapes, forward and backward."""
    q, k, v = qkv(rng, torch.float64, hk=1)
    opts = (0.7, True, torch.tensor([5, 2]), torch.tensor([4, 1]), [2, -1], None)
    for case in (
        (None, None),
        (randn(rng, (4, 5), torch.float64), torch.ones(2, 1, 4, 5, dtype=torch.bool)),
    ):
        args = (q, k, v, *case, *opts)
        torch.library.opcheck(torch.ops.numbattn.attention.default, args)
        out, lse = torch.ops.numbattn.attention(*args)
        dout = randn(rng, tuple(out.shape), torch.float64)
        bargs = (q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), dout, *case, *opts)
        torch.library.opcheck(torch.ops.numbattn.attention_backward.default, bargs)


@pytest.mark.parametrize("kind", ["tensor", "numpy", "list"])
def test_backward_uses_the_forward_lengths(rng, kind):
    """The caller refills its lengths and diagonal buffers between the forward
    and the backward: the gradients are still those of the forward's values."""
    q, k, v = qkv(rng, torch.float64, b=2, h=1, nq=2, nk=6, d=4, dv=4)
    wrap = {"tensor": torch.tensor, "numpy": np.array, "list": list}[kind]
    kl, ql, diag = wrap([6, 3]), wrap([2, 1]), wrap([4, 1])
    opts = dict(causal=True, key_lengths=kl, query_lengths=ql, diagonal=diag)
    out = nt.attention(q, k, v, **opts)
    dout = torch.from_numpy(rng.standard_normal(tuple(out.shape)))
    grads = torch.autograd.grad(out, (q, k, v), dout)
    out = nt.attention(q, k, v, **opts)
    kl[1], ql[1], diag[1] = 1, 2, -3  # the caller reuses its buffers
    after = torch.autograd.grad(out, (q, k, v), dout)
    for name, want, got in zip("qkv", grads, after):
        assert torch.equal(got, want), f"d{name} changed with the caller's buffers"
    kl[1], ql[1], diag[1] = 3, 1, 1
    ref = numbattn.reference.attention_backward(
        *(t.detach().numpy() for t in (q, k, v)), dout.numpy(), causal=True,
        key_lengths=np.array([6, 3]), query_lengths=np.array([2, 1]), diagonal=np.array([4, 1]),
    )  # fmt: skip
    for name, want, got in zip("qkv", ref, grads):
        assert relative_error(got.numpy(), want) <= TOL[torch.float64], name


def test_errors(rng):
    q, k, v = qkv(rng, torch.float64)
    bias = randn(rng, (4, 5), torch.float64, True)
    with pytest.raises(ValueError, match="bias requires grad"):
        nt.attention(q, k, v, bias=bias)
    with pytest.raises(TypeError, match=r"k must have dtype torch\.float32 or torch\.float64"):
        nt.attention(q, k.half(), v)
    with pytest.raises(TypeError, match=r"q must be a torch\.Tensor"):
        nt.attention(q.detach().numpy(), k, v)
    with pytest.raises(TypeError, match=r"v must be a torch\.Tensor, got NoneType"):
        nt.attention(q, k, None)
    with pytest.raises(TypeError, match=r"mask must have dtype torch\.bool"):
        nt.attention(q, k, v, mask=torch.ones(4, 5))
    with pytest.raises(TypeError, match="v is on meta but q is on cpu"):
        nt.attention(q, k, v.to("meta"))
    with pytest.raises(TypeError, match="key_lengths must be an integer"):
        nt.attention(q, k, v, key_lengths=torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="must have dtype float64"):  # numbattn's own check
        nt.attention(q, k, v.float())
    with pytest.raises(ValueError, match="last dimension d = 3"):
        nt.attention(q, k[..., :2], v)
    with pytest.raises(ValueError, match="key_lengths"):
        nt.attention(q, k, v, key_lengths=np.array([9, 1]))


def test_import_without_torch_says_what_is_missing():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "try:\n    import numbattn.torch\nexcept ImportError as e:\n    print(e)"
    )
    root = str(Path(numbattn.__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert "numbattn.torch needs PyTorch" in r.stdout, r.stdout + r.stderr


def test_import_numbattn_does_not_import_torch():
    code = "import sys, numbattn; sys.exit(int('torch' in sys.modules or 'numbattn.torch' in sys.modules))"
    root = str(Path(numbattn.__file__).resolve().parents[1])
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0


def test_guide_example_runs():
    text = GUIDE.read_text()
    section = text[text.index("## PyTorch: `numbattn.torch`") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "docs/backward.md:pytorch", "exec"), namespace)
    assert namespace["q"].grad is not None
