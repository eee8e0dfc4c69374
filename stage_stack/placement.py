"""Where each expert runs, and which experts stay loaded.

`device_map` (the Arranger's argument):
    "cpu"                   every expert on the CPU;
    "auto"                  spread over the visible accelerators by free memory, CPU fallback;
    {instrument: device}    explicit ("cuda:1", "cpu", ...); the key "*" sets the device of
                            instruments not listed (default "cpu").

"auto", step by step (`plan_placement`): experts are taken largest first; each goes to the
accelerator with the most memory left after the experts already placed there, if it fits; an
expert that does not fit beside the others goes to the accelerator where it fits alone (it then
takes turns with the others, see below); an expert that fits on no accelerator, or any expert
when there is none, goes to the CPU. "Memory" is the device's free memory at planning time times
(1 - AUTO_RESERVE), capped by `max_memory`; an expert's size is the bytes of its weights
in the dtype it will run in (`expert_nbytes`), the reserve leaves room for activations and the
KV cache.

Loading is lazy and bounded (`ExpertPool`): an expert is loaded the first time a layer needs it.
When loading it would take a device past its `max_memory` budget, the least recently used
experts on that device are unloaded first.

`DeviceInventory.detect()` reads the real devices through Accelerate; tests build inventories
by hand.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Union

import torch

from .errors import DeviceError

AUTO_RESERVE = 0.15  # of an accelerator's free memory kept for activations, the KV cache, other users
DeviceMap = Union[str, Mapping[str, str]]


@dataclass(frozen=True)
class DeviceInfo:
    name: str  # "cuda:0", "mps", "cpu"
    free_bytes: int


@dataclass(frozen=True)
class DeviceInventory:
    """The accelerators an arrangement may use (the CPU is always available)."""

    accelerators: tuple[DeviceInfo, ...] = ()

    @classmethod
    def detect(cls) -> "DeviceInventory":
        from accelerate.utils import get_max_memory

        found = []
        if torch.cuda.is_available():
            for key, free in get_max_memory().items():  # {0: bytes, 1: bytes, ..., "cpu": bytes}
                if isinstance(key, int):
                    found.append(DeviceInfo(f"cuda:{key}", int(free)))
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            found.append(DeviceInfo("mps", int(torch.mps.recommended_max_memory())))
        return cls(tuple(found))

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.accelerators] + ["cpu"]

    def free(self, device: str) -> int | None:
        for d in self.accelerators:
            if d.name == device:
                return d.free_bytes
        return None


def normalize_device(device: str, inventory: DeviceInventory) -> str:
    """"cuda" -> "cuda:0"; an unknown or absent device -> DeviceError naming the visible ones."""
    name = str(device).strip().lower()
    if name == "cuda":
        name = "cuda:0"
    if name.startswith("cpu"):
        return "cpu"
    if name not in inventory.names:
        raise DeviceError(f"device {device!r} is not available; visible devices: {', '.join(inventory.names)}")
    return name


def parse_max_memory(max_memory: Mapping[str, int | str] | None, inventory: DeviceInventory) -> dict[str, int]:
    """{device: bytes or "24GiB"/"500MB"} -> {normalized device: bytes}."""
    if not max_memory:
        return {}
    from accelerate.utils import convert_file_size_to_int

    budgets = {}
    for device, size in max_memory.items():
        key = f"cuda:{device}" if isinstance(device, int) else device
        try:
            value = convert_file_size_to_int(size) if isinstance(size, str) else int(size)
        except (ValueError, TypeError):
            raise DeviceError(f"max_memory[{device!r}] = {size!r} is not a size; use bytes or a string "
                              "such as '24GiB' or '500MB'") from None
        if value <= 0:
            raise DeviceError(f"max_memory[{device!r}] must be positive, got {size!r}")
        budgets[normalize_device(key, inventory)] = value
    return budgets


def expert_nbytes(path: str | Path, dtype: torch.dtype = torch.float32) -> int:
    """Bytes an expert's weights take once loaded: LM floats in `dtype`, codec and text in float32."""
    from .expert import read_header

    _, entries = read_header(path)
    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    lm_float = torch.finfo(dtype).bits // 8
    total = 0
    for key, (kind, shape) in entries.items():
        count = 1
        for dim in shape:
            count *= dim
        is_float = kind in ("F64", "F32", "F16", "BF16")
        per = (lm_float if key.startswith("lm.") else 4) if is_float else sizes.get(kind, 4)
        total += count * per
    return total


