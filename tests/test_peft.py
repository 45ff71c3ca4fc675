"""PEFT and transformers interop, as a PEFT user would use it: tiny Llama, GPT-2 and BERT built from configs
(no network). patch_peft_model, load_peft_adapter and save_peft_adapter against PEFT itself."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.peft import adapter_batch, load_peft_adapter, patch_peft_model, save_peft_adapter, unpatch_peft_model

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")


def _llama(dtype=torch.float32):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def _gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def _bert():
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, num_labels=3, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


def _randomize_lora(model, seed=0):
    """Non-zero lora_B (and a perturbed lora_A) everywhere: a trained adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.2)
    return model


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("make,targets", [(_llama, LLAMA_TARGETS), (_gpt2, ["c_attn", "c_proj", "c_fc"])],
                         ids=["llama", "gpt2"])
def test_patched_peft_model_gives_peft_outputs_and_gradients(make, targets):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=make is _gpt2)
    model = _randomize_lora(peft.get_peft_model(make(), config))
    expected = _logits(model)
    model.train()
    model(IDS).logits.square().mean().backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    report = patch_peft_model(model)
    assert len(report.patched) == 2 * len(targets) + (make is _gpt2) * 2 and not report.skipped
    model.eval()
    torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)
    model.train()
    model(IDS).logits.square().mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    model.eval()
    base = make()
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model), _logits(base), rtol=1e-5, atol=1e-5)
    model.merge_adapter()
    torch.testing.assert_close(_logits(model), expected, rtol=1e-4, atol=1e-4)
    model.unmerge_adapter()
    assert unpatch_peft_model(model) == len(report.patched)
    torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)


def test_patched_layers_really_run_the_fused_op(monkeypatch):
    model = _randomize_lora(peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"])))
    patch_peft_model(model)
    calls = []
    original = lk.peft.lora_linear
    monkeypatch.setattr(lk.peft, "lora_linear", lambda *a, **k: calls.append(1) or original(*a, **k))
    _logits(model)
    assert len(calls) == 2  # one per q_proj


def test_float32_adapters_on_a_bfloat16_model():
    """PEFT keeps adapters in float32 on a 16-bit model (autocast_adapter_dtype): the patched layers compute
    the LoRA branch from them in float32, as PEFT does, and train them in float32."""
    model = peft.get_peft_model(_llama(torch.bfloat16), peft.LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32
    _randomize_lora(model)
    expected = _logits(model).float()
    patch_peft_model(model)
    ours = _logits(model).float()
    assert (ours - expected).abs().max() <= 0.02 * expected.abs().max()
    model.train()
    model(IDS).logits.float().square().mean().backward()
    assert layer.lora_A["default"].weight.grad.dtype == torch.float32


def test_unsupported_layers_stay_on_peft_and_are_reported():
    model = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))
    report = patch_peft_model(model)
    assert not report.patched and len(report.skipped) == 2
    assert all("lora_bias" in why for why in report.skipped.values())
    assert "left on PEFT's path" in str(report)


def test_patched_model_saves_and_compiles_fullgraph(tmp_path):
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    model = _randomize_lora(peft.get_peft_model(mlp, peft.LoraConfig(r=4, target_modules=["0", "2"])))
    x = torch.randn(5, 16)
    expected = model(x)
    patch_peft_model(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    fresh = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    base_weights = {k.replace(".base_layer", ""): v for k, v in model.base_model.model.state_dict().items()
                    if "lora_" not in k}
    fresh.load_state_dict(base_weights)
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(reloaded(x), expected, rtol=1e-5, atol=1e-5)


def _peft_adapter(tmp_path, make, config):
    model = _randomize_lora(peft.get_peft_model(make(), config))
    if config.modules_to_save:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "modules_to_save" in name:
                    p.add_(1.0)
    model.save_pretrained(tmp_path)
    return _logits(model)


@pytest.mark.parametrize("case", ["llama-patterns-rslora", "gpt2", "bert-classifier", "llama-layers"])
def test_load_peft_adapter_into_a_plain_model(tmp_path, case):
    if case == "llama-patterns-rslora":
        make, config = _llama, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True,
                                                rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3})
    elif case == "gpt2":
        make, config = _gpt2, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"],
                                               fan_in_fan_out=True)
    elif case == "bert-classifier":
        make, config = _bert, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                               modules_to_save=["classifier"])
    else:
        make, config = _llama, peft.LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[1])
    expected = _peft_adapter(tmp_path, make, config)
    model = load_peft_adapter(make(), tmp_path)
    torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in model.parameters())
    if case == "llama-layers":
        assert not isinstance(model.model.layers[0].self_attn.q_proj, lk.LoRALinear)
        assert isinstance(model.model.layers[1].self_attn.q_proj, lk.LoRALinear)
    if case == "bert-classifier":
        trainable = load_peft_adapter(make(), tmp_path, is_trainable=True)
        assert trainable.classifier.weight.requires_grad and "classifier.weight" in lk.lora_state_dict(trainable)


