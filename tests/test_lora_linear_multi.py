"""lora_linear_multi: many adapters in one batch, every backend against reference.py and an independent
per-row float64 oracle; outputs and gradients, odd batches (unsorted ids, -1 rows, adapters with no rows,
mixed ranks, 3-D x), all dtypes, dropout, opcheck, torch.compile without recompiles."""

from __future__ import annotations

import pytest
import torch

import lora_kernels as lk
from lora_kernels import lora_linear, lora_linear_multi, reference
from lora_kernels.functional import draw_seed
from lora_kernels.ops.lora_linear_multi import lora_linear_multi_op

from conftest import DEVICE, DTYPES, assert_matches_reference, compiled_backends

BACKENDS = ["reference"] + [b for b in compiled_backends() if b in lk.available_backends("lora_linear_multi")]
# Triton has no float64
FLOAT64_BACKENDS = [b for b in BACKENDS if b != "triton"]


def _inputs(M, in_f, out_f, n, r_max, dtype, seed=0, adapter_dtype=None, lead=None):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE, dt)

    adapter_dtype = adapter_dtype or dtype
    return dict(
        x=rand(*(lead or (M,)), in_f),
        weight=rand(out_f, in_f, scale=in_f**-0.5),
        bias=rand(out_f),
        lora_A=rand(n, r_max, in_f, scale=in_f**-0.5, dt=adapter_dtype),
        lora_B=rand(n, out_f, r_max, scale=r_max**-0.5, dt=adapter_dtype),
        scalings=torch.linspace(0.5, 2.0, n, dtype=torch.float64),
    )


# (name, M, n, adapter_ids maker, ranks)
def _ids(kind, M, n):
    g = torch.Generator().manual_seed(7)
    if kind == "every-row-its-own":
        return torch.arange(M) % n
    if kind == "all-same":
        return torch.full((M,), n - 1)
    if kind == "unsorted-with-base-rows":
        return torch.randint(-1, n, (M,), generator=g)
    if kind == "grouped-blocks":  # each adapter's rows one range, adapters in no particular order, -1 between
        sizes = torch.randint(1, 2 * M // n + 1, (n,), generator=g)
        blocks = [torch.full((int(k),), a) for a, k in zip(torch.randperm(n, generator=g).tolist(), sizes)]
        blocks.insert(1, torch.full((3,), -1))
        ids = torch.cat(blocks)
        return torch.cat([ids, torch.full((max(0, M - len(ids)),), -1)])[:M]
    if kind == "some-adapters-unused":
        return torch.randint(0, 2, (M,), generator=g) * (n - 1)  # only 0 and n-1
    raise ValueError(kind)


CASES = [
    ("every-row-its-own", 13, 13, 70, 33, 4, None),
    ("all-same", 37, 3, 33, 70, 16, None),
    ("all-same", 20, 3, 33, 40, 8, [3, 8, 5]),  # one adapter below r_max: the single-adapter path with a rank
    ("unsorted-with-base-rows", 50, 5, 33, 70, 8, [1, 8, 3, 8, 5]),
    ("some-adapters-unused", 40, 6, 70, 33, 6, None),
    ("grouped-blocks", 45, 5, 33, 70, 8, [2, 8, 5, 1, 8]),
    ("unsorted-with-base-rows", 0, 3, 33, 70, 4, None),
]


def _run(fn, inputs, ids, ranks, dropout_p, training=True):
    leaves = {k: (v.detach().clone().requires_grad_(k not in ("scalings",)) if v is not None else None)
              for k, v in inputs.items()}
    torch.manual_seed(1234)
    y = fn(leaves, ids, ranks, dropout_p, training)
    g = torch.Generator().manual_seed(1)
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(device=y.device, dtype=y.dtype)
    wrt = [leaves[k] for k in ("x", "lora_A", "lora_B", "bias")]
    # zero rows too: their backward must give zero gradients (the textbook formulas leave unused leaves out of
    # the graph there: None, which is zero; a zero compared with a non-zero oracle still fails)
    grads = torch.autograd.grad(y, wrt, grad_y, allow_unused=True)
    return y, [torch.zeros_like(t) if g is None else g for t, g in zip(wrt, grads)]


def _ours(t, ids, ranks, p, training):
    return lora_linear_multi(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["scalings"], ids, ranks,
                             p, training)


def _reference(t, ids, ranks, p, training):
    torch.manual_seed(1234)
    seed = int(draw_seed()) if training and p > 0 else None
    x2d = t["x"].reshape(-1, t["x"].shape[-1])
    ids2d = (ids if ids.shape == t["x"].shape[:-1] else ids[:, None].expand(t["x"].shape[:-1])).reshape(-1)
    ranks_t = torch.tensor(ranks) if ranks is not None else None
    y, _ = reference.lora_linear_multi(x2d, t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["scalings"],
                                       ids2d.to(x2d.device), ranks_t, p, seed)
    return y.view(*t["x"].shape[:-1], t["weight"].shape[0])


def _check(inputs, ids, ranks, p):
    ranks_t = torch.tensor(ranks) if ranks is not None else None
    y, grads = _run(_ours, inputs, ids.to(DEVICE), ranks_t, p)
    exact = {k: v.double() if v is not None else None for k, v in inputs.items()}
    y_exact, grads_exact = _run(_reference, exact, ids, ranks, p)
    y_plain, grads_plain = _run(_reference, inputs, ids, ranks, p)
    assert_matches_reference(y, y_exact, y_plain, "y")
    for name, ours, e, plain in zip(("dx", "dA", "dB", "dbias"), grads, grads_exact, grads_plain):
        assert_matches_reference(ours, e, plain, name)
    return grads


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-M{c[1]}-n{c[2]}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, case, dtype, dropout_p, use_backend):
    use_backend(backend)
    kind, M, n, in_f, out_f, r_max, ranks = case
    inputs = _inputs(M, in_f, out_f, n, r_max, dtype)
    grads = _check(inputs, _ids(kind, M, n), ranks, dropout_p)
    if ranks is not None:  # ranks past r_a get no gradient: nothing is computed there
        for a, r in enumerate(ranks):
            assert not grads[1][a, r:].any() and not grads[2][a, :, r:].any()


