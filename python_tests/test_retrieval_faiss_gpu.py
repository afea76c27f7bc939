"""The faiss GPU decisions of radit_fast.retrieval.index, checked against a fake faiss module (faiss-gpu is not
installed here): which copies are made, where the index is trained, which ParameterSpace sets nprobe, and that
the CPU path is unchanged with the real faiss-cpu."""
from __future__ import annotations

import logging
import sys
import types

import numpy as np
import pytest

from radit_fast.retrieval import index as index_mod


class FakeIVF:
    """A CPU IndexIVFFlat: records where it is trained and filled."""

    where = "cpu"

    def __init__(self, log, nlist=100, is_trained=False):
        self.log, self.nlist, self.is_trained, self.ntotal, self.nprobe = log, nlist, is_trained, 0, 1

    def train(self, x):
        self.log.append(("train", self.where, len(x)))
        self.is_trained = True

    def add(self, x):
        self.log.append(("add", self.where, len(x)))
        self.ntotal += len(x)


class FakeFlat(FakeIVF):
    def __init__(self, log):
        super().__init__(log, nlist=0, is_trained=True)


class GpuIndexIVFFlat(FakeIVF):
    def __init__(self, cpu, device):
        super().__init__(cpu.log, cpu.nlist, cpu.is_trained)
        self.ntotal, self.where = cpu.ntotal, f"gpu{device}"


class IndexShards:
    """What index_cpu_to_all_gpus returns for several GPUs: no "Gpu" in the name, GPU indexes inside."""

    def __init__(self, shards):
        self.shards = shards
        self.is_trained = all(s.is_trained for s in shards)

    def count(self):
        return len(self.shards)

    def at(self, i):
        return self.shards[i]

    def train(self, x):  # what faiss does: every shard runs its own k-means
        for s in self.shards:
            s.train(x)

    def add(self, x):
        self.shards[0].log.append(("add", "shards", len(x)))


class IndexReplicas(IndexShards):
    pass


class IndexPreTransform:
    def __init__(self, inner):
        self.index = inner
        self.is_trained = inner.is_trained


class ClonerOptions:
    def __init__(self):
        self.shard, self.useFloat16, self.common_ivf_quantizer = False, False, False


def fake_faiss(log, n_gpus=2, unsupported=()):
    """A faiss module with GPU support and ``n_gpus`` GPUs; index types in ``unsupported`` cannot go to a GPU."""
    faiss = types.ModuleType("faiss")

    def to_gpus(index, co=None, gpus=None):
        log.append(("to_gpu", list(gpus), co.shard, co.common_ivf_quantizer, co.useFloat16))
        if type(index) in unsupported:
            raise RuntimeError("Error in ...: This index type is not implemented on GPU.")
        shards = [GpuIndexIVFFlat(index, g) for g in gpus]
        return shards[0] if len(shards) == 1 else IndexShards(shards)

    def to_cpu(index):
        log.append(("to_cpu", type(index).__name__))
        first = index.at(0) if hasattr(index, "at") else getattr(index, "index", index)
        cpu = FakeIVF(log, first.nlist, first.is_trained)
        cpu.ntotal = sum(s.ntotal for s in index.shards) if hasattr(index, "shards") else first.ntotal
        return cpu

    def extract_index_ivf(index):
        if not isinstance(index, FakeIVF) or isinstance(index, GpuIndexIVFFlat):  # faiss cannot see a GPU IVF
            raise RuntimeError("could not extract IVF index")
        return index

    class Space:
        def set_index_parameters(self, index, params):
            log.append(("params", type(self).__name__, params))

    faiss.get_num_gpus = lambda: n_gpus
    faiss.index_cpu_to_gpus_list = to_gpus
    faiss.index_gpu_to_cpu = to_cpu
    faiss.downcast_index = lambda index: index
    faiss.extract_index_ivf = extract_index_ivf
    faiss.GpuMultipleClonerOptions = ClonerOptions
    faiss.ParameterSpace = type("ParameterSpace", (Space,), {})
    faiss.GpuParameterSpace = type("GpuParameterSpace", (Space,), {})
    return faiss


@pytest.fixture
def log(monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "faiss", fake_faiss(calls))
    return calls


EMB = np.zeros((300_000, 4), np.float16)


def test_sharded_ivf_is_trained_on_one_gpu_then_sharded_for_adding(log):
    cpu, used = index_mod.build_on_device(FakeIVF(log, nlist=1000), EMB, device="cuda")
    assert used == 100_000  # max(65536, 100 nlist), read from the CPU index (a GPU IVF hides its nlist)
    assert [c for c in log if c[0] == "train"] == [("train", "gpu0", 100_000)]  # once, on one device
    assert log[0] == ("to_gpu", [0], False, False, True)
    assert ("to_gpu", [0, 1], True, True, True) in log  # shards share one coarse quantizer
    adds = [c for c in log if c[0] == "add"]
    assert {c[1] for c in adds} == {"shards"} and sum(c[2] for c in adds) == len(EMB)
    assert log[-1] == ("to_cpu", "IndexShards") and isinstance(cpu, FakeIVF) and cpu.where == "cpu"


