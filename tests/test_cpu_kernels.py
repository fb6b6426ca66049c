"""The fused CPU kernels (vitcraft/cpu_kernels.c) against PyTorch's own operations, and their build."""

import ctypes
import os
import platform
import re
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

from vitcraft import ViTConfig, ViTForClassification, cpu_kernels

# Skipped only where there is nothing to build with; with a compiler at hand a
# build that fails is a failure (see kernels_built), so a broken C file cannot
# pass as "skipped". VITCRAFT_CPU_KERNELS=require (CI) never skips.
pytestmark = pytest.mark.skipif(
    cpu_kernels.find_compiler() is None and os.environ.get("VITCRAFT_CPU_KERNELS") != "require",
    reason="no C compiler for the CPU kernels")


@pytest.fixture(autouse=True, scope="module")
def kernels_built():
    """Build the kernels once, raising KernelBuildError (the compiler's output) if that fails."""
    cpu_kernels.build()
    if not cpu_kernels.available():
        pytest.fail("the kernels build, but are off (VITCRAFT_CPU_KERNELS=0?) or failed to load")


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty kernel cache in tmp_path; the library loaded afresh during the test and after it."""
    monkeypatch.setenv("VITCRAFT_CACHE", str(tmp_path))
    monkeypatch.delenv("VITCRAFT_CFLAGS", raising=False)
    cpu_kernels.library.cache_clear()
    yield tmp_path
    cpu_kernels.library.cache_clear()


def reference_attention(qkv, num_queries, keep_scale=None, mask_diagonal=False):
    """Softmax attention from (B, N, 3, heads, d) to (B, Q, heads, d), times a fixed dropout mask if given;
    with ``mask_diagonal`` no token attends to itself."""
    query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    scores = query[:, :, :num_queries] @ key.transpose(-1, -2) / query.shape[-1] ** 0.5
    if mask_diagonal:
        scores = scores.diagonal_scatter(torch.full(scores.diagonal(dim1=-2, dim2=-1).shape, float("-inf")),
                                         dim1=-2, dim2=-1)
    probs = torch.softmax(scores, dim=-1)
    if keep_scale is not None:
        probs = probs * keep_scale
    return (probs @ value).transpose(1, 2)


def revealed_mask(batch, tokens, heads, num_queries, p, seed):
    """The kernel's dropout mask (B, heads, Q, N), read off by attending to identity values."""
    qkv = torch.randn(batch, tokens, 3, heads, tokens)
    qkv[:, :, 2] = torch.eye(tokens)[:, None, :]  # value of token j = e_j, so output row i = dropped probs row i
    torch.manual_seed(seed)
    out = cpu_kernels.attention(qkv, num_queries, p)  # (B, Q, heads, N)
    probs = reference_attention(qkv, num_queries)  # without dropout, same identity values
    return (out != 0).transpose(1, 2).float() / (1 - p), out, probs


@pytest.mark.parametrize("batch,tokens,heads,head_size,num_queries", [
    (3, 65, 4, 12, 65), (2, 65, 4, 12, 1), (2, 17, 3, 20, 2), (1, 7, 2, 5, 7), (2, 40, 1, 64, 40)])
def test_attention_without_dropout_matches_softmax_attention(batch, tokens, heads, head_size, num_queries):
    qkv = torch.randn(batch, tokens, 3, heads, head_size, requires_grad=True)
    out = cpu_kernels.attention(qkv, num_queries, 0.0)
    expected = reference_attention(qkv, num_queries)
    assert out.shape == (batch, num_queries, heads, head_size)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, qkv, grad)
    (want,) = torch.autograd.grad(expected, qkv, grad)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if num_queries < tokens:  # queries that are not asked for get no gradient
        assert got[:, num_queries:, 0].abs().max() == 0