@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_three_d_x_with_one_adapter_per_sequence(backend, adapter_dtype, use_backend):
    """x [batch, seq, in] with one id per sequence, on bfloat16, with bfloat16 or float32 adapters."""
    use_backend(backend)
    inputs = _inputs(None, 33, 40, 3, 4, torch.bfloat16, lead=(4, 5), adapter_dtype=adapter_dtype)
    grads = _check(inputs, torch.tensor([2, -1, 0, 2]), None, 0.25)
    assert grads[1].dtype == adapter_dtype and not grads[1][1].any()  # adapter 1 has no rows


def _textbook(t, ids, scalings, ranks):
    """An independent oracle: each row's own formula, one row at a time, in float64."""
    rows = []
    for m in range(t["x"].shape[0]):
        x = t["x"][m].double()
        y = t["weight"].double() @ x + t["bias"].double()
        a = int(ids[m])
        if a >= 0:
            r = ranks[a]
            y = y + float(scalings[a]) * (t["lora_B"][a, :, :r].double() @ (t["lora_A"][a, :r].double() @ x))
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
def test_random_batches_against_the_per_row_formula(backend, use_backend):
    use_backend(backend)
    g = torch.Generator().manual_seed(11)
    for trial in range(6):
        n = int(torch.randint(1, 7, (), generator=g))
        r_max = int(torch.randint(1, 20, (), generator=g))
        M = int(torch.randint(1, 60, (), generator=g))
        inputs = _inputs(M, 17 + trial, 23 - trial, n, r_max, torch.float64, seed=trial)
        ids = torch.randint(-1, n, (M,), generator=g)
        ranks = torch.randint(1, r_max + 1, (n,), generator=g).tolist()
        y = _ours(inputs, ids.to(DEVICE), torch.tensor(ranks), 0.0, False)
        torch.testing.assert_close(y, _textbook(inputs, ids, inputs["scalings"], ranks), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("reference", "cpu", "cuda")])
