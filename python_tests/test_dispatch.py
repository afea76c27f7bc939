"""impl="auto": the committed table of measured choices, its matching rules and the fallback (no GPU needed:
the device name and capability are monkeypatched)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from radit_fast.ops import _dispatch

ROOT = Path(__file__).resolve().parents[1]
H200 = torch.device("cuda", 0)


@pytest.fixture
def gpu(monkeypatch):
    """Pretend cuda:0 is an NVIDIA H200 (sm_90); returns a setter for another name/capability."""
    def set_gpu(name="NVIDIA H200", capability=(9, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    set_gpu()
    return set_gpu


def _use_rows(monkeypatch, *rows):
    full = tuple({"measured": {"commit": "test", "benchmark": "test"}, **r} for r in rows)
    monkeypatch.setattr(_dispatch, "load_impl_table", lambda: full)


def test_committed_table_is_valid_and_cpu_only():
    rows = _dispatch.load_impl_table()
    assert rows, "the table starts with the measured CPU rows"
    for row in rows:
        assert row["device"].startswith("cpu "), f"GPU rows come only from a GPU run: {row}"
        assert row["impl"] == "cpu"
        measured = row["measured"]
        assert measured["commit"] and measured["benchmark"] and measured["figures"]
        assert (ROOT / measured["benchmark"]).is_file()
        results = measured["results"].split(" ")[0]
        assert (ROOT / results).is_file(), results
        op_rows = [line for line in (ROOT / results).read_text().splitlines()
                   if line.startswith(row["op"] + ",cpu,cpu," + row["dtype"] + ",")]
        assert op_rows, f"{results} has no cpu-backend row for {row['op']} {row['dtype']}"


def test_device_kind(gpu):
    assert _dispatch.device_kind(H200) == "cuda NVIDIA H200 sm_90"
    gpu("NVIDIA L40S", (8, 9))
    assert _dispatch.device_kind(H200) == "cuda NVIDIA L40S sm_89"
    assert _dispatch.device_kind(torch.device("cpu")).startswith("cpu ")


def test_table_matching(monkeypatch, gpu):
    _use_rows(monkeypatch,
              {"op": "answer_logprobs", "device": "cuda NVIDIA H1* sm_90", "dtype": "bfloat16", "impl": "triton"},
              {"op": "answer_logprobs", "device": "cuda * sm_89", "dtype": "*", "impl": "torch"},
              {"op": "lsr_loss", "device": "cuda *", "dtype": "float32", "impl": "torch"})
    monkeypatch.setattr(_dispatch, "HAS_NATIVE_CUDA", True)
    monkeypatch.setattr(_dispatch, "triton_available", lambda: True)
    auto = (lambda op="answer_logprobs", dtype=torch.bfloat16:
            _dispatch.resolve_impl(op, "auto", H200, dtype=dtype))
    gpu("NVIDIA H100 80GB HBM3", (9, 0))
    assert auto() == "triton"
    assert auto(dtype=torch.float32) == "cuda"  # no row for fp32: the vendor-GEMM driver
    assert auto(dtype=None) == "cuda"  # without a dtype only "*" rows match
    gpu("NVIDIA H200", (9, 0))
    assert auto() == "cuda"  # "H1*" does not match H200
    gpu("NVIDIA L4", (8, 9))
    assert auto() == "torch" and auto(dtype=torch.float32) == "torch" and auto(dtype=None) == "torch"
    assert auto("lsr_loss", torch.float32) == "torch" and auto("lsr_loss", torch.bfloat16) == "cuda"
    assert auto("replug_logprob") == "cuda"


def test_fallback_without_measurements(monkeypatch, gpu):
    _use_rows(monkeypatch)
    monkeypatch.setattr(_dispatch, "HAS_NATIVE_CUDA", True)
    monkeypatch.setattr(_dispatch, "triton_available", lambda: True)
    auto = (lambda **kw: _dispatch.resolve_impl("answer_logprobs", "auto", H200, dtype=torch.bfloat16, **kw))
    assert auto() == "cuda"
    assert auto(has_cuda_kernel=False) == "triton"
    monkeypatch.setattr(_dispatch, "HAS_NATIVE_CUDA", False)
    assert auto() == "triton"
    monkeypatch.setattr(_dispatch, "triton_available", lambda: False)
    assert auto() == "torch"
    monkeypatch.setattr(_dispatch, "HAS_NATIVE", True)
    assert _dispatch.resolve_impl("answer_logprobs", "auto", torch.device("cpu"), dtype=torch.float32) == "cpu"
    monkeypatch.setattr(_dispatch, "HAS_NATIVE", False)
    assert _dispatch.resolve_impl("answer_logprobs", "auto", torch.device("cpu"), dtype=torch.float32) == "torch"


def test_table_choice_that_cannot_run_falls_through(monkeypatch, gpu):
    # A measured "cuda" row on a build without CUDA kernels: the next matching row, then the fallback.
    _use_rows(monkeypatch,
              {"op": "answer_logprobs", "device": "cuda *", "dtype": "*", "impl": "cuda"},
              {"op": "answer_logprobs", "device": "cuda NVIDIA H200 *", "dtype": "*", "impl": "torch"})
    monkeypatch.setattr(_dispatch, "triton_available", lambda: True)
    monkeypatch.setattr(_dispatch, "HAS_NATIVE_CUDA", False)
    assert _dispatch.resolve_impl("answer_logprobs", "auto", H200, dtype=torch.float32) == "torch"
    gpu("NVIDIA A100-SXM4-80GB", (8, 0))
    assert _dispatch.resolve_impl("answer_logprobs", "auto", H200, dtype=torch.float32) == "triton"
    monkeypatch.setattr(_dispatch, "HAS_NATIVE_CUDA", True)
    assert _dispatch.resolve_impl("answer_logprobs", "auto", H200, dtype=torch.float32) == "cuda"


def test_cpu_rows_choose_the_cpu_backend(monkeypatch):
    monkeypatch.setattr(_dispatch, "HAS_NATIVE", True)
    for row in _dispatch.load_impl_table():
        kind = _dispatch.device_kind(torch.device("cpu"))
        assert _dispatch.table_impls(row["op"], kind, getattr(torch, row["dtype"])) == ["cpu"]
        assert _dispatch.resolve_impl(row["op"], "auto", torch.device("cpu"), dtype=getattr(torch, row["dtype"])) \
            == "cpu"
    # A table row for the CPU decides over the fallback.
    _use_rows(monkeypatch, {"op": "answer_logprobs", "device": "cpu *", "dtype": "float16", "impl": "torch"})
    assert _dispatch.resolve_impl("answer_logprobs", "auto", torch.device("cpu"), dtype=torch.float16) == "torch"
    assert _dispatch.resolve_impl("answer_logprobs", "auto", torch.device("cpu"), dtype=torch.float32) == "cpu"


def test_explicit_choices_are_checked(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="impl must be one of"):
        _dispatch.resolve_impl("op", "fast", cpu)
    with pytest.raises(ValueError, match="impl='cuda' needs CUDA tensors"):
        _dispatch.resolve_impl("op", "cuda", cpu)
    with pytest.raises(ValueError, match="impl='cpu' needs CPU tensors"):
        _dispatch.resolve_impl("op", "cpu", H200)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _dispatch.resolve_impl("op", "triton", cpu)
    assert _dispatch.resolve_impl("op", "torch", cpu) == "torch"


@pytest.mark.parametrize("bad, match", [
    ({"op": "x", "device": "cpu *", "dtype": "float32", "impl": "cpu"}, "lacks"),
    ({"op": "x", "device": "cpu *", "dtype": "float32", "impl": "gpu", "measured": {}}, "impl"),
    ({"op": "x", "device": "cpu *", "dtype": "f32", "impl": "cpu", "measured": {}}, "dtype"),
])
def test_malformed_table_rows(tmp_path, bad, match):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"rows": [bad]}))
    with pytest.raises(ValueError, match=match):
        _dispatch.load_impl_table(path)


def test_auto_is_a_constant_under_torch_compile(monkeypatch):
    # Ops resolve impl="auto" inside torch.compile(fullgraph=True) regions: the table lookup (file and
    # /proc/cpuinfo reads) runs once at trace time instead of breaking the graph.
    monkeypatch.setattr(_dispatch, "HAS_NATIVE", True)
    _use_rows(monkeypatch, {"op": "answer_logprobs", "device": "cpu *", "dtype": "float32", "impl": "torch"})

    @torch.compile(fullgraph=True, backend="eager")
    def scaled(x):
        impl = _dispatch.resolve_impl("answer_logprobs", "auto", x.device, dtype=x.dtype)
        return x * (2.0 if impl == "torch" else 3.0)

    assert torch.equal(scaled(torch.ones(3)), torch.full((3,), 2.0))
