"""LoRALinear, the model helpers, torch.compile, autocast and opcheck."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lora_kernels
from lora_kernels import LoRALinear, inject_lora, lora_linear, lora_state_dict, mark_only_lora_as_trainable, reference
from lora_kernels.ops.lora_linear import lora_linear_op
from lora_kernels.ops.merge import merge_op

from conftest import DEVICE, compiled_backends, make_lora_inputs

BACKENDS = ["reference"] + compiled_backends()


def test_new_layer_equals_its_base_and_has_loralib_keys():
    layer = LoRALinear(33, 70, r=4, lora_alpha=8, device=DEVICE)
    x = torch.randn(5, 33, device=DEVICE)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    assert layer.lora_A.shape == (4, 33) and layer.lora_B.shape == (70, 4)
    assert not layer.weight.requires_grad and layer.lora_A.requires_grad
    assert layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    bound = 1 / math.sqrt(33)  # kaiming_uniform(a=sqrt(5)) on [r, in]
    assert layer.lora_A.abs().max() <= bound
    assert "r=4" in repr(layer) and "scaling=2" in repr(layer)


def test_rslora_scaling():
    assert LoRALinear(8, 8, r=16, lora_alpha=8, use_rslora=True).scaling == pytest.approx(2.0)


def test_from_linear_shares_weights_and_matches_peft_formula():
    base = nn.Linear(33, 70).to(DEVICE)
    layer = LoRALinear.from_linear(base, r=3, lora_alpha=6, lora_dropout=0.0)
    assert layer.weight is base.weight and layer.bias is base.bias
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 5, 33, device=DEVICE)
    expected = base(x) + layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_fan_in_fan_out_weight_layout():
    conv1d_weight = torch.randn(33, 70, device=DEVICE)  # GPT-2 Conv1D: [in, out]
    holder = nn.Module()
    holder.weight = nn.Parameter(conv1d_weight.clone())
    holder.bias = nn.Parameter(torch.zeros(70, device=DEVICE))
    layer = LoRALinear.from_linear(holder, r=2, fan_in_fan_out=True)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 33, device=DEVICE)
    expected = x @ conv1d_weight + layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.v_proj = nn.Linear(16, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

    def forward(self, x):
        return self.mlp(self.q_proj(x) + self.v_proj(x))


def test_inject_mark_and_state_dict():
    model = _Block()
    inject_lora(model, ["q_proj", "v_proj"], r=2, lora_alpha=4)
    assert isinstance(model.q_proj, LoRALinear) and isinstance(model.v_proj, LoRALinear)
    assert isinstance(model.mlp[0], nn.Linear) and not isinstance(model.mlp[0], LoRALinear)
    mark_only_lora_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"q_proj.lora_A", "q_proj.lora_B", "v_proj.lora_A", "v_proj.lora_B"}
    mark_only_lora_as_trainable(model, bias="lora_only")
    assert model.q_proj.bias.requires_grad and not model.mlp[0].bias.requires_grad
    assert set(lora_state_dict(model)) == trainable
    assert set(lora_state_dict(model, bias="all")) >= {"mlp.0.bias", "q_proj.bias"}
    assert set(lora_state_dict(model, bias="lora_only")) == trainable | {"q_proj.bias", "v_proj.bias"}

    regex_model = inject_lora(_Block(), r"mlp\.\d+", r=2)
    assert isinstance(regex_model.mlp[0], LoRALinear) and isinstance(regex_model.mlp[2], LoRALinear)
    with pytest.raises(ValueError, match="target_modules"):
        inject_lora(_Block(), ["nope"])
    with pytest.raises(ValueError, match="bias"):
        mark_only_lora_as_trainable(model, bias="some")


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_reduces_loss(backend, use_backend):
    use_backend(backend)
    torch.manual_seed(0)
    model = inject_lora(_Block().to(DEVICE), ["q_proj", "v_proj"], r=4, lora_alpha=8, lora_dropout=0.1)
    mark_only_lora_as_trainable(model)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B, std=0.01)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, target = torch.randn(64, 16, device=DEVICE), torch.randn(64, 16, device=DEVICE)
    losses = []
    for _ in range(20):
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend, use_backend):
    use_backend(backend)
    torch.manual_seed(0)
    model = inject_lora(_Block().to(DEVICE), ["q_proj", "v_proj"], r=4, lora_alpha=8)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B)
    x = torch.randn(8, 16, device=DEVICE, requires_grad=True)
    eager = model(x)
    (g_eager,) = torch.autograd.grad(eager.sum(), x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    (g_compiled,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g_compiled, g_eager)
    # another adapter strength (a new alpha): the eager numbers, without recompiling
    compiles = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    model.q_proj.scaling = 3.5
    torch.testing.assert_close(compiled(x), model(x))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiles, "a new scaling recompiled"


def test_scaling_tensor_lives_with_the_weight_and_changes_in_place():
    """The 0-d scaling the op gets under torch.compile and CUDA-graph capture: updated in place (a compiled
    graph or a captured one keeps reading the same tensor), float64 whatever the layer's dtype, on the
    weight's device after .to() (on the CPU for every non-CUDA weight), and never on the meta device: a
    layer built under torch.device("meta") and materialised with to_empty still compiles."""
    layer = LoRALinear(8, 6, r=2, lora_alpha=4)
    tensor = layer._scaling_tensor
    layer.scaling = 0.25
    assert layer._scaling_tensor is tensor and tensor.item() == 0.25 and tensor.dtype == torch.float64
    layer.half()
    assert layer._scaling_tensor.dtype == torch.float64 and layer._scaling_tensor.item() == 0.25
    with torch.device("meta"):
        meta_layer = LoRALinear(8, 6, r=2, lora_alpha=4)
    assert meta_layer._scaling_tensor.device.type == "cpu" and meta_layer._scaling_tensor.item() == 2.0
    meta_layer.to_empty(device=DEVICE)
    with torch.no_grad():
        for p in meta_layer.parameters():
            p.normal_()
    assert meta_layer._scaling_tensor.device.type == ("cuda" if DEVICE == "cuda" else "cpu")
    x = torch.randn(3, 8, device=DEVICE)
    compiled = torch.compile(meta_layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), meta_layer(x))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "2", "grad", "parameter"])
def test_a_bad_scaling_is_refused_when_assigned(bad):
    """On a GPU the kernels read the layer's scaling tensor and nothing checks it per call (that would wait for
    the GPU): a non-finite or non-numeric scaling is refused when assigned, and the layer keeps its own."""
    layer = LoRALinear(8, 6, r=2, lora_alpha=4)
    # a tensor that requires grad (or a Parameter) would become a constant that no gradient reaches
    bad = {"grad": torch.tensor(3.0, requires_grad=True), "parameter": nn.Parameter(torch.tensor(3.0))}.get(bad, bad)
    with pytest.raises((ValueError, TypeError), match="scaling must"):
        layer.scaling = bad
    assert layer.scaling == 2.0 and layer._scaling_tensor.item() == 2.0
    assert not isinstance(getattr(layer, "_parameters").get("scaling"), nn.Parameter)


def test_a_scalings_list_refuses_a_tensor_that_requires_grad():
    x, w = torch.randn(4, 8, device=DEVICE), torch.randn(6, 8, device=DEVICE)
    A, B = torch.randn(2, 2, 8, device=DEVICE), torch.randn(2, 6, 2, device=DEVICE)
    with pytest.raises(ValueError, match="scalings must not require grad"):
        lora_kernels.lora_linear_multi(x, w, None, A, B, [1.0, torch.tensor(2.0, requires_grad=True)],
                                       torch.tensor([0, 1, 1, -1], device=DEVICE))


def test_torch_compile_functional_with_float_scaling():
    """lora_linear inside a compiled function, its scaling a float argument: no graph break, and after
    Dynamo's usual first specialisation a new value reuses the graph."""
    torch.manual_seed(0)
    x, weight, bias = torch.randn(5, 33), torch.randn(70, 33), torch.randn(70)
    lora_A, lora_B = torch.randn(4, 33), torch.randn(70, 4)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def layer(x, scaling):
        return lora_linear(x, weight, bias, lora_A, lora_B, scaling)

    torch._dynamo.utils.counters.clear()
    for i, scaling in enumerate((2.0, 3.0, 0.5, 7.25)):
        torch.testing.assert_close(layer(x, scaling), reference.lora_linear(x, weight, bias, lora_A, lora_B, scaling)[0])
        if i == 1:
            compiles = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiles, "a new float scaling recompiled"


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_behaves_like_nn_linear(backend, use_backend):
    use_backend(backend)
    device_type = "cuda" if DEVICE == "cuda" else "cpu"
    layer = LoRALinear(33, 70, r=4, device=DEVICE)
    nn.init.normal_(layer.lora_B)
    base = nn.Linear(33, 70, device=DEVICE)
    x = torch.randn(5, 33, device=DEVICE)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        y = layer(x)
        y_base = base(x)
    assert y.dtype == y_base.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32
    expected = layer.float()(x)
    torch.testing.assert_close(y.float(), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, use_backend):
    use_backend(backend)
    t = make_lora_inputs((6,), 33, 70, 3, torch.float32)
    seed, scaling = torch.tensor(7), torch.tensor(2.0, dtype=torch.float64)
    fwd_args = (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], scaling, 0.25, seed)
    torch.library.opcheck(lora_linear_op.custom_op, fwd_args)
    torch.library.opcheck(lora_linear_op.custom_op, (t["x"].requires_grad_(), *fwd_args[1:3],
                                                     t["lora_A"].requires_grad_(), t["lora_B"].requires_grad_(),
                                                     scaling, 0.0, None))
    _, xa = lora_linear_op.custom_op(*fwd_args)
    grad_y = torch.randn(6, 70, device=DEVICE)
    torch.library.opcheck(lora_linear_op.backward_op, (grad_y, t["x"].detach(), t["weight"], t["lora_A"].detach(),
                                                       t["lora_B"].detach(), xa, scaling, 0.25, seed, True))
    weight = t["weight"].clone()
    torch.library.opcheck(merge_op.custom_op, (weight, t["lora_A"].detach(), t["lora_B"].detach(), 2.0, None, None,
                                               0.0, False))