@pytest.mark.parametrize("num_queries", [20, 1])
def test_attention_dropout_is_a_fixed_mask_applied_forwards_and_backwards(num_queries):
    batch, tokens, heads, p = 4, 20, 3, 0.25
    keep_scale, out, probs = revealed_mask(batch, tokens, heads, num_queries, p, seed=7)
    # the kept probabilities are scaled by 1 / (1 - p), the others are zero
    torch.testing.assert_close(out, probs * keep_scale.transpose(1, 2), atol=1e-6, rtol=1e-5)
    assert 0.6 < keep_scale.gt(0).float().mean() < 0.9
    # the same seed gives the same mask for any values: forward and gradients against that fixed mask
    qkv = torch.randn(batch, tokens, 3, heads, tokens, requires_grad=True)
    torch.manual_seed(7)
    out = cpu_kernels.attention(qkv, num_queries, p)
    expected = reference_attention(qkv, num_queries, keep_scale)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, qkv, grad)
    (want,) = torch.autograd.grad(expected, qkv, grad)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens, head_size, num_queries, p", [
    (65, 12, 65, 0.0), (65, 12, 1, 0.0), (17, 20, 5, 0.25), (33, 8, 33, 0.25)])
def test_attention_with_the_diagonal_masked_is_softmax_attention_without_self_attention(tokens, head_size,
                                                                                      num_queries, p):
    # locality self-attention: query i gets no probability of token i; dropout's mask stays the same
    batch, heads = 2, 3
    keep_scale = revealed_mask(batch, tokens, heads, num_queries, p, seed=3)[0] if p else None
    qkv = torch.randn(batch, tokens, 3, heads, head_size, requires_grad=True)
    torch.manual_seed(3)
    out = cpu_kernels.attention(qkv, num_queries, p, mask_diagonal=True)
    expected = reference_attention(qkv, num_queries, keep_scale, mask_diagonal=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, reference_attention(qkv, num_queries, keep_scale), atol=1e-3)
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, qkv, grad)
    (want,) = torch.autograd.grad(expected, qkv, grad)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_attention_masks_differ_between_calls_and_repeat_under_a_seed():
    first, _, _ = revealed_mask(2, 16, 2, 16, 0.5, seed=1)
    again, _, _ = revealed_mask(2, 16, 2, 16, 0.5, seed=1)
    other, _, _ = revealed_mask(2, 16, 2, 16, 0.5, seed=2)
    assert torch.equal(first, again)
    assert (first != other).float().mean() > 0.3  # independent masks differ in half the places


def test_dropout_drops_p_of_the_elements_and_is_unbiased():
    x = torch.ones(1_000_003)  # not a multiple of the kernel's 1024-element rows
    y = cpu_kernels.dropout(x, 0.1)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.002
    assert torch.allclose(y[kept], torch.tensor(1 / 0.9))
    assert abs(y.mean().item() - 1.0) < 0.003
    # neighbouring elements and rows are not correlated
    k = kept.float()
    assert abs(torch.corrcoef(torch.stack([k[:-1], k[1:]]))[0, 1]) < 0.01
    assert abs(torch.corrcoef(torch.stack([k[:-1024], k[1024:]]))[0, 1]) < 0.01


def test_dropout_backward_uses_the_forward_mask():
    x = torch.randn(37, 1000, requires_grad=True)
    y = cpu_kernels.dropout(x, 0.3)
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    # y = x * mask, so dy/dx = mask = y / x
    torch.testing.assert_close(grad, (y / x).detach(), atol=1e-5, rtol=1e-5)
    assert grad.unique().tolist() == [0.0, pytest.approx(1 / 0.7)]


def test_bfloat16_dropout_uses_the_same_mask_as_float32():
    x = torch.randn(5000)
    torch.manual_seed(3)
    full = cpu_kernels.dropout(x, 0.2)
    torch.manual_seed(3)
    half = cpu_kernels.dropout(x.bfloat16(), 0.2)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half != 0, full != 0)
    torch.testing.assert_close(half.float(), full, atol=0, rtol=1e-2)


