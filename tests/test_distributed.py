"""LoRALinear under torch.distributed (gloo, two processes on this machine): DDP and FSDP2.

Each rank trains on its shard of a fixed batch with dropout on (tests/distributed_worker.py).
Checked: the ranks end bit for bit equal, equal (within float tolerance) to one process that
replays both shards with the same dropout seeds and averages their gradients, and merging
after training gives every rank the same weights.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distributed_worker as worker

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available())
    or "cpu" not in __import__("lora_kernels").available_backends(),
    reason="needs torch.distributed with gloo and the cpu backend",
)

WORLD = 2
TIMEOUT_S = 240


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(mode: str, out_dir: Path) -> list[dict]:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_loopback_port()),
               WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1", LORA_KERNELS_BACKEND="cpu")
    script = Path(__file__).with_name("distributed_worker.py")
    procs = [subprocess.Popen([sys.executable, str(script), mode, str(out_dir)], env=dict(env, RANK=str(rank)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(WORLD)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for proc in procs:
            proc.kill()
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{output[-3000:]}"
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD)]


def _single_process_replay() -> dict:
    """One process, the same steps: each rank's shard with the dropout seed that rank drew, the
    gradients averaged as DDP and FSDP2 average them."""
    torch.manual_seed(0)
    model = worker.build_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(1)
    for step in range(worker.STEPS):
        x, target = worker.batch(step)
        optimizer.zero_grad()
        rng = torch.get_rng_state()
        for rank in range(WORLD):
            torch.set_rng_state(rng)  # every rank starts the step from the same generator state
            loss = worker.loss_fn(model, worker.shard(x, rank, WORLD), worker.shard(target, rank, WORLD))
            (loss / WORLD).backward()
        optimizer.step()
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"params": params, "merged": worker.merged_weights(model)}


@pytest.mark.parametrize("variant", ["lora", "dora", "nf4"])
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_training_across_two_ranks(mode, variant, tmp_path, monkeypatch):
    """nf4: LoRALinear4bit layers (QLoRA); under FSDP2 each rank holds a shard of the codes and scales
    (distributed_worker.check_4bit_shards)."""
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "cpu")
    monkeypatch.setenv("LORA_KERNELS_TEST_DORA", "1" if variant == "dora" else "0")
    monkeypatch.setenv("LORA_KERNELS_TEST_4BIT", "1" if variant == "nf4" else "0")
    ranks = _run_ranks(mode, tmp_path)
    for key in ranks[0]["params"]:
        assert torch.equal(ranks[0]["params"][key], ranks[1]["params"][key]), f"{key} differs between ranks"
    for key in ranks[0]["merged"]:
        assert torch.equal(ranks[0]["merged"][key], ranks[1]["merged"][key]), f"merged {key} differs between ranks"

    replay = _single_process_replay()
    initial = worker.build_model().state_dict()
    for key, value in replay["params"].items():
        torch.testing.assert_close(ranks[0]["params"][key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
        if "lora_" in key:  # every LoRA parameter of both layers was trained (no dropped hook or gradient)
            assert not torch.equal(value, initial[key]), f"{key} never changed"
            assert not torch.equal(ranks[0]["params"][key], initial[key]), f"{key} never changed on the ranks"
    for key, value in replay["merged"].items():
        torch.testing.assert_close(ranks[0]["merged"][key], value, rtol=1e-5, atol=1e-6)
