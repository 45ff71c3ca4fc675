"""The prepared GPU check: validate every GPU kernel against reference.py, then time them, inside a deadline.

    bash benchmarks/gpu_check.sh                            # on the GPU machine: build, validate, time
    bash benchmarks/gpu_check.sh --deadline 300             # a shorter lease
    python -m benchmarks.gpu_check --dry-run                # anywhere: same code path on CPU (TRITON_INTERPRET=1)

Sections in priority order, each skipped once --deadline (default 480 s) has passed:
1. a Triton smoke validation (one shape, every dtype, dropout and bias on/off), while gpu_check.sh builds
   lora_kernels._C in the background; then the wait for that build and the cuda backend's smoke validation;
2. the headline timings (bf16, r = 16, 4096², M in {1, 16, 2048, 8192}, forward and train: ours vs F.linear
   vs the reference formula vs PEFT, ours[cuda] next to ours);
3. decode under CUDA graphs (4096² at M = 1 and 16, 4096 -> 1024 at M = 1), for F.linear, PEFT and ours:
   do_bench's GPU time per call, the eager wall time per call of 200 back-to-back calls (Python included),
   and the replay time of a captured graph (kernel-bound); LoRALinear and MultiLoRALinear replays must equal eager calls before
   and after a scaling change; torch.compile(mode="reduce-overhead") must capture ours;
4. the full validation of each GPU backend (odd shapes, r up to 256; y, xa, dx, dA, dB against the float64
   reference with the same dropout seed, within the tests' rule; merge, unmerge, switch, safe merge, drift);
5. QLoRA (lora_linear_4bit, NF4/FP4 W0): the triton backend's 4-bit kernels validated on both of its paths
   (fused, dequantize) and lora_linear_multi_4bit, the Triton dequantization bit for bit; then timed (bf16,
   r = 16, 4096 -> 4096 and 4096 -> 14336, M in {1, 16, 2048, 8192}, forward and train: ours (auto), each path
   forced, "dequantize whole + F.linear + LoRA", PEFT on bitsandbytes' Linear4bit where the machine has it,
   against bf16 F.linear) and decode under CUDA graphs;
6. lora_linear_multi's validation (random ids with -1 rows, mixed ranks, dropout; every output and
   gradient) and its timings (benchmarks/multi_adapter.py's cases); DoRA's validation and timings;
7. the remaining timing grid and the merges.
Every check and timed case is appended to $OUT/progress.jsonl as it finishes, and gpu_check.json /
results.md are rewritten after each section: a run cut short still returns what it measured.
LORA_KERNELS_AUTOTUNE=first limits each autotuned kernel to its first config (no tuning runs).
Fresh random inputs per case; the allocator is filled with NaN before each run so an output element a
kernel forgets to write cannot pass.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch


def _poison_allocator(device: str) -> None:
    """Fill freed allocator blocks with NaN so that unwritten outputs show up."""
    if device != "cuda":
        return
    free, _ = torch.cuda.mem_get_info()
    blocks = [torch.full((n,), float("nan"), device=device) for n in (1 << 16, 1 << 20, 1 << 24)
              if n * 4 * 4 < free]
    del blocks


def _error_ok(ours, exact, plain) -> tuple[bool, str]:
    from lora_kernels.testing import error_and_budget

    if not torch.isfinite(ours).all():
        return False, "non-finite values"
    if ours.numel() == 0:
        return True, ""
    err, budget = error_and_budget(ours, exact, plain)
    return err <= budget, f"err {err:.3g} budget {budget:.3g}"


def _judged(outputs, log, label: str, **fields) -> list[dict]:
    """A check row (fields + output, ok, detail) per (name, ours, exact, plain) output, under _error_ok's rule; a
    "FAIL <label> <name>" line for each that misses."""
    rows = []
    for name, ours, exact, plain in outputs:
        ok, why = _error_ok(ours, exact, plain)
        rows.append(dict(fields, output=name, ok=ok, detail=why))
        if not ok:
            log(f"FAIL {label} {name}: {why}")
    return rows


def validate_linear(backend: str, device: str, shapes, log, scalings=("number",)) -> list[dict]:
    """lora_linear on `backend`: y, xa, dx, dA, dB against the float64 reference, every dtype, dropout and
    bias on and off; scalings: "number" (a float argument) and/or "in memory" (a 0-d tensor on the device,
    what LoRALinear passes on a GPU: Triton reads it in the kernel, the C++ backend folds it into B)."""
    from lora_kernels.ops import lora_linear as ops
    from lora_kernels.testing import LORA_OUTPUTS, lora_linear_oracles, make_lora_inputs

    rows = []
    os.environ["LORA_KERNELS_BACKEND"] = backend
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for (M, d_in, d_out, r) in shapes:
            for p, has_bias, kind in itertools.product((0.0, 0.3), (True, False), scalings):
                scaling = 2.0 if kind == "number" else torch.tensor(2.0, dtype=torch.float64, device=device)
                case_seed = hash((M, d_in, d_out, r, p, has_bias)) % 2**31
                t = make_lora_inputs((M,), d_in, d_out, r, dtype, device, bias=has_bias, seed=case_seed)
                x, w, bias, A, B = t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"]
                grad_y = make_lora_inputs((M,), d_out, 1, 1, dtype, device, seed=case_seed + 1)["x"]
                seed = torch.tensor(1234 + M) if p else None
                _poison_allocator(device)
                y, xa = ops.forward(x, w, bias, A, B, scaling, p, seed)
                _poison_allocator(device)
                dx, dA, dB = ops.backward(grad_y, x, w, A, B, xa, scaling, p, seed, True)
                sv = int(seed) if seed is not None else None
                exact, plain = lora_linear_oracles(grad_y, x, w, bias, A, B, 2.0, p, sv)
                rows += _judged(zip(LORA_OUTPUTS, (y, xa, dx, dA, dB), exact, plain), log,
                                f"{backend} {dtype} M={M} {d_in}->{d_out} r={r} p={p} bias={has_bias} scaling {kind}",
                                op="lora_linear", backend=backend, dtype=str(dtype)[6:], shape=[M, d_in, d_out, r],
                                dropout=p, bias=has_bias, scaling=kind)
    os.environ.pop("LORA_KERNELS_BACKEND", None)
    return rows


def validate_merge(backend: str, device: str, shapes, cycles: int, log) -> list[dict]:
    from lora_kernels import merge_, switch_, unmerge_
    from lora_kernels.testing import make_adapter, two_ulp_bound

    rows = []
    os.environ["LORA_KERNELS_BACKEND"] = backend
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for (d_out, d_in, r) in shapes:
            w0, A, B = make_adapter(d_out, d_in, r, dtype, device, seed=d_out * d_in + r)
            exact = w0.double() + 1.5 * (B.double() @ A.double())
            w = w0.clone()
            merge_(w, A, B, 1.5)
            rounded_exact = exact.to(dtype).double()
            one_ulp = (rounded_exact - exact).abs().max().item() * 2 + 1e-30
            err = (w.double() - exact).abs().max().item()
            ok_merge = err <= max(one_ulp, (rounded_exact.abs().max().item()) * 2.0**-20)
            for _ in range(cycles):
                unmerge_(w, A, B, 1.5)
                merge_(w, A, B, 1.5)
            unmerge_(w, A, B, 1.5)
            drift = (w.double() - w0.double()).abs()
            ok_drift = bool((drift <= two_ulp_bound(dtype, w0, exact)).all())
            bad_A = A.clone()
            bad_A[0, 0] = float("nan")
            before = w.clone()
            try:
                merge_(w, bad_A, B, 1.5, safe=True)
                ok_safe = False
            except RuntimeError:
                ok_safe = torch.equal(w, before)
            _, A2, B2 = make_adapter(d_out, d_in, 5, dtype, device, seed=d_out * d_in + r + 1)
            merge_(w, A, B, 1.5)
            switch_(w, A, B, 1.5, A2, B2, 0.5)
            exact2 = w0.double() + 0.5 * (B2.double() @ A2.double())
            ok_switch = (w.double() - exact2).abs().max().item() <= 4 * one_ulp + exact2.abs().max().item() * 2.0**-18
            for name, ok in (("merge", ok_merge), ("drift", ok_drift), ("safe", ok_safe), ("switch", ok_switch)):
                rows.append(dict(op="merge", backend=backend, dtype=str(dtype)[6:], shape=[d_out, d_in, r],
                                 output=name, ok=bool(ok), detail=f"merge err {err:.3g}"))
                if not ok:
                    log(f"FAIL merge {backend} {dtype} {d_out}x{d_in} r={r}: {name}")
    os.environ.pop("LORA_KERNELS_BACKEND", None)
    return rows


def validate_multi(backend: str, device: str, shapes, log) -> list[dict]:
    """lora_linear_multi on `backend`: y, xa, dx, dA, dB against the float64 reference, random ids with -1 rows,
    mixed ranks, dropout off and per-adapter probabilities, float32 adapters on bfloat16 too."""
    from lora_kernels.ops import lora_linear_multi as ops
    from lora_kernels.testing import LORA_OUTPUTS, lora_linear_multi_oracles

    rows = []
    os.environ["LORA_KERNELS_BACKEND"] = backend
    dtypes = [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)]
    dtypes.append((torch.bfloat16, torch.float32))
    for dtype, adapter_dtype in dtypes:
        for (M, d_in, d_out, n, r_max) in shapes:
            for p in (0.0, 0.3):
                g = torch.Generator().manual_seed(M * 7 + n)
                rand = lambda *shape, scale=1.0, dt=dtype: (torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
                                                            * scale).to(device, dt)
                x, w, bias = rand(M, d_in), rand(d_out, d_in, scale=d_in**-0.5), rand(d_out)
                A = rand(n, r_max, d_in, scale=d_in**-0.5, dt=adapter_dtype)
                B = rand(n, d_out, r_max, scale=r_max**-0.5, dt=adapter_dtype)
                grad_y = rand(M, d_out)
                scalings = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
                ids = torch.randint(-1, n, (M,), generator=g).to(device)
                ranks = torch.randint(1, r_max + 1, (n,), generator=g).to(device)
                seed = torch.tensor(4321 + M) if p else None
                dropouts = torch.linspace(0.0, p, n, dtype=torch.float64)  # each adapter its own probability
                _poison_allocator(device)
                y, xa = ops.forward(x, w, bias, A, B, scalings, ids, ranks, dropouts, seed)
                _poison_allocator(device)
                dx, dA, dB = ops.backward(grad_y, x, w, A, B, xa, scalings, ids, ranks, dropouts, seed, True)
                sv = int(seed) if seed is not None else None
                exact, plain = lora_linear_multi_oracles(grad_y, x, w, bias, A, B, scalings, ids, ranks, dropouts, sv)
                rows += _judged(zip(LORA_OUTPUTS, (y, xa, dx, dA, dB), exact, plain), log,
                                f"multi {backend} {dtype}/{adapter_dtype} M={M} {d_in}->{d_out} n={n} r_max={r_max} p={p}",
                                op="lora_linear_multi", backend=backend, dtype=str(dtype)[6:],
                                adapter_dtype=str(adapter_dtype)[6:], shape=[M, d_in, d_out, n, r_max], dropout=p)
    os.environ.pop("LORA_KERNELS_BACKEND", None)
    return rows


def validate_4bit(device: str, shapes, log) -> list[dict]:
    """lora_linear_4bit on the triton backend, both of its paths (fused: W0's tiles dequantized in the GEMMs;
    dequantize: W0 dequantized whole first): y, xa, dx, dA, dB against the reference on the dequantized weight (in
    float64 and in x's dtype), NF4 double quantized and FP4 with float32 absmax, 16-bit x with adapters of its
    dtype and float32 ones, dropout on and off; the whole-weight Triton dequantization bit for bit; and
    lora_linear_multi_4bit on one shape."""
    from lora_kernels import Weight4bit
    from lora_kernels.ops import lora_linear_4bit as ops
    from lora_kernels.ops.triton_lora_linear import dequantize_4bit as triton_dequantize
    from lora_kernels.testing import LORA_OUTPUTS, lora_linear_oracles

    rows = []
    os.environ["LORA_KERNELS_BACKEND"] = "triton"
    for (M, d_in, d_out, r), (quant_type, double_quant) in itertools.product(shapes, (("nf4", True), ("fp4", False))):
        g = torch.Generator().manual_seed(M + d_in)
        w4 = Weight4bit.quantize(torch.randn(d_out, d_in, generator=g).to(device) * d_in**-0.5, 64, quant_type,
                                 double_quant)
        for dtype in (torch.bfloat16, torch.float16):
            same = torch.equal(triton_dequantize(w4.kernel_args(), d_in, dtype), w4.dequantize(dtype))
            rows.append(dict(op="dequantize_4bit", backend="triton", dtype=str(dtype)[6:], shape=[d_out, d_in],
                             output="W0", ok=same, detail="bit for bit" if same else "differs from the reference"))
            if not same:
                log(f"FAIL triton dequantize {quant_type} {dtype} {d_out}x{d_in}")
        for (dtype, adapter_dtype), p, path in itertools.product(
                ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, torch.float32)),
                (0.0, 0.3), ("fused", "dequantize")):
            os.environ["LORA_KERNELS_4BIT_PATH"] = path
            rand = lambda *shape, scale=1.0, dt=dtype: (  # noqa: E731
                torch.randn(*shape, generator=g) * scale).to(device, dt)
            x, bias, grad_y = rand(M, d_in), rand(d_out), rand(M, d_out)
            A, B = rand(r, d_in, scale=d_in**-0.5, dt=adapter_dtype), rand(d_out, r, scale=0.1, dt=adapter_dtype)
            seed = torch.tensor(999 + M) if p else None
            _poison_allocator(device)
            y, xa = ops.forward(x, *w4.kernel_args(), bias, A, B, 2.0, p, seed)
            _poison_allocator(device)
            dx, dA, dB = ops.backward(grad_y, x, *w4.kernel_args(), A, B, xa, 2.0, p, seed, True)
            sv = int(seed) if seed is not None else None
            exact, plain = lora_linear_oracles(grad_y, x, w4.dequantize(dtype), bias, A, B, 2.0, p, sv)
            rows += _judged(zip(LORA_OUTPUTS, (y, xa, dx, dA, dB), exact, plain), log,
                            f"4bit {path} {quant_type} {dtype}/{adapter_dtype} M={M} {d_in}->{d_out} r={r} p={p}",
                            op="lora_linear_4bit", backend="triton", path=path, quant_type=quant_type,
                            dtype=str(dtype)[6:], adapter_dtype=str(adapter_dtype)[6:], shape=[M, d_in, d_out, r],
                            dropout=p)
    rows += _validate_multi_4bit(device, log)
    os.environ.pop("LORA_KERNELS_4BIT_PATH", None)
    os.environ.pop("LORA_KERNELS_BACKEND", None)
    return rows


def _validate_multi_4bit(device: str, log) -> list[dict]:
    """lora_linear_multi_4bit (triton, fused base GEMMs): 37 rows over 3 adapters and the base, mixed ranks."""
    from lora_kernels import Weight4bit
    from lora_kernels.ops import lora_linear_4bit as ops
    from lora_kernels.testing import LORA_OUTPUTS, lora_linear_multi_oracles

    g = torch.Generator().manual_seed(11)
    M, d_in, d_out, n, r_max, dtype = 37, 256, 96, 3, 16, torch.bfloat16
    os.environ["LORA_KERNELS_4BIT_PATH"] = "fused"
    w4 = Weight4bit.quantize(torch.randn(d_out, d_in, generator=g).to(device) * d_in**-0.5, 64, "nf4", True)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(device, dtype)  # noqa: E731
    x, bias, grad_y = rand(M, d_in), rand(d_out), rand(M, d_out)
    A, B = rand(n, r_max, d_in, scale=d_in**-0.5), rand(n, d_out, r_max, scale=0.1)
    scalings = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    ids = torch.randint(-1, n, (M,), generator=g).to(device)
    ranks = torch.tensor([16, 3, 9], device=device)
    no_dropout = torch.zeros(n, dtype=torch.float64)
    y, xa = ops.multi_forward(x, *w4.kernel_args(), bias, A, B, scalings, ids, ranks, no_dropout, None)
    dx, dA, dB = ops.multi_backward(grad_y, x, *w4.kernel_args(), A, B, xa, scalings, ids, ranks, no_dropout, None,
                                    True)
    exact, plain = lora_linear_multi_oracles(grad_y, x, w4.dequantize(dtype), bias, A, B, scalings, ids, ranks, 0.0)
    return _judged(zip(LORA_OUTPUTS, (y, xa, dx, dA, dB), exact, plain), log,
                   f"multi 4bit bf16 M={M} {d_in}->{d_out} n={n}",
                   op="lora_linear_multi_4bit", backend="triton", dtype="bfloat16", shape=[M, d_in, d_out, n, r_max])


def time_qlora_decode_graphs(device: str, reps: int, progress) -> None:
    """QLoRA decode (NF4 W0, bf16, r = 16, M = 1, 4096² and 4096 -> 14336): bf16 F.linear vs ours, do_bench's GPU
    time and a CUDA graph's replay (kernel-bound): the QLoRA issue's decode target is ours <= 0.40x F.linear."""
    from . import providers as prov
    from .harness import CaseResult, Timing, time_providers

    dtype, d = (torch.bfloat16, 4096) if device == "cuda" else (torch.float32, 64)
    for d_out in (d, d * 7 // 2):
        if progress.left() <= 0:
            return
        providers = prov.lora_linear_providers(1, d, d_out, 16, dtype, 0.0, False, device, ["base", "ours"],
                                               quantized="nf4")
        timings = time_providers(providers, device, reps)
        if device == "cuda":
            for p in providers:
                try:
                    p.prepare()
                    ms = _graph_replay_ms(p.fn)
                    timings[f"{p.name} (graph)"] = Timing(ms, ms, ms, samples=0)
                except Exception as error:  # noqa: BLE001
                    progress.log(f"QLoRA decode {d}->{d_out}: {p.name} could not be captured: {error!r}")
        label = f"QLoRA decode M=1 {d}->{d_out} r=16 nf4 base {str(dtype)[6:]}: eager vs CUDA graph"
        progress.add_result(CaseResult("decode_graph", label, dict(M=1, d=d, d_out=d_out, dtype=str(dtype)[6:],
                                                                   quantized="nf4", target=0.40), timings))
        progress.log(f"{label}: " + ", ".join(f"{k} {t.median_ms * 1e3:.1f} us" for k, t in timings.items()))


def validate_dora(backend: str, device: str, shapes, log, quantized: bool = False) -> list[dict]:
    """dora_linear on `backend`: y and the gradients of x, bias, lora_A, lora_B and the magnitude against the float64
    reference (autograd through reference.dora_linear), dropout off and on, float32 adapters on bfloat16 too.
    quantized: QDoRA, on the weight's NF4 quantization (double quantized; the 4-bit kernels' fused path), against
    the reference on its dequantization in x's dtype."""
    import lora_kernels as lk
    from lora_kernels import Weight4bit, reference
    from lora_kernels.functional import draw_seed

    rows = []
    os.environ["LORA_KERNELS_BACKEND"] = backend
    dtypes = [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
              (torch.bfloat16, torch.float32)]
    s = 1.5
    for dtype, adapter_dtype in dtypes:
        for (M, d_in, d_out, r) in shapes:
            for p in (0.0, 0.3):
                g = torch.Generator().manual_seed(M * 3 + r)
                rand = lambda *shape, scale=1.0, dt=dtype: (torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
                                                            * scale).to(device, dt)
                x, w, bias = rand(M, d_in), rand(d_out, d_in, scale=d_in**-0.5), rand(d_out)
                weight = w
                if quantized:  # the op gets the packed weight; the oracles its dequantization in x's dtype
                    weight = Weight4bit.quantize(w.float(), 64, "nf4", double_quant=True)
                    w = weight.dequantize(dtype)
                A = rand(r, d_in, scale=d_in**-0.5, dt=adapter_dtype)
                B = rand(d_out, r, scale=r**-0.5, dt=adapter_dtype)
                norm = reference.dora_weight_norm(w.double(), A.double(), B.double(), s)
                m = (norm * (1 + 0.2 * rand(d_out, dt=torch.float64))).to(adapter_dtype)
                grad_y = rand(M, d_out)

                def run(fn, tensors):
                    leaves = [t.detach().clone().requires_grad_() for t in tensors]
                    torch.manual_seed(99)
                    y = fn(*leaves)
                    return [y, *torch.autograd.grad(y, leaves, grad_y.to(y.dtype))]

                ours = run(lambda x_, b_, A_, B_, m_: lk.dora_linear(x_, weight, b_, A_, B_, m_, s, p, True),
                           (x, bias, A, B, m))
                torch.manual_seed(99)
                seed = int(draw_seed(device)) if p else None
                d = lambda t: t.double()  # noqa: E731
                # QDoRA's norm is of the weight's float32 values, whatever x's dtype (ops/dora_linear.py)
                n_w = weight.dequantize(torch.float32) if quantized else w
                exact = run(lambda x_, b_, A_, B_, m_: reference.dora_linear(
                    x_, d(w), b_, A_, B_, m_, s, p, seed,
                    weight_norm=reference.dora_weight_norm(d(n_w), A_.detach(), B_.detach(), s)),
                    [d(t) for t in (x, bias, A, B, m)])
                plain = run(lambda x_, b_, A_, B_, m_: reference.dora_linear(
                    x_, w, b_, A_, B_, m_, s, p, seed,
                    weight_norm=reference.dora_weight_norm(n_w, A_.detach(), B_.detach(), s)),
                    (x, bias, A, B, m))
                name = "qdora" if quantized else "dora"
                rows += _judged(zip(("y", "dx", "dbias", "dA", "dB", "dmagnitude"), ours, exact, plain), log,
                                f"{name} {backend} {dtype}/{adapter_dtype} M={M} {d_in}->{d_out} r={r} p={p}",
                                op="dora_linear_4bit" if quantized else "dora_linear", backend=backend,
                                dtype=str(dtype)[6:],
                                adapter_dtype=str(adapter_dtype)[6:], shape=[M, d_in, d_out, r], dropout=p)
    os.environ.pop("LORA_KERNELS_BACKEND", None)
    return rows


