"""Random configurations against an independent float64 oracle: the textbook formula through autograd.

Every backend, random dtype, leading dims (zero rows included), in/out sizes, ranks (across the Triton rank
chunk of 64), dropout, scaling and bias; outputs and every gradient. 16/32-bit results are held to the suite's
rule (twice plain PyTorch's error in the same dtype, plus 8 ulp); float64 to 1e-10 relative.
"""

from __future__ import annotations

import random

import pytest
import torch

from lora_kernels import lora_linear, reference
from lora_kernels.functional import draw_seed
from lora_kernels.testing import error_and_budget

from conftest import DEVICE, compiled_backends

CASES = {"reference": 40, "cpu": 40, "cuda": 40, "triton": 12}  # the interpreter is slow


def _config(rng: random.Random, backend: str) -> dict:
    dtypes = [torch.float32, torch.float16, torch.bfloat16] + ([torch.float64] if backend != "triton" else [])
    lead = rng.choice([(rng.randint(0, 40),), (rng.randint(1, 4), rng.randint(0, 6))])
    return dict(dtype=rng.choice(dtypes), lead=lead, d_in=rng.randint(1, 70), d_out=rng.randint(1, 70),
                r=rng.choice([1, 3, 7, 16, 33, 64, 65, 130]), p=rng.choice([0.0, 0.0, 0.3]),
                s=rng.choice([0.5, 2.0, 16.0]), bias=rng.random() < 0.5)


def _textbook(x, weight, bias, lora_A, lora_B, s, p, seed):
    x2d = x.reshape(-1, x.shape[-1])
    keep = reference.dropout_mask(seed, x2d.shape[0], x2d.shape[1], p).to(x2d.dtype) / (1 - p) if p else 1.0
    y = x2d @ weight.t() + s * ((x2d * keep) @ lora_A.t()) @ lora_B.t()
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _plain(x, weight, bias, lora_A, lora_B, s, p, seed):
    y, _ = reference.lora_linear(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, s, p, seed)
    return y.reshape(*x.shape[:-1], weight.shape[0])


@pytest.mark.parametrize("backend", ["reference"] + compiled_backends())
def test_random_configurations_match_a_float64_oracle(backend, use_backend):
    use_backend(backend)
    rng = random.Random(f"lora-fuzz-{backend}")
    failures = []
    for case in range(CASES[backend]):
        c = _config(rng, backend)
        g = torch.Generator().manual_seed(case)

        def rand(*shape, scale=1.0):
            return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

        data = dict(x=rand(*c["lead"], c["d_in"]), weight=rand(c["d_out"], c["d_in"], scale=c["d_in"] ** -0.5),
                    bias=rand(c["d_out"]) if c["bias"] else None, lora_A=rand(c["r"], c["d_in"], scale=c["d_in"] ** -0.5),
                    lora_B=rand(c["d_out"], c["r"], scale=c["r"] ** -0.5))
        grad_y = rand(*c["lead"], c["d_out"])
        torch.manual_seed(case)
        seed = int(draw_seed()) if c["p"] else None

        def run(dtype, fn):
            leaves = {k: None if v is None else v.to(DEVICE, dtype).requires_grad_(k != "weight") for k, v in data.items()}
            torch.manual_seed(case)  # lora_linear draws the same seed as above
            y = fn(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_A"], leaves["lora_B"], c["s"], c["p"],
                   seed)
            wrt = [leaves[k] for k in ("x", "lora_A", "lora_B", "bias") if leaves[k] is not None]
            grads = torch.autograd.grad(y, wrt, grad_y.to(DEVICE, dtype))  # zero rows too
            return [y, *grads]

        def ours(x, weight, bias, lora_A, lora_B, s, p, _seed):
            return lora_linear(x, weight, bias, lora_A, lora_B, s, p, training=True)

        got = run(c["dtype"], ours)
        exact = run(torch.float64, _textbook)
        plain = run(c["dtype"], _plain)
        for name, o, e, pl in zip(("y", "dx", "dA", "dB", "dbias"), got, exact, plain):
            if not torch.isfinite(o).all():
                failures.append((c, name, "non-finite"))
            elif o.numel() and c["dtype"] == torch.float64:
                err = (o - e).abs().max().item()
                if err > 1e-10 * max(e.abs().max().item(), 1.0):
                    failures.append((c, name, f"err {err:.3g}"))
            elif o.numel():
                err, budget = error_and_budget(o, e, pl)
                if err > budget:
                    failures.append((c, name, f"err {err:.3g} > budget {budget:.3g}"))
    assert not failures, f"{len(failures)} failure(s), first: {failures[:3]}"
