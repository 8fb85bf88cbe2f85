"""GPU discovery through NVML (nvidia-ml-py), and a fake NVML for machines without GPUs.

Indices are NVML's (PCI bus order); workers are pinned with CUDA_DEVICE_ORDER=PCI_BUS_ID so that
CUDA's numbering agrees. `CUDA_VISIBLE_DEVICES` of the calling process limits what is seen.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

GIB = 1024**3
FAKE_ENV = "ORCHESTRATOR_FAKE_GPUS"  # tests only: "name:total_gib:used_gib;…" plans on FAKE cards


class NoGpus(RuntimeError):
    """No NVIDIA GPU can be used here; the message says why."""


@dataclass(frozen=True)
class Gpu:
    index: int  # NVML index (PCI bus order)
    uuid: str
    name: str
    total_bytes: int
    free_bytes: int
    used_by_others_bytes: int  # memory held by processes already on the card
    compute_capability: tuple[int, int] | None = None  # (8, 0) A100/A800, (8, 9) Ada, (9, 0) Hopper

    @property
    def label(self) -> str:
        return f"gpu{self.index}"

    def describe(self) -> str:
        return (f"{self.label} {self.name}: {self.free_bytes / GIB:.1f} of {self.total_bytes / GIB:.1f} GiB free"
                + (f", {self.used_by_others_bytes / GIB:.1f} GiB held by other processes"
                   if self.used_by_others_bytes else ""))


def _visible_filter(visible: str | None):
    """Which NVML devices CUDA_VISIBLE_DEVICES admits: by index or by UUID (prefix)."""
    if visible is None:
        return lambda index, uuid: True
    items = [v.strip() for v in visible.split(",") if v.strip()]
    allowed: list[str] = []
    for item in items:
        if item.startswith("-"):  # CUDA stops at the first invalid entry
            break
        allowed.append(item)

    def admit(index: int, uuid: str) -> bool:
        return any(item == str(index) or (item.startswith("GPU-") and uuid.startswith(item))
                   for item in allowed)
    return admit


def discover(nvml=None, visible: str | None = ...) -> list[Gpu]:
    """The GPUs this process may use, with their memory now. Raises NoGpus with the reason."""
    if nvml is None:
        try:
            nvml = nvml_module()
        except ImportError:
            raise NoGpus("nvidia-ml-py is not installed (pip install nvidia-ml-py)") from None
    if visible is ...:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        raise NoGpus(f"no NVIDIA driver found (NVML: {exc})") from None
    try:
        admit = _visible_filter(visible)
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            if not admit(index, uuid):
                continue
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            others = 0
            for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
                try:
                    others += sum(p.usedGpuMemory or 0 for p in getattr(nvml, getter)(handle))
                except Exception:
                    pass
            try:
                capability = tuple(int(v) for v in nvml.nvmlDeviceGetCudaComputeCapability(handle))
            except Exception:  # an old driver: unknown
                capability = None
            gpus.append(Gpu(index=index, uuid=uuid, name=_text(nvml.nvmlDeviceGetName(handle)),
                            total_bytes=int(memory.total), free_bytes=int(memory.free),
                            used_by_others_bytes=int(others), compute_capability=capability))
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
    if not gpus:
        raise NoGpus("NVML sees no GPU" + (f" admitted by CUDA_VISIBLE_DEVICES={visible!r}" if visible else ""))
    return gpus


def nvml_module():
    """pynvml, or the FAKE cards of ORCHESTRATOR_FAKE_GPUS (tests)."""
    if os.environ.get(FAKE_ENV):
        return FakeNvml.from_env(os.environ[FAKE_ENV])
    import pynvml
    return pynvml


def process_memories(pids, nvml=None) -> dict[int, dict[int, int]]:
    """Device memory (bytes) held by each of `pids`, per NVML GPU index, in one NVML session.

    A pid NVML does not list (not started on a GPU yet, or in another PID namespace) is absent.
    """
    if nvml is None:
        nvml = nvml_module()
    wanted = set(pids)
    nvml.nvmlInit()
    try:
        used: dict[int, dict[int, int]] = {}
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid in wanted and proc.usedGpuMemory:
                    per_card = used.setdefault(proc.pid, {})
                    per_card[index] = per_card.get(index, 0) + int(proc.usedGpuMemory)
        return used
    finally:
        nvml.nvmlShutdown()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class FakeNvml:
    """A FAKE of the pynvml calls `discover` makes, for tests and planning on machines without GPUs.

    cards: list of (name, total GiB, used GiB by other processes).
    """

    class _Memory:
        def __init__(self, total, free, used):
            self.total, self.free, self.used = total, free, used

    class _Proc:
        def __init__(self, pid, used):
            self.pid, self.usedGpuMemory = pid, used

    def __init__(self, cards: list[tuple[str, float, float]]):
        self.cards = cards

    @classmethod
    def from_env(cls, text: str) -> "FakeNvml":
        """FAKE cards from ORCHESTRATOR_FAKE_GPUS="FAKE A:16:0;FAKE B:12:1" (tests of the real CLI)."""
        cards = []
        for item in filter(None, (part.strip() for part in text.split(";"))):
            name, total, used = item.rsplit(":", 2)
            cards.append((name, float(total), float(used)))
        return cls(cards)

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.cards)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetUUID(self, handle):
        return f"GPU-fake-{handle:04d}"

    def nvmlDeviceGetName(self, handle):
        return self.cards[handle][0]

    def nvmlDeviceGetMemoryInfo(self, handle):
        _, total, used = self.cards[handle]
        total_b, used_b = int(total * GIB), int(used * GIB)
        return self._Memory(total_b, total_b - used_b, used_b)

    # What the real cards answer, by a word of the FAKE card's name (unknown names: Hopper's).
    CAPABILITIES = {"A800": (8, 0), "A100": (8, 0), "A6000": (8, 6), "3090": (8, 6), "V100": (7, 0),
                    "T4": (7, 5), "4090": (8, 9), "L40": (8, 9), "L4": (8, 9), "H100": (9, 0), "H200": (9, 0)}

    def nvmlDeviceGetCudaComputeCapability(self, handle):
        name = self.cards[handle][0]
        return next((cc for word, cc in self.CAPABILITIES.items() if word in name), (9, 0))

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        used = self.cards[handle][2]
        return [self._Proc(99999, int(used * GIB))] if used else []

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        return []