def time_multi(device: str, reps: int, progress) -> None:
    """benchmarks/multi_adapter.py's cases (bfloat16 on CUDA), each recorded as it finishes."""
    from .harness import CaseResult, time_providers
    from .multi_adapter import CASES, providers

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    cases = [(64, 64, 64, 4, t, g) for t, g in ((False, False), (True, True))] if device == "cpu" else CASES
    for M, d_in, d_out, n, train, grouped in cases:
        if progress.left() <= 0:
            progress.log("multi-adapter timing stopped at the deadline")
            return
        timings = time_providers(providers(M, d_in, d_out, n, 16, dtype, device, train, grouped), device, reps)
        label = f"M={M} {d_in}->{d_out} n={n} {'grouped' if grouped else 'scattered'} {'train' if train else 'forward'}"
        result = CaseResult("lora_linear_multi", label, dict(M=M, d_in=d_in, d_out=d_out, n=n, train=train,
                                                             grouped=grouped, dtype=str(dtype)[6:]), timings)
        progress.add_result(result)
        med = {k: t.median_ms for k, t in timings.items()}
        progress.log(f"multi {label}: " + ", ".join(f"{k} {v:.3g} ms" for k, v in med.items())
                     + f"; ours/one {med['ours'] / med['one']:.3f}, ours/base {med['ours'] / med['base']:.3f}")


