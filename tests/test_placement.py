"""Device planning against fake device inventories, and LRU loading under a memory budget."""

from __future__ import annotations

import pytest
import torch

from stage_stack.errors import DeviceError
from stage_stack.placement import (AUTO_RESERVE, DeviceInfo, DeviceInventory, ExpertPool, check_device_map,
                                   expert_nbytes, normalize_device, parse_max_memory, plan_placement)
from stage_stack.testing import make_tiny_expert

GB = 10**9
TWO_GPUS = DeviceInventory((DeviceInfo("cuda:0", 10 * GB), DeviceInfo("cuda:1", 20 * GB)))
SIZES = {"drums": 8 * GB, "bass": 6 * GB, "keys": 5 * GB}


def test_cpu_and_auto_without_accelerators():
    assert plan_placement("cpu", SIZES, TWO_GPUS) == {n: "cpu" for n in SIZES}
    assert plan_placement("auto", SIZES, DeviceInventory()) == {n: "cpu" for n in SIZES}


def test_auto_spreads_by_free_memory():
    # usable: cuda:0 8.5 GB, cuda:1 17 GB. Largest first: drums (8) -> cuda:1 (9 left),
    # bass (6) -> cuda:1 (most left: 9 > 8.5; 3 left), keys (5) -> cuda:0 (8.5 > 3).
    assert plan_placement("auto", SIZES, TWO_GPUS) == {"drums": "cuda:1", "bass": "cuda:1", "keys": "cuda:0"}
    equal = DeviceInventory((DeviceInfo("cuda:0", 10 * GB), DeviceInfo("cuda:1", 10 * GB)))
    assert plan_placement("auto", {"a": 4 * GB, "b": 4 * GB}, equal) == {"a": "cuda:0", "b": "cuda:1"}


def test_auto_shares_a_device_or_falls_back_to_cpu():
    one = DeviceInventory((DeviceInfo("cuda:0", 10 * GB),))  # 8.5 GB usable
    plan = plan_placement("auto", {"a": 6 * GB, "b": 5 * GB, "huge": 9 * GB}, one)
    # a fits, b only fits alone (takes turns with a: the pool evicts), huge fits nowhere
    assert plan == {"a": "cuda:0", "b": "cuda:0", "huge": "cpu"}


def test_auto_respects_max_memory():
    capped = parse_max_memory({"cuda:1": "4GB"}, TWO_GPUS)
    assert capped == {"cuda:1": 4 * GB}
    # budgets 8.5 and 4: drums fills cuda:0; bass and keys fit only there, alone: they take turns
    assert plan_placement("auto", SIZES, TWO_GPUS, capped) == {n: "cuda:0" for n in SIZES}
    capped = parse_max_memory({"cuda:0": "5GB", "cuda:1": "4GB"}, TWO_GPUS)
    assert plan_placement("auto", SIZES, TWO_GPUS, capped) == {"drums": "cpu", "bass": "cpu", "keys": "cuda:0"}
    assert int(10 * GB * (1 - AUTO_RESERVE)) == int(8.5 * GB)


def test_explicit_map():
    plan = plan_placement({"drums": "cuda", "bass": "cuda:1", "*": "cpu"}, SIZES, TWO_GPUS)
    assert plan == {"drums": "cuda:0", "bass": "cuda:1", "keys": "cpu"}
    assert plan_placement("cuda:1", SIZES, TWO_GPUS) == {n: "cuda:1" for n in SIZES}
    with pytest.raises(DeviceError, match=r"device 'cuda:2' is not available; visible devices: cuda:0, cuda:1, cpu"):
        plan_placement({"drums": "cuda:2"}, SIZES, TWO_GPUS)
    with pytest.raises(DeviceError, match="names instrument\\(s\\) tuba that have no expert"):
        check_device_map({"tuba": "cpu"}, SIZES, TWO_GPUS)
    with pytest.raises(DeviceError, match="'cuda:7' is not available"):
        check_device_map({"drums": "cuda:7"}, SIZES, TWO_GPUS)
    with pytest.raises(DeviceError, match="device_map must be"):
        check_device_map(3, SIZES, TWO_GPUS)
    check_device_map("auto", SIZES, TWO_GPUS)


