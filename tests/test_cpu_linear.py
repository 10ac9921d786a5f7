"""
`enable_fast_cpu_linears`: the products of `F.linear`, only float32 CPU `nn.Linear` switched, exact generation.
`quantize_cpu_linears_int8`: drafting models quantized, generation with them still exact.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
import types
import warnings

import pytest
import torch
from conftest import VOCAB, make_llama, training_prompts
from torch import nn
from transformers import LlamaForCausalLM

import prism_hf
from prism_hf import (
    FastCpuLinear,
    cpu_linear,
    disable_fast_cpu_linears,
    enable_fast_cpu_linears,
    few_rows_kernel_available,
    quantize_cpu_linears_int8,
)


@pytest.fixture(params=["kernel", "torch.mm"])
def few_rows_path(request, monkeypatch):
    """FastCpuLinear's two few-row paths: the compiled kernel and the `torch.mm` fallback where it cannot be built."""
    if request.param == "torch.mm":
        monkeypatch.setattr(cpu_linear, "_few_rows_kernel", lambda: None)
    elif not few_rows_kernel_available():
        pytest.skip("the few-row kernel cannot be built on this machine (see the warning)")
    return request.param


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("features", [(48, 80), (13, 7)])  # a tail of input features; output features not 3k
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 32, 33, 70, 300])
def test_fast_linear_equals_linear(rows, features, bias, few_rows_path):
    torch.manual_seed(rows)
    layer = nn.Linear(*features, bias=bias)
    inputs = [torch.randn(rows, features[0]), torch.randn(1, rows, features[0]), torch.randn(2, rows, features[0])]
    inputs.append(torch.randn(rows * 2, features[0])[::2])  # a non-contiguous view
    expected = [nn.functional.linear(x, layer.weight, layer.bias) for x in inputs]
    assert enable_fast_cpu_linears(layer) == 1
    assert type(layer) is FastCpuLinear
    for x, reference in zip(inputs, expected, strict=True):
        with torch.no_grad():
            output = layer(x)
        assert output.shape == reference.shape
        torch.testing.assert_close(output, reference, rtol=1e-5, atol=1e-5)


def test_kernel_rows_equal_one_row_products(monkeypatch):
    """
    With the kernel, each row of a k-row product is bit-identical to that row's one-row product (the same summation
    order), so a verification forward computes its linear layers exactly as one-token decoding does.
    """
    if not few_rows_kernel_available():
        pytest.skip("the few-row kernel cannot be built on this machine (see the warning)")
    calls = []
    kernel = cpu_linear._few_rows_kernel()
    monkeypatch.setattr(cpu_linear, "_few_rows_kernel", lambda: lambda x, w: calls.append(len(x)) or kernel(x, w))
    torch.manual_seed(0)
    layer = nn.Linear(1536, 200)  # the width of Qwen2.5-1.5B
    enable_fast_cpu_linears(layer, routing="always")
    with torch.no_grad():
        for rows in range(2, cpu_linear.KERNEL_ROWS_LIMIT + 1):
            x = torch.randn(rows, 1536)
            product = layer(x)
            for m in range(rows):
                assert torch.equal(layer(x[m : m + 1])[0], product[m]), (rows, m)
        layer(torch.randn(cpu_linear.KERNEL_ROWS_LIMIT + 1, 1536))  # longer inputs take another path
    assert max(calls) == cpu_linear.KERNEL_ROWS_LIMIT and cpu_linear.KERNEL_ROWS_LIMIT + 1 not in calls


def test_kernel_build_failure_warns_and_falls_back(monkeypatch):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    _pretend_an_avx2_linux_machine(monkeypatch)
    try:
        with pytest.warns(UserWarning, match=r"could not build its few-row CPU kernel \(RuntimeError: Ninja is"):
            assert not few_rows_kernel_available()
        layer = nn.Linear(8, 4)
        enable_fast_cpu_linears(layer)
        x = torch.randn(3, 8)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)
        monkeypatch.setenv("PRISM_HF_CPU_KERNEL", "0")  # the opt-out does not even try
        cpu_linear._few_rows_kernel.cache_clear()
        assert not few_rows_kernel_available()
    finally:
        cpu_linear._few_rows_kernel.cache_clear()