def _capture(fn):
    """(graph, its output) of fn() captured in a CUDA graph, after a warm-up off the default stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture wants
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _eager_wall_ms(provider, device: str, calls: int = 200) -> float:
    """Wall time per call of `calls` back-to-back eager calls (perf_counter around the loop, one sync at the
    end): what a decode loop pays, Python and launches included. do_bench's figure is GPU time between
    events after an L2 flush, which hides host overhead shorter than the flush."""
    provider.prepare()
    for _ in range(10):
        provider.fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        provider.fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / calls


def _graph_replay_ms(fn) -> float:
    """Median ms of replaying a CUDA graph of fn(): the kernel-bound time of a call."""
    import triton.testing

    graph, _ = _capture(fn)
    median = triton.testing.do_bench(graph.replay, quantiles=[0.5], warmup=25, rep=100)
    return median[0] if isinstance(median, (list, tuple)) else median


def time_decode_graphs(device: str, reps: int, progress) -> None:
    """Decode three ways (bf16, r = 16: 4096² at M = 1 and 16, and 4096 -> 1024 at M = 1, a grouped-query
    attention k/v projection, whose 1024 columns give the decode kernel only 64 column blocks), for
    F.linear, PEFT and ours: do_bench's GPU time, the eager wall time per call (Python, checks and launches
    included) and the kernel-bound time of replaying a CUDA graph of the same call. Then the replay checks
    (LoRALinear, MultiLoRALinear; a scaling changed after capture) and torch.compile(mode="reduce-overhead")."""
    from . import providers as prov
    from .harness import CaseResult, Timing, time_providers

    dtype, d = (torch.bfloat16, 4096) if device == "cuda" else (torch.float32, 64)
    for M, d_out in ((1, d), (16, d), (1, d // 4)):
        if progress.left() <= 0:
            return
        providers = prov.lora_linear_providers(M, d, d_out, 16, dtype, 0.0, False, device, ["base", "peft", "ours"])
        timings = time_providers(providers, device, reps)
        eager = {name: t.median_ms for name, t in timings.items()}
        for p in providers:
            ms = _eager_wall_ms(p, device)
            timings[f"{p.name} (wall)"] = Timing(ms, ms, ms, samples=200)
        if device == "cuda":
            for p in providers:
                try:
                    p.prepare()
                    ms = _graph_replay_ms(p.fn)
                    timings[f"{p.name} (graph)"] = Timing(ms, ms, ms, samples=0)
                except Exception as error:  # noqa: BLE001 - a provider that cannot be captured is reported
                    progress.log(f"decode M={M}: {p.name} could not be captured in a CUDA graph: {error!r}")
        label = f"decode M={M} {d}->{d_out} r=16 {str(dtype)[6:]}: eager vs CUDA graph"
        progress.add_result(CaseResult("decode_graph", label, dict(M=M, d=d, d_out=d_out, dtype=str(dtype)[6:]),
                                       timings))
        progress.log(f"{label}: " + ", ".join(f"{k} {t.median_ms * 1e3:.1f} us" for k, t in timings.items())
                     + ("" if device == "cuda" else " (no CUDA graphs on CPU: eager only)"))
        if d_out == d:
            _check_graph_replay(M, d, dtype, device, progress)
        if device == "cpu":
            progress.log(f"eager ours/base {eager['ours'] / eager['base']:.3f}")
    _check_multi_graph_replay(d, dtype, device, progress)
    _check_reduce_overhead(device, d, dtype, progress)


def _decode_layer(M: int, d: int, dtype, device: str):
    import lora_kernels

    torch.manual_seed(M)
    layer = lora_kernels.LoRALinear(d, d, r=16, lora_alpha=32, device=device, dtype=dtype).eval()
    torch.nn.init.normal_(layer.lora_B, std=0.02)
    return layer, torch.randn(M, d, device=device, dtype=dtype)


def _recorded(fn, device: str):
    """(replay, out): on CUDA a captured graph of fn() and its output buffer; on the CPU (dry run) a
    stand-in that reruns fn() into the same buffer, so that the checks' own code is exercised."""
    if device == "cuda":
        graph, out = _capture(fn)
        return graph.replay, out
    out = fn()
    return (lambda: out.copy_(fn())), out