def test_one_adapter_equals_lora_linear_bit_for_bit(backend, dropout_p, use_backend):
    use_backend(backend)
    inputs = _inputs(37, 33, 70, 1, 8, torch.float32)
    ids = torch.zeros(37, dtype=torch.int64)
    y_multi, g_multi = _run(_ours, inputs, ids, None, dropout_p)

    def single(t, ids, ranks, p, training):
        return lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"][0], t["lora_B"][0],
                           float(t["scalings"][0]), p, training)

    y_single, g_single = _run(single, inputs, ids, None, dropout_p)
    assert torch.equal(y_multi, y_single)
    assert torch.equal(g_multi[0], g_single[0]) and torch.equal(g_multi[3], g_single[3])
    assert torch.equal(g_multi[1], g_single[1]) and torch.equal(g_multi[2], g_single[2])


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
def test_gradients_of_a_mixed_batch_are_the_sum_of_per_adapter_batches(backend, use_backend):
    use_backend(backend)
    inputs = _inputs(30, 33, 20, 4, 6, torch.float64)
    ids = torch.randint(-1, 4, (30,), generator=torch.Generator().manual_seed(3))
    _, mixed = _run(_ours, inputs, ids, None, 0.0)
    total = [torch.zeros_like(g) for g in mixed[1:3]]
    for a in range(4):
        rows = (ids == a).nonzero().flatten()
        if not rows.numel():
            continue
        sub = dict(inputs, x=inputs["x"][rows])
        # the same upstream gradient rows as the mixed batch's
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in sub.items() if k in ("lora_A", "lora_B")}
        y = lora_linear_multi(sub["x"], sub["weight"], sub["bias"], leaves["lora_A"], leaves["lora_B"],
                              sub["scalings"], torch.full((len(rows),), a), None)
        grad_y = torch.randn((30, 20), generator=torch.Generator().manual_seed(1), dtype=torch.float64)[rows]
        dA, dB = torch.autograd.grad(y, [leaves["lora_A"], leaves["lora_B"]], grad_y)
        total[0] += dA
        total[1] += dB
    torch.testing.assert_close(mixed[1], total[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mixed[2], total[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, use_backend):
    use_backend(backend)
    inputs = _inputs(9, 12, 10, 3, 4, torch.float32 if backend == "triton" else torch.float64)
    for t in ("x", "lora_A", "lora_B"):
        inputs[t].requires_grad_(True)
    ids = torch.tensor([2, 0, -1, 2, 1, 0, 0, -1, 2])
    args = (inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_A"], inputs["lora_B"], inputs["scalings"],
            ids, torch.tensor([4, 2, 3]), torch.tensor([0.2, 0.0, 0.1], dtype=torch.float64),
            torch.tensor(5, dtype=torch.int64))
    torch.library.opcheck(lora_linear_multi_op.custom_op, args)
    torch.library.opcheck(lora_linear_multi_op.custom_op, (*args[:8], None, None))  # no dropout: no CPU tensor


def test_a_batch_without_dropout_hands_the_op_no_cpu_tensor(monkeypatch):
    """Without a seed (eval, or no adapter drops) the op gets dropouts=None: a CPU tensor reaching a compiled
    graph's op would make Inductor skip CUDA graphs (torch.compile(mode="reduce-overhead")) for a GPU batch."""
    from lora_kernels import functional

    seen = []
    real = functional.lora_linear_multi_op

    def spy(*args):
        seen.append(args[8:])
        return real(*args)

    monkeypatch.setattr(functional, "lora_linear_multi_op", spy)
    inputs = _inputs(6, 8, 5, 2, 4, torch.float32)
    ids = torch.tensor([0, 1, -1, 1, 0, 0])
    call = lambda p, training: lora_linear_multi(inputs["x"], inputs["weight"], inputs["bias"],  # noqa: E731
                                                 inputs["lora_A"], inputs["lora_B"], inputs["scalings"], ids,
                                                 dropout_p=p, training=training)
    call(0.1, False)
    call(0.0, True)
    call(0.1, True)
    assert seen[0] == (None, None) and seen[1] == (None, None)
    dropouts, seed = seen[2]
    assert dropouts.tolist() == [0.1, 0.1] and seed is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_without_recompiles(backend, use_backend):
    """New adapter values, scalings and ids between calls reuse the compiled graph."""
    use_backend(backend)
    inputs = _inputs(12, 16, 8, 4, 4, torch.float32)

    @torch.compile(fullgraph=True, backend="aot_eager", dynamic=False)
    def step(x, weight, bias, lora_A, lora_B, scalings, ids):
        return lora_linear_multi(x, weight, bias, lora_A, lora_B, scalings, ids).sum()

    lora_A = inputs["lora_A"].clone().requires_grad_(True)
    ids = torch.tensor([0, 1, 2, 3] * 3)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for trial in range(3):
            with torch.no_grad():
                lora_A.add_(0.1)
                inputs["scalings"].mul_(1.5)
            ids = ids.roll(1) if trial != 2 else torch.full((12,), -1)
            out = step(inputs["x"], inputs["weight"], inputs["bias"], lora_A, inputs["lora_B"], inputs["scalings"],
                       ids)
            out.backward()
            expected = _reference(dict(inputs, lora_A=lora_A.detach()), ids, None, 0.0, False).sum()
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_ids_and_ranks_are_refused_by_name(backend, use_backend):
    use_backend(backend)
    t = _inputs(5, 12, 10, 3, 4, torch.float32)
    args = (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["scalings"])
    with pytest.raises((ValueError, RuntimeError), match="adapter_ids"):
        lora_linear_multi(*args, torch.tensor([0, 1, 3, 0, 0]))
    with pytest.raises((ValueError, RuntimeError), match="ranks"):
        lora_linear_multi(*args, torch.zeros(5, dtype=torch.int64), torch.tensor([1, 5, 2]))
    with pytest.raises(ValueError, match="adapter_ids must be one id per row"):
        lora_linear_multi(*args, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="adapter_ids must be an integer tensor"):
        lora_linear_multi(*args, torch.zeros(5))
    with pytest.raises(ValueError, match="scalings must be a float tensor"):
        lora_linear_multi(*args[:5], torch.ones(2), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="lora_B must be"):
        lora_linear_multi(*args[:4], t["lora_B"][:2], t["scalings"], torch.zeros(5, dtype=torch.int64))
    ids = torch.zeros(5, dtype=torch.int64)
    for bad in (1.0, True, torch.tensor([0.1, 0.2]), torch.tensor([0.1, 1.0, 0.0], dtype=torch.float64)):
        with pytest.raises(ValueError, match="dropout_p must be"):
            lora_linear_multi(*args, ids, None, bad, True)


@pytest.mark.parametrize("grouped", [False, True], ids=["scattered", "grouped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_adapter_dropout(backend, dtype, grouped, use_backend):
    """Each adapter its own probability (0 included): outputs and gradients against the reference, and
    each adapter's rows equal to lora_linear over the whole batch with that adapter's probability and
    the same seed (the mask of a row does not depend on the other adapters)."""
    use_backend(backend)
    n, M = 4, 40
    t = _inputs(M, 33, 20, n, 8, dtype)
    ids = _ids("unsorted-with-base-rows", M, n)
    ids = ids.sort().values if grouped else ids
    dropouts = torch.tensor([0.0, 0.3, 0.1, 0.5], dtype=torch.float64)
    leaves = {k: v.detach().clone().requires_grad_(k != "scalings") for k, v in t.items()}
    torch.manual_seed(99)
    y = lora_linear_multi(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_A"], leaves["lora_B"],
                          t["scalings"], ids, None, dropouts, True)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    grads = torch.autograd.grad(y, [leaves[k] for k in ("x", "lora_A", "lora_B")], grad_y)
    torch.manual_seed(99)
    seed = int(draw_seed())
    d = {k: v.double() for k, v in t.items()}
    y_exact, xa_exact = reference.lora_linear_multi(d["x"], d["weight"], d["bias"], d["lora_A"], d["lora_B"],
                                                    t["scalings"], ids, None, dropouts, seed)
    y_plain, xa_plain = reference.lora_linear_multi(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"],
                                                    t["scalings"], ids, None, dropouts, seed)
    assert_matches_reference(y, y_exact, y_plain, "y")
    exact = reference.lora_linear_multi_backward(grad_y.double(), d["x"], d["weight"], d["lora_A"], d["lora_B"],
                                                 xa_exact, t["scalings"], ids, None, dropouts, seed)
    plain = reference.lora_linear_multi_backward(grad_y, t["x"], t["weight"], t["lora_A"], t["lora_B"], xa_plain,
                                                 t["scalings"], ids, None, dropouts, seed)
    for name, ours, e, p in zip(("dx", "dA", "dB"), grads, exact, plain):
        assert_matches_reference(ours, e, p, name)
    for a in range(n):
        rows = (ids == a).nonzero().flatten()
        torch.manual_seed(99)
        single = lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"][a], t["lora_B"][a],
                             float(t["scalings"][a]), float(dropouts[a]), True)
        # judged like plain PyTorch: within the rule of lora_linear's own result (same mask, same seed)
        assert_matches_reference(y[rows], y_exact[rows], single[rows], f"rows of adapter {a}")


def test_argument_checks_never_read_a_device_tensors_values():
    """check_multi_args reads values of CPU tensors only: on a GPU, reading the scalings (say, to check they
    are finite) would wait for the GPU on every call and fail inside CUDA-graph capture. Meta tensors stand
    in for GPU ones here: any read of their values raises."""
    from lora_kernels import validation

    n, r, d_in, d_out, M = 3, 4, 8, 6, 5
    meta = dict(device="meta")
    checked = validation.check_multi_args(
        torch.empty(M, d_in, **meta), torch.empty(d_out, d_in, **meta), torch.empty(d_out, **meta),
        torch.empty(n, r, d_in, **meta), torch.empty(n, d_out, r, **meta), torch.empty(n, dtype=torch.float64, **meta),
        torch.zeros(M, dtype=torch.int64, **meta), torch.empty(n, dtype=torch.int64, **meta), 0.0)
    assert checked[5].device.type == "meta" and checked[6].shape == (M,)


@pytest.mark.skipif("triton" not in compiled_backends(), reason="triton backend not available")
@pytest.mark.parametrize("splits", [2, 3])
def test_triton_weight_gradient_cut_into_row_slices(splits, monkeypatch, use_backend):
    """On a GPU the Triton weight-gradient kernel sums each adapter's rows in several slices (every splits-th
    row tile), so that few adapters with many rows still fill the GPU. Forced here (the interpreter uses
    one slice): the slices must cover every row once, skewed batches included (one adapter with most rows)."""
    from lora_kernels.ops import triton_lora_linear_multi as multi

    use_backend("triton")
    monkeypatch.setattr(multi, "weight_grad_splits", lambda *args: splits)
    g = torch.Generator().manual_seed(splits)
    n, r_max, d_in, d_out, M = 3, 8, 40, 36, 70
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE, torch.float32)  # noqa: E731
    x, w, grad_y = rand(M, d_in), rand(d_out, d_in), rand(M, d_out)
    A, B = rand(n, r_max, d_in), rand(n, d_out, r_max)
    ids = torch.where(torch.rand(M, generator=g) < 0.8, 1, torch.randint(-1, n, (M,), generator=g)).to(DEVICE)
    ranks = torch.tensor([8, 5, 3], device=DEVICE)
    scalings = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    dropouts = torch.tensor([0.0, 0.25, 0.1], dtype=torch.float64)
    y, xa = lora_linear_multi_op.impl(x, w, None, A, B, scalings, ids, ranks, dropouts, torch.tensor(11))
    ours = multi.backward(grad_y, x, w, A, B, xa, scalings, ids, ranks, dropouts, 11, True)
    d = lambda t: t.double()  # noqa: E731
    _, exa = reference.lora_linear_multi(d(x), d(w), None, d(A), d(B), scalings, ids, ranks, dropouts, 11)
    exact = reference.lora_linear_multi_backward(d(grad_y), d(x), d(w), d(A), d(B), exa, scalings, ids, ranks,
                                                 dropouts, 11)
    _, pxa = reference.lora_linear_multi(x, w, None, A, B, scalings, ids, ranks, dropouts, 11)
    plain = reference.lora_linear_multi_backward(grad_y, x, w, A, B, pxa, scalings, ids, ranks, dropouts, 11)
    for name, got, oracle, same_dtype in zip(("dx", "dA", "dB"), ours, exact, plain):
        assert_matches_reference(got, oracle, same_dtype, name)


@pytest.mark.skipif("triton" not in compiled_backends(), reason="triton backend not available")
def test_triton_weight_gradient_slices_fill_the_gpu_without_exceeding_the_rows():
    """About `programs_wanted` programs: none split when n adapters × column blocks already make that many,
    many when few adapters share a long batch, never more slices than the batch has row tiles."""
    from lora_kernels.ops.triton_common import weight_grad_tiles
    from lora_kernels.ops.triton_lora_linear_multi import weight_grad_splits

    block_m, block_n = weight_grad_tiles()
    wanted = 528  # 4 programs on each of 132 SMs
    assert weight_grad_splits(8192, 64, 4096, 16, wanted) == 1
    few = weight_grad_splits(8192, 2, 4096, 16, wanted)
    assert few > 1 and few * 2 * -(-4096 // block_n) >= wanted
    assert weight_grad_splits(3 * block_m, 1, 128, 16, 10**6) == 3


@pytest.mark.skipif("cpu" not in compiled_backends(), reason="lora_kernels._C not built")
def test_cpu_scattered_batch_beyond_the_kept_workspace(use_backend):
    """The C++ scattered path keeps its [M, in] / [M, out] temporaries between calls up to 16 MB each and
    allocates larger ones per call (so one large batch does not pin them): both paths, one after the
    other, match the reference, outputs and gradients."""
    use_backend("cpu")
    g = torch.Generator().manual_seed(3)
    n, r, d = 4, 8, 1040
    for M in (64, 4100):  # x is 0.3 MB, then 17 MB (float32)
        x = torch.randn(M, d, generator=g, requires_grad=True)
        w, bias = torch.randn(d, d, generator=g) / d**0.5, torch.randn(d, generator=g)
        A = (torch.randn(n, r, d, generator=g) / d**0.5).requires_grad_()
        B = torch.randn(n, d, r, generator=g).requires_grad_()
        ids = torch.randint(-1, n, (M,), generator=g)
        scalings = torch.tensor([0.5, 1.0, 2.0, -1.0], dtype=torch.float64)
        y = lora_linear_multi(x, w, bias, A, B, scalings, ids)
        grads = torch.autograd.grad(y, (x, A, B), torch.ones_like(y))
        d64 = lambda t: t.detach().double().requires_grad_()  # noqa: E731
        x64, A64, B64 = d64(x), d64(A), d64(B)
        y64, _ = reference.lora_linear_multi(x64, w.double(), bias.double(), A64, B64, scalings, ids)
        grads64 = torch.autograd.grad(y64, (x64, A64, B64), torch.ones_like(y64))
        torch.testing.assert_close(y.double(), y64, rtol=1e-4, atol=1e-4)
        for got, exact in zip(grads, grads64):
            torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("backend", ["reference"] + compiled_backends())
def test_strided_ranks_and_scalings_are_read_by_position(backend, use_backend):
    """ranks and float32 scalings handed as strided views (t[::2]): every backend reads element i as the i-th
    value (Triton's kernels index them by position: they are made contiguous first)."""
    use_backend(backend)
    g = torch.Generator().manual_seed(3)
    n, r_max, d_in, d_out, M = 3, 8, 24, 20, 30
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE, torch.float32)  # noqa: E731
    x, w, A, B = rand(M, d_in), rand(d_out, d_in), rand(n, r_max, d_in), rand(n, d_out, r_max)
    ids = torch.randint(-1, n, (M,), generator=g).to(DEVICE)
    ranks_wide = torch.tensor([8, 99, 5, 99, 3, 99], device=DEVICE)
    scalings_wide = torch.tensor([0.5, 7.0, 2.0, 7.0, -1.0, 7.0], device=DEVICE)
    ours = lora_linear_multi(x, w, None, A, B, scalings_wide[::2], ids, ranks=ranks_wide[::2])
    packed = reference.lora_linear_multi(x.double(), w.double(), None, A.double(), B.double(),
                                         torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64), ids,
                                         torch.tensor([8, 5, 3]))[0]
    torch.testing.assert_close(ours.double(), packed, rtol=1e-5, atol=1e-5)
