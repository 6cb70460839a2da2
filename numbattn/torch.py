"""PyTorch autograd adapter: numbattn's fused attention as a differentiable op.

Imported only when used (``import numbattn.torch``); ``import numbattn`` never
imports torch. :func:`attention` is a ``torch.autograd.Function`` whose forward
pass is :func:`numbattn.attention` (with its ``lse``) and whose backward pass is
:func:`numbattn.attention_backward`.

Tensors reach numbattn without copies: a CPU tensor as the NumPy view
``t.detach().numpy()`` (same memory, same strides, stride-0 broadcasts
included), a CUDA tensor as itself (``__cuda_array_interface__``), launched on
torch's current stream of its device. The one copy made is for a tensor with
torch's lazy negation bit set (``torch._neg_view``), which neither NumPy nor
the CUDA array interface can describe.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import numpy as np

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised in a subprocess
    raise ImportError(
        "numbattn.torch needs PyTorch: install torch (pip install torch), or numbattn's "
        f"'torch' extra ({exc})"
    ) from exc

import numbattn as _nb

__all__ = ["attention"]

_DTYPES = (torch.float32, torch.float64)


class _Options(NamedTuple):
    """The non-tensor arguments, passed unchanged to the forward and the backward."""

    scale: float | None
    causal: bool
    key_lengths: Any
    query_lengths: Any
    window: tuple[int, int] | None
    diagonal: Any


def _view(t: Any) -> Any:
    """What numbattn receives for tensor ``t``: no copy, same strides.

    A CPU tensor as a NumPy view, a CUDA tensor as itself (numbattn reads its
    ``__cuda_array_interface__``, which torch refuses on a tensor that requires
    grad, hence the detach). ``None`` stays ``None``.
    """
    if t is None:
        return None
    t = t.detach()
    if t.is_neg():  # a lazy negation: neither NumPy nor the CUDA interface can express it
        t = t.resolve_neg()
    return t.numpy() if t.device.type == "cpu" else t


def _stream(t: Any) -> int | None:
    """torch's current stream on ``t``'s CUDA device, as a raw handle; None on the CPU.

    Autograd runs a backward on the stream its forward ran on, and makes that
    stream current, so reading it at each call is right for both passes."""
    if t.device.type != "cuda":
        return None
    return int(torch.cuda.current_stream(t.device).cuda_stream)


def _host_integers(name: str, value: Any) -> Any:
    """Lengths or diagonals on the host, as numbattn wants them: a private copy
    (a tensor on a GPU is copied, which synchronises; a 0-d tensor becomes an
    int). The backward pass reuses the forward's values, so the caller's
    buffer, which it may refill before calling ``backward``, is never kept.
    Other values (ints, None, anything unexpected) pass through to numbattn's
    checks."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor or array, got {value.dtype}")
        host = value.detach().cpu().numpy().copy()
        return int(host) if host.ndim == 0 else host
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, list):
        return copy.deepcopy(value)
    return value


def _check_tensors(named: dict[str, Any]) -> torch.device:
    """Types, dtypes and one device for every tensor argument (numbattn checks the rest)."""
    device = None
    first = ""
    for name, t in named.items():
        if t is None and name in ("bias", "mask"):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__qualname__}")
        if t.layout != torch.strided:
            raise TypeError(f"{name} must be a strided (dense) tensor, got layout {t.layout}")
        if name == "mask":
            if t.dtype != torch.bool:
                raise TypeError(f"mask must have dtype torch.bool (True = attend), got {t.dtype}")
        elif t.dtype not in _DTYPES:
            raise TypeError(
                f"{name} must have dtype torch.float32 or torch.float64, got {t.dtype}; "
                "numbattn never converts dtypes silently"
            )
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise TypeError(
                f"{name} is on {t.device} but {first} is on {device}; "
                "all tensors of one call must live on the same device"
            )
        if t.device.type not in ("cpu", "cuda"):
            raise TypeError(f"{name} must be a CPU or CUDA tensor, got device {t.device}")
    assert device is not None  # q is always checked
    return device