def _pretend_an_avx2_linux_machine(monkeypatch):
    """Where the kernel would be built (whatever this machine is), with the cached build forgotten."""
    monkeypatch.setattr(cpu_linear.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(cpu_linear.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_linear.sys, "platform", "linux")
    monkeypatch.delenv("PRISM_HF_CPU_KERNEL", raising=False)
    cpu_linear._few_rows_kernel.cache_clear()


def test_kernel_build_directory_and_a_stale_lock(monkeypatch, tmp_path):
    """
    The kernel is built in a folder per Python and torch version; a lock left by an interrupted build (on which torch
    would wait forever) is removed with a warning, a recent one (a build running now) is left for torch to wait on.
    """
    import torch.utils.cpp_extension

    builds = []

    def load(name, sources, build_directory, **kwargs):
        builds.append((build_directory, os.path.exists(os.path.join(build_directory, "lock"))))
        return types.SimpleNamespace(few_rows_linear=lambda x, weight: x @ weight.T)

    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    _pretend_an_avx2_linux_machine(monkeypatch)
    version = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
    build_directory = tmp_path / f"prism_hf_few_rows_linear-{version}"
    try:
        build_directory.mkdir()
        lock = build_directory / "lock"
        lock.touch()
        hour_ago = time.time() - 3600
        os.utime(lock, (hour_ago, hour_ago))
        with pytest.warns(UserWarning, match=r"removes a stale lock of its few-row kernel's build .* 60 minutes old"):
            assert few_rows_kernel_available()
        assert builds == [(str(build_directory), False)] and not lock.exists()
        lock.touch()
        cpu_linear._few_rows_kernel.cache_clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning: the lock is left alone
            assert few_rows_kernel_available()
        assert builds[1] == (str(build_directory), True) and lock.exists()
        monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
        monkeypatch.setenv("PRISM_HF_CACHE", str(tmp_path / "cache"))
        assert cpu_linear._kernel_build_directory() == tmp_path / "cache" / "torch_extensions" / build_directory.name
    finally:
        cpu_linear._few_rows_kernel.cache_clear()


def test_fast_linear_backpropagates_like_linear():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    fast = copy.deepcopy(layer)
    enable_fast_cpu_linears(fast)
    x = torch.randn(3, 16)
    layer(x).square().sum().backward()
    fast(x).square().sum().backward()
    torch.testing.assert_close(fast.weight.grad, layer.weight.grad)
    torch.testing.assert_close(fast.bias.grad, layer.bias.grad)


class _SubclassedLinear(nn.Linear):
    """Stands in for quantized linears (bitsandbytes' are `nn.Linear` subclasses with their own forward)."""


def test_enable_switches_only_float32_cpu_linears_and_disable_restores():
    model = nn.ModuleDict(
        {
            "a": nn.Linear(4, 4),
            "b": nn.Linear(4, 4, bias=False),
            "bf16": nn.Linear(4, 4).to(torch.bfloat16),
            "sub": _SubclassedLinear(4, 4),
            "embedding": nn.Embedding(10, 4),
        }
    )
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert enable_fast_cpu_linears(model) == 2
    assert enable_fast_cpu_linears(model) == 0  # idempotent: nothing left to switch
    assert [type(model[k]) for k in ("a", "b", "bf16", "sub")] == [
        FastCpuLinear,
        FastCpuLinear,
        nn.Linear,
        _SubclassedLinear,
    ]
    assert model.state_dict().keys() == state.keys()  # same parameters, so checkpoints are unchanged
    assert disable_fast_cpu_linears(model) == 2
    assert type(model["a"]) is nn.Linear and type(model["b"]) is nn.Linear


def test_model_with_fast_linears_saves_and_reloads_unchanged(tmp_path):
    model = make_llama(seed=3)
    assert enable_fast_cpu_linears(model) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + LM head
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert not any(isinstance(m, FastCpuLinear) for m in reloaded.modules())
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_generation_with_fast_linears_is_exact(trained_llama_draft, few_rows_path):
    """Plain, PRISM and Ouroboros greedy outputs agree with fast linears on the target and the draft."""
    target = make_llama()  # the target `trained_llama_draft` was trained on, as a private copy
    draft = copy.deepcopy(trained_llama_draft)
    draft.bind_target(target)
    stock = [target.generate(p[None], do_sample=False, max_new_tokens=30) for p in training_prompts(num=4)]
    assert enable_fast_cpu_linears(target) > 0 and enable_fast_cpu_linears(draft) > 0
    for prompt, reference in zip(training_prompts(num=4), stock, strict=True):
        plain = target.generate(prompt[None], do_sample=False, max_new_tokens=30)
        assert torch.equal(plain, reference)
        for assistant in (draft, prism_hf.Ouroboros(pool=prism_hf.PhrasePool())):
            output = target.generate(prompt[None], assistant_model=assistant, do_sample=False, max_new_tokens=30)
            assert torch.equal(output, reference), type(assistant).__name__
    assert draft.last_generation_stats.accepted_tokens > 0  # the fast draft still drafts what the target says


# ------------------------------------------------------------------------------------------------- int8 drafting


def test_int8_quantizes_float32_cpu_linears_only():
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "a": nn.Linear(32, 48),
            "fast": nn.Linear(32, 48, bias=False),
            "bf16": nn.Linear(4, 4).to(torch.bfloat16),
            "sub": _SubclassedLinear(4, 4),
        }
    )
    enable_fast_cpu_linears(model["fast"])
    x = torch.randn(3, 32)
    expected = {name: model[name](x) for name in ("a", "fast")}
    assert quantize_cpu_linears_int8(model) == 2
    assert quantize_cpu_linears_int8(model) == 0  # nothing float left
    quantized = torch.ao.nn.quantized.dynamic.Linear
    assert [type(model[k]) for k in ("a", "fast", "bf16", "sub")] == [
        quantized,
        quantized,
        nn.Linear,
        _SubclassedLinear,
    ]
    for name, reference in expected.items():  # int8 weights with per-row scales: close, not equal
        torch.testing.assert_close(model[name](x), reference, rtol=0.05, atol=0.05)
        assert not torch.equal(model[name](x), reference)
    bare = nn.Linear(4, 4)
    enable_fast_cpu_linears(bare)
    with pytest.raises(ValueError, match="quantizes the linear layers inside a model; got a bare nn.Linear"):
        quantize_cpu_linears_int8(bare)
    assert type(bare) is FastCpuLinear  # refused before anything changed