def _bitwise_check(op: str, output: str, got, expected, what: str) -> dict:
    """A check that `got` equals the eager `expected` bit for bit; its detail gives the largest difference."""
    ok = bool(torch.equal(got, expected))
    detail = "" if ok else f"max |{what} - eager| {(got.float() - expected.float()).abs().max().item():.3g}"
    return dict(op=op, output=output, ok=ok, detail=detail)


def _add_and_log_failures(progress, checks: list[dict], title: str) -> None:
    progress.add_checks(checks)
    for check in checks:
        if not check["ok"]:
            progress.log(f"FAIL {title}, {check['output']}: {check['detail']}")


def _replay_checks(name: str, fn, expected_after, changes, device: str, progress) -> None:
    """Record fn() once, then for each (label, change) in changes: change(), replay, and compare the
    output with expected_after() (an eager call) bit for bit; each comparison is a check."""
    checks = []
    with torch.no_grad():
        try:
            replay, out = _recorded(fn, device)
            for label, change in changes:
                change()
                replay()
                checks.append(_bitwise_check("cuda_graph", f"{name} {label}", out, expected_after(), "replay"))
        except Exception as error:  # noqa: BLE001
            checks.append(dict(op="cuda_graph", output=name, ok=False, detail=f"capture failed: {error!r}"))
    _add_and_log_failures(progress, checks, "CUDA graph replay")