class _Attention(torch.autograd.Function):
    """numbattn.attention forward, numbattn.attention_backward backward.

    Saves (q, k, v, out, lse) and the constant bias and mask; gradients flow to
    q, k and v only.
    """

    @staticmethod
    def forward(ctx: Any, q: Any, k: Any, v: Any, bias: Any, mask: Any, opts: _Options) -> Any:
        out = lse = None
        if q.dim() >= 2 and v.dim() >= 2:  # else numbattn raises about the shapes
            out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
            lse = torch.empty(q.shape[:-1], dtype=q.dtype, device=q.device)
        _nb.attention(
            _view(q),
            _view(k),
            _view(v),
            scale=opts.scale,
            causal=opts.causal,
            key_lengths=opts.key_lengths,
            query_lengths=opts.query_lengths,
            bias=_view(bias),
            mask=_view(mask),
            window=opts.window,
            diagonal=opts.diagonal,
            out=_view(out),
            lse=_view(lse),
            stream=_stream(q),
        )
        ctx.save_for_backward(q, k, v, out, lse, bias, mask)
        ctx.opts = opts
        return out

    @staticmethod
    def backward(ctx: Any, dout: Any) -> Any:
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        if not (need_q or need_k or need_v):
            return None, None, None, None, None, None
        with torch.no_grad():
            dq, dk, dv = _Attention._gradients(ctx, dout)
        if torch.is_grad_enabled():  # create_graph=True: the gradients' own graph is asked for
            dq, dk, dv = _NoDoubleBackward.apply(*(g.requires_grad_() for g in (dq, dk, dv)))
        return (
            dq if need_q else None,
            dk if need_k else None,
            dv if need_v else None,
            None,
            None,
            None,
        )

    @staticmethod
    def _gradients(ctx: Any, dout: Any) -> tuple[Any, Any, Any]:
        q, k, v, out, lse, bias, mask = ctx.saved_tensors
        opts: _Options = ctx.opts
        # One fused pass gives all three; ones not needed are dropped.
        # empty_like keeps each input's layout (dense permutations); a
        # non-dense input (a stride-0 broadcast) gets a contiguous gradient.
        dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
        _nb.attention_backward(
            _view(q),
            _view(k),
            _view(v),
            _view(out),
            _view(lse),
            _view(dout),
            scale=opts.scale,
            causal=opts.causal,
            key_lengths=opts.key_lengths,
            query_lengths=opts.query_lengths,
            bias=_view(bias),
            mask=_view(mask),
            window=opts.window,
            diagonal=opts.diagonal,
            dq=_view(dq),
            dk=_view(dk),
            dv=_view(dv),
            stream=_stream(q),
        )
        return dq, dk, dv


class _NoDoubleBackward(torch.autograd.Function):
    """Passes the first-order gradients through and raises if anything
    differentiates them: numbattn has no second-order backward, and a
    gradient penalty must not silently lose its second-order term."""

    @staticmethod
    def forward(ctx: Any, dq: Any, dk: Any, dv: Any) -> Any:
        return dq.view_as(dq), dk.view_as(dk), dv.view_as(dv)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise RuntimeError(
            "numbattn.torch.attention has no double backward: its gradients were "
            "computed with create_graph=True and are now being differentiated; use "
            "torch.nn.functional.scaled_dot_product_attention for higher-order gradients"
        )


