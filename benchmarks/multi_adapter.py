"""Many adapters in one batch: lora_linear_multi against one adapter, the base layer, PEFT and a Python loop.

    python -m benchmarks.multi_adapter [--quick] [--json FILE] [--device cpu|cuda]

Cases (float32 on CPU, bfloat16 on CUDA; r = 16; adapter ids drawn at random):
    M = 2048, 1024 -> 1024, spread over 1, 8, 32 adapters: forward and train step (forward + backward), with
    the rows of an adapter scattered over the batch, and grouped (the same ids sorted: a batch by adapter)
    decode: M = 32 rows on 32 different adapters, 4096 -> 4096, forward
Providers, timed interleaved in one run (medians):
    base      F.linear (the floor)
    one       lora_linear_multi with every row on adapter 0 (the same batch on one adapter)
    ours      lora_linear_multi with the rows spread over the adapters
    peft      PEFT's mixed-batch forward (LoraLayer(x, adapter_names=...)): inference only
    loop      the base GEMM, then a Python loop over the adapters in plain PyTorch ops on each adapter's
              rows (what training needs without a multi-adapter op; PEFT cannot train a mixed batch)
Also: what one training step with lora_dropout 0.1 saves for backward (beyond parameters), ours vs the loop.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F
from torch import nn

import lora_kernels as lk

from .harness import Provider, have, machine_info, memory_profile, rotation, time_providers, timed_call


def _adapters(n, d_in, d_out, r, dtype, device):
    g = torch.Generator().manual_seed(0)
    lora_A = (torch.randn(n, r, d_in, generator=g) / math.sqrt(d_in)).to(device, dtype)
    lora_B = (torch.randn(n, d_out, r, generator=g) * 0.01).to(device, dtype)
    return lora_A, lora_B, torch.full((n,), 2.0, dtype=torch.float64)


def _peft_layer(weight, lora_A, lora_B, names):
    """A peft LoRA Linear holding the n adapters, for its adapter_names= mixed-batch forward."""
    import peft

    d_out, d_in = weight.shape
    holder = nn.Sequential()
    holder.add_module("lin", nn.Linear(d_in, d_out, bias=False, device=weight.device, dtype=weight.dtype))
    holder.lin.weight.data = weight
    r = lora_A.shape[1]
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"])
    model = peft.get_peft_model(holder, config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    layer = model.base_model.model.lin
    for a, name in enumerate(names):
        layer.lora_A[name].weight.data = lora_A[a].clone()
        layer.lora_B[name].weight.data = lora_B[a].clone()
    return layer.eval()


def providers(M, d_in, d_out, n, r, dtype, device, train, grouped, dropout=0.0):
    torch.manual_seed(0)
    factory = dict(device=device, dtype=dtype)
    weight = torch.randn(d_out, d_in, **factory) / math.sqrt(d_in)
    bias = torch.randn(d_out, **factory)
    lora_A, lora_B, scalings = _adapters(n, d_in, d_out, r, dtype, device)
    lora_A.requires_grad_(train)
    lora_B.requires_grad_(train)
    ids = torch.randint(0, n, (M,), generator=torch.Generator().manual_seed(1))
    ids = (ids.sort().values if grouped else ids).to(device)
    one = torch.zeros(M, dtype=torch.int64, device=device)
    next_x = rotation(lambda: torch.randn(M, d_in, **factory).requires_grad_(train))
    grad_y = torch.randn(M, d_out, **factory)
    rows_of = [(a, (ids == a).nonzero().flatten()) for a in range(n)]

    def run(forward):
        return timed_call(forward, next_x, grad_y, train)

    def zero():
        lora_A.grad = lora_B.grad = None

    def multi(adapter_ids):
        return lambda x: lk.lora_linear_multi(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, None, dropout,
                                              train)

    def loop(x):
        y = F.linear(x, weight, bias)
        parts = [2.0 * F.linear(F.linear(F.dropout(x[rows], dropout, train), lora_A[a]), lora_B[a])
                 for a, rows in rows_of if rows.numel()]
        return y.index_add(0, torch.cat([rows for _, rows in rows_of if rows.numel()]), torch.cat(parts))

    params = [weight, bias, lora_A, lora_B]
    out = [Provider("base", run(lambda x: F.linear(x, weight, bias)), zero, params),
           Provider("one", run(multi(one)), zero, params),
           Provider("ours", run(multi(ids)), zero, params)]
    if train:
        out.append(Provider("loop", run(loop), zero, params))
    elif have("peft"):
        names = [f"a{i}" for i in range(n)]
        layer = _peft_layer(weight, lora_A.detach(), lora_B.detach(), names)
        row_names = [names[int(i)] for i in ids]
        out.append(Provider("peft", run(lambda x: layer(x, adapter_names=row_names) + bias)))
    return out


CASES = [  # (M, in, out, n, train, grouped)
    *[(2048, 1024, 1024, n, train, grouped) for train in (False, True) for n, grouped in
      ((1, True), (8, False), (32, False), (8, True), (32, True))],
    (32, 4096, 4096, 32, False, True),
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="3 repetitions (a smoke test of the script)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    reps = 3 if args.quick else args.reps
    info = machine_info(args.device)
    print(f"{info.get('gpu') or info['cpu']} ({info['cpu_isa']}), torch {info['torch']}, peft {info['peft']}, "
          f"{info['date']}, commit {info['git_commit']}; {str(dtype)[6:]}, r = 16, random adapter ids")
    print("| case | base | one adapter | ours | peft (mixed batch) | loop over adapters | ours / one | ours / base |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for M, d_in, d_out, n, train, grouped in CASES:
        timings = time_providers(providers(M, d_in, d_out, n, 16, dtype, args.device, train, grouped), args.device,
                                 reps)
        med = {k: t.median_ms for k, t in timings.items()}
        layout = "" if n == 1 else " grouped" if grouped else " scattered"
        label = f"M={M} {d_in}->{d_out} n={n}{layout} {'train' if train else 'forward'}"
        cell = lambda k: f"{med[k]:.3g} ms" if k in med else "–"  # noqa: E731
        print(f"| {label} | {cell('base')} | {cell('one')} | {cell('ours')} | {cell('peft')} | {cell('loop')} | "
              f"{med['ours'] / med['one']:.3f} | {med['ours'] / med['base']:.3f} |")
        rows.append({"case": label, "median_ms": med})
    saved = {}
    for p in providers(2048, 1024, 1024, 32, 16, dtype, args.device, True, False, dropout=0.1):
        if p.name in ("ours", "loop"):
            saved[p.name] = memory_profile(p, args.device)["saved_for_backward_mb"]
    print(f"\nM=2048 1024->1024 n=32 scattered, lora_dropout 0.1: saved for backward {saved['ours']:.1f} MB (ours) vs "
          f"{saved['loop']:.1f} MB (loop over adapters)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": rows, "saved_for_backward_mb_dropout_0.1": saved}, f, indent=2)


if __name__ == "__main__":
    main()
