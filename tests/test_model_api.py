"""Model-level API: inject_lora's options, merge/unmerge/unload/disable over a model, state dicts of merged
layers, switch_adapter and optimizers, float32 adapters on a bfloat16 model, transformers' Conv1D (GPT-2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels import LoRALinear

from conftest import DEVICE


class _Tiny(nn.Module):
    """An embedding, two projections, a norm and an output head with get_output_embeddings (as HF models)."""

    def __init__(self, vocab=50, d=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.q_proj = nn.Linear(d, d)
        self.up = nn.Linear(d, 2 * d)
        self.norm = nn.LayerNorm(2 * d)
        self.classifier = nn.Linear(2 * d, 3)
        self.lm_head = nn.Linear(2 * d, vocab, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, ids):
        h = self.norm(self.up(self.q_proj(self.embed(ids))))
        return self.lm_head(h) + self.classifier(h).sum(-1, keepdim=True)


def _trained(model, seed=0):
    """Give every LoRA layer a non-zero B (as after training)."""
    g = torch.Generator().manual_seed(seed)
    for _, layer in lk.lora_layers(model):
        layer.lora_B.data = torch.randn(layer.lora_B.shape, generator=g).to(layer.lora_B) * 0.1
    return model


def _ids():
    return torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1)).to(DEVICE)


def test_inject_freezes_the_base_and_trains_modules_to_save():
    model = lk.inject_lora(_Tiny().to(DEVICE), "all-linear", r=4, modules_to_save=["classifier"])
    assert isinstance(model.q_proj, LoRALinear) and isinstance(model.up, LoRALinear)
    assert not isinstance(model.lm_head, LoRALinear)  # all-linear leaves the output head alone, as PEFT
    assert not isinstance(model.classifier, LoRALinear)  # a module to save is trained whole, not wrapped
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"q_proj.lora_A", "q_proj.lora_B", "up.lora_A", "up.lora_B", "classifier.weight",
                         "classifier.bias"}
    assert set(lk.lora_state_dict(model)) == trainable
    trainable_count, total = lk.print_trainable_parameters(model)
    assert trainable_count == sum(model.get_parameter(n).numel() for n in trainable)
    assert total == sum(p.numel() for p in model.parameters())
    kept = lk.inject_lora(_Tiny(), ["q_proj"], freeze_base=False)
    assert kept.embed.weight.requires_grad and kept.norm.weight.requires_grad and not kept.q_proj.weight.requires_grad
    with pytest.raises(ValueError, match="modules_to_save"):
        lk.inject_lora(_Tiny(), ["q_proj"], modules_to_save=["nope"])


def test_model_level_merge_unmerge_disable_and_unload():
    torch.manual_seed(0)
    base = _Tiny().to(DEVICE)
    ids = _ids()
    expected_base = base(ids)
    model = _trained(lk.inject_lora(base, ["q_proj", "up"], r=4, lora_alpha=8))
    with_adapter = model(ids)
    assert not torch.allclose(with_adapter, expected_base)
    with lk.disable_adapter(model):
        torch.testing.assert_close(model(ids), expected_base)
    torch.testing.assert_close(model(ids), with_adapter)
    lk.merge_adapter(model)
    assert all(layer.merged for _, layer in lk.lora_layers(model))
    torch.testing.assert_close(model(ids), with_adapter, rtol=1e-5, atol=1e-5)
    with lk.disable_adapter(model):  # merged: taken out for the block, merged again after
        torch.testing.assert_close(model(ids), expected_base, rtol=1e-5, atol=1e-5)
    assert all(layer.merged for _, layer in lk.lora_layers(model))
    lk.unmerge_adapter(model)
    torch.testing.assert_close(model(ids), with_adapter)
    unloaded = lk.unload(_trained(lk.inject_lora(_Tiny().to(DEVICE), ["q_proj"])))
    assert type(unloaded.q_proj) is nn.Linear
    merged = lk.merge_and_unload(model)
    assert not list(lk.lora_layers(merged)) and type(merged.up) is nn.Linear
    torch.testing.assert_close(merged(ids), with_adapter, rtol=1e-5, atol=1e-5)


def test_state_dict_of_merged_layer_holds_w0_and_loading_does_not_merge_twice():
    """merge_weights=True merges in eval(); a state dict taken then, loaded into a fresh model that is
    put in eval(), must give the same outputs (it used to merge the adapter a second time)."""
    torch.manual_seed(0)
    model = _trained(lk.inject_lora(_Tiny().to(DEVICE), ["q_proj", "up"], r=4, merge_weights=True)).eval()
    assert model.q_proj.merged
    ids = _ids()
    expected = model(ids)
    state = model.state_dict()
    fresh = lk.inject_lora(_Tiny().to(DEVICE), ["q_proj", "up"], r=4, merge_weights=True)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.eval()(ids), expected, rtol=1e-5, atol=1e-5)
    # loading into a layer that is merged already re-merges the loaded adapter
    other = _trained(lk.inject_lora(_Tiny().to(DEVICE), ["q_proj", "up"], r=4, merge_weights=True), seed=3).eval()
    other.load_state_dict(state)
    assert other.q_proj.merged
    torch.testing.assert_close(other(ids), expected, rtol=1e-5, atol=1e-5)
    # an adapter-only state dict loaded into a merged layer replaces the merged adapter
    other = _trained(lk.inject_lora(_Tiny().to(DEVICE), ["q_proj", "up"], r=4, merge_weights=True), seed=3)
    other.load_state_dict(state)  # the base weights first, unmerged (train mode)
    other = _trained(other, seed=5).eval()
    other.load_state_dict(lk.lora_state_dict(model), strict=False)
    torch.testing.assert_close(other(ids), expected, rtol=1e-5, atol=1e-5)


def test_switch_adapter_keeps_parameters_for_the_optimizer():
    layer = LoRALinear(16, 8, r=4).to(DEVICE)
    optimizer = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.1)
    before = (layer.lora_A, layer.lora_B)
    layer.switch_adapter(torch.randn(4, 16, device=DEVICE), torch.randn(8, 4, device=DEVICE))
    assert (layer.lora_A, layer.lora_B) == before
    layer(torch.randn(3, 16, device=DEVICE)).sum().backward()
    snapshot = layer.lora_B.detach().clone()
    optimizer.step()
    assert not torch.equal(layer.lora_B, snapshot)  # the optimizer trains the layer's current adapter
    with pytest.warns(UserWarning, match="new Parameters"):
        layer.switch_adapter(torch.randn(2, 16, device=DEVICE), torch.randn(8, 2, device=DEVICE))
    assert layer.lora_A is not before[0] and layer.r == 2


def test_float32_adapters_on_a_bfloat16_model_train_and_merge():
    torch.manual_seed(0)
    model = lk.inject_lora(_Tiny().to(DEVICE, torch.bfloat16), ["q_proj", "up"], r=4, adapter_dtype=torch.float32)
    _trained(model)
    assert model.q_proj.lora_A.dtype == torch.float32 and model.q_proj.weight.dtype == torch.bfloat16
    out = model(_ids())
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert model.q_proj.lora_A.grad.dtype == torch.float32 and model.q_proj.lora_B.grad.abs().sum() > 0
    expected = model.eval()(_ids())
    lk.merge_adapter(model)
    merged = model(_ids())
    assert (merged.float() - expected.float()).abs().max() <= 0.05 * expected.float().abs().max()


transformers = pytest.importorskip("transformers")


def _gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_gpt2_conv1d_layers_wrap_and_unload_back_to_conv1d(tmp_path):
    from transformers.pytorch_utils import Conv1D

    model = _gpt2()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    base_logits = model(ids).logits
    lk.inject_lora(model, ["c_attn", "c_proj", "c_fc"], r=4, lora_alpha=8)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear) and layer.fan_in_fan_out and layer.base_layer_type is Conv1D
    torch.testing.assert_close(model(ids).logits, base_logits)  # B = 0: the base model
    _trained(model)
    with torch.no_grad():
        logits = model(ids).logits
    square = model.transformer.h[0].attn.c_proj  # 32 x 32: a transposed weight would go unnoticed by shape
    x = torch.randn(3, 32)
    expected = x @ square.weight + square.bias + square.scaling * (x @ square.lora_A.t()) @ square.lora_B.t()
    torch.testing.assert_close(square(x), expected, rtol=1e-5, atol=1e-5)
    merged = lk.merge_and_unload(model)
    assert type(merged.transformer.h[0].attn.c_proj) is Conv1D
    merged.save_pretrained(tmp_path)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits, rtol=1e-4, atol=1e-4)