@torch.compiler.disable(recursive=True)
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    key_lengths: Any = None,
    query_lengths: Any = None,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
    diagonal: Any = None,
) -> torch.Tensor:
    """Differentiable fused attention on torch tensors (CPU or CUDA).

    ``softmax(scale * q @ k^T + bias, masked) @ v``, computed by
    :func:`numbattn.attention` and differentiated by
    :func:`numbattn.attention_backward` (FlashAttention-2's backward: the
    probabilities are recomputed from the saved log-sum-exp; no (Nq, Nk)
    array is ever allocated, forward or backward). Semantics are numbattn's:
    in particular ``causal`` is bottom-right aligned (query i sees key j
    when ``j <= i + Nk - Nq``), whereas torch's ``scaled_dot_product_attention``
    aligns ``is_causal`` top-left; the two agree when Nq == Nk, and
    ``diagonal=0`` gives torch's alignment for any shape.

    Gradients flow to ``q``, ``k`` and ``v`` (those that require grad; the
    backward computes the three in one pass). ``bias`` and ``mask`` are
    constants. Double backward is not supported: differentiating the
    gradients (computed with ``create_graph=True``, as a gradient penalty
    does) raises RuntimeError.

    The lengths and the diagonal are copied at the call, so the backward
    pass uses the values the forward pass used even when the caller refills
    its buffer in between. Inside a ``torch.compile``'d function it runs
    eagerly, between the compiled parts (a graph break).

    Tensors are passed to numbattn without copies, whatever their strides
    (transposed views, stride-0 broadcasts; the gradient of the output
    too). CUDA tensors run on torch's current stream of their device, so
    nothing synchronises the host (except lengths given as CUDA tensors,
    which are copied to the host).

    Parameters
    ----------
    q : torch.Tensor, shape (..., Nq, d)
    k : torch.Tensor, shape (..., Nk, d)
    v : torch.Tensor, shape (..., Nk, dv)
        float32 or float64 (all the same), on one device (CPU or CUDA), same
        leading dimensions (typically (B, H)); any strides, e.g. a
        (B, N, H, d) tensor as ``x.transpose(1, 2)``. ``dv`` may differ from
        ``d``. Grouped-query / multi-query attention: k and v may have fewer
        heads (the last leading axis) than q, a divisor of q's; their
        gradients are summed over each group of query heads.
    scale : float, optional
        Multiplier of the dot products; default ``1/sqrt(d)``.
    causal : bool, default False
        Query i sees key j only when ``j <= i + (Nk - Nq)`` (bottom-right).
    key_lengths, query_lengths : integer tensor or array, shape (B,), optional
        Batch element b (first leading axis) uses keys ``[0, key_lengths[b])``
        and queries ``[0, query_lengths[b])``. Rows past the query length
        are zeros in the output and get zero gradients. A CUDA tensor is
        copied to the host (this synchronises); pass a CPU tensor or NumPy
        array to avoid that.
    bias : torch.Tensor, broadcastable to (..., Nq, Nk), optional
        Added to the scaled scores (the inputs' dtype and device); -inf
        entries mask. A constant: it must not require grad.
    mask : bool torch.Tensor, broadcastable to (..., Nq, Nk), optional
        True = attend (same device as the inputs).
    window : (int, int), optional
        ``(left, right)`` sliding window, FlashAttention's ``window_size``;
        -1 = unbounded on that side.
    diagonal : int, or integer tensor or array of shape (B,), optional
        Where causal and window are aligned: query i is aligned with key
        ``i + diagonal`` (default ``Nk - Nq``, or ``key_lengths[b] -
        query_lengths[b]``: bottom-right); 0 is top-left, torch's
        ``is_causal``. A CUDA tensor is copied to the host (synchronises).

    Returns
    -------
    torch.Tensor, shape (..., Nq, dv)
        New tensor (contiguous) on the inputs' device, with a gradient
        function when any of q, k, v requires grad. A row with no visible
        key is zeros and its gradients are zero (never NaN).

    Raises
    ------
    TypeError
        Non-tensor ``q``/``k``/``v``/``bias``/``mask``; a dtype other than
        float32/float64 (bool for ``mask``); tensors on different devices
        or on a device other than CPU/CUDA; float lengths or diagonal; and every
        ``TypeError`` of :func:`numbattn.attention`.
    ValueError
        ``bias`` that requires grad; and every ``ValueError`` of
        :func:`numbattn.attention` (shapes, heads, lengths, window, diagonal,
        scale).

    Examples
    --------
    >>> import torch, numbattn.torch
    >>> q, k, v = (torch.randn(2, 4, 16, 8, requires_grad=True) for _ in range(3))
    >>> out = numbattn.torch.attention(q, k, v, causal=True)
    >>> out.square().sum().backward()
    >>> q.grad.shape
    torch.Size([2, 4, 16, 8])
    """
    device = _check_tensors({"q": q, "k": k, "v": v, "bias": bias, "mask": mask})
    if bias is not None and bias.requires_grad:
        raise ValueError(
            "bias requires grad, but numbattn.torch.attention treats bias as a constant "
            "and gives it no gradient; pass bias.detach() (or use torch's "
            "scaled_dot_product_attention for a learned bias)"
        )
    opts = _Options(
        scale=scale,
        causal=causal,
        key_lengths=_host_integers("key_lengths", key_lengths),
        query_lengths=_host_integers("query_lengths", query_lengths),
        window=window,
        diagonal=_host_integers("diagonal", diagonal),
    )
    if device.type == "cuda":
        with torch.cuda.device(device):
            return _Attention.apply(q, k, v, bias, mask, opts)
    return _Attention.apply(q, k, v, bias, mask, opts)