def _check_graph_replay(M: int, d: int, dtype, device: str, progress) -> None:
    """LoRALinear captured in a CUDA graph and replayed equals lora_linear called eagerly with a float
    scaling, before and after layer.scaling changes (the kernels read it in device memory)."""
    import lora_kernels

    layer, x = _decode_layer(M, d, dtype, device)

    def set_scaling(value):
        return lambda: setattr(layer, "scaling", value)

    _replay_checks(f"decode M={M}", lambda: layer(x),
                   lambda: lora_kernels.lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B,
                                                    layer.scaling),
                   [(f"scaling={layer.scaling:g}", lambda: None), ("scaling=-0.75", set_scaling(-0.75))],
                   device, progress)


def _decode_multi_layer(d: int, dtype, device: str):
    """(MultiLoRALinear with 4 adapters of ranks 16 and 8, x [16, d], ids [16] on the device, some -1)."""
    import lora_kernels

    torch.manual_seed(5)
    layer = lora_kernels.MultiLoRALinear(d, d, capacity=4, r_max=16, device=device, dtype=dtype).eval()
    for i in range(4):
        layer.add_adapter(f"a{i}", r=8 if i % 2 else 16, lora_alpha=16)
    torch.nn.init.normal_(layer.lora_B, std=0.02)
    return layer, torch.randn(16, d, device=device, dtype=dtype), torch.randint(-1, 4, (16,), device=device)


