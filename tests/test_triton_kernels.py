"""The Triton launchers' choices that the interpreter's single small config does not exercise by itself:
row tiles and weight-gradient slices as a GPU picks them, the seed read in device memory, the dropout tables
kept for CUDA-graph capture. Each forced here on CPU tensors (TRITON_INTERPRET=1) and checked against the
float64 reference, outputs and every gradient."""

from __future__ import annotations

import pytest
import torch

from lora_kernels import reference, testing

from conftest import DEVICE, compiled_backends

pytestmark = pytest.mark.skipif("triton" not in compiled_backends(), reason="triton backend not available")


def _inputs(M, d_in, d_out, r, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)  # noqa: E731
    return rand(M, d_in), rand(d_out, d_in), rand(d_out), rand(r, d_in), rand(d_out, r), rand(M, d_out)


def _check_lora_linear(lin, x, w, b, A, B, grad_y, p, seed_tensor, seed_value):
    y, xa = lin.forward(x, w, b, A, B, 1.5, p, seed_tensor)
    grads = lin.backward(grad_y, x, w, A, B, xa, 1.5, p, seed_tensor, True)
    exact, plain = testing.lora_linear_oracles(grad_y, x, w, b, A, B, 1.5, p, seed_value)
    testing.assert_all_match_reference(testing.LORA_OUTPUTS, (y, xa, *grads), exact, plain)
    return y


@pytest.mark.parametrize("rows", [32, 64])
def test_shrink_row_tiles_a_gpu_picks(rows, monkeypatch, use_backend):
    """The shrink's 32- and 64-row tiles (shrink_rows: large batches), with dropout, on a batch that is no
    multiple of them."""
    from lora_kernels.ops import triton_lora_linear as lin

    use_backend("triton")
    monkeypatch.setattr(lin, "shrink_rows", lambda M, wanted: rows)
    _check_lora_linear(lin, *_inputs(101, 40, 24, 5), 0.25, torch.tensor(77), 77)