def test_generation_with_an_int8_small_model_is_exact(llama_target):
    """
    An int8 small model (its weights are the target's, so it drafts well) drafts for Ouroboros and for HF assisted
    generation: the output stays plain greedy output, and its drafts still get accepted.
    """
    small = make_llama(seed=0)
    assert quantize_cpu_linears_int8(small) == 2 * 7 + 1
    greedy = dict(do_sample=False, max_new_tokens=30)
    ouroboros = prism_hf.Ouroboros(small, num_draft_tokens=4)
    for prompt in training_prompts(num=3):
        reference = llama_target.generate(prompt[None], **greedy)
        assert torch.equal(llama_target.generate(prompt[None], assistant_model=ouroboros, **greedy), reference)
        assert ouroboros.last_generation_stats.accepted_tokens > 0
        assert torch.equal(llama_target.generate(prompt[None], assistant_model=small, **greedy), reference)
    # with a reduced vocabulary the int8 head keeps the same int8 rows (values and per-row scales)
    reduced = prism_hf.Ouroboros(small, num_draft_tokens=4, small_model_vocab=100)
    for prompt in training_prompts(num=2):
        reference = llama_target.generate(prompt[None], **greedy)
        assert torch.equal(llama_target.generate(prompt[None], assistant_model=reduced, **greedy), reference)
        assert reduced.last_generation_stats.accepted_tokens > 0
    assert reduced._reduced_vocabulary_head() is reduced._reduced_vocabulary_head()  # built once
    # fbgemm takes seconds to unpack an int8 head: building unpacks it once, later calls' extra rows not again
    packed_params = small.lm_head._packed_params
    unpack = packed_params._weight_bias
    unpacks = []
    packed_params._weight_bias = lambda: unpacks.append(1) or unpack()
    head = prism_hf.Ouroboros(small, small_model_vocab=100)._reduced_vocabulary_head()
    assert unpacks == [1]
    assert {type(linear) for _, linear in head.parts} == {torch.ao.nn.quantized.dynamic.Linear}
    hidden = torch.randn(3, small.config.hidden_size)
    full = small.get_output_embeddings()(hidden)
    assert torch.equal(head(hidden)[:, :100], full[:, :100])
    assert torch.isinf(head(hidden)[:, 100:]).all()
    extended = head.with_tokens([150, 200])
    assert unpacks == [1] and extended.token_ids.tolist() == [*range(100), 150, 200]
    assert torch.equal(extended(hidden)[:, [150, 200]], full[:, [150, 200]])