@pytest.mark.skipif("cpu" not in compiled_backends(), reason="lora_kernels._C not built")
def test_opcheck_compiled_kernels():
    """The C++ ops themselves (registered per dispatch key, with fakes) pass opcheck too."""
    t = make_lora_inputs((6,), 33, 70, 3, torch.float32)
    args = (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 2.0, 0.25, 7)
    torch.library.opcheck(torch.ops.lora_kernels.fused_forward.default, args)
    gain = torch.rand(70, device=DEVICE) + 0.5  # DoRA's epilogue (no dropout there, but the op allows it)
    torch.library.opcheck(torch.ops.lora_kernels.fused_forward.default, args[:6] + (0.0, 0, gain))
    _, xa = torch.ops.lora_kernels.fused_forward(*args)
    grad_y = torch.randn(6, 70, device=DEVICE)
    torch.library.opcheck(torch.ops.lora_kernels.fused_backward.default,
                          (grad_y, t["x"], t["weight"], t["lora_A"], t["lora_B"], xa, 2.0, 0.25, 7, True))
    merge_args = (t["weight"].clone(), t["lora_A"], t["lora_B"], 2.0, None, None, 0.0)
    torch.library.opcheck(torch.ops.lora_kernels.merge_kernel_.default, merge_args)
    torch.library.opcheck(torch.ops.lora_kernels.merge_nonfinite_count.default, merge_args)


