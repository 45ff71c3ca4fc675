"""Model-level benchmark: a small Llama (transformers, built from a config) with LoRA on every linear layer.

    python -m benchmarks.peft_model [--hidden 1024 --layers 2 --tokens 512 --reps 15 --dtype float32] [--use-dora]

Providers, timed interleaved in one run (medians), each a separate model with the same weights:
    base      the model without LoRA (the floor)
    peft      PEFT's LoraModel (get_peft_model)
    patched   the same PEFT model after lora_kernels.peft.patch_peft_model
    ours      lora_kernels.inject_lora on the plain model
Modes: forward (eval, no grad) and a training step's forward + backward (lora_dropout 0.05). --use-dora: DoRA
adapters everywhere (PEFT's use_dora=True, inject_lora(use_dora=True)); between timed training steps every
trainable parameter is changed in place, as an optimizer step does (a DoRA layer then recomputes its norm).
Prints a table of median times and ratios to the base model; --json writes the numbers.
"""

from __future__ import annotations

import argparse
import json

import torch

import lora_kernels as lk
from lora_kernels.peft import patch_peft_model

from .harness import Provider, machine_info, time_providers

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(args, dtype):
    import transformers

    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                      num_key_value_heads=args.hidden // 64, max_position_embeddings=args.tokens)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype)


def _models(args, dtype, dropout):
    import peft

    base = _llama(args, dtype).requires_grad_(False)
    # the floor of a training step is the backward through every layer's activations (a LoRA model needs
    # dx everywhere): a trainable input embedding makes the base model's step do it
    base.get_input_embeddings().weight.requires_grad_(True)
    config = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=dropout, target_modules=TARGETS,
                             use_dora=args.use_dora)
    peft_model = peft.get_peft_model(_llama(args, dtype), config)
    patched = peft.get_peft_model(_llama(args, dtype), config)
    patch_peft_model(patched)
    ours = lk.inject_lora(_llama(args, dtype), TARGETS, r=args.r, lora_alpha=2 * args.r, lora_dropout=dropout,
                          use_dora=args.use_dora,
                          adapter_dtype=peft_model.base_model.model.model.layers[0].self_attn.q_proj
                          .lora_A["default"].weight.dtype)
    return {"base": base, "peft": peft_model, "patched": patched, "ours": ours}


def _providers(models, ids, train: bool):
    providers = []
    for name, model in models.items():
        model.train(train)
        if train:
            def step(model=model):
                model(ids).logits.float().mean().backward()

            def zero(model=model):
                model.zero_grad(set_to_none=True)
                with torch.no_grad():  # an optimizer step's in-place update (values unchanged)
                    for p in model.parameters():
                        if p.requires_grad:
                            p.mul_(1.0)

            providers.append(Provider(name, step, zero))
        else:
            def forward(model=model):
                with torch.no_grad():
                    model(ids)

            providers.append(Provider(name, forward))
    return providers


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512, help="batch of 2 sequences of tokens/2")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--use-dora", action="store_true", help="DoRA adapters (PEFT's use_dora=True)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    ids = torch.randint(0, 1024, (2, args.tokens // 2), generator=torch.Generator().manual_seed(0))
    info = machine_info("cpu")
    rows = []
    for mode, train in (("forward", False), ("train step, lora_dropout 0.05", True)):
        models = _models(args, dtype, 0.05 if train else 0.0)
        timings = time_providers(_providers(models, ids, train), "cpu", args.reps)
        base = timings["base"].median_ms
        rows.append({"mode": mode, **{name: t.median_ms for name, t in timings.items()}})
        cells = " | ".join(f"{timings[n].median_ms:.0f} ms ({timings[n].median_ms / base:.3f}x)"
                           for n in ("base", "peft", "patched", "ours"))
        if len(rows) == 1:
            print(f"Llama {args.layers} layers, hidden {args.hidden}, {args.tokens} tokens, "
                  f"{'DoRA' if args.use_dora else 'LoRA'} r={args.r} on 7 "
                  f"projections per layer, {args.dtype}; {info['cpu']} ({info['cpu_isa']}), torch {info['torch']}, "
                  f"peft {info['peft']}, {info['date']}, commit {info['git_commit']}")
            print("| mode | base | peft | patched peft | ours (inject_lora) |\n|---|---|---|---|---|")
        print(f"| {mode} | {cells} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args), "median_ms": rows}, f, indent=2)


if __name__ == "__main__":
    main()