def test_int8_prism_draft_drafts_with_an_int8_head_and_stays_exact(trained_llama_draft):
    """
    `quantize_cpu_linears_int8` on a PRISM draft with a draft vocabulary quantizes its slice of the target's LM head
    (the bulk of a draft step) and leaves its layers float: greedy output stays plain greedy output and drafts still
    get accepted, the target's own LM head is untouched, and binding again keeps the one int8 head.
    """
    target = make_llama()
    config = trained_llama_draft.config.to_dict() | {"draft_vocab_size": VOCAB}
    for key in ("architectures", "auto_map", "transformers_version", "model_type"):
        config.pop(key, None)
    draft = prism_hf.PrismDraftModel(prism_hf.PrismConfig(**config))
    missing, unexpected = draft.load_state_dict(trained_llama_draft.state_dict(), strict=False)
    assert missing == ["draft_to_target"] and unexpected == []  # the identity vocabulary: the same draft
    draft.bind_target(target)
    hidden = torch.randn(3, draft.config.hidden_size)
    float_logits = draft.compute_logits(hidden)
    target_head = target.lm_head.weight.clone()

    assert quantize_cpu_linears_int8(draft) == 1
    assert quantize_cpu_linears_int8(draft) == 1  # idempotent: the same head
    assert {type(m) for m in draft.modules() if "Linear" in type(m).__name__} == {nn.Linear}  # layers stay float
    int8_head = draft.verifier.draft_lm_int8
    assert type(int8_head) is torch.ao.nn.quantized.dynamic.Linear
    int8_logits = draft.compute_logits(hidden)
    # int8 weights and inputs: within 5% of the logits' range, not equal
    assert (int8_logits - float_logits).abs().max() < 0.05 * float_logits.abs().max()
    assert not torch.equal(int8_logits, float_logits)
    greedy = dict(do_sample=False, max_new_tokens=30)
    for prompt in training_prompts(num=4):
        reference = target.generate(prompt[None], **greedy)
        assert torch.equal(target.generate(prompt[None], assistant_model=draft, **greedy), reference)
        assert draft.last_generation_stats.accepted_tokens > 0
    assert draft.verifier.draft_lm_int8 is int8_head  # generate binds again: the int8 head is reused
    assert type(target.lm_head) is nn.Linear and torch.equal(target.lm_head.weight, target_head)

    # the whole-vocabulary draft drafts with the target's own LM head, which stays float
    full = copy.deepcopy(trained_llama_draft)
    full.bind_target(target)
    assert quantize_cpu_linears_int8(full) == 0
    assert full.verifier.draft_lm_int8 is None and type(target.lm_head) is nn.Linear
    with pytest.raises(ValueError, match="uses the target's whole LM head"):
        full.quantize_lm_head_int8()
    bf16 = prism_hf.PrismDraftModel(prism_hf.PrismConfig(**config)).to(torch.bfloat16)
    assert quantize_cpu_linears_int8(bf16) == 0  # int8 drafting is for float32 drafts on the CPU
    with pytest.raises(ValueError, match="for float32 drafts on the CPU; this draft is torch.bfloat16"):
        bf16.quantize_lm_head_int8()