def test_device_names_and_sizes():
    assert normalize_device("CPU", TWO_GPUS) == "cpu"
    assert normalize_device("cuda", TWO_GPUS) == "cuda:0"
    assert parse_max_memory({0: 1000, "cpu": "2GiB"}, TWO_GPUS) == {"cuda:0": 1000, "cpu": 2 * 2**30}
    with pytest.raises(DeviceError, match="is not a size"):
        parse_max_memory({"cuda:0": "lots"}, TWO_GPUS)


def test_detect_on_this_machine():
    inventory = DeviceInventory.detect()
    assert inventory.names[-1] == "cpu"
    assert len(inventory.accelerators) == (torch.cuda.device_count() if torch.cuda.is_available() else
                                           len(inventory.accelerators))
    if not torch.cuda.is_available():
        assert plan_placement("auto", SIZES, inventory) == {n: "cpu" for n in SIZES}


def test_expert_nbytes(tmp_path):
    path = make_tiny_expert(tmp_path / "drums.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        lm = sum(f.get_tensor(k).numel() for k in f.keys() if k.startswith("lm."))
        rest = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys() if not k.startswith("lm."))
    assert expert_nbytes(path, torch.float32) == lm * 4 + rest
    assert expert_nbytes(path, torch.bfloat16) == lm * 2 + rest


class FakeLoader:
    def __init__(self):
        self.calls = []

    def __call__(self, name, source, device):
        self.calls.append((name, device))
        return f"<{name} on {device}>"


def test_pool_loads_lazily_and_evicts_least_recently_used():
    sources = {"a": "a.safetensors", "b": "b.safetensors", "c": "c.safetensors"}
    loader = FakeLoader()
    pool = ExpertPool(sources, {"a": "cuda:0", "b": "cuda:0", "c": "cuda:0"}, {"a": 6, "b": 3, "c": 4}, loader,
                      max_memory={"cuda:0": 10})
    assert pool.loaded == [] and loader.calls == []
    assert pool.get("a") == "<a on cuda:0>"
    pool.get("b")  # 6 + 3 fits
    assert pool.loaded == ["a", "b"] and pool.evictions == []
    pool.get("a")  # a is now the most recently used
    pool.get("c")  # 9 + 4 > 10: evict the least recently used (b); 6 + 4 fits
    assert pool.evictions == ["b"] and pool.loaded == ["a", "c"] and pool.used("cuda:0") == 10
    pool.get("b")  # evict a (LRU), then 4 + 3 fits
    assert pool.evictions == ["b", "a"] and pool.loaded == ["c", "b"]
    assert [name for name, _ in loader.calls] == ["a", "b", "c", "b"]


def test_pool_budget_is_per_device_and_checked():
    loader = FakeLoader()
    pool = ExpertPool({"a": "a", "b": "b", "big": "big"}, {"a": "cuda:0", "b": "cuda:1", "big": "cuda:0"},
                      {"a": 6, "b": 6, "big": 11}, loader, max_memory={"cuda:0": 10, "cuda:1": 10})
    pool.get("a")
    pool.get("b")  # another device: no eviction
    assert pool.evictions == []
    with pytest.raises(DeviceError, match="'big' expert needs .* but max_memory for cuda:0"):
        pool.get("big")


def test_pool_never_evicts_experts_handed_over_loaded():
    loaded = object()
    pool = ExpertPool({"mine": loaded, "b": "b"}, {"mine": "cuda:0", "b": "cuda:0"}, {"mine": 5, "b": 5},
                      FakeLoader(), max_memory={"cuda:0": 8})
    assert pool.get("mine") is loaded
    pool.get("b")  # over budget, but "mine" is not the pool's to unload
    assert "mine" in pool.loaded and pool.evictions == []


def test_arranger_uses_the_plan(tmp_path):
    from stage_stack import Arranger

    paths = {n: make_tiny_expert(tmp_path / f"{n}.safetensors", instrument=n) for n in ("drums", "bass")}
    arranger = Arranger(paths, device_map={"drums": "cuda:1", "bass": "cpu"}, inventory=TWO_GPUS)
    assert arranger.device_of("drums") == "cuda:1" and arranger.device_of("bass") == "cpu"
    auto = Arranger(paths, device_map="auto", inventory=TWO_GPUS)
    assert auto.device_of("drums") == "cuda:1"  # planned one at a time: each goes where most memory is free
    with pytest.raises(DeviceError, match="tuba"):
        Arranger(paths, device_map={"tuba": "cpu"}, inventory=TWO_GPUS)