@pytest.mark.parametrize("splits", [2, 3])
def test_weight_gradient_slices_are_summed_once_each(splits, monkeypatch, use_backend):
    """dA and dB summed over M in several float32 slices (a GPU's choice), then added, scaled (s/(1-p) for dA),
    rounded and, for dB, transposed by the finish kernel. A slice counted twice or dropped fails."""
    from lora_kernels.ops import triton_lora_linear as lin

    use_backend("triton")
    block_m = lin.weight_grad_tiles()[0]
    monkeypatch.setattr(lin, "weight_grad_splits", lambda M, N, wanted, full: (splits, -(-M // (splits * block_m))
                                                                              * block_m))
    _check_lora_linear(lin, *_inputs(70, 40, 36, 6, seed=splits), 0.25, torch.tensor(5), 5)
    _check_lora_linear(lin, *_inputs(70, 40, 36, 6, torch.bfloat16, seed=splits), 0.0, None, None)


@pytest.mark.parametrize("splits", [2, 3, 5])
def test_decode_of_a_narrow_layer_is_split_over_k_and_summed_once(splits, monkeypatch, use_backend):
    """Decode (M <= 16) of a layer whose 16-column blocks are too few for the GPU: K split in slices (the last
    ones short or empty: 5 slices of 288 columns in 32-column tiles), float32 sums of x W0 and of the shrink added
    by the finish kernel, which applies the LoRA term, the dropout scale, the bias and writes xa. A slice counted
    twice, dropped or cut wrongly fails; so does an xa the backward cannot use."""
    from lora_kernels.ops import triton_lora_linear as lin

    use_backend("triton")
    monkeypatch.setattr(lin.gpu_paths, "decode_splits", lambda M, N, K, r, w4, sms: splits)
    for M, dtype, p in ((1, torch.float32, 0.0), (16, torch.float32, 0.25), (7, torch.bfloat16, 0.25)):
        seed = 9 + M if p else None
        _check_lora_linear(lin, *_inputs(M, 288, 40, 6, dtype, seed=M), p,
                           torch.tensor(seed) if seed is not None else None, seed)


def test_decode_splits_only_narrow_layers_and_only_where_the_model_predicts_a_gain():
    """decode_split_count proposes 4 slices for 4096 -> 1024 on 132 SMs (64 column blocks), none for 4096² (256)
    nor below the minimum slice; gpu_paths.decode_splits keeps a proposal only where the cost model predicts the
    two launches faster than one: not for a bf16 4096 -> 1024 layer (the finish launch's gap is larger than the
    gain), but for a 4-bit 14336 -> 1024 one, which one launch leaves bound by its dequantization on 64 SMs."""
    from lora_kernels import cost_model, gpu_paths
    from lora_kernels.ops import triton_common
    from lora_kernels.ops import triton_lora_linear as lin

    with triton_common.as_launched_on_gpu():  # the proposals a GPU gets (the interpreter's minimum slice is shorter)
        assert lin.decode_split_count(1, 1024, 4096, 132) == 4
        assert lin.decode_split_count(16, 4096, 4096, 132) == 1
        assert lin.decode_split_count(1, 1024, 1000, 132) == 1
        for K, w4 in ((4096, False), (4096, True), (14336, True)):
            proposed = 5 if K == 14336 else 4
            split, whole = (cost_model.decode_us(1, 1024, K, 16, w4, n) for n in (proposed, 1))
            assert gpu_paths.decode_splits(1, 1024, K, 16, w4, 132) == (proposed if split < whole else 1)
        assert gpu_paths.decode_splits(1, 1024, 4096, 16, False, 132) == 1
        assert gpu_paths.decode_splits(1, 1024, 14336, 16, True, 132) == 5


def test_the_seed_is_read_in_device_memory(use_backend):
    """A CUDA graph replays its launches with the same arguments: the seed tensor, refilled in place by the
    captured draw, must be read at run time. Here the same tensor is refilled between two launches: each gives
    the reference's mask for the value it held, and the two masks differ."""
    from lora_kernels.ops import triton_lora_linear as lin

    use_backend("triton")
    x, w, b, A, B, grad_y = _inputs(37, 48, 20, 4)
    seed = torch.tensor(1, dtype=torch.int64, device=DEVICE)
    first = _check_lora_linear(lin, x, w, b, A, B, grad_y, 0.5, seed, 1)
    seed.fill_(2**62 - 3)
    second = _check_lora_linear(lin, x, w, b, A, B, grad_y, 0.5, seed, 2**62 - 3)
    assert not torch.equal(first, second)


def test_multi_adapter_dropout_tables_are_copied_to_the_device_once():
    """The per-adapter thresholds reach the GPU once per set of probabilities: a CUDA-graph capture, which
    refuses copies from host memory, then reuses the tables of its eager warm-up."""
    from lora_kernels.ops import triton_lora_linear_multi as multi

    ps = torch.tensor([0.0, 0.1, 0.25], dtype=torch.float64)
    first = multi._dropout_tensors(ps, DEVICE)
    again = multi._dropout_tensors(ps.clone(), DEVICE)
    assert first is again
    assert multi._dropout_tensors(torch.tensor([0.0, 0.1, 0.5], dtype=torch.float64), DEVICE) is not first
    assert multi._dropout_tensors(torch.zeros(3, dtype=torch.float64), DEVICE) is None


def test_auto_chooses_the_gpu_path_per_shape_from_the_model_until_a_table_is_measured(tmp_path, monkeypatch):
    """Without a measured table the roofline model decides: the fused decode kernel (one launch, W0 read
    once) at M <= 16, cuBLAS's composition for large batches (Triton's GEMM assumed at 65 % of the peak, cuBLAS
    at 75 %). A committed table for this card overrides the model at the nearest measured batch size; one
    measured on another card is ignored. Dropout, float32 adapters, float32 tensors and CPU tensors are not
    chosen per shape."""
    import json

    from lora_kernels import gpu_paths

    bf16 = torch.bfloat16
    monkeypatch.setattr(gpu_paths, "_device_name", lambda: "NVIDIA H200")
    monkeypatch.setattr(gpu_paths, "TABLE", tmp_path / "gpu_paths.json")
    for cache in (gpu_paths.choose, gpu_paths._table):
        cache.cache_clear()
    assert gpu_paths.path_for("forward", "cuda", bf16, bf16, False, 1, 4096, 4096, 16) == "triton"
    assert gpu_paths.path_for("forward", "cuda", bf16, bf16, False, 2048, 4096, 4096, 16) == "cuda"
    assert gpu_paths.path_for("backward", "cuda", bf16, bf16, False, 2048, 4096, 4096, 16) == "cuda"
    for args in (("cuda", bf16, bf16, True), ("cuda", bf16, torch.float32, False), ("cuda", torch.float32,
                                                                                   torch.float32, False),
                 ("cpu", bf16, bf16, False)):
        assert gpu_paths.path_for("forward", *args, 2048, 4096, 4096, 16) is None
    entry = dict(step="forward", out=4096, r=16, dtype="bfloat16", winner="triton", triton_ms=0.1, cuda_ms=0.2)
    entry["in"] = 4096
    for device, expected in (("NVIDIA H200", "triton"), ("NVIDIA A100", "cuda")):
        (tmp_path / "gpu_paths.json").write_text(json.dumps(dict(device=device, entries=[dict(entry, M=8192)])))
        for cache in (gpu_paths.choose, gpu_paths._table):
            cache.cache_clear()
        assert gpu_paths.path_for("forward", "cuda", bf16, bf16, False, 2000, 4096, 4096, 16) == expected
        unmeasured = gpu_paths.path_for("forward", "cuda", bf16, bf16, False, 2000, 4096, 1024, 16)
        assert unmeasured == gpu_paths.modelled("forward", 2048, 4096, 1024, 16)
    for cache in (gpu_paths.choose, gpu_paths._table):
        cache.cache_clear()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_a_dropped_infinity_gives_nan_as_in_the_reference(dtype, use_backend):
    """x holds +Inf where dropout drops it: Inf · 0 is NaN (IEEE, the reference), in xa, y, dA. The interpreter
    took bfloat16 products on raw bits and gave 0; the kernels now route that product through float32 there
    (on a GPU it is the hardware's IEEE product either way)."""
    from lora_kernels.ops import triton_lora_linear as lin

    use_backend("triton")
    seed, p = 1234, 0.5
    x, w, b, A, B, grad_y = _inputs(20, 32, 24, 4, dtype)
    i, j = [int(v) for v in (~reference.dropout_mask(seed, 20, 32, p)).nonzero()[0]]
    x[i, j] = float("inf")
    y, xa = lin.forward(x, w, b, A, B, 2.0, p, torch.tensor(seed))
    _, dA, _ = lin.backward(grad_y, x, w, A, B, xa, 2.0, p, torch.tensor(seed), True)
    ry, rxa = reference.lora_linear(x, w, b, A, B, 2.0, p, seed)
    _, rdA, _ = reference.lora_linear_backward(grad_y, x, w, A, B, rxa, 2.0, p, seed)
    for name, ours, ref in (("xa", xa, rxa), ("y", y, ry), ("dA", dA, rdA)):
        assert torch.equal(ours.isnan(), ref.isnan()), name


def test_an_interpreter_that_fails_the_probe_makes_the_backend_unavailable(monkeypatch):
    """A Triton whose interpreter cannot run kernels made like these (3.9 refused a mask they used) is reported
    as unavailable with the probe's error, instead of being listed and failing in every call."""
    from lora_kernels import backends
    from lora_kernels.ops import triton_common

    monkeypatch.setattr(triton_common, "interpreter_probe", lambda: "ValueError: mask has unsupported dtype")
    backends._interpreter_probe_problem.cache_clear()
    try:
        assert "triton" not in backends.available_backends()
        assert "mask has unsupported dtype" in backends._backend_problem("triton")
    finally:
        backends._interpreter_probe_problem.cache_clear()  # the next call probes the real interpreter again
        backends._selected.clear()