def test_gelu_matches_pytorchs_tanh_gelu():
    x = torch.cat([torch.randn(10_007) * 4, torch.tensor([0.0, -0.0, 1e-8, -30.0, 30.0, 100.0, -100.0])])
    x.requires_grad_(True)
    y = cpu_kernels.gelu_tanh(x)
    expected = F.gelu(x, approximate="tanh")
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-5)
    grad = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, grad)[0], torch.autograd.grad(expected, x, grad)[0],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(4, 65, 48), (3, 7, 20), (600, 64)])  # 600 rows: several row blocks
def test_layer_norm_matches_pytorchs(shape):
    x = (torch.randn(shape) * 3 + 1).requires_grad_()
    weight, bias = torch.randn(shape[-1], requires_grad=True), torch.randn(shape[-1], requires_grad=True)
    y = cpu_kernels.layer_norm(x, weight, bias, 1e-6)
    expected = F.layer_norm(x, shape[-1:], weight, bias, 1e-6)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, (x, weight, bias), grad),
                         torch.autograd.grad(expected, (x, weight, bias), grad)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)  # weight, bias: sums over all rows


def test_layer_norm_to_bfloat16_is_the_float32_result_rounded():
    x = torch.randn(5, 65, 48, requires_grad=True)
    weight, bias = torch.randn(48), torch.randn(48)
    y16 = cpu_kernels.layer_norm(x, weight, bias, 1e-6, torch.bfloat16)
    y32 = cpu_kernels.layer_norm(x, weight, bias, 1e-6)
    assert y16.dtype == torch.bfloat16 and torch.equal(y16, y32.bfloat16())
    grad = torch.randn_like(y16)  # a bf16 product after it hands back a bf16 gradient
    assert torch.equal(torch.autograd.grad(y16, x, grad)[0], torch.autograd.grad(y32, x, grad.float())[0])


def test_bfloat16_gelu_is_the_float32_kernel_rounded():
    # under bf16 autocast the kernels read and write bfloat16 but compute in float32
    x16 = (torch.randn(10_007) * 4).bfloat16().requires_grad_()  # a partial last vector too
    x32 = x16.detach().float().requires_grad_()
    y16, y32 = cpu_kernels.gelu_tanh(x16), cpu_kernels.gelu_tanh(x32)
    assert y16.dtype == torch.bfloat16
    assert torch.equal(y16, y32.bfloat16())
    grad = torch.randn_like(y16)
    assert torch.equal(torch.autograd.grad(y16, x16, grad)[0],
                       torch.autograd.grad(y32, x32, grad.float())[0].bfloat16())


@pytest.mark.parametrize("head_size,num_queries", [(12, 33), (12, 1), (20, 33)])
def test_bfloat16_attention_is_the_float32_kernel_rounded(head_size, num_queries):
    qkv16 = torch.randn(3, 33, 3, 2, head_size).bfloat16().requires_grad_()
    qkv32 = qkv16.detach().float().requires_grad_()
    outputs = []
    for qkv in (qkv16, qkv32):
        torch.manual_seed(4)  # the same dropout mask for both
        outputs.append(cpu_kernels.attention(qkv, num_queries, 0.2))
    out16, out32 = outputs
    assert out16.dtype == torch.bfloat16
    assert torch.equal(out16, out32.bfloat16())
    grad = torch.randn_like(out16)
    (grad16,) = torch.autograd.grad(out16, qkv16, grad)
    (grad32,) = torch.autograd.grad(out32, qkv32, grad.float())
    assert grad16.dtype == torch.bfloat16
    assert torch.equal(grad16, grad32.bfloat16())


