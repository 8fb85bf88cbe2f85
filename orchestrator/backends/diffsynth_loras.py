"""LoRAs on the diffsynth backend's pipeline (`PipelineLoras`): which LoRA goes into which DiT at which
strength, DiffSynth's own `load_lora` doing the work, and the worker's cache of LoRA files read.

Experts. DiffSynth's `WanVideoPipeline` runs `dit` while the timestep is at or above
`switch_DiT_boundary` × 1000 and `dit2` below it (wan_video.py's denoising loop): `dit` is Wan2.2 A14B's
high-noise expert, `dit2` the low-noise one. A LoRA goes into `dit` at `LoraConfig.strengths[0]` and into
`dit2` at `strengths[1]`; a model of one DiT (Wan2.1, TI2V-5B) has `dit` only, at the first value. A
strength of 0 loads nothing into that DiT (the same frames as without the LoRA, at no cost).

Two modes:
  hot    (the default) DiffSynth's hot-loading: each Linear layer of the DiT is one of DiffSynth's
         `AutoWrappedLinear`s, which keep a list of (lora_A × strength, lora_B) pairs and add
         `x @ A.T @ B.T` to their output; the base weights are never touched. Switching LoRAs
         (`apply` again) is `pipe.clear_lora()` and loading the new set: exact, a job after the switch
         gives the frames of a fresh worker. A DiT loaded without VRAM management has plain Linear
         layers: `pipe.enable_lora_hot_loading(dit)` (DiffSynth 2.x) wraps them, with every device and
         dtype the pipeline's, so the wrapped layer computes the same `F.linear` as before. It is done
         at the first LoRA, so a worker that never runs one keeps DiffSynth's plain layers.
  fused  when `speed.quantize` quantizes the DiT (`backend.FUSING_QUANTIZE`): DiffSynth's
         `GeneralLoRALoader.fuse_lora_to_base_model` adds strength × B @ A into the weights, once, before
         they are quantized. It cannot be undone: any change of LoRAs reloads the model
         (`backend.lora_change` says so), and `apply` refuses a second set.

DiffSynth's reading of a LoRA file (`GeneralLoRALoader.convert_state_dict`): keys in the Wan/ComfyUI
layout (`diffusion_model.blocks.N.self_attn.q.lora_down.weight`, `lora_up`, `alpha`) or DiffSynth's own
(`lora_A`/`lora_B`); `lora_down` is scaled by alpha / rank; other tensors, such as lightx2v's
`.diff` and `.diff_b` (full weight and bias differences of the norms and biases), are left out: the
number of tensors left out is in the record. A diffusers/PEFT-layout file is first renamed to the Wan
layout (`checkpoints.loras.wan_state_dict`).

The cache: a strength sweep applies the same file again and again, so the converted tensors (on the
CPU, in the pipeline's dtype) of the last `FILES_KEPT` files are kept, known by path, digest, size and
modification time (a file rewritten in place is read again).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import warnings
from collections import OrderedDict
from typing import TYPE_CHECKING

from ..checkpoints.loras import wan_state_dict

if TYPE_CHECKING:
    from ..manifest import LoraConfig

log = logging.getLogger(__name__)

FILES_KEPT = 4  # LoRA files whose converted tensors a worker keeps (a rank-64 14B LoRA: ~0.6 GB each)
EXPERTS = ("dit", "dit2")  # the pipeline's attributes: high-noise expert, low-noise expert


class PipelineLoras:
    """The LoRAs on one `WanVideoPipeline`'s DiT(s); `apply(loras)` makes `loras` the ones on."""

    def __init__(self, pipe, fused: bool, keep: int = FILES_KEPT):
        self.pipe = pipe
        self.mode = "fused" if fused else "hot"
        self.keep = keep
        self.files: OrderedDict[tuple, tuple[dict, int]] = OrderedDict()  # key → (lora_A/B tensors, left out)
        self.file_reads = 0
        self.applied: tuple = ()  # the LoRAs on now
        self._fused_once = False

    def apply(self, loras: "tuple[LoraConfig, ...]") -> list[dict]:
        """Make `loras` (manifest order) the LoRAs on; returns a record per LoRA: name, file, digest,
        strength, expert, mode, the layers patched per DiT, the tensors left out, the seconds it took."""
        if self.mode == "fused":
            if self._fused_once and tuple(loras) != self.applied:
                raise RuntimeError("these LoRAs are fused into weights that are then quantized; another set "
                                   "needs the model loaded again (backend.lora_change says reload)")
            if self._fused_once:
                return []
            self._fused_once = True
        elif tuple(loras) == self.applied:
            return []
        else:
            self.pipe.clear_lora(verbose=0)  # every hot-loaded pair; the base weights were never touched
        records = []
        for lora in loras:
            started = time.perf_counter()
            tensors, left_out = self._converted(lora)
            if self.mode == "hot":  # on the card once here, not at each layer call (hot-loaded layers move
                tensors = {k: v.to(self.pipe.device) for k, v in tensors.items()}  # what they hold per call)
            layers = {}
            for expert, strength in zip(EXPERTS, lora.strengths):
                dit = getattr(self.pipe, expert, None)
                if dit is None or strength == 0:  # one DiT: the first strength only; 0: nothing to add
                    continue
                layers[expert] = self._load(expert, tensors, strength)
            for expert, count in layers.items():
                if not count:  # (the pre-start checks refuse such a file; a file changed since would get here)
                    log.warning("LoRA %s (%s) patches no layer of the pipeline's %s: its keys name none of them",
                                lora.name, lora.path, expert)
            records.append({"name": lora.name, "file": lora.path, "digest": lora.digest,
                            "strength": list(lora.strength) if isinstance(lora.strength, tuple) else lora.strength,
                            "expert": lora.expert, "mode": self.mode, "layers": layers, "left_out": left_out,
                            "seconds": round(time.perf_counter() - started, 4)})
        self.applied = tuple(loras)
        return records

    def _load(self, expert: str, tensors: dict, strength: float) -> int:
        """`tensors` into the DiT `expert` at `strength`, by DiffSynth's `load_lora`: layers patched."""
        pipe = self.pipe
        if self.mode == "hot":
            dit = getattr(pipe, expert)
            if not getattr(dit, "vram_management_enabled", False):
                setattr(pipe, expert, pipe.enable_lora_hot_loading(dit))
            pipe.load_lora(getattr(pipe, expert), state_dict=tensors, alpha=float(strength), hotload=True,
                           verbose=0)
        else:
            with contextlib.redirect_stdout(io.StringIO()):  # the fuse prints its count unconditionally
                pipe.load_lora(getattr(pipe, expert), state_dict=tensors, alpha=float(strength), hotload=False,
                               verbose=0)
        names = {name for name, _ in getattr(pipe, expert).named_modules()}
        return sum(1 for key in tensors if key.endswith(".lora_A.weight")
                   and key[:-len(".lora_A.weight")] in names)

    def _converted(self, lora: "LoraConfig") -> tuple[dict, int]:
        """The LoRA's tensors as DiffSynth applies them (`name.lora_A.weight`, already × alpha / rank, and
        `name.lora_B.weight`, CPU, pipeline dtype) and how many of the file's tensors DiffSynth leaves
        out; from the cache when the file was read lately."""
        stat = os.stat(lora.path)
        key = (lora.path, lora.digest, stat.st_size, stat.st_mtime_ns)
        if key in self.files:
            self.files.move_to_end(key)
            return self.files[key]
        raw = wan_state_dict(lora.path, dtype=self.pipe.torch_dtype)  # either layout, in Wan's naming
        loader = self.pipe.lora_loader(torch_dtype=self.pipe.torch_dtype, device="cpu")
        with warnings.catch_warnings():  # "Alpha detected ... converted to weight * alpha / rank": as meant
            warnings.simplefilter("ignore")
            tensors = loader.convert_state_dict(raw)
        used = {key for entry in loader.get_name_dict(raw).values() for key in entry if key is not None}
        self.file_reads += 1
        self.files[key] = (tensors, len(raw) - len(used))
        while len(self.files) > self.keep:
            self.files.popitem(last=False)
        return self.files[key]
