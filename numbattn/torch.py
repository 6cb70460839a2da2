"""PyTorch adapter: numbattn's fused attention as a differentiable torch op.

Imported only when used (``import numbattn.torch``); ``import numbattn`` never
imports torch. :func:`attention` calls the custom operator
``torch.ops.numbattn.attention`` (registered with ``torch.library``), whose
forward pass is :func:`numbattn.attention` (with its ``lse``) and whose
registered backward is ``torch.ops.numbattn.attention_backward``, that is
:func:`numbattn.attention_backward`. Both have fake (meta) implementations,
so ``torch.compile(fullgraph=True)`` traces through them.

Tensors reach numbattn without copies: a CPU tensor as the NumPy view
``t.detach().numpy()`` (same memory, same strides, stride-0 broadcasts
included), a CUDA tensor as itself (``__cuda_array_interface__``), launched on
torch's current stream of its device. The one copy made is for a tensor with
torch's lazy negation bit set (``torch._neg_view``), which neither NumPy nor
the CUDA array interface can describe.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised in a subprocess
    raise ImportError(
        "numbattn.torch needs PyTorch: install torch (pip install torch), or numbattn's "
        f"'torch' extra ({exc})"
    ) from exc

import numbattn as _nb
from numbattn import _checks as chk

__all__ = ["attention"]

_DTYPES = (torch.float32, torch.float64)


#: Window sides are capped here before they enter the op's int64 schema.
_WINDOW_CAP = 2**62


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


def _integers(name: str, value: Any, batch: int | None) -> torch.Tensor | None:
    """Lengths or a diagonal as a new int64 tensor that the call owns.

    The op saves it for the backward pass, so the caller's buffer, which it
    may refill before calling ``backward``, is never kept. Tensors stay on
    their device (CUDA lengths are copied to the host inside the op, which
    synchronises); NumPy arrays, lists and ints become CPU tensors after
    numbattn's own checks of their types (and, for an int diagonal, range).
    """
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor or array, got {value.dtype}")
        return value.detach().to(dtype=torch.int64, copy=True)
    if name == "diagonal":
        return torch.from_numpy(chk.check_diagonal(value, batch).copy())
    # Shape and range are checked inside the op, by numbattn, against the inputs.
    return torch.from_numpy(np.array(chk._host_integers(name, value, "of shape (B,)"), np.int64))


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


def _host(t: torch.Tensor | None) -> np.ndarray | None:
    """A lengths or diagonal tensor's values on the host (a 0-d diagonal stays 0-d)."""
    return None if t is None else t.cpu().numpy()


def _options(
    q: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    scale: float | None,
    causal: bool,
    key_lengths: torch.Tensor | None,
    query_lengths: torch.Tensor | None,
    window: list[int] | None,
    diagonal: torch.Tensor | None,
) -> dict[str, Any]:
    """The keyword arguments both ops pass numbattn (options, stream)."""
    return dict(
        scale=scale,
        causal=causal,
        key_lengths=_host(key_lengths),
        query_lengths=_host(query_lengths),
        bias=_view(bias),
        mask=_view(mask),
        window=None if window is None else (window[0], window[1]),
        diagonal=_host(diagonal),
        stream=_stream(q),
    )


@torch.library.custom_op("numbattn::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    scale: float | None,
    causal: bool,
    key_lengths: torch.Tensor | None,
    query_lengths: torch.Tensor | None,
    window: list[int] | None,
    diagonal: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """numbattn.attention into new (out, lse) tensors."""
    out = lse = None
    if q.dim() >= 2 and v.dim() >= 2:  # else numbattn raises about the shapes
        out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=q.dtype, device=q.device)
    opts = _options(q, bias, mask, scale, causal, key_lengths, query_lengths, window, diagonal)
    with _on_device(q):
        _nb.attention(_view(q), _view(k), _view(v), out=_view(out), lse=_view(lse), **opts)
    assert out is not None and lse is not None
    return out, lse


@_attention_op.register_fake
def _attention_fake(q: Any, k: Any, v: Any, *rest: Any) -> tuple[Any, Any]:
    return q.new_empty(q.shape[:-1] + v.shape[-1:]), q.new_empty(q.shape[:-1])


