"""MultiLoRALinear and its model-level helpers: named adapters in preallocated slots, per-row and
per-sequence adapter names, training, merge of one adapter, state dicts, torch.compile without recompiles."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels import MultiLoRALinear

from conftest import DEVICE


def _layer(seed=0):
    torch.manual_seed(seed)
    layer = MultiLoRALinear(24, 16, capacity=4, r_max=8, device=DEVICE)
    g = torch.Generator().manual_seed(seed)
    for name, r, alpha in (("a", 8, 16), ("b", 3, 6), ("c", 5, 5)):
        layer.add_adapter(name, r, alpha, lora_A=torch.randn(r, 24, generator=g).to(DEVICE) * 0.2,
                          lora_B=torch.randn(16, r, generator=g).to(DEVICE) * 0.2)
    return layer


def _expected(layer, x, names):
    """Each row through its own adapter with lora_linear (the single-adapter op)."""
    rows = []
    for m, name in enumerate(names):
        if name is None:
            rows.append(nn.functional.linear(x[m:m + 1], layer.weight, layer.bias))
            continue
        A, B, s = layer._adapter_tensors(name)
        rows.append(lk.lora_linear(x[m:m + 1], layer.weight, layer.bias, A, B, s))
    return torch.cat(rows)


def test_rows_on_named_adapters_match_single_adapter_layers():
    layer = _layer()
    x = torch.randn(7, 24, device=DEVICE)
    names = ["b", None, "a", "c", "b", "a", None]
    torch.testing.assert_close(layer(x, adapter_names=names), _expected(layer, x, names), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), _expected(layer, x, ["a"] * 7), rtol=1e-5, atol=1e-5)  # the active one
    layer.set_adapter("c")
    torch.testing.assert_close(layer(x), _expected(layer, x, ["c"] * 7), rtol=1e-5, atol=1e-5)
    x3 = torch.randn(3, 5, 24, device=DEVICE)
    per_sequence = layer(x3, adapter_names=["a", None, "b"])
    for i, name in enumerate(["a", None, "b"]):
        torch.testing.assert_close(per_sequence[i], _expected(layer, x3[i], [name] * 5), rtol=1e-5, atol=1e-5)


def test_training_reaches_only_the_adapters_in_the_batch():
    layer = _layer()
    x = torch.randn(6, 24, device=DEVICE)
    layer(x, adapter_names=["a", "a", None, "c", "c", "a"]).square().sum().backward()
    slot = layer.slots
    assert layer.lora_A.grad[slot["a"]].abs().sum() > 0 and layer.lora_B.grad[slot["c"], :, :5].abs().sum() > 0
    assert not layer.lora_A.grad[slot["b"]].any()  # not in the batch
    assert not layer.lora_B.grad[slot["c"], :, 5:].any()  # past its rank


def test_remove_add_set_and_errors():
    layer = _layer()
    slot_b = layer.slots["b"]
    layer.remove_adapter("b")
    assert not layer.lora_A[slot_b].any() and "b" not in layer.slots
    assert layer.add_adapter("d", 2) == slot_b  # the freed slot is reused
    layer.add_adapter("e", 1)
    with pytest.raises(ValueError, match="slots are in use"):
        layer.add_adapter("f", 1)
    with pytest.raises(ValueError, match="r_max"):
        layer.remove_adapter("e") or layer.add_adapter("f", 9)
    with pytest.raises(KeyError, match="no adapter named 'zzz'"):
        layer(torch.randn(2, 24, device=DEVICE), adapter_names=["a", "zzz"])
    with pytest.raises(ValueError, match="exists already"):
        layer.add_adapter("a", 2)


def test_merge_one_adapter_for_a_batch_that_uses_it_alone():
    layer = _layer()
    x = torch.randn(5, 24, device=DEVICE)
    expected = _expected(layer, x, ["b"] * 5)
    layer.merge("b")
    assert layer.active_adapter == "b"
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(x, adapter_names=["a"] * 5)
    layer.unmerge()
    torch.testing.assert_close(layer(x, adapter_names=["a", "b", "c", None, "b"]),
                               _expected(layer, x, ["a", "b", "c", None, "b"]), rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_keeps_names_and_slots():
    layer = _layer(seed=1)
    fresh = MultiLoRALinear(24, 16, capacity=4, r_max=8, device=DEVICE)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.slots == layer.slots and fresh.active_adapter == "a"
    x = torch.randn(4, 24, device=DEVICE)
    names = ["c", "b", None, "a"]
    torch.testing.assert_close(fresh(x, adapter_names=names), layer(x, adapter_names=names))


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, x, **kwargs):
        return self.down(torch.relu(self.up(x)))


def test_model_level_helpers_and_compile_without_recompiles():
    torch.manual_seed(0)
    model = lk.inject_multi_lora(_Model().to(DEVICE), ["up", "down"], capacity=4, r_max=8)
    assert not model.up.weight.requires_grad and model.up.lora_A.requires_grad
    lk.add_adapter(model, "x", r=4, lora_alpha=8)
    lk.add_adapter(model, "y", r=8, lora_alpha=8)
    for layer in (model.up, model.down):
        nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(3, 5, 24, device=DEVICE)
    with lk.adapter_batch(model, ["y", None, "x"]):
        mixed = model(x)
    lk.set_adapter(model, "y")
    torch.testing.assert_close(mixed[0], model(x[0]), rtol=1e-5, atol=1e-5)
    lk.set_adapter(model, None)
    base = model(x[1])
    torch.testing.assert_close(mixed[1], base, rtol=1e-5, atol=1e-5)

    ids = model.up.adapter_ids(["y", None, "x"])

    def step(x, ids):
        h = torch.relu(model.up(x, adapter_ids=ids))
        return model.down(h, adapter_ids=ids)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=False)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        first = compiled(x, ids)
        torch.testing.assert_close(first, mixed, rtol=1e-5, atol=1e-5)
        lk.remove_adapter(model, "x")
        lk.add_adapter(model, "z", r=2, lora_alpha=4)  # new values in a slot: no recompile
        nn.init.normal_(model.up.lora_B, std=0.1)
        second = compiled(x, model.up.adapter_ids(["z", "y", None]))
        second.sum().backward()
    with lk.adapter_batch(model, ["z", "y", None]):
        torch.testing.assert_close(second, model(x), rtol=1e-5, atol=1e-5)


def test_disable_adapter_covers_multi_lora_layers():
    layer = _layer()
    x = torch.randn(4, 24, device=DEVICE)
    base = nn.functional.linear(x, layer.weight, layer.bias)
    with_b = _expected(layer, x, ["b"] * 4)
    holder = nn.Sequential(layer)
    layer.merge("b")
    with lk.disable_adapter(holder):
        torch.testing.assert_close(holder(x), base, rtol=1e-5, atol=1e-5)
        assert layer.merged_adapter is None
    assert layer.merged_adapter == "b"
    torch.testing.assert_close(holder(x), with_b, rtol=1e-5, atol=1e-5)


def test_each_adapter_has_its_own_dropout():
    layer = MultiLoRALinear(24, 16, capacity=4, r_max=8, lora_dropout=0.0, device=DEVICE)
    layer.add_adapter("plain", 4)
    layer.add_adapter("dropped", 4, lora_dropout=0.5)
    for name in ("plain", "dropped"):
        nn.init.normal_(layer.lora_B[layer.slots[name]], std=0.5)
    x = torch.randn(6, 24, device=DEVICE)
    names = ["plain", "dropped"] * 3
    with torch.no_grad():
        train_out = layer.train()(x, adapter_names=names)
        eval_out = layer.eval()(x, adapter_names=names)
    torch.testing.assert_close(train_out[0::2], eval_out[0::2])  # no dropout on "plain"
    assert not torch.allclose(train_out[1::2], eval_out[1::2])  # dropout on "dropped"
    fresh = MultiLoRALinear(24, 16, capacity=4, r_max=8, device=DEVICE)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.dropouts.tolist() == layer.dropouts.tolist() and fresh.alphas == layer.alphas


def test_model_level_merge_and_unload_cover_multi_lora_layers():
    torch.manual_seed(0)
    model = lk.inject_multi_lora(_Model().to(DEVICE), ["up", "down"], capacity=4, r_max=8)
    lk.add_adapter(model, "a", r=4)
    lk.add_adapter(model, "b", r=8)
    for layer in (model.up, model.down):
        nn.init.normal_(layer.lora_B, std=0.1)
    lk.set_adapter(model, "b")
    x = torch.randn(5, 24, device=DEVICE)
    expected = model(x)
    lk.merge_adapter(model)
    assert model.up.merged_adapter == "b"
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    lk.unmerge_adapter(model)
    assert model.up.merged_adapter is None
    merged = lk.merge_and_unload(model)
    assert type(merged.up) is nn.Linear and type(merged.down) is nn.Linear
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)


def test_state_dict_of_a_merged_multi_layer_holds_w0():
    """As for LoRALinear: a state dict taken while an adapter is merged holds W0, so loading it into a fresh
    layer does not count the adapter twice; loading into a merged layer merges the loaded adapter."""
    layer = _layer()
    x = torch.randn(3, 24, device=DEVICE)
    expected = layer(x, adapter_names=["b", "a", None])
    layer.merge("b")
    state = layer.state_dict()
    fresh = MultiLoRALinear(24, 16, capacity=4, r_max=8, device=DEVICE)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x, adapter_names=["b", "a", None]), expected, rtol=1e-5, atol=1e-5)
    merged = _layer(seed=4)
    merged.merge("b")
    merged.load_state_dict(state)
    assert merged.merged_adapter == "b"
    torch.testing.assert_close(merged(x[:1]), expected[:1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cast", ["to_bfloat16", "half"])
def test_scalings_keep_their_precision_through_dtype_casts(cast):
    """A dtype cast of the layer rounds its weights, not its scalings: 16/3 stays 16/3 (in bfloat16 it would be
    5.34375, and 395 of 1024 outputs differed from a LoRALinear holding the same adapter), 1e5 stays finite."""
    torch.manual_seed(0)
    layer = MultiLoRALinear(32, 32, capacity=2, r_max=4, device=DEVICE)
    layer.add_adapter("a", r=3, lora_alpha=16)
    layer.add_adapter("big", r=4, lora_alpha=4e5)
    nn.init.normal_(layer.lora_B, std=0.02)
    single = lk.LoRALinear.from_linear(nn.Linear(32, 32).to(DEVICE), r=3, lora_alpha=16)
    with torch.no_grad():
        single.weight.copy_(layer.weight)
        single.bias.copy_(layer.bias)
        single.lora_A.copy_(layer.lora_A[0, :3])
        single.lora_B.copy_(layer.lora_B[0, :, :3])
    dtype = torch.bfloat16 if cast == "to_bfloat16" else torch.float16
    layer = layer.to(dtype) if cast == "to_bfloat16" else layer.half()
    single = single.to(dtype)
    assert layer.scalings.dtype == torch.float64 and layer.scalings.tolist()[:2] == [16 / 3, 1e5]
    x = torch.randn(8, 32, device=DEVICE, dtype=dtype)
    layer.set_adapter("a")
    assert torch.equal(layer(x), single(x))
    layer.set_adapter("big")
    assert torch.isfinite(layer(x * 1e-4)).all()


def test_model_level_adapter_changes_are_all_or_nothing():
    """lk.add_adapter / set_adapter / remove_adapter check every layer before changing any: a refusal by a later
    layer used to leave the earlier ones changed (layers on different adapters)."""
    model = nn.Sequential(MultiLoRALinear(8, 8, capacity=3, r_max=8), MultiLoRALinear(8, 8, capacity=3, r_max=4))
    with pytest.raises(ValueError, match="r must be <= r_max=4"):
        lk.add_adapter(model, "wide", r=6)
    assert all("wide" not in layer.slots for layer in model)
    lk.add_adapter(model, "a", r=2)
    lk.add_adapter(model, "b", r=2)
    model[1].merge("a")
    with pytest.raises(RuntimeError, match="merged"):
        lk.set_adapter(model, "b")
    assert [layer.active_adapter for layer in model] == ["a", "a"]
    model[1].unmerge()
    model[1].remove_adapter("b")
    with pytest.raises(KeyError, match="no adapter named 'b'"):
        lk.remove_adapter(model, "b")
    assert "b" in model[0].slots


def _merged_multi():
    torch.manual_seed(1)
    layer = MultiLoRALinear(16, 12, capacity=2, r_max=4)
    layer.add_adapter("a", r=4, lora_alpha=8)
    layer.add_adapter("b", r=2, lora_alpha=3)
    nn.init.normal_(layer.lora_B, std=0.5)
    w0 = layer.weight.detach().clone()
    layer.merge("a")
    return layer, w0


def test_loading_a_state_with_another_active_adapter_into_a_merged_layer_merges_that_one():
    """A merged layer that loads a state whose active adapter is b ends merged with b, active b (it stayed on a)."""
    layer, w0 = _merged_multi()
    other, _ = _merged_multi()
    other.unmerge()
    other.set_adapter("b")
    layer.load_state_dict(other.state_dict())
    assert layer.active_adapter == "b" and layer.merged_adapter == "b"
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), other(x), rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)


def test_a_failed_load_into_a_merged_multi_layer_changes_nothing():
    layer, w0 = _merged_multi()
    merged_weight = layer.weight.detach().clone()
    state = layer.state_dict()
    state["lora_B"] = torch.zeros(2, 12, 3)
    with pytest.raises(RuntimeError, match="has shape"):
        layer.load_state_dict(state)
    assert layer.merged_adapter == "a" and torch.equal(layer.weight, merged_weight)


def test_lora_only_bias_trains_multi_adapter_layers_biases():
    model = nn.Sequential(MultiLoRALinear(8, 8, capacity=2, r_max=4), nn.Linear(8, 8))
    lk.mark_only_lora_as_trainable(model, bias="lora_only")
    assert model[0].bias.requires_grad and not model[1].bias.requires_grad
    assert "0.bias" in lk.lora_state_dict(model, bias="lora_only")