def _check_multi_graph_replay(d: int, dtype, device: str, progress) -> None:
    """MultiLoRALinear at decode (16 rows on 4 adapters, ids on the device) captured and replayed equals its
    eager call, also after one adapter's scaling changes."""
    layer, x, ids = _decode_multi_layer(d, dtype, device)

    def new_scaling():
        layer.scalings[1] = -0.75

    _replay_checks("multi-adapter decode M=16 n=4", lambda: layer(x, adapter_ids=ids),
                   lambda: layer(x, adapter_ids=ids), [("as captured", lambda: None), ("a1 scaling=-0.75", new_scaling)],
                   device, progress)


def _check_reduce_overhead(device: str, d: int, dtype, progress) -> None:
    """torch.compile(mode="reduce-overhead") of LoRALinear (M = 1) and of MultiLoRALinear (16 rows, 4
    adapters) at decode: Inductor must not skip CUDA graphs (no CPU tensor reaches the graph), the output
    equals eager, and a new scaling needs no recompile and is used. On the CPU (dry run) the same code runs
    without CUDA graphs, and the skip count is only reported."""
    layer, x = _decode_layer(1, d, dtype, device)
    multi, multi_x, ids = _decode_multi_layer(d, dtype, device)

    def set_layer_scaling(value):
        layer.scaling = value

    def set_multi_scaling(value):
        multi.scalings[1] = value

    cases = [("LoRALinear", layer, (x,), {}, set_layer_scaling),
             ("MultiLoRALinear", multi, (multi_x,), {"adapter_ids": ids}, set_multi_scaling)]
    for name, module, args, kwargs, set_scaling in cases:
        _reduce_overhead_checks(name, module, args, kwargs, set_scaling, device, progress)


def _reduce_overhead_checks(name, module, args, kwargs, set_scaling, device: str, progress) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(module, mode="reduce-overhead")
    checks = []
    with torch.no_grad():
        try:
            for scaling in (0.5, -0.75):
                set_scaling(scaling)
                for _ in range(3):  # warm-up, record, replay
                    out = compiled(*args, **kwargs).clone()
                checks.append(_bitwise_check("reduce_overhead", f"{name} scaling={scaling:g}", out,
                                             module(*args, **kwargs), "compiled"))
            skips, graphs = counters["inductor"]["cudagraph_skips"], counters["stats"]["unique_graphs"]
            detail = f"cudagraph skips {skips}, graphs compiled {graphs}"
            checks.append(dict(op="reduce_overhead", output=f"{name}: CUDA graphs used, one graph",
                               ok=(skips == 0 or device == "cpu") and graphs == 1, detail=detail))
            progress.log(f"torch.compile(mode='reduce-overhead') of {name}: {detail}")
        except Exception as error:  # noqa: BLE001
            checks.append(dict(op="reduce_overhead", output=name, ok=False, detail=f"failed: {error!r}"))
    _add_and_log_failures(progress, checks, "reduce-overhead")


def write_gpu_paths(progress, device: str, out: Path) -> None:
    """The per-shape race of the two GPU paths (ours[triton] vs ours[cuda] in the headline timings), next to
    the roofline model's predictions: $OUT/gpu_paths.json, the table `auto` reads once it is committed as
    lora_kernels/gpu_paths.json (forward winners from forward cases, backward winners from train − forward)."""
    from lora_kernels import cost_model

    cases = {}
    for result in progress.results:
        if result.op != "linear" or result.params.get("dropout"):
            continue
        t = result.timings
        if "ours[triton]" not in t or "ours[cuda]" not in t:
            continue
        p = result.params
        key = (p["M"], p["d_out"], p["d_in"], p["r"], p["dtype"][6:])
        cases.setdefault(key, {})[p["mode"]] = {name: t[name].median_ms for name in ("ours[triton]", "ours[cuda]")}
    entries = []
    for (M, d_out, d_in, r, dtype), modes in sorted(cases.items()):
        steps = {}
        if "forward" in modes:
            steps["forward"] = modes["forward"]
        if "forward" in modes and "train" in modes:
            steps["backward"] = {k: modes["train"][k] - modes["forward"][k] for k in modes["forward"]}
        for step, ms in steps.items():
            predicted = {path: cost_model.step_us(step, path, M, d_out, d_in, r) / 1e3 for path in ("triton", "cuda")}
            winner = min(("triton", "cuda"), key=lambda path: ms[f"ours[{path}]"])
            entries.append({"step": step, "M": M, "out": d_out, "in": d_in, "r": r, "dtype": dtype, "winner": winner,
                            "triton_ms": ms["ours[triton]"], "cuda_ms": ms["ours[cuda]"],
                            "model_triton_ms": predicted["triton"], "model_cuda_ms": predicted["cuda"]})
            progress.log(f"path race {step} M={M} {d_in}->{d_out}: triton {ms['ours[triton]']:.4f} ms "
                         f"(model {predicted['triton']:.4f}), cuda {ms['ours[cuda]']:.4f} ms "
                         f"(model {predicted['cuda']:.4f}): {winner}")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run: not a table to commit)"
    (out / "gpu_paths.json").write_text(json.dumps(dict(device=name, entries=entries), indent=1))


def wait_for_build(progress) -> None:
    """Wait for gpu_check.sh's background build of lora_kernels._C (its status file, named by
    LORA_KERNELS_BUILD_STATUS, holds "ok" or "failed"), then pick the extension up. A failed build is a
    failed check with the log's tail; the Triton sections do not need the extension and carry on."""
    from lora_kernels.backends import rescan_compiled_extension

    status_file = os.environ.get("LORA_KERNELS_BUILD_STATUS")
    if not status_file:
        progress.log("extension: built before the check (no background build)")
        return
    status_path, t0 = Path(status_file), time.time()
    while not status_path.exists() and progress.left() > 0:
        time.sleep(0.5)
    if not status_path.exists():
        progress.log("extension build still running at the deadline: the cuda backend is not checked")
        return
    status = status_path.read_text().strip()
    found = status == "ok" and rescan_compiled_extension()
    detail = f"{status}; waited {time.time() - t0:.0f} s"
    if not found:
        log_path = Path(os.environ.get("LORA_KERNELS_BUILD_LOG", "/dev/null"))
        tail = log_path.read_text(errors="replace").splitlines()[-30:] if log_path.is_file() else []
        detail += "\n" + "\n".join(tail)
    progress.add_checks([dict(op="build", output="lora_kernels._C", ok=found, detail=detail)])
    progress.log(f"extension build: {detail}")


