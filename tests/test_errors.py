"""Bad input raises a clear error naming the argument, and modifies nothing."""

from __future__ import annotations

import pytest
import torch

from lora_kernels import LoRALinear, lora_linear, merge_, switch_, unmerge_

from conftest import make_lora_inputs


def _inputs():
    return make_lora_inputs((5,), 12, 10, 3, torch.float32, device="cpu")


def _snapshot(tensors):
    return {k: v.clone() for k, v in tensors.items() if isinstance(v, torch.Tensor)}


BAD_LORA_LINEAR = [
    # (argument changed, new value, exception, words in the message)
    ("x", torch.randn(5, 11), ValueError, "x must be [..., in_features=12]"),
    ("x", torch.ones(5, 12, dtype=torch.int64), TypeError, "x must be float16"),
    ("x", [[1.0] * 12], TypeError, "x must be a torch.Tensor"),
    ("x", torch.randn(5, 12, dtype=torch.float64), TypeError, "weight must have x's dtype"),
    ("x", torch.randn(5, 12, device="meta"), ValueError, "weight must be on x's device"),
    ("weight", torch.randn(10, 12, 1), ValueError, "weight must be 2-D"),
    ("weight", torch.randn(10, 12).half(), TypeError, "weight must have x's dtype"),
    ("bias", torch.randn(9), ValueError, "bias must be [out_features=10]"),
    ("bias", torch.randn(10).double(), TypeError, "bias must have x's dtype"),
    ("lora_A", torch.randn(3, 11), ValueError, "lora_A must be [r >= 1, in_features=12]"),
    ("lora_A", torch.randn(0, 12), ValueError, "lora_A must be [r >= 1"),
    ("lora_A", torch.randn(3, 12).bfloat16(), TypeError, "lora_A must have x's dtype"),
    ("lora_B", torch.randn(10, 4), ValueError, "lora_B must be [out_features=10, r=3]"),
    ("lora_B", torch.ones(10, 3, dtype=torch.int32), TypeError, "lora_B must be float16"),
    ("scaling", float("nan"), ValueError, "scaling must be finite"),
    ("scaling", 10**400, ValueError, "scaling must be finite"),
    ("scaling", torch.tensor(2.0, dtype=torch.float64, requires_grad=True), ValueError,
     "scaling must not require grad"),
    ("weight", torch.randn(10, 11), ValueError, "weight must be [out_features, in_features=12]"),
    ("x", torch.tensor(1.0), ValueError, "x must be [..., in_features]"),
    ("scaling", "2", TypeError, "scaling must be a real number"),
    # a tensor scaling off the CPU is read by the kernels on x's device: elsewhere it cannot be
    ("scaling", torch.tensor(2.0, device="meta"), ValueError, "a 0-d floating tensor on the CPU or on x's device"),
    ("scaling", torch.tensor([2.0]), TypeError, "scaling must be a real number"),
    ("dropout_p", 1.0, ValueError, "dropout_p must be a number in [0, 1)"),
    ("dropout_p", -0.1, ValueError, "dropout_p must be a number in [0, 1)"),
]


@pytest.mark.parametrize("arg,value,exc,words", BAD_LORA_LINEAR, ids=[f"{a}-{w}" for a, _, _, w in BAD_LORA_LINEAR])
def test_lora_linear_rejects_bad_input(arg, value, exc, words):
    kwargs = dict(_inputs(), scaling=2.0, dropout_p=0.1, training=True)
    kwargs[arg] = value
    before = _snapshot(kwargs)
    with pytest.raises(exc) as info:
        lora_linear(**kwargs)
    assert words in str(info.value)
    for k, v in before.items():
        if v.device.type != "meta":
            assert torch.equal(kwargs[k], v), f"{k} was modified"


BAD_MERGE = [
    ("lora_A", torch.randn(3, 11), ValueError, "lora_A must be [r >= 1, in_features=12]"),
    ("lora_B", torch.randn(9, 3), ValueError, "lora_B must be [out_features=10, r=3]"),
    ("lora_B", torch.randn(10, 3).half(), TypeError, "lora_B must have weight's dtype"),
    ("weight", torch.randn(10, 12, dtype=torch.float64), TypeError, "lora_A must have weight's dtype"),
    ("weight", torch.ones(10, 12, dtype=torch.int8), TypeError, "weight must be float16"),
    ("scaling", float("inf"), ValueError, "scaling must be finite"),
    ("scaling", -(10**400), ValueError, "scaling must be finite"),
    ("weight", torch.randn(1, 12).expand(10, 12), ValueError, "weight must not have elements that share memory"),
]