def plan_placement(
    device_map: DeviceMap,
    expert_sizes: Mapping[str, int],
    inventory: DeviceInventory,
    max_memory: Mapping[str, int] | None = None,
) -> dict[str, str]:
    """{instrument: device} for every instrument in `expert_sizes` (see the module docstring)."""
    max_memory = dict(max_memory or {})
    if isinstance(device_map, Mapping):
        default = normalize_device(device_map.get("*", "cpu"), inventory)
        return {name: normalize_device(device_map.get(name, default), inventory) for name in expert_sizes}
    if device_map == "cpu":
        return {name: "cpu" for name in expert_sizes}
    if device_map != "auto":
        if isinstance(device_map, str):  # a single device for all, e.g. "cuda:1"
            device = normalize_device(device_map, inventory)
            return {name: device for name in expert_sizes}
        raise DeviceError(f"device_map must be 'auto', 'cpu', a device or {{instrument: device}}, got {device_map!r}")

    budget = {}
    for accel in inventory.accelerators:
        usable = int(accel.free_bytes * (1 - AUTO_RESERVE))
        budget[accel.name] = min(usable, max_memory[accel.name]) if accel.name in max_memory else usable
    left = dict(budget)
    placement: dict[str, str] = {}
    for name in sorted(expert_sizes, key=lambda n: (-expert_sizes[n], n)):
        size = expert_sizes[name]
        roomy = sorted((d for d in left if left[d] >= size), key=lambda d: (-left[d], d))
        if roomy:  # fits beside the experts already placed
            placement[name] = roomy[0]
            left[roomy[0]] -= size
            continue
        alone = sorted((d for d in budget if budget[d] >= size), key=lambda d: (-budget[d], d))
        placement[name] = alone[0] if alone else "cpu"  # takes turns on the device (ExpertPool evicts)
    return placement


def check_device_map(device_map: DeviceMap, instruments: Iterable[str], inventory: DeviceInventory) -> None:
    """Fail early on a device_map that names unknown instruments or devices."""
    if isinstance(device_map, Mapping):
        known = set(instruments)
        unknown = sorted(k for k in device_map if k != "*" and k not in known)
        if unknown:
            raise DeviceError(f"device_map names instrument(s) {', '.join(unknown)} that have no expert; "
                              f"instruments: {', '.join(sorted(known))}")
        for device in device_map.values():
            normalize_device(device, inventory)
    elif isinstance(device_map, str):
        if device_map not in ("auto", "cpu"):
            normalize_device(device_map, inventory)
    else:
        raise DeviceError(f"device_map must be 'auto', 'cpu', a device or {{instrument: device}}, got {device_map!r}")


class ExpertPool:
    """Experts loaded on demand on their planned device; LRU eviction per device under `max_memory`.

    `sources` maps an instrument to an expert file or an already loaded Expert (used as is,
    never evicted). `loader(name, path, device)` loads one file; `sizes` are the bytes each takes.
    Safe to use from several threads (one per device when pipelining).
    """

    def __init__(self, sources: Mapping[str, object], placement: Mapping[str, str], sizes: Mapping[str, int],
                 loader: Callable[[str, object, str], object], max_memory: Mapping[str, int] | None = None) -> None:
        self.sources = dict(sources)
        self.placement = dict(placement)
        self.sizes = dict(sizes)
        self.loader = loader
        self.max_memory = dict(max_memory or {})
        self._loaded: OrderedDict[str, object] = OrderedDict()  # least recently used first
        self._lock = threading.RLock()
        self.load_count: dict[str, int] = {}
        self.evictions: list[str] = []

    def device_of(self, name: str) -> str:
        return self.placement[name]

    @property
    def loaded(self) -> list[str]:
        return list(self._loaded)

    def used(self, device: str) -> int:
        return sum(self.sizes.get(n, 0) for n in self._loaded if self.placement[n] == device)

    def get(self, name: str):
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
            source = self.sources[name]
            if not isinstance(source, (str, Path)):
                expert = source  # handed over loaded: always resident
            else:
                self._make_room(name)
                expert = self.loader(name, source, self.placement[name])
                self.load_count[name] = self.load_count.get(name, 0) + 1
            self._loaded[name] = expert
            return expert

    def _make_room(self, name: str) -> None:
        device = self.placement[name]
        budget = self.max_memory.get(device)
        if budget is None:
            return
        need = self.sizes.get(name, 0)
        if need > budget:
            raise DeviceError(f"the {name!r} expert needs {need / 2**30:.2f} GiB but max_memory for {device} is "
                              f"{budget / 2**30:.2f} GiB; raise max_memory['{device}'] or place {name!r} elsewhere "
                              "with device_map")
        for victim in [n for n in self._loaded if self.placement[n] == device]:
            if self.used(device) + need <= budget:
                break
            if isinstance(self.sources[victim], (str, Path)):
                self.evict(victim)

    def evict(self, name: str) -> None:
        with self._lock:
            expert = self._loaded.pop(name, None)
            if expert is None:
                return
            self.evictions.append(name)
            device = self.placement[name]
            del expert
            if device.startswith("cuda") and torch.cuda.is_available():
                torch.cuda.empty_cache()
