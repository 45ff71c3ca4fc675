"""Fine-tune a tiny Llama with lora_kernels, save the adapter in PEFT's format, load it back with PEFT.

    python examples/finetune_tiny.py [--steps 30] [--out DIR]

The model is built from a config (random weights, no download); the task is to continue a repeating
token pattern. On the frozen random base the loss falls from ~4.9 to ~3.6 in 30 steps (seconds on a CPU):
the point is the workflow (inject, train, save in PEFT's format, PEFT loads the same logits), not the task.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers

import lora_kernels as lk
from lora_kernels.peft import save_peft_adapter


def tiny_llama() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)  # the same "pretrained" weights every time
    return transformers.LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", help="where to save the adapter (default: a temporary directory, removed at the end)")
    args = parser.parse_args()

    model = lk.inject_lora(tiny_llama(), "all-linear", r=8, lora_alpha=16, lora_dropout=0.05)  # base frozen
    lk.print_trainable_parameters(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    pattern = torch.arange(8).repeat(4)  # 0 1 2 ... 7 0 1 2 ...
    batch = torch.stack([pattern.roll(-i) for i in range(8)])
    model.train()
    for step in range(args.steps):
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")

    model.eval()
    with torch.no_grad():
        ours = model(batch).logits
    if args.out:
        check_saved_adapter(model, args.out, batch, ours)
    else:  # nothing left behind: the adapter goes to a temporary folder removed at the end
        with tempfile.TemporaryDirectory(prefix="lora_adapter_") as out:
            check_saved_adapter(model, out, batch, ours)


def check_saved_adapter(model, out: str, batch, ours) -> None:
    """Save the adapter as PEFT does, and load it back with PEFT (when installed): the same logits."""
    save_peft_adapter(model, out)
    print(f"adapter saved to {out} (adapter_config.json + adapter_model.safetensors)")
    try:
        import peft
    except ImportError:
        return
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), out).eval()
    with torch.no_grad():
        difference = (loaded(batch).logits - ours).abs().max().item()
    print(f"PEFT's PeftModel.from_pretrained on the saved adapter: max |logits difference| = {difference:.2e}")
    assert difference < 1e-4


if __name__ == "__main__":
    main()