class Progress:
    """Everything measured so far, on disk as it happens: one JSON line per check or timed case in
    progress.jsonl, and gpu_check.json / results.md rewritten after every section, so a run cut at
    any point (the lease's deadline, a crash) still returns all it measured."""

    def __init__(self, out: Path, deadline_s: float):
        self.out, self.deadline = out, time.time() + deadline_s
        self.started = time.time()
        self.checks: list[dict] = []
        self.results: list = []
        self.log_lines: list[str] = []
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = (out / "progress.jsonl").open("a")

    def left(self) -> float:
        return self.deadline - time.time()

    def log(self, line: str) -> None:
        print(line, flush=True)
        self.log_lines.append(line)
        self.record(dict(kind="log", line=line))

    def record(self, row: dict) -> None:
        self.jsonl.write(json.dumps(dict(row, t=round(time.time() - self.started, 1))) + "\n")
        self.jsonl.flush()

    def add_checks(self, rows: list[dict]) -> None:
        self.checks += rows
        for row in rows:
            self.record(dict(kind="check", **row))

    def add_result(self, result) -> None:
        from dataclasses import asdict

        self.results.append(result)
        self.record(dict(kind="timing", **asdict(result)))

    def write_summary(self, device: str, section: str) -> None:
        from .harness import machine_info, write_results
        from .tables import markdown_report

        info = machine_info(device)
        n_ok = sum(c["ok"] for c in self.checks)
        if self.results:
            write_results(self.results, info, self.out, markdown_report(self.results, info))
        summary = dict(last_section=section, checks_passed=n_ok, checks=len(self.checks),
                       seconds=round(time.time() - self.started, 1))
        (self.out / "gpu_check.json").write_text(json.dumps(
            {"machine": info, "summary": summary, "checks": self.checks, "log": self.log_lines}, indent=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny shapes")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results/gpu_check")))
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--budget", type=float, default=0.5, help="seconds of timing per case")
    parser.add_argument("--deadline", type=float, default=480.0,
                        help="seconds after which no new section or case starts (default 480: one 10-minute call "
                             "with room for the build and the copy back)")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        import numpy
        import triton

        from lora_kernels.backends import interpreter_problem

        problem = interpreter_problem(triton.__version__, numpy.__version__)
        if problem:  # the dry run is the Triton interpreter: nothing of it could run
            print(f"gpu_check --dry-run: {problem}", file=sys.stderr)
            return 2
    import lora_kernels  # noqa: F401  (after TRITON_INTERPRET is set)
    from lora_kernels.ops.lora_linear_4bit import TRITON_4BIT

    from .cases import LinearCase, linear_cases, merge_cases
    from .runners import run_linear, run_merge

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run", file=sys.stderr)
        return 2
    progress = Progress(args.out, args.deadline)
    log = progress.log

    def gpu_backends() -> list[str]:  # the cuda backend appears once the background build is in
        return ["triton"] if args.dry_run else [b for b in ("triton", "cuda") if b in lora_kernels.available_backends()]

    log(f"torch {torch.__version__}; device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (interpreter)'}"
        f"; deadline {args.deadline:.0f} s")
    smoke = [(37, 100, 33, 16)]
    shapes = ([(1, 33, 70, 1), (7, 70, 100, 3), (37, 100, 33, 16)] if args.dry_run else
              [(1, 33, 70, 1), (7, 70, 100, 3), (37, 100, 33, 16), (1000, 129, 257, 64), (16, 4096, 4096, 16),
               (2048, 4096, 1000, 16), (2049, 1000, 4096, 64), (64, 256, 256, 256)])
    merge_shapes = [(33, 70, 3), (40, 50, 16)] if args.dry_run else [(33, 70, 3), (100, 129, 64), (257, 1000, 16)]
    # (M, in, out, adapters, r_max)
    multi_shapes = [(37, 40, 33, 3, 16)] if args.dry_run else [(1, 33, 70, 2, 4), (37, 100, 33, 5, 16),
                                                                (2048, 1024, 1024, 32, 16), (32, 4096, 4096, 32, 64)]
    cycles = 12 if args.dry_run else 50
    dora_shapes = [(7, 33, 40, 3)] if args.dry_run else [(1, 33, 70, 1), (37, 100, 33, 16), (2048, 1024, 1024, 16)]
    # QDoRA (M, in, out, r): decode and large M on the fused 4-bit GEMMs, and in = 100 (dequantized first)
    qdora_shapes = [(7, 64, 40, 3)] if args.dry_run else [(1, 4096, 1024, 16), (37, 100, 33, 16),
                                                          (2048, 1024, 1024, 16)]
    # QLoRA (M, in, out, r): in a multiple of 64 (the fused path) but one (in = 100: W0 dequantized first)
    qlora_shapes = ([(3, 128, 40, 4), (37, 64, 48, 16)] if args.dry_run else
                    [(1, 4096, 4096, 16), (16, 1024, 4000, 64), (37, 100, 33, 16), (2048, 4096, 1024, 16),
                     (300, 1024, 1024, 128)])
    qlora_cases = ([LinearCase(M, 64, 96, 16, torch.float32, t, 0.0, quantized="nf4") for M in (1, 37)
                    for t in (False, True)] if args.dry_run else
                   [LinearCase(M, 4096, d_out, 16, torch.bfloat16, t, 0.0, quantized="nf4")
                    for d_out in (4096, 14336) for M in (1, 16, 2048, 8192) for t in (False, True)])
    qlora_wanted = ["base", "ours", "ours[fused]", "ours[dequantize]", "dequant", "peft"]

    def section(name: str, run) -> None:
        """One section, skipped once the deadline has passed; the summary is rewritten after it."""
        if progress.left() <= 0:
            log(f"skipped {name}: past the deadline")
            return
        t0 = time.time()
        try:
            run()
        except Exception:  # noqa: BLE001 - report and carry on to the other sections
            log(f"ERROR in {name}:\n{traceback.format_exc()}")
            progress.add_checks([dict(op="error", section=name, ok=False, detail=traceback.format_exc())])
        log(f"section {name}: {time.time() - t0:.0f} s ({progress.left():.0f} s left)")
        progress.write_summary(device, name)

    def time_cases(cases, wanted):
        for case in cases:
            if progress.left() <= 0:
                log(f"timing stopped at the deadline before {case.label}")
                return
            progress.add_result(run_linear(case, device, wanted, args.budget))

    # Priority order: what a short lease must not miss comes first. The extension builds in the
    # background (gpu_check.sh) while the Triton kernels, which do not need it, are checked.
    def smoke_validation(backend):
        section(f"smoke validation {backend}", lambda: progress.add_checks(
            validate_linear(backend, device, smoke, log, scalings=("number", "in memory"))))

    if "triton" in gpu_backends():
        smoke_validation("triton")
    section("extension build", lambda: wait_for_build(progress))
    backends = gpu_backends()
    log(f"backends under test: {backends}")
    if "cuda" in backends:
        smoke_validation("cuda")
    if not args.skip_timing:
        if args.dry_run:
            headline = [LinearCase(M, 64, 96, 16, torch.float32, t, 0.0) for M in (1, 37) for t in (False, True)]
            wanted = ["base", "reference", "ours"]
        else:
            headline = [LinearCase(M, 4096, 4096, 16, torch.bfloat16, t, 0.0) for M in (1, 16, 2048, 8192)
                        for t in (False, True)]
            wanted = ["base", "reference", "peft", "ours", "ours[triton]", "ours[cuda]"]
        section("headline timings", lambda: time_cases(headline, wanted))
        section("GPU path table", lambda: write_gpu_paths(progress, device, args.out))
        section("decode under CUDA graphs", lambda: time_decode_graphs(device, 3 if args.dry_run else 20, progress))
    for backend in backends:
        section(f"validation {backend}",
                lambda b=backend: progress.add_checks(validate_linear(b, device, shapes, log)))
        section(f"merge validation {backend}",
                lambda b=backend: progress.add_checks(validate_merge(b, device, merge_shapes, cycles, log)))
    if "triton" in backends and TRITON_4BIT:  # QLoRA: validation, then timings
        section("4-bit validation triton", lambda: progress.add_checks(validate_4bit(device, qlora_shapes, log)))
        if not args.skip_timing:
            from .harness import have

            if not have("bitsandbytes"):  # the comparison is bnb's Linear4bit + PEFT: say what stands in
                log("QLoRA timings: bitsandbytes is not installed here, so there is no PEFT + bitsandbytes column; "
                    "'dequant' (W0 dequantized whole by our Triton kernel, then F.linear and the LoRA branch) "
                    "stands in for it")
            section("QLoRA timings", lambda: time_cases(qlora_cases, qlora_wanted))
            section("QLoRA decode under CUDA graphs",
                    lambda: time_qlora_decode_graphs(device, 3 if args.dry_run else 20, progress))
    multi_backends = [b for b in backends if b in lora_kernels.available_backends("lora_linear_multi")]
    for backend in multi_backends:
        section(f"multi-adapter validation {backend}",
                lambda b=backend: progress.add_checks(validate_multi(b, device, multi_shapes, log)))
    if not args.skip_timing:
        section("multi-adapter timings", lambda: time_multi(device, 3 if args.dry_run else 10, progress))
    for backend in backends:
        section(f"DoRA validation {backend}",
                lambda b=backend: progress.add_checks(validate_dora(b, device, dora_shapes, log)))
    if not args.skip_timing:  # DoRA against our LoRA layer and PEFT's DoRA (the GPU target: train <= 1.15x LoRA)
        dora_cases = ([LinearCase(37, 64, 96, 16, torch.float32, True, p, dora=True) for p in (0.0, 0.1)]
                      if args.dry_run else
                      [LinearCase(M, 4096, 4096, 16, torch.bfloat16, t, p, dora=True)
                       for M, t, p in ((16, False, 0.0), (2048, False, 0.0), (2048, True, 0.0), (2048, True, 0.1))])
        section("DoRA timings", lambda: time_cases(dora_cases, ["base", "ours", "ours-lora", "peft"]))
    if TRITON_4BIT and "triton" in backends:
        section("QDoRA validation triton",
                lambda: progress.add_checks(validate_dora("triton", device, qdora_shapes, log, quantized=True)))
    if not args.skip_timing and TRITON_4BIT:  # QDoRA against our QLoRA layer and PEFT's QDoRA (bitsandbytes)
        qdora_cases = ([LinearCase(37, 64, 96, 16, torch.float32, True, 0.0, quantized="nf4", dora=True)]
                       if args.dry_run else
                       [LinearCase(M, 4096, 4096, 16, torch.bfloat16, t, p, quantized="nf4", dora=True)
                        for M, t, p in ((1, False, 0.0), (16, True, 0.0), (2048, True, 0.0), (2048, True, 0.1))])
        section("QDoRA timings", lambda: time_cases(qdora_cases, ["base", "ours", "ours-lora", "peft"]))
    if not args.skip_timing and not args.dry_run:
        rest = [c for c in linear_cases("cuda", full=False) if c not in headline]
        section("remaining timings", lambda: time_cases(rest, ["base", "reference", "peft", "ours"]))

        def merges():
            for shape in merge_cases("cuda", full=False):
                if progress.left() > 0:
                    progress.add_result(run_merge(shape, device, ["floor", "gemm", "ours", "ours-safe", "peft"], args.budget))
        section("merge timings", merges)

    n_ok = sum(c["ok"] for c in progress.checks)
    progress.write_summary(device, "done")
    log(f"validation: {n_ok}/{len(progress.checks)} checks passed; total {time.time() - progress.started:.0f} s; "
        f"wrote {args.out}")
    return 0 if n_ok == len(progress.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
