"""One rank of the distributed tests (tests/test_distributed.py starts two of them on gloo).

    python tests/distributed_worker.py {ddp|fsdp2} OUT_DIR      (RANK, WORLD_SIZE, MASTER_ADDR/PORT set;
                                                                 LORA_KERNELS_TEST_DORA=1: DoRA layers;
                                                                 LORA_KERNELS_TEST_4BIT=1: NF4 bases)

Trains the small model of `build_model` for STEPS steps on this rank's shard of a
fixed global batch, with dropout on, then merges every LoRA layer and saves the
final parameters and merged weights to OUT_DIR/rank{RANK}.pt. The parent test
compares ranks bit for bit and against one process that replays the same shards.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

import lora_kernels

STEPS = 5
GLOBAL_BATCH, D_IN, D_HIDDEN, D_OUT = 8, 24, 40, 12


class TinyModel(nn.Module):
    """Two LoRA layers with dropout and an in-place op on the first one's output (h.mul_),
    the pattern that loses FSDP2's pre-backward hook when a layer returns a view."""

    def __init__(self, use_dora: bool = False, four_bit: bool = False):
        super().__init__()
        options = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1}
        if four_bit:  # NF4 bases, double quantized, quantized from the same float layers
            self.up = lora_kernels.LoRALinear4bit.quantize(nn.Linear(D_IN, D_HIDDEN), **options)
            self.down = lora_kernels.LoRALinear4bit.quantize(nn.Linear(D_HIDDEN, D_OUT), **options)
        else:
            self.up = lora_kernels.LoRALinear(D_IN, D_HIDDEN, use_dora=use_dora, **options)
            self.down = lora_kernels.LoRALinear(D_HIDDEN, D_OUT, use_dora=use_dora, **options)

    def forward(self, x):
        h = self.up(x)
        h.mul_(0.5)
        return self.down(torch.relu(h))


def four_bit() -> bool:
    return os.environ.get("LORA_KERNELS_TEST_4BIT") == "1"


def build_model() -> TinyModel:
    """DoRA layers when LORA_KERNELS_TEST_DORA=1 (their norm cache must see FSDP2's re-gathered parameters), NF4 bases
    when LORA_KERNELS_TEST_4BIT=1 (FSDP2 shards their codes and scales)."""
    torch.manual_seed(0)
    model = TinyModel(use_dora=os.environ.get("LORA_KERNELS_TEST_DORA") == "1", four_bit=four_bit())
    for layer in (model.up, model.down):
        nn.init.normal_(layer.lora_B, std=0.1)  # not the zero init: gradients reach lora_A from step one
    return model


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, D_IN, generator=g), torch.randn(GLOBAL_BATCH, D_OUT, generator=g)


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    per = t.shape[0] // world
    return t[rank * per:(rank + 1) * per]


def loss_fn(model, x, target) -> torch.Tensor:
    return (model(x) - target).pow(2).mean()


def merged_weights(model: TinyModel) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("up", "down"):
        layer = getattr(model, name)
        if isinstance(layer, lora_kernels.LoRALinear4bit):  # how QLoRA adapters ship: a float layer, W0 + s·BA
            out[name] = layer.merge_and_unload(torch.float32).weight.detach().clone()
            continue
        layer.merge()
        out[name] = layer.weight.detach().clone()
    return out


def check_4bit_shards(model: TinyModel, world: int) -> None:
    """Each rank holds its shard of the codes and of every scale (uint8 DTensors: what the all-gather moves is the
    4-bit data), and a sharded layer refuses to build its weight outside forward."""
    for layer in (model.up, model.down):
        for name in ("weight", "weight_absmax", "weight_nested_absmax", "weight_offset"):
            param = getattr(layer, name)
            assert param.dtype == torch.uint8 and not param.requires_grad, (name, param.dtype)
            local = param.to_local()
            assert local.numel() <= -(-param.numel() // world), (name, local.numel(), param.numel())
        assert layer.weight.numel() * 2 == layer.in_features * layer.out_features
        try:
            layer.base_weight()
        except TypeError as error:
            assert "DTensor" in str(error), error
        else:
            raise AssertionError("a 4-bit weight was built over FSDP2's shards")


def main(mode: str, out_dir: str) -> None:
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = build_model()
    if mode == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        mesh = init_device_mesh("cpu", (world,))
        for layer in (model.up, model.down):
            fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
        # Outside forward, FSDP2's parameters are DTensor shards: the op must refuse them, not run on a shard.
        assert isinstance(model.up.weight, DTensor)
        if four_bit():
            check_4bit_shards(model, world)
        else:
            try:
                lora_kernels.lora_linear(torch.randn(2, D_IN), model.up.weight, None, model.up.lora_A,
                                         model.up.lora_B, 2.0)
            except TypeError as error:
                assert "DTensor" in str(error), error
            else:
                raise AssertionError("lora_linear ran on DTensor shards")
            try:
                model.up.merge()
            except TypeError as error:
                assert "DTensor" in str(error), error
            else:
                raise AssertionError("merge ran on a DTensor shard")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(1)  # the same dropout seeds on every rank (as nn.Dropout with one manual_seed)
    losses = []
    for step in range(STEPS):
        x, target = batch(step)
        loss = loss_fn(wrapped, shard(x, rank, world), shard(target, rank, world))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    if mode == "fsdp2":  # whole tensors, for the comparison and the merge
        params = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
        model = build_model()
        model.load_state_dict(params)
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"params": params, "merged": merged_weights(model), "losses": losses},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
