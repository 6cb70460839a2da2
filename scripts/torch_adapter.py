"""numbattn.torch on the CPU: forward + backward through the autograd adapter
against the same two numbattn calls on NumPy views (the adapter's cost) and
against torch's SDPA autograd.

    python scripts/torch_adapter.py [--shape 2,4,512,64] [--dtype float32,float64]
                                    [--causal yes] [--rounds 9]

Each round times every variant once, in turn (alternated, one process);
the table gives medians and ratios to the bare numbattn calls. Variants:
``numbattn`` (attention with lse, then attention_backward, on NumPy views),
``adapter .backward()`` (accumulates into ``.grad``, a torch operation
between numbattn calls, as in training), ``adapter autograd.grad`` (no
accumulation), ``SDPA .backward()``. Try it with and without
``OMP_WAIT_POLICY=PASSIVE`` (docs/backward.md, "PyTorch autograd").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # (before numbattn's first CPU call: see docs/threads.md)

import numbattn
import numbattn.torch as nt


def variants(shape: tuple[int, ...], dtype: torch.dtype, causal: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(True) for _ in "qkv")
    dout = torch.randn(*shape, generator=g, dtype=dtype)
    qn, kn, vn, dn = (x.detach().numpy() for x in (q, k, v, dout))

    def bare() -> None:
        lse = torch.empty(shape[:-1], dtype=dtype).numpy()
        out = numbattn.attention(qn, kn, vn, causal=causal, lse=lse)
        numbattn.attention_backward(qn, kn, vn, out, lse, dn, causal=causal)

    def adapter() -> None:
        nt.attention(q, k, v, causal=causal).backward(dout)

    def adapter_grad() -> None:
        torch.autograd.grad(nt.attention(q, k, v, causal=causal), (q, k, v), dout)

    def sdpa() -> None:
        f = torch.nn.functional.scaled_dot_product_attention
        f(q, k, v, is_causal=causal).backward(dout)

    return {
        "numbattn": bare,
        "adapter .backward()": adapter,
        "adapter autograd.grad": adapter_grad,
        "SDPA .backward()": sdpa,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="2,4,512,64", help="B,H,N,d")
    p.add_argument("--dtype", default="float32,float64")
    p.add_argument("--causal", choices=["no", "yes"], default="yes")
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.split(","))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads; shape {shape}")
    for name in args.dtype.split(","):
        fns = variants(shape, getattr(torch, name), args.causal == "yes")
        for fn in fns.values():  # compile and warm up
            fn()
            fn()
        times: dict[str, list[float]] = {n: [] for n in fns}
        for _ in range(args.rounds):
            for n, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[n].append(time.perf_counter() - t0)
        base = statistics.median(times["numbattn"])
        for n, t in times.items():
            med = statistics.median(t)
            print(f"{name:8} {n:24} {med * 1e3:9.2f} ms  {med / base:5.2f}x numbattn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