@pytest.mark.parametrize("arg,value,exc,words", BAD_MERGE, ids=[f"{a}-{w}" for a, _, _, w in BAD_MERGE])
@pytest.mark.parametrize("op", ["merge_", "unmerge_", "switch_"])
def test_merge_family_rejects_bad_input(op, arg, value, exc, words):
    t = _inputs()
    kwargs = dict(weight=t["weight"], lora_A=t["lora_A"], lora_B=t["lora_B"], scaling=2.0)
    kwargs[arg] = value
    if op == "switch_":
        kwargs.update(new_A=t["lora_A"] * 2, new_B=t["lora_B"] * 2, new_scaling=1.0)
    before = _snapshot(kwargs)
    fn = {"merge_": merge_, "unmerge_": unmerge_, "switch_": switch_}[op]
    with pytest.raises(exc) as info:
        fn(**kwargs)
    assert words in str(info.value)
    for k, v in before.items():
        assert torch.equal(kwargs[k], v), f"{k} was modified"


def test_merge_accepts_strided_weights_that_share_no_memory():
    """Column slices and transposes (a fused QKV weight's parts, fan_in_fan_out) are merged in place."""
    t = _inputs()
    fused = torch.randn(10, 30)
    for view in (fused[:, 5:17], fused.t().contiguous().t()[:, :12]):
        expected = view + 2.0 * t["lora_B"] @ t["lora_A"]
        merge_(view, t["lora_A"], t["lora_B"], 2.0)
        torch.testing.assert_close(view, expected)


def test_switch_rejects_bad_new_adapter():
    t = _inputs()
    weight = t["weight"].clone()
    with pytest.raises(ValueError, match=r"new_B must be \[out_features=10, r=5\]"):
        switch_(weight, t["lora_A"], t["lora_B"], 2.0, torch.randn(5, 12), torch.randn(10, 4), 1.0)
    assert torch.equal(weight, t["weight"])


def test_unmerge_rejects_a_record_of_another_weight():
    t = _inputs()
    other = torch.randn(10, 12)
    record = merge_(other, t["lora_A"], t["lora_B"], 2.0, exact=True)
    wrong = torch.randn(11, 12)
    with pytest.raises(ValueError, match="lora_B must be"):
        unmerge_(wrong, t["lora_A"], t["lora_B"], 2.0, record=record)
    with pytest.raises(TypeError, match="record must be a MergeRecord"):
        unmerge_(other, t["lora_A"], t["lora_B"], 2.0, record="nope")


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(r=0), "r must be an int >= 1"),
        (dict(r=2.5), "r must be an int >= 1"),
        (dict(lora_dropout=1.0), "lora_dropout must be a number in [0, 1)"),
        (dict(lora_alpha=float("nan")), "lora_alpha must be a finite number"),
        (dict(in_features=0), "in_features must be a positive int"),
    ],
)
def test_module_rejects_bad_config(kwargs, words):
    config = dict(in_features=8, out_features=4) | kwargs
    with pytest.raises(ValueError) as info:
        LoRALinear(**config)
    assert words in str(info.value)


@pytest.mark.parametrize("op", ["merge_", "unmerge_", "switch_"])
def test_merge_family_refuses_inference_tensors_outside_inference_mode(op):
    """As torch's own in-place ops: an inference tensor is updated only inside inference_mode."""
    t = _inputs()
    with torch.inference_mode():
        weight = t["weight"].clone()
    before = weight.clone()
    args = (weight, t["lora_A"], t["lora_B"], 2.0) + ((t["lora_A"], t["lora_B"], 1.0) if op == "switch_" else ())
    fn = {"merge_": merge_, "unmerge_": unmerge_, "switch_": switch_}[op]
    with pytest.raises(RuntimeError, match="weight is an inference tensor"):
        fn(*args)
    assert torch.equal(weight, before)
    with torch.inference_mode():
        fn(*args)
    assert not torch.equal(weight, before)
