

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