def test_bf16_autocast_training_runs_the_kernels_close_to_float32(monkeypatch):
    calls = []
    for name in ("attention", "gelu_tanh", "dropout", "layer_norm"):
        kernel = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, kernel=kernel, name=name: calls.append(name) or kernel(*a))
    config = ViTConfig(hidden_dropout_prob=1e-9, attention_probs_dropout_prob=1e-9)  # on, dropping nothing
    model = ViTForClassification(config).train()
    x = torch.randn(4, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)[0]
        # a block's LayerNorm hands its Linear bfloat16, what autocast would have cast it to
        normalised = model.encoder.blocks[0].layernorm_1(torch.randn(2, 65, 48))
        assert normalised.dtype == torch.bfloat16
    assert {"attention", "gelu_tanh", "dropout", "layer_norm"} <= set(calls)
    calls.clear()
    expected = model(x)[0]
    assert "attention" in calls  # float32 takes the kernels too
    torch.testing.assert_close(logits.float(), expected, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("pooling", ["cls", "mean"])  # [CLS] pooling: the last block has one query
def test_training_model_through_the_kernels_matches_the_per_head_model(pooling):
    # a drop rate so small that nothing is dropped: the train-mode model then runs
    # the fused kernels yet must compute what the readable per-head model computes
    tiny_p = 1e-9
    config = ViTConfig(hidden_dropout_prob=tiny_p, attention_probs_dropout_prob=tiny_p, pooling=pooling)
    fast = ViTForClassification(config).train()
    readable = ViTForClassification(config.replace(attention_backend="per_head")).eval()
    readable.load_state_dict(fast.state_dict())
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    got, want = fast(x)[0], readable(x)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # gradients through every block, back to the pixels and the first layer
    (got_x,) = torch.autograd.grad(got.square().sum(), x)
    (want_x,) = torch.autograd.grad(want.square().sum(), x)
    torch.testing.assert_close(got_x, want_x, atol=1e-6, rtol=1e-4)


def test_gradient_checkpointing_replays_the_same_dropout_masks():
    torch.manual_seed(0)
    model = ViTForClassification(ViTConfig(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)).train()
    x = torch.randn(3, 3, 32, 32)
    grads = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        torch.manual_seed(1)
        model(x)[0].sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_without_a_compiler_the_model_falls_back_to_pytorch(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("VITCRAFT_CACHE", str(tmp_path))
    monkeypatch.delenv("VITCRAFT_CPU_KERNELS", raising=False)  # CI's "require" would raise
    cpu_kernels.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not build the fused CPU kernels"):
            assert not cpu_kernels.available()
        model = ViTForClassification(ViTConfig()).train()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss = model(torch.randn(2, 3, 32, 32))[0].sum()
        loss.backward()
        assert model.classifier.weight.grad is not None
    finally:
        monkeypatch.undo()
        cpu_kernels.library.cache_clear()
    assert cpu_kernels.available()


@pytest.mark.parametrize("mode", ["require", "default"])
def test_no_compiler_at_all_raises_under_require_and_warns_otherwise(fresh_build, monkeypatch, mode):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(fresh_build))  # no cc, gcc or clang on it
    if mode == "require":
        monkeypatch.setenv("VITCRAFT_CPU_KERNELS", "require")
        with pytest.raises(cpu_kernels.KernelBuildError, match="no C compiler found"):
            cpu_kernels.library()
    else:
        monkeypatch.delenv("VITCRAFT_CPU_KERNELS", raising=False)
        with pytest.warns(UserWarning, match="no C compiler found"):
            assert cpu_kernels.library() is None


@pytest.mark.parametrize("mode", ["require", "default"])
def test_a_broken_c_file_raises_the_compilers_message_under_require_and_warns_otherwise(fresh_build, monkeypatch,
                                                                                        mode):
    broken = fresh_build / "broken_kernels.c"
    broken.write_text(cpu_kernels.SOURCE.read_text() + "int kernels_broken(void) { return 1 }\n")  # no ';'
    bad_line = broken.read_text().count("\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", broken)
    # the compiler's own diagnostic, pointing at the broken line, not a summary of it
    diagnostic = rf"broken_kernels\.c:{bad_line}:\d+: error"
    if mode == "require":
        monkeypatch.setenv("VITCRAFT_CPU_KERNELS", "require")
        with pytest.raises(cpu_kernels.KernelBuildError, match=diagnostic):
            cpu_kernels.library()
    else:
        monkeypatch.delenv("VITCRAFT_CPU_KERNELS", raising=False)
        with pytest.warns(UserWarning, match=diagnostic):
            assert cpu_kernels.library() is None
        assert not cpu_kernels.available()  # warned once, then quietly off
    assert not list((fresh_build / "kernels").glob("*.so"))


def test_off_builds_nothing_and_warns_nothing(fresh_build, monkeypatch):
    monkeypatch.setenv("VITCRAFT_CPU_KERNELS", "0")
    monkeypatch.setattr(cpu_kernels, "_compile", lambda *args, **kwargs: pytest.fail("compiled"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_kernels.library() is None
    with pytest.raises(RuntimeError, match="not available"):  # a direct call says why instead of crashing
        cpu_kernels.gelu_tanh(torch.randn(3))


def test_extra_compiler_flags_are_split_like_a_shell_and_change_the_cache_key(fresh_build, monkeypatch):
    compiler = cpu_kernels.find_compiler()
    builds = []

    def record(compiler, target, source, extra):
        builds.append((target, extra))
        raise cpu_kernels.KernelBuildError("not built in this test")

    monkeypatch.setattr(cpu_kernels, "_compile", record)
    monkeypatch.setenv("VITCRAFT_CPU_KERNELS", "require")
    for cflags in ("", "-DVITCRAFT_A='1 2' -O2", "-DVITCRAFT_A=1"):
        monkeypatch.setenv("VITCRAFT_CFLAGS", cflags)
        with pytest.raises(cpu_kernels.KernelBuildError):
            cpu_kernels.library()
    (plain, none), (spaced, flags), (other, _) = builds
    assert none == [] and flags == ["-DVITCRAFT_A=1 2", "-O2"]
    assert len({plain, spaced, other}) == 3  # each set of flags is its own build
    assert plain == cpu_kernels.library_path(compiler, cpu_kernels.SOURCE, [])


def test_extra_compiler_flags_reach_the_compiler(fresh_build, monkeypatch):
    monkeypatch.setenv("VITCRAFT_CPU_KERNELS", "require")
    monkeypatch.setenv("VITCRAFT_CFLAGS", "-fvitcraft-no-such-option")
    with pytest.raises(cpu_kernels.KernelBuildError) as info:
        cpu_kernels.library()
    # every command tried shows it, and the compiler's complaint about it follows each
    assert str(info.value).count("-fvitcraft-no-such-option") >= 2 * len(cpu_kernels.FLAG_SETS)


C_TYPES = {"int64_t": "i64", "uint64_t": "u64", "uint32_t": "u32", "float": "f32", "int": "int"}


def exported_c_functions() -> dict[str, tuple[str, str]]:
    """Every non-static function of cpu_kernels.c, in SIGNATURES' notation."""
    found = {}
    source = cpu_kernels.SOURCE.read_text()
    for restype, name, parameters in re.findall(r"^(void|int) (\w+)\(([^)]*)\)\s*\{", source, flags=re.M):
        arguments = []
        for parameter in parameters.split(",") if parameters != "void" else []:
            kind, pointer, argument = re.fullmatch(r"(?:const )?(\w+) (\*?)(\w+)", " ".join(parameter.split())).groups()
            arguments.append(f"{argument}:{'ptr' if pointer else C_TYPES[kind]}")
        found[name] = (restype, " ".join(arguments))
    return found


def test_the_signature_table_lists_every_c_function_with_its_parameters_in_order():
    exported = exported_c_functions()
    assert {"attention_forward", "layernorm_backward", "kernels_dropout_row"} <= set(exported)
    assert exported == cpu_kernels.SIGNATURES


def test_a_kernel_call_with_a_missing_or_unknown_argument_raises_before_reaching_c():
    x = torch.randn(64)
    with pytest.raises(TypeError, match=r"missing arguments \['y'\], unknown arguments \['out'\]"):
        cpu_kernels._parallel("gelu_forward", x.numel(), x=x.data_ptr(), out=x.data_ptr(), bf16=0)
    with pytest.raises(TypeError, match=r"missing arguments \[\], unknown arguments \['scale'\]"):
        cpu_kernels._call("kernels_use_openmp", scale=1.0)
    # given by name, the order of the keywords does not matter
    y = torch.empty_like(x)
    cpu_kernels._parallel("gelu_forward", x.numel(), bf16=0, y=y.data_ptr(), x=x.data_ptr())
    torch.testing.assert_close(y, F.gelu(x, approximate="tanh"), atol=1e-6, rtol=1e-5)


def _every_kernel(seed: int = 5) -> list[torch.Tensor]:
    """The outputs and gradients of every kernel on uneven shapes, with dropout, through the current library."""
    torch.manual_seed(seed)
    qkv = torch.randn(6, 33, 3, 2, 12, requires_grad=True)  # head size 12: one and a half vectors of 8
    x = torch.randn(3000, requires_grad=True)
    rows = torch.randn(700, 24, requires_grad=True)  # LayerNorm row blocks of 256, split unevenly
    weight = torch.randn(24, requires_grad=True)
    out = cpu_kernels.attention(qkv, 33, 0.2)
    dropped = cpu_kernels.dropout(x, 0.3)
    activated = cpu_kernels.gelu_tanh(x)
    normalised = cpu_kernels.layer_norm(rows, weight, torch.zeros(24), 1e-5)
    (out.sum() + dropped.sum() + activated.square().sum() + normalised.square().sum()).backward()
    return [out, dropped, activated, normalised, qkv.grad, x.grad, rows.grad, weight.grad]


def _built(tmp_path, flags: list[str], extra: list[str]) -> ctypes.CDLL:
    target = tmp_path / "kernels.so"
    cpu_kernels._compile(shutil.which("cc"), target, flag_sets=[flags], extra=extra)
    built = ctypes.CDLL(str(target))
    cpu_kernels._declare(built)
    return built


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs cc")
@pytest.mark.slow
def test_a_build_without_openmp_splits_the_work_over_python_threads_with_the_same_results(monkeypatch, tmp_path):
    # Apple's clang has no OpenMP: the kernels then run single-threaded per call and
    # Python splits each range over threads; the results must not change. Built for the same
    # processor as the library it is compared with: the vector width follows the instruction set.
    plain = _built(tmp_path, ["-fopenmp-simd", "-march=native"], cpu_kernels.extra_flags())
    assert plain.kernels_use_openmp() == 0
    with_openmp = _every_kernel()
    monkeypatch.setattr(cpu_kernels, "library", lambda: plain)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # ranges split unevenly
    for a, b in zip(with_openmp, _every_kernel()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs cc")
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="an x86 instruction-set flag")
@pytest.mark.slow
def test_the_avx2_build_with_8_wide_vectors_computes_what_this_build_does(monkeypatch, tmp_path):
    # without AVX-512 the kernels use vectors of 8 floats (cpu_kernels.c); on an AVX-512 machine this is
    # the only test of that build. The dropout masks are the same elements; sums differ in rounding only.
    avx2 = _built(tmp_path, ["-fopenmp"], ["-march=x86-64-v3"])
    assert avx2.kernels_vector_width() == 8
    native = _every_kernel()
    monkeypatch.setattr(cpu_kernels, "library", lambda: avx2)
    for a, b in zip(native, _every_kernel()):
        assert torch.equal(a == 0, b == 0)  # the same elements dropped
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- ARM
CROSS_COMPILER = "aarch64-linux-gnu-gcc"  # Debian's gcc-aarch64-linux-gnu; .ci/run installs it
EM_AARCH64 = 183  # the ELF header's machine field for 64-bit ARM


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["-fopenmp", "-march=armv8-a"], ["-fopenmp-simd", "-march=armv8-a"]],
                         ids=["openmp", "no-openmp"])
def test_the_kernels_cross_compile_for_arm(flags, tmp_path):
    """Apple M-series and Graviton (NEON) build the same C file: with OpenMP, and without it, as Apple's clang."""
    if shutil.which(CROSS_COMPILER) is None:
        pytest.skip(f"no {CROSS_COMPILER}: apt-get install gcc-aarch64-linux-gnu (.ci/run installs it)")
    target = tmp_path / "cpu_kernels-aarch64.so"
    cpu_kernels._compile(CROSS_COMPILER, target, flag_sets=(flags,))  # the build's own command, for ARM
    header = target.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == EM_AARCH64
