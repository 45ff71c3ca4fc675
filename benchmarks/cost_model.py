"""Print the roofline model of lora_linear's GPU paths at the headline shapes (lora_kernels/cost_model.py).

    python -m benchmarks.cost_model [--json FILE]

For each shape (bf16, r = 16; M in {1, 16, 2048, 8192}; 4096 -> 4096 and 4096 -> 1024, a grouped-query
k/v projection), forward and training step: every path's launches, megabytes from HBM, GFLOP, predicted
microseconds and its ratio to the bare base layer (F.linear; for a training step F.linear + dx = dy W0),
and the path `auto` picks from the model while no measured table exists. Predictions, not measurements:
CI prints them so a kernel change shows its modelled effect, and the device check measures the same shapes.
Then DoRA as built, and QLoRA (an NF4 W0: the fused 4-bit GEMMs against "dequantize, then cuBLAS").
"""

from __future__ import annotations

import argparse
import json
import sys

from lora_kernels import cost_model

SHAPES = [(M, out, 4096) for out in (4096, 1024) for M in (1, 16, 2048, 8192)]


def rows():
    for (M, out, inp), train in ((s, t) for s in SHAPES for t in (False, True)):
        base = cost_model.predict("base", M, out, inp, 16, train).us
        for path in cost_model.PATHS:
            if path == "peft" and train:
                continue
            p = cost_model.predict(path, M, out, inp, 16, train)
            yield dict(M=M, out=out, inp=inp, train=train, path=path, launches=p.launches, mb=round(p.megabytes, 2),
                       gflop=round(p.gflops, 3), us=round(p.us, 2), vs_base=round(p.us / base, 3))


def dora_rows():
    for M in (16, 2048, 8192):
        for train, dropout in ((False, False), (True, False), (True, True)):
            for path in ("triton", "cuda"):
                lora = cost_model.predict(path, M, 4096, 4096, 16, train).us
                p = cost_model.predict_dora(path, M, 4096, 4096, 16, train, dropout)
                yield dict(M=M, out=4096, inp=4096, train=train, dropout=dropout, path=path, launches=p.launches,
                           mb=round(p.megabytes, 2), us=round(p.us, 2), vs_lora=round(p.us / lora, 3))


def qlora_rows():
    """lora_linear_4bit (NF4 W0) at the QLoRA issue's shapes: 4096 -> 4096 and the 4096 -> 14336 MLP projection."""
    for (M, out, inp), train in ((s, t) for s in [(M, out, 4096) for out in (4096, 14336) for M in (1, 16, 2048, 8192)]
                                 for t in (False, True)):
        base = cost_model.predict_4bit("base", M, out, inp, 16, train).us
        for path in cost_model.PATHS_4BIT:
            p = cost_model.predict_4bit(path, M, out, inp, 16, train)
            yield dict(M=M, out=out, inp=inp, train=train, path=path, launches=p.launches, mb=round(p.megabytes, 2),
                       us=round(p.us, 2), vs_base=round(p.us / base, 3))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    table = list(rows())
    print(f"Roofline model, {cost_model.H200.name}: {cost_model.H200.dense_tflops:g} TFLOP/s bf16 dense, "
          f"{cost_model.H200.hbm_tb_s:g} TB/s, {cost_model.H200.sms} SMs; cuBLAS at "
          f"{cost_model.H200.cublas_efficiency:.0%}, Triton GEMM at {cost_model.H200.triton_efficiency:.0%} of "
          "peak (assumed). Unmeasured predictions.")
    print(f"{'shape':<24}{'step':<7}{'path':<8}{'launches':>9}{'MB':>9}{'GFLOP':>9}{'us':>10}{'x base':>8}")
    for row in table:
        shape = f"M={row['M']} {row['inp']}->{row['out']}"
        print(f"{shape:<24}{'train' if row['train'] else 'fwd':<7}{row['path']:<8}{row['launches']:>9}"
              f"{row['mb']:>9.1f}{row['gflop']:>9.2f}{row['us']:>10.1f}{row['vs_base']:>8.3f}")
    dora = list(dora_rows())
    print("\nDoRA as built (dora_linear: the LoRA path's kernels, the gain in the Triton GEMM's epilogue or after cuBLAS,"
          " the backward's Triton epilogue), against the LoRA step on the same path"
          " (the DoRA issue's GPU target: train <= 1.15x at M >= 2048):")
    print(f"{'shape':<24}{'step':<14}{'path':<8}{'launches':>9}{'MB':>9}{'us':>10}{'x LoRA':>8}")
    for row in dora:
        shape = f"M={row['M']} {row['inp']}->{row['out']}"
        step = ("train" if row["train"] else "fwd") + (" p>0" if row["dropout"] else "")
        print(f"{shape:<24}{step:<14}{row['path']:<8}{row['launches']:>9}{row['mb']:>9.1f}{row['us']:>10.1f}"
              f"{row['vs_lora']:>8.3f}")
    qlora = list(qlora_rows())
    ops = cost_model.DEQUANT_OPS
    print(f"\nQLoRA (lora_linear_4bit, NF4 W0 at {cost_model.W4_BYTES} B/weight; instructions per lane per dequantized "
          f"element, from the SASS: {ops['gemm']} in the large-M GEMM, under its MMA, {ops['decode']} at decode, after "
          f"it, {ops['whole']} dequantizing whole), against bf16 F.linear on the dequantized weight (the QLoRA issue's "
          "targets: fwd <= 1.10x and train <= 1.15x at M >= 2048, decode <= 0.40x):")
    print(f"{'shape':<24}{'step':<7}{'path':<17}{'launches':>9}{'MB':>9}{'us':>10}{'x base':>8}")
    for row in qlora:
        shape = f"M={row['M']} {row['inp']}->{row['out']}"
        print(f"{shape:<24}{'train' if row['train'] else 'fwd':<7}{row['path']:<17}{row['launches']:>9}"
              f"{row['mb']:>9.1f}{row['us']:>10.1f}{row['vs_base']:>8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=cost_model.H200.name, rows=table, dora=dora, qlora=qlora), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