def test_one_gpu_is_not_sharded(log, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", fake_faiss(log, n_gpus=1))
    index_mod.build_on_device(FakeIVF(log, nlist=10), EMB[:1000], device="cuda", train_size=500)
    assert [c for c in log if c[0] == "to_gpu"] == [("to_gpu", [0], False, False, True)] * 2
    assert [c for c in log if c[0] == "train"] == [("train", "gpu0", 500)]
    assert {c[1] for c in log if c[0] == "add"} == {"gpu0"}
    assert log[-1] == ("to_cpu", "GpuIndexIVFFlat")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_cpu_builds_and_untrained_free_indexes_never_touch_the_gpus(log, device):
    flat = FakeFlat(log)
    out, used = index_mod.build_on_device(flat, EMB[:1000], device=device)
    assert out is flat and used == 0 and {c[:2] for c in log} == {("add", "cpu")}
    log.clear()
    ivf = FakeIVF(log, nlist=4)
    out, used = index_mod.build_on_device(ivf, EMB[:1000], device="cpu", train_size=200)
    assert out is ivf and [c[:2] for c in log][:1] == [("train", "cpu")] and not any(c[0] == "to_gpu" for c in log)


def test_unsupported_index_types_stay_on_the_cpu(log, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "faiss", fake_faiss(log, unsupported=(FakeIVF,)))
    with caplog.at_level(logging.WARNING, logger=index_mod.__name__):
        out, _ = index_mod.build_on_device(FakeIVF(log, nlist=4), EMB[:1000], device="cuda", train_size=200)
    assert "cannot put FakeIVF on a GPU" in caplog.text
    assert isinstance(out, FakeIVF) and {c[1] for c in log if c[0] in ("train", "add")} == {"cpu"}
    assert not any(c[0] == "to_cpu" for c in log)


@pytest.mark.parametrize("make, gpu", [
    (lambda log: IndexShards([GpuIndexIVFFlat(FakeIVF(log), 0), GpuIndexIVFFlat(FakeIVF(log), 1)]), True),
    (lambda log: IndexReplicas([GpuIndexIVFFlat(FakeIVF(log), 0), GpuIndexIVFFlat(FakeIVF(log), 1)]), True),
    (lambda log: IndexPreTransform(GpuIndexIVFFlat(FakeIVF(log), 0)), True),  # OPQ/PCA around a GPU IVF
    (lambda log: GpuIndexIVFFlat(FakeIVF(log), 0), True),
    (lambda log: FakeIVF(log), False),
    (lambda log: IndexPreTransform(FakeIVF(log)), False),
])
def test_conversion_and_parameter_space_follow_the_gpu_parts(log, make, gpu):
    index = make(log)
    assert index_mod.is_gpu_index(index) is gpu
    out = index_mod.index_to_cpu(index)
    assert (out is index) is (not gpu)
    assert [c[0] for c in log] == (["to_cpu"] if gpu else [])
    index_mod.set_search_params(index, "nprobe=32")
    assert log[-1] == ("params", "GpuParameterSpace" if gpu else "ParameterSpace", "nprobe=32")


def test_without_gpu_support_everything_stays_on_the_cpu(log, monkeypatch, caplog):
    cpu_only = fake_faiss(log, n_gpus=0)
    del cpu_only.index_gpu_to_cpu  # faiss-cpu has get_num_gpus (0) but no GPU cloners
    monkeypatch.setitem(sys.modules, "faiss", cpu_only)
    ivf = FakeIVF(log, nlist=4)
    with caplog.at_level(logging.WARNING, logger=index_mod.__name__):
        out, _ = index_mod.build_on_device(ivf, EMB[:1000], device="cuda", train_size=200)
        assert index_mod.index_to_gpu(ivf) is ivf
    assert out is ivf and "no GPU support" in caplog.text
    shards = IndexShards([GpuIndexIVFFlat(FakeIVF(log), 0)])
    assert index_mod.index_to_cpu(shards) is shards
    index_mod.set_search_params(ivf, "nprobe=2")
    assert log[-1] == ("params", "ParameterSpace", "nprobe=2")
    assert not any(c[0] in ("to_gpu", "to_cpu") for c in log)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_real_faiss_cpu_path_equals_train_and_add(device):
    import faiss

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 16)).astype(np.float16)
    q = rng.standard_normal((20, 16)).astype(np.float32)
    ref = faiss.index_factory(16, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    used_ref = index_mod.train_and_add(ref, x, train_size=1000)
    got, used = index_mod.build_on_device(faiss.index_factory(16, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT), x,
                                          device=device, train_size=1000)
    assert used == used_ref == 1000 and got.ntotal == ref.ntotal == 3000
    assert not index_mod.is_gpu_index(got) and index_mod.index_to_cpu(got) is got
    for index in (ref, got):
        index_mod.set_search_params(index, "nprobe=4")
    np.testing.assert_array_equal(got.search(q, 5)[1], ref.search(q, 5)[1])
