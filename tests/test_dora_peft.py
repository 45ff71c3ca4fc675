"""DoRA with PEFT and transformers, as a PEFT user would: patched PEFT DoRA models (outputs and every gradient,
with and without dropout), adapter files both ways, merge_and_unload, inject_lora(use_dora=True)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.functional import draw_seed
from lora_kernels.peft import load_peft_adapter, patch_peft_model, save_peft_adapter
from lora_kernels import reference

from test_peft import IDS, LLAMA_TARGETS, _gpt2, _llama, _logits

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _trained_dora(model, seed=0):
    """A trained-looking DoRA adapter: random lora_B (A perturbed) and magnitudes off ‖W0 + s·BA‖ by ~20%."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g).to(p))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.2)
    return model


def _grads(model):
    model.zero_grad()
    model(IDS).logits.square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("make,targets", [(_llama, LLAMA_TARGETS), (_gpt2, ["c_attn", "c_proj", "c_fc"])],
                         ids=["llama", "gpt2"])
def test_patched_peft_dora_model_gives_peft_outputs_and_gradients(make, targets):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True, fan_in_fan_out=make is _gpt2)
    model = _trained_dora(peft.get_peft_model(make(), config))
    expected = _logits(model)
    model.train()
    expected_grads = _grads(model)
    report = patch_peft_model(model)
    assert report.patched and not report.skipped, str(report)
    model.eval()
    torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)
    model.train()
    grads = _grads(model)
    assert any("lora_magnitude" in n for n in grads)
    for name, g in expected_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_patched_layers_run_dora_linear(monkeypatch):
    model = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    patch_peft_model(model)
    calls = []
    original = lk.peft.cached_dora_linear
    monkeypatch.setattr(lk.peft, "cached_dora_linear", lambda *a, **k: calls.append(1) or original(*a, **k))
    _logits(model)
    assert len(calls) == 2


class _SeededDropout(nn.Dropout):
    """nn.Dropout that drops with lora_kernels' mask for a given seed (so PEFT's path sees the same x̃)."""

    def __init__(self, p, seed):
        super().__init__(p)
        self.seed = seed

    def forward(self, x):
        x2d = x.reshape(-1, x.shape[-1])
        keep = reference.dropout_mask(self.seed, x2d.shape[0], x2d.shape[1], self.p)
        return (x2d * keep.to(x.dtype) / (1 - self.p)).view(x.shape)


def test_patched_peft_dora_layer_with_dropout_matches_peft_given_the_same_mask():
    layer_model = peft.get_peft_model(nn.Sequential(nn.Linear(24, 20)),
                                      peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True,
                                                      lora_dropout=0.3))
    _trained_dora(layer_model)
    layer = layer_model.base_model.model[0]
    x = torch.randn(7, 24)
    torch.manual_seed(11)
    seed = int(draw_seed())
    layer.train()

    def run():
        leaves = [p for n, p in layer.named_parameters() if p.requires_grad]
        y = layer(x)
        return [y] + list(torch.autograd.grad(y.square().sum(), leaves))

    patch_peft_model(layer_model)
    torch.manual_seed(11)
    ours = run()
    lk.peft.unpatch_peft_model(layer_model)
    layer.lora_dropout["default"] = _SeededDropout(0.3, seed).train()
    expected = run()
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_float32_adapters_on_a_bfloat16_peft_dora_model():
    model = _trained_dora(peft.get_peft_model(_llama(torch.bfloat16), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], use_dora=True)))
    assert next(p for n, p in model.named_parameters() if "lora_magnitude" in n).dtype == torch.float32
    expected = _logits(model).float()
    patch_peft_model(model)
    got = _logits(model).float()
    # PEFT rounds W0 + s·BA and its norm to bfloat16; we keep them in float32: a bfloat16 difference
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()


def test_peft_dora_adapter_loads_saves_and_merges_as_peft(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True,
                             lora_dropout=0.1)
    peft_model = _trained_dora(peft.get_peft_model(_llama(), config))
    peft_model.save_pretrained(tmp_path / "peft")
    expected = _logits(peft_model.eval())

    plain = load_peft_adapter(_llama(), tmp_path / "peft")
    layer = plain.model.layers[0].self_attn.q_proj
    assert isinstance(layer, lk.LoRALinear) and layer.use_dora and layer.lora_dropout == 0.1
    torch.testing.assert_close(_logits(plain.eval()), expected, rtol=1e-5, atol=1e-5)

    save_peft_adapter(plain, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(again), expected, rtol=1e-6, atol=1e-6)
    assert again.peft_config["default"].use_dora

    merged_peft = _logits(peft_model.merge_and_unload())
    merged = lk.merge_and_unload(plain)
    assert not any(isinstance(m, lk.LoRALinear) for m in merged.modules())
    torch.testing.assert_close(_logits(merged), merged_peft, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(merged), expected, rtol=1e-5, atol=1e-5)


def test_dora_adapter_into_a_merged_dora_model_and_refusals(tmp_path):
    for seed, name in ((0, "a"), (1, "b")):
        model = _trained_dora(peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                             use_dora=True)), seed)
        model.save_pretrained(tmp_path / name)
    expected_b = _logits(peft.PeftModel.from_pretrained(_llama(), tmp_path / "b").eval())
    ours = load_peft_adapter(_llama(), tmp_path / "a").eval()
    lk.merge_adapter(ours)
    load_peft_adapter(ours, tmp_path / "b")  # out with a's merge, in with b's
    assert ours.model.layers[0].self_attn.q_proj.merged
    torch.testing.assert_close(_logits(ours), expected_b, rtol=1e-5, atol=1e-5)
    lk.unmerge_adapter(ours)
    torch.testing.assert_close(_logits(ours), expected_b, rtol=1e-5, atol=1e-5)

    peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="use_dora"):
        load_peft_adapter(ours, tmp_path / "lora")
    multi = lk.inject_multi_lora(_llama(), ["q_proj"])
    with pytest.raises(ValueError, match="DoRA"):
        load_peft_adapter(multi, tmp_path / "a")


def test_inject_lora_use_dora_starts_as_the_base_model_and_trains_every_part():
    base = _llama()
    expected = _logits(base)
    model = lk.inject_lora(_llama(), ["q_proj", "v_proj"], r=4, lora_alpha=8, use_dora=True)
    torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("lora_magnitude") for n in trainable) and any(n.endswith("lora_A") for n in trainable)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(IDS).logits.flatten(0, 1), IDS.flatten())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    state = lk.lora_state_dict(model)
    assert any(k.endswith("lora_magnitude") for k in state)
    quantized = lk.inject_lora(_llama(), ["q_proj"], use_dora=True, quantize="nf4")  # QDoRA: tests/test_qdora.py
    layer = quantized.model.layers[0].self_attn.q_proj
    assert isinstance(layer, lk.LoRALinear4bit) and layer.use_dora


def test_adapter_batch_with_a_dora_adapter_is_refused_not_served_on_the_active_adapter():
    """A mixed batch naming a DoRA adapter is not fused: it is handed to PEFT's own mixed batch, which refuses DoRA.
    It used to run every row on the active adapter (off by 1.46 on this layer)."""
    from lora_kernels.peft import adapter_batch

    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(nn.Sequential(nn.Linear(64, 32)),
                                peft.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    model.add_adapter("d", peft.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False, use_dora=True))
    patch_peft_model(model.eval())
    with torch.no_grad(), adapter_batch(model, ["default", "d", "__base__", "d"]):
        with pytest.raises(ValueError, match="DoRA"):
            model(torch.randn(4, 64))