@torch.library.custom_op("numbattn::attention_backward", mutates_args=())
def _attention_backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    scale: float | None,
    causal: bool,
    key_lengths: torch.Tensor | None,
    query_lengths: torch.Tensor | None,
    window: list[int] | None,
    diagonal: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """numbattn.attention_backward into new (dq, dk, dv) tensors.

    ``empty_like`` keeps each input's layout (dense permutations); a
    non-dense input (a stride-0 broadcast) gets a contiguous gradient."""
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    opts = _options(q, bias, mask, scale, causal, key_lengths, query_lengths, window, diagonal)
    with _on_device(q):
        _nb.attention_backward(
            *(_view(t) for t in (q, k, v, out, lse, dout)),
            dq=_view(dq),
            dk=_view(dk),
            dv=_view(dv),
            **opts,
        )
    return dq, dk, dv


@_attention_backward_op.register_fake
def _attention_backward_fake(q: Any, k: Any, v: Any, *rest: Any) -> tuple[Any, Any, Any]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _on_device(t: torch.Tensor) -> Any:
    """A context making ``t``'s CUDA device current (nothing for a CPU tensor)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _save(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    """Autograd context of numbattn::attention: the inputs, out and lse."""
    q, k, v, bias, mask, scale, causal, key_lengths, query_lengths, window, diagonal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, mask, key_lengths, query_lengths, diagonal)
    ctx.options = (scale, causal, window)
    ctx.mark_non_differentiable(lse)


def _backward(ctx: Any, dout: Any, dlse: Any) -> tuple[Any, ...]:
    """Gradients of numbattn::attention for q, k and v (one fused pass gives
    all three; those not needed are dropped); bias and mask are constants."""
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    none = (None,) * 8
    if not (need_q or need_k or need_v):
        return (None, None, None, *none)
    q, k, v, out, lse, bias, mask, key_lengths, query_lengths, diagonal = ctx.saved_tensors
    scale, causal, window = ctx.options
    dq, dk, dv = _attention_backward_op(
        q, k, v, out, lse, dout, bias, mask, scale, causal, key_lengths, query_lengths,
        window, diagonal,
    )  # fmt: skip
    return (dq if need_q else None, dk if need_k else None, dv if need_v else None, *none)


def _no_double_backward(ctx: Any, *grads: Any) -> Any:
    raise RuntimeError(
        "numbattn.torch.attention has no double backward: its gradients were "
        "computed with create_graph=True and are now being differentiated; use "
        "torch.nn.functional.scaled_dot_product_attention for higher-order gradients"
    )


torch.library.register_autograd("numbattn::attention", _backward, setup_context=_save)
# Differentiating the gradients raises (a gradient penalty must not silently
# lose its second-order term).
torch.library.register_autograd(
    "numbattn::attention_backward",
    _no_double_backward,
    setup_context=lambda ctx, inputs, output: None,
)


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
    its buffer in between. ``torch.compile`` traces it as one operator
    (``fullgraph=True`` works).

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
    _check_tensors({"q": q, "k": k, "v": v, "bias": bias, "mask": mask})
    if bias is not None and bias.requires_grad:
        raise ValueError(
            "bias requires grad, but numbattn.torch.attention treats bias as a constant "
            "and gives it no gradient; pass bias.detach() (or use torch's "
            "scaled_dot_product_attention for a learned bias)"
        )
    batch = q.shape[0] if q.dim() > 2 else None
    sides = None
    if window is not None:
        # A side past any reach excludes no key; numbattn makes it unbounded. Capped so
        # that it fits the op's int64 schema (the limit is Nq + Nk + |diagonal| < 2**62).
        sides = [min(w, _WINDOW_CAP) for w in chk.check_window(window)]
    out, _lse = _attention_op(
        q,
        k,
        v,
        bias,
        mask,
        None if scale is None else chk.check_scale(scale, 1),
        chk.check_flag("causal", causal),
        _integers("key_lengths", key_lengths, batch),
        _integers("query_lengths", query_lengths, batch),
        sides,
        _integers("diagonal", diagonal, batch),
    )
    return out