def test_measured_routing_keeps_linear_where_it_measured_faster(monkeypatch, tmp_path):
    """
    Each shape's row-count buckets go to the few-row path only where it was measured faster; the table is measured
    once per shape and machine, cached in the prism_hf cache, and reused by later calls.
    """
    monkeypatch.setenv("PRISM_HF_CACHE", str(tmp_path))
    measured = []
    pattern = [rows <= 4 or rows == 64 for rows in cpu_linear.ROW_BUCKETS]  # 1-4 rows and 33-64 rows: few-row path

    def fake_timing(layers):
        measured.append([cpu_linear._shape_key(layer) for layer in layers])
        return {cpu_linear._shape_key(layer): pattern for layer in layers}

    monkeypatch.setattr(cpu_linear, "time_routing", fake_timing)
    calls = []
    product = cpu_linear.few_rows_product
    monkeypatch.setattr(cpu_linear, "few_rows_product", lambda x, w: calls.append(len(x)) or product(x, w))
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    assert enable_fast_cpu_linears(layer) == 1
    assert layer.fast_row_buckets == tuple(pattern)
    with torch.no_grad():
        for rows in (1, 2, 3, 4, 5, 8, 9, 32, 33, 64, 65, 256, 257):
            x = torch.randn(rows, 64)
            torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    assert calls == [1, 2, 3, 4, 33, 64]
    cache = json.loads((tmp_path / cpu_linear.ROUTING_CACHE_FILE).read_text())
    assert cache == {cpu_linear.routing_machine_key(): {"48x64": pattern}}
    again, other = nn.Linear(64, 48), nn.Linear(32, 48)
    enable_fast_cpu_linears(nn.ModuleList([again, other]))
    assert measured == [["48x64"], ["48x64", "48x32"]]  # timed together, only the new shape is taken from it
    assert json.loads((tmp_path / cpu_linear.ROUTING_CACHE_FILE).read_text())[cpu_linear.routing_machine_key()] == {
        "48x64": pattern,
        "48x32": pattern,
    }
    assert again.fast_row_buckets == tuple(pattern)
    enable_fast_cpu_linears(other, routing="always")  # already switched: only the routing changes
    assert other.fast_row_buckets is None
    assert disable_fast_cpu_linears(again) == 1 and "fast_row_buckets" not in vars(again)
    with pytest.raises(ValueError, match="routing must be 'measured' or 'always', got 'fastest'"):
        enable_fast_cpu_linears(again, routing="fastest")


def test_routing_measurement_picks_the_faster_product(monkeypatch):
    """The few-row path wins a bucket only when its fastest time is clearly under F.linear's, timed interleaved."""
    slow_from = 8

    def few_rows(x, weight):
        time.sleep(0.004 if len(x) >= slow_from else 0.0)
        return x.new_zeros(len(x), weight.shape[0])

    def linear(x, weight, bias=None):
        time.sleep(0.002)
        return x.new_zeros(len(x), weight.shape[0])

    monkeypatch.setattr(cpu_linear, "few_rows_product", few_rows)
    monkeypatch.setattr(cpu_linear.nn.functional, "linear", linear)
    layers = [nn.Linear(16, 8), nn.Linear(8, 16), nn.Linear(16, 8)]  # two shapes, one of them twice
    expected = [rows < slow_from for rows in cpu_linear.ROW_BUCKETS]
    assert cpu_linear.time_routing(layers, repeats=3) == {"8x16": expected, "16x8": expected}


def test_routing_measurement_ignores_rounds_slowed_by_other_work(monkeypatch):
    """
    Rounds slowed by another process (here the few-row path's first three timed rounds out of five) do not decide:
    the fastest round does, where a median would send every bucket to F.linear and cache that for the machine.
    """
    rounds = {"few": 0}
    sweep_calls = 2  # layers per sweep

    def few_rows(x, weight):
        rounds["few"] += 1
        disturbed = sweep_calls < rounds["few"] <= 4 * sweep_calls  # timed rounds 1-3 (round 0 warms up)
        time.sleep(0.006 if disturbed else 0.0)
        return x.new_zeros(len(x), weight.shape[0])

    def linear(x, weight, bias=None):
        time.sleep(0.002)
        return x.new_zeros(len(x), weight.shape[0])

    monkeypatch.setattr(cpu_linear, "few_rows_product", few_rows)
    monkeypatch.setattr(cpu_linear.nn.functional, "linear", linear)
    monkeypatch.setattr(cpu_linear, "ROW_BUCKETS", (1,))
    layers = [nn.Linear(16, 8), nn.Linear(16, 8)]
    assert cpu_linear.time_routing(layers, repeats=5) == {"8x16": [True]}


def test_routing_machine_key_names_the_processor_and_its_isa():
    key = cpu_linear.routing_machine_key()
    assert cpu_linear.cpu_model_name() in key and torch.backends.cpu.get_cpu_capability() in key
    assert f"threads {torch.get_num_threads()}" in key and torch.__version__ in key
    assert set(cpu_linear.cpu_isa_flags()) <= set(cpu_linear._ISA_FLAGS)
    # a changed kernel source is another kernel: its routing is timed afresh
    kernel = cpu_linear._kernel_source_digest() if cpu_linear.few_rows_kernel_available() else "none"
    assert key.endswith(f" | kernel {kernel}") and len(cpu_linear._kernel_source_digest()) == 12