def test_save_peft_adapter_loads_in_peft(tmp_path):
    model = lk.inject_lora(_llama(), LLAMA_TARGETS, r=4, lora_alpha=8)
    layer = model.model.layers[0].self_attn.v_proj
    with pytest.warns(UserWarning, match="rank changed"):
        layer.switch_adapter(torch.randn(2, 32) * 0.1, torch.randn(32, 2) * 0.1, lora_alpha=5)  # rank 2, alpha 5
    _randomize_lora(model)
    expected = _logits(model)
    save_peft_adapter(model, tmp_path, base_model_name_or_path="tiny-llama")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {r"^model\.layers\.0\.self_attn\.v_proj": 2}
    assert config["alpha_pattern"] == {r"^model\.layers\.0\.self_attn\.v_proj": 5}
    loaded = peft.PeftModel.from_pretrained(_llama(), tmp_path)
    torch.testing.assert_close(_logits(loaded), expected, rtol=1e-5, atol=1e-5)
    # and back into a plain model
    torch.testing.assert_close(_logits(load_peft_adapter(_llama(), tmp_path)), expected, rtol=1e-5, atol=1e-5)


def test_save_gpt2_and_bert_with_modules_to_save(tmp_path):
    gpt2 = _randomize_lora(lk.inject_lora(_gpt2(), ["c_attn", "c_proj"], r=4))
    save_peft_adapter(gpt2, tmp_path / "gpt2")
    torch.testing.assert_close(_logits(peft.PeftModel.from_pretrained(_gpt2(), tmp_path / "gpt2")), _logits(gpt2),
                               rtol=1e-5, atol=1e-5)
    bert = _randomize_lora(lk.inject_lora(_bert(), ["query", "value"], r=4, modules_to_save=["classifier"]))
    with torch.no_grad():
        bert.classifier.weight.add_(1.0)
    save_peft_adapter(bert, tmp_path / "bert")
    torch.testing.assert_close(_logits(peft.PeftModel.from_pretrained(_bert(), tmp_path / "bert")), _logits(bert),
                               rtol=1e-5, atol=1e-5)