def test_available_backends_and_forced_unavailable_backend(monkeypatch):
    assert "reference" in lora_kernels.available_backends()
    t = make_lora_inputs((2,), 8, 8, 2, torch.float32)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="LORA_KERNELS_BACKEND"):
        lora_kernels.lora_linear(t["x"], t["weight"], None, t["lora_A"], t["lora_B"], 1.0)
    if not torch.cuda.is_available():
        monkeypatch.setenv("LORA_KERNELS_BACKEND", "cuda")
        with pytest.raises(RuntimeError, match="LORA_KERNELS_BACKEND=cuda cannot be used"):
            lora_kernels.lora_linear(t["x"], t["weight"], None, t["lora_A"], t["lora_B"], 1.0)


@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=["2-D", "3-D"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_output_is_not_a_view_and_in_place_ops_on_it_are_tracked(backend, lead, use_backend):
    """Like nn.Linear, the layer's output owns its memory: an in-place op on it (h.mul_) is recorded
    on the output itself, so autograd hooks placed on it (FSDP2's pre-backward hook) still fire."""
    use_backend(backend)
    layer = LoRALinear(33, 70, r=4, device=DEVICE)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(*lead, 33, device=DEVICE)
    y = layer(x)
    assert y._base is None and not y._is_view()
    with torch.no_grad():
        assert layer(x)._base is None
    fired = []
    y.register_hook(lambda g: fired.append(g.shape))
    y.mul_(3.0).sum().backward()
    assert fired == [y.shape]
    grad_B = layer.lora_B.grad.clone()
    layer.zero_grad()
    (3.0 * reference.lora_linear(x.reshape(-1, 33), layer.weight, layer.bias, layer.lora_A, layer.lora_B,
                                 layer.scaling)[0]).sum().backward()
    torch.testing.assert_close(grad_B, layer.lora_B.grad)


def _merged_layer():
    torch.manual_seed(0)
    layer = LoRALinear(16, 12, r=4, lora_alpha=8).eval()
    nn.init.normal_(layer.lora_B, std=0.5)
    w0 = layer.weight.detach().clone()
    layer.merge()
    return layer, w0


def test_assigning_the_scaling_of_a_merged_layer_re_merges_it():
    """The weight holds s·BA: a new scaling takes the old term out and puts the new one in (it used to keep the
    old one, and unmerge then left |W - W0| = 1.65)."""
    layer, w0 = _merged_layer()
    x = torch.randn(5, 16)
    layer.scaling = -3.0
    expected = lora_linear(x, w0, layer.bias, layer.lora_A, layer.lora_B, -3.0)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)


def test_a_failed_load_into_a_merged_layer_changes_nothing():
    """A wrong-shape tensor in the state dict: refused before the layer changes (the merge used to be applied a
    second time: W0 + 2·s·BA)."""
    layer, w0 = _merged_layer()
    merged_weight = layer.weight.detach().clone()
    state = layer.state_dict()
    state["weight"] = torch.zeros(12, 15)
    with pytest.raises(RuntimeError, match="has shape"):
        layer.load_state_dict(state)
    assert layer.merged and torch.equal(layer.weight, merged_weight)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)