def test_bad_adapters_are_refused_by_name(tmp_path):
    _peft_adapter(tmp_path / "bias", _llama, peft.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))
    with pytest.raises(ValueError, match="lora_bias"):
        load_peft_adapter(_llama(), tmp_path / "bias")
    _peft_adapter(tmp_path / "gpt2", _gpt2, peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    with pytest.raises(ValueError, match="does not fit"):
        load_peft_adapter(_llama(), tmp_path / "gpt2")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_peft_adapter(_llama(), tmp_path)


def test_finetune_example_runs_and_peft_loads_its_adapter(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "finetune_tiny.py"
    done = subprocess.run([sys.executable, str(script), "--steps", "5", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "logits difference" in done.stdout  # the script asserts the difference is < 1e-4
    assert (tmp_path / "adapter_model.safetensors").is_file()
    # without --out, the adapter goes to a temporary folder that is gone afterwards
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    done = subprocess.run([sys.executable, str(script), "--steps", "2"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(scratch)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "adapter saved to" in done.stdout and not list(scratch.iterdir())


def _three_adapters(make=_llama):
    """A PEFT model with three adapters of different ranks and alphas, all trained (random B)."""
    model = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("c", peft.LoraConfig(r=8, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"]))
    return _randomize_lora(model)


NAMES = ["b", "__base__", "default", "c", "b"]
BATCH = torch.randint(0, 64, (5, 7), generator=torch.Generator().manual_seed(2))


def test_mixed_batch_inference_runs_the_multi_adapter_op(monkeypatch):
    model = _three_adapters().eval()
    with torch.no_grad():
        expected = model(BATCH, adapter_names=NAMES).logits  # PEFT's own mixed-batch forward
    patch_peft_model(model)
    calls = []
    original = lk.peft.lora_linear_multi
    monkeypatch.setattr(lk.peft, "lora_linear_multi", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        ours = model(BATCH, adapter_names=NAMES).logits
    assert len(calls) == 4  # q_proj and v_proj of both layers
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_mixed_batch_training_gives_each_adapter_its_gradient():
    """PEFT refuses adapter_names= in training; adapter_batch() trains a mixed batch, and every adapter's
    gradient equals the one PEFT computes for that adapter's samples alone."""
    model = _three_adapters()
    patch_peft_model(model)
    model.train()
    for n, p in model.named_parameters():  # PEFT trains only the active adapter; here all three train
        p.requires_grad_("lora_" in n)
    with adapter_batch(model, NAMES):
        model(BATCH).logits.square().mean().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    reference_model = _three_adapters().train()  # same weights (same seeds), PEFT's own path
    total = {}
    for name in ("default", "b", "c"):
        reference_model.set_adapter(name)
        rows = [i for i, n in enumerate(NAMES) if n == name]
        reference_model.zero_grad()
        full = reference_model(BATCH).logits
        # the same loss as the mixed batch's, restricted to this adapter's samples
        (full[rows].square().sum() / full.numel()).backward()
        total.update({n: p.grad.clone() for n, p in reference_model.named_parameters()
                      if p.grad is not None and f".{name}." in n})
    assert set(ours) == set(total)
    for n in total:
        torch.testing.assert_close(ours[n], total[n], rtol=1e-4, atol=1e-7, msg=n)
    with pytest.raises(ValueError, match="patch_peft_model"):
        with adapter_batch(_three_adapters(), NAMES):
            pass


def test_named_peft_adapters_into_multi_lora_layers_and_back(tmp_path):
    """Two PEFT adapters loaded by name into MultiLoRALinear layers serve a mixed batch as PEFT does, and a
    named adapter saved from them loads in PEFT with the same outputs."""
    peft_model = _three_adapters().eval()
    for name in ("default", "b"):
        peft_model.save_pretrained(tmp_path / "all", selected_adapters=[name])
    with torch.no_grad():
        expected = peft_model(BATCH[:3], adapter_names=["b", "__base__", "default"]).logits
    model = lk.inject_multi_lora(_llama(), ["q_proj", "v_proj"], capacity=4, r_max=8).eval()
    load_peft_adapter(model, tmp_path / "all", adapter_name="default")
    load_peft_adapter(model, tmp_path / "all" / "b", adapter_name="b")
    with torch.no_grad(), lk.adapter_batch(model, ["b", None, "default"]):
        torch.testing.assert_close(model(BATCH[:3]).logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="taken"):
        load_peft_adapter(model, tmp_path / "all", adapter_name="b")
    save_peft_adapter(model, tmp_path / "b_again", adapter_name="b")
    reloaded = peft.PeftModel.from_pretrained(_llama(), tmp_path / "b_again").eval()
    lk.set_adapter(model, "b")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(BATCH).logits, model(BATCH).logits, rtol=1e-5, atol=1e-5)


def test_an_adapter_that_does_not_fit_leaves_the_model_as_it_was(tmp_path):
    _peft_adapter(tmp_path, _llama, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if "layers.1.self_attn.v_proj.lora_A" in k)
    tensors[key] = tensors[key][:, :16].contiguous()  # the last layer's lora_A too narrow
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="v_proj: expected lora_A"):
        load_peft_adapter(model, tmp_path)
    assert not list(lk.lora_layers(model))  # nothing injected
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_patched_model_deep_copies_and_pickles():
    import copy
    import io

    model = _randomize_lora(peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))).eval()
    patch_peft_model(model)
    expected = _logits(model)
    twin = copy.deepcopy(model)
    layer = twin.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.forward.layer is layer  # the copy's forward is bound to the copy, not to the original
    torch.testing.assert_close(_logits(twin), expected)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    torch.testing.assert_close(_logits(torch.load(buffer, weights_only=False)), expected)


def test_adapter_biases_round_trip(tmp_path):
    """bias="lora_only": PEFT saves the LoRA layers' biases with the adapter; loading puts them into the
    model, and a model whose LoRA biases train saves them the same way."""
    peft_model = _randomize_lora(peft.get_peft_model(_bert(), peft.LoraConfig(r=4, target_modules=["query", "value"],
                                                                               bias="lora_only")))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if name.endswith("query.base_layer.bias") or name.endswith("value.base_layer.bias"):
                p.add_(0.5)  # trained biases, different from the base model's
    peft_model.eval().save_pretrained(tmp_path / "peft")
    expected = _logits(peft_model)
    model = load_peft_adapter(_bert(), tmp_path / "peft")
    torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)
    lk.mark_only_lora_as_trainable(model, bias="lora_only")
    save_peft_adapter(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["bias"] == "lora_only"
    reloaded = peft.PeftModel.from_pretrained(_bert(), tmp_path / "ours")
    torch.testing.assert_close(_logits(reloaded.eval()), expected, rtol=1e-5, atol=1e-5)


def _bert_with_heads():
    """BERT sequence classification with two adapters, each with its own trained classifier head."""
    config = dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    model = peft.get_peft_model(_bert(), peft.LoraConfig(**config))
    model.add_adapter("b", peft.LoraConfig(**dict(config, r=2, lora_alpha=3)))
    _randomize_lora(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


HEAD_NAMES = ["b", "__base__", "default", "b", "default"]


def test_adapter_batch_routes_modules_to_save_heads_per_sample():
    """Each row's classifier head is its adapter's (the base model's for __base__), as PEFT's own mixed batch
    computes it; adapter_batch used to send every row through the active adapter's head."""
    model = _bert_with_heads()
    with torch.no_grad():
        expected = model(BATCH, adapter_names=HEAD_NAMES).logits
    patch_peft_model(model)
    with torch.no_grad(), adapter_batch(model, HEAD_NAMES):
        ours = model(BATCH).logits
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_adapter_batch_refuses_what_peft_refuses_and_nests():
    model = _three_adapters().eval()
    patch_peft_model(model)
    with pytest.raises(ValueError, match=r"no adapter of the model: \['typo'\]"):
        with adapter_batch(model, ["typo"] * 5):
            pass
    with pytest.raises(ValueError, match="one adapter name per sample"):
        with torch.no_grad(), adapter_batch(model, NAMES[:3]):
            model(BATCH)
    with torch.no_grad():
        inner_alone = model(BATCH, adapter_names=["c"] * 5).logits
        outer_alone = model(BATCH, adapter_names=NAMES).logits
        with adapter_batch(model, NAMES):
            with adapter_batch(model, ["c"] * 5):
                torch.testing.assert_close(model(BATCH).logits, inner_alone)
            torch.testing.assert_close(model(BATCH).logits, outer_alone)  # the outer names again
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged adapters"):
        with adapter_batch(model, NAMES):
            pass


def test_saved_patterns_and_targets_name_only_their_layers(tmp_path):
    """A nested model whose layer names are suffixes of each other ("0" and "1.0"): the written alpha pattern of
    "0" must not reach "1.0" (PEFT's rule would give it alpha 32 instead of 4: outputs off by 261), and the
    targets must not select "1.0" when only "0" is adapted (load_peft_adapter refused its own file)."""
    def nested():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8)), nn.Linear(8, 8))

    x = torch.randn(3, 8)
    for targets in (r"^(0|1\.0|2)$", r"^0$"):
        model = lk.inject_lora(nested(), targets, r=2, lora_alpha=4)
        if targets == r"^(0|1\.0|2)$":
            model[0].switch_adapter(torch.randn(2, 8), torch.randn(8, 2), lora_alpha=32)
        _randomize_lora(model)
        with torch.no_grad():
            expected = model(x)
        path = tmp_path / ("three" if "|" in targets else "one")
        save_peft_adapter(model, path)
        with torch.no_grad():
            torch.testing.assert_close(peft.PeftModel.from_pretrained(nested(), path)(x), expected)
            torch.testing.assert_close(load_peft_adapter(nested(), path)(x), expected)


def test_load_peft_adapter_into_a_merged_model_with_another_rslora(tmp_path):
    """The merged weight is switched to the loaded adapter with the loaded scaling (rsLoRA here, not before):
    it used to merge with one scaling and keep another (still off by 6.5 after unmerge)."""
    source = _randomize_lora(lk.inject_lora(_llama(), ["q_proj", "v_proj"], r=4, lora_alpha=8, use_rslora=True))
    save_peft_adapter(source, tmp_path)
    expected = _logits(source)
    model = _randomize_lora(lk.inject_lora(_llama(), ["q_proj", "v_proj"], r=4, lora_alpha=8), seed=3)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}
    for _, layer in lk.lora_layers(model):
        layer.merge()
    load_peft_adapter(model, tmp_path)
    torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)
    for _, layer in lk.lora_layers(model):
        layer.unmerge()
    for n, p in model.named_parameters():
        if n in base:
            torch.testing.assert_close(p, base[n], rtol=0, atol=1e-6, msg=n)


def test_lora_only_biases_survive_reloading_resaving_and_training(tmp_path):
    """Re-saving a loaded bias="lora_only" adapter keeps its biases (it wrote bias="none" and dropped them);
    is_trainable=True trains them as PEFT does (they were frozen); a modules_to_save head does not turn the
    file into bias="all" (PEFT would then train every bias of the model)."""
    peft_model = _randomize_lora(peft.get_peft_model(_bert(), peft.LoraConfig(
        r=4, target_modules=["query", "value"], bias="lora_only", modules_to_save=["classifier"])))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if name.endswith("base_layer.bias"):
                p.add_(0.5)
    peft_model.eval().save_pretrained(tmp_path / "peft")
    expected = _logits(peft_model)
    model = load_peft_adapter(_bert(), tmp_path / "peft")
    save_peft_adapter(model, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["bias"] == "lora_only"
    torch.testing.assert_close(_logits(peft.PeftModel.from_pretrained(_bert(), tmp_path / "again").eval()), expected,
                               rtol=1e-5, atol=1e-5)
    trainable = load_peft_adapter(_bert(), tmp_path / "peft", is_trainable=True)
    lora_biases = [n for n, _ in lk.lora_layers(trainable)]
    assert all(trainable.get_submodule(n).bias.requires_grad for n in lora_biases)
    assert not trainable.bert.embeddings.LayerNorm.bias.requires_grad
    save_peft_adapter(trainable, tmp_path / "trained")
    assert json.loads((tmp_path / "trained" / "adapter_config.json").read_text())["bias"] == "lora_only"


def test_multi_adapter_lora_state_dict_restores_its_adapters(tmp_path):
    """lora_state_dict of a MultiLoRALinear model keeps scalings, ranks and names; load_lora_state_dict puts them
    back and checks every key lands (a state for another model structure is refused before loading)."""
    def model():
        torch.manual_seed(0)
        return lk.inject_multi_lora(_llama(), ["q_proj", "v_proj"], capacity=3, r_max=4)

    trained = model()
    lk.add_adapter(trained, "a", r=4, lora_alpha=8)
    lk.add_adapter(trained, "b", r=2, lora_alpha=3)
    _randomize_lora(trained)
    torch.save(lk.lora_state_dict(trained, bias="lora_only"), tmp_path / "adapters.pt")
    restored = lk.load_lora_state_dict(model(), torch.load(tmp_path / "adapters.pt"))
    with torch.no_grad(), lk.adapter_batch(trained, ["b", "a"]), lk.adapter_batch(restored, ["b", "a"]):
        torch.testing.assert_close(restored(IDS).logits, trained(IDS).logits)
    with pytest.raises(ValueError, match="LoRA keys the state lacks"):
        lk.load_lora_state_dict(model(), {k: v for k, v in lk.lora_state_dict(trained).items() if "ranks" not in k})
    with pytest.raises(ValueError, match="keys the model does not have"):
        lk.load_lora_state_dict(lk.inject_multi_lora(_llama(), ["q_proj"], capacity=3, r_max=4),
                                lk.lora_state_dict(trained))


def test_peft_adapters_into_multi_adapter_models_that_do_not_match_their_targets(tmp_path):
    """An adapter for layers the multi-adapter model did not inject is refused (a LoRALinear there would serve
    rows of every adapter, and rows naming none, on it); one for a subset of an all-linear multi-adapter model
    loads, and the layers without it serve its rows on the base layer, as PEFT's layers do (adapter_batch raised
    KeyError right after the load)."""
    expected = _peft_adapter(tmp_path, _llama, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    narrow = lk.inject_multi_lora(_llama(), ["q_proj"], capacity=2, r_max=4).eval()
    with pytest.raises(ValueError, match="no MultiLoRALinear"):
        load_peft_adapter(narrow, tmp_path, adapter_name="x")
    assert not list(lk.lora_layers(narrow))
    wide = lk.inject_multi_lora(_llama(), "all-linear", capacity=2, r_max=4).eval()
    load_peft_adapter(wide, tmp_path, adapter_name="x")
    base = _logits(_llama())
    with torch.no_grad(), lk.adapter_batch(wide, ["x", None]):
        logits = wide(IDS).logits
        with lk.adapter_batch(wide, [None, None]):  # nested: the inner rows, then the outer ones again
            torch.testing.assert_close(wide(IDS).logits, base, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(wide(IDS).logits, logits)
    torch.testing.assert_close(logits[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[1], base[1], rtol=1e-5, atol=1e-5)
