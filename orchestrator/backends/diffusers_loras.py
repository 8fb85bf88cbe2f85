"""LoRAs on a loaded diffusers Wan pipeline, through diffusers' own LoRA API (PEFT adapters).

`LoraAdapters` owns the adapters of one pipeline: which LoRA files are loaded into which denoiser
(`transformer`, and on Wan2.2's two-expert checkpoints the low-noise expert `transformer_2`), which of
them are active and at what strength. `use(loras)` makes a set of `LoraConfig`s the active one, each
file read once (`pipe.load_lora_weights`, which takes both the diffusers/PEFT key layout and the
original Wan/lightx2v one through its converter), each expert given its own scale
(`LoraConfig.strengths`) with the transformer's own `set_adapters`. `fuse(loras)` merges them into the
base weights and drops the adapters: the form quantized weights need (`backend.FUSING_QUANTIZE`), done
before the speed settings quantize.

What a switch guarantees: the frames of the next job are exactly those of a fresh pipeline loaded with
the new set. An adapter that is off, or at strength 0 for an expert, is not in that expert's active
set, so its layers return their base layer's output unchanged (not `base + 0 * lora`); an expert with
no active adapter has its LoRA layers disabled (`disable_lora`).
"""
from __future__ import annotations

import hashlib
import logging
import re
import time
import warnings
from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..manifest import LoraConfig

log = logging.getLogger(__name__)

# The pipeline's denoisers in the order `LoraConfig.strengths` gives their scales: the high-noise expert
# (Wan2.1's and TI2V's only denoiser), then Wan2.2 A14B's low-noise expert.
DENOISERS = ("transformer", "transformer_2")

# LoRA files whose adapters stay loaded while unused. Jobs come ordered so that a worker switches as
# few times as possible, so a file left behind rarely comes back soon; each one kept holds its rank's
# worth of weights on the card (a rank-64 LoRA of a 14B expert is about 0.6 GB in bf16, per expert).
# A few cover the sweeps that alternate between sets (`loras: [[], [a], [a, b]]`) without a file read
# at every switch, and bound the memory a sweep over many checkpoint files would otherwise pile up.
KEEP_UNUSED_FILES = 3


def adapter_name(lora: "LoraConfig") -> str:
    """The adapter's name: the LoRA's own (made a safe module name) and a short hash of its file's path
    and content digest, so another file under the same LoRA name is another adapter."""
    key = hashlib.sha256(f"{lora.path}\0{lora.digest}".encode()).hexdigest()[:8]
    return f"{re.sub(r'[^0-9A-Za-z_]', '_', lora.name)}_{key}"


def lora_facts(lora: "LoraConfig", mode: str, seconds: float) -> dict:
    """What the sidecar records of one applied LoRA."""
    strength = list(lora.strength) if isinstance(lora.strength, tuple) else lora.strength
    return {"name": lora.name, "file": lora.path, "digest": lora.digest, "strength": strength,
            "expert": lora.expert, "mode": mode, "seconds": round(seconds, 3)}


class LoraAdapters:
    """The LoRA adapters of one pipeline and the set that is active (see the module's docstring)."""

    def __init__(self, pipe, keep_unused_files: int = KEEP_UNUSED_FILES, scales_as_tensors: bool = False):
        self.pipe = pipe
        # Under torch.compile (`speed.compile`): each LoRA layer's scale held in a 0-dim tensor whose value
        # a switch fills in, as PEFT's compiled hotswap does. A Python float is a constant of the compiled
        # graph, so each new strength would compile the blocks again (measured: one graph per value).
        self.scales_as_tensors = scales_as_tensors
        self._scale_tensors: dict[tuple[int, str], object] = {}
        self.denoisers = [name for name in DENOISERS if getattr(pipe, name, None) is not None]
        # adapter name -> the denoisers it is loaded into; least recently used first
        self.loaded: OrderedDict[str, set[str]] = OrderedDict()
        self.keep_unused_files = keep_unused_files
        self.fused = False
        self._active: dict[str, dict[str, float]] = {denoiser: {} for denoiser in self.denoisers}

    def scales(self, lora: "LoraConfig") -> dict[str, float]:
        """Denoiser -> this LoRA's scale in it (a one-denoiser model takes only the high expert's)."""
        return dict(zip(self.denoisers, lora.strengths))

    def active(self) -> dict[str, dict[str, float]]:
        """Denoiser -> {adapter: scale} of the adapters it runs now (what `set_adapters` was given)."""
        return {denoiser: dict(scales) for denoiser, scales in self._active.items()}

    def use(self, loras: "tuple[LoraConfig, ...]") -> list[dict]:
        """Make `loras` the active set: files not loaded yet are read (into the experts where their scale
        is not 0), the others only get their scales. Returns what was applied, per LoRA."""
        if self.fused:
            raise RuntimeError("the LoRAs are fused into this pipeline's weights: load the model again to change them")
        facts, active = [], {denoiser: {} for denoiser in self.denoisers}
        for lora in loras:
            name, started = adapter_name(lora), time.monotonic()
            for denoiser, scale in self.scales(lora).items():
                if scale == 0.0:
                    continue  # not in this expert's active set: its layers give the base output exactly
                if denoiser not in self.loaded.get(name, ()):
                    self._load(lora, name, denoiser)
                active[denoiser][name] = scale
            if name in self.loaded:
                self.loaded.move_to_end(name)
            facts.append(lora_facts(lora, "adapter", time.monotonic() - started))
        for denoiser, scales in active.items():
            self._activate(denoiser, scales)
        self._active = active
        self._forget_unused({adapter_name(lora) for lora in loras})
        return facts

    def fuse(self, loras: "tuple[LoraConfig, ...]") -> list[dict]:
        """Merge `loras` at their strengths into each expert's base weights, then remove the adapters:
        the weights are then ordinary ones, for the quantization that follows. Any later change of LoRAs
        loads the model again (`backend.lora_change`)."""
        started = time.monotonic()
        facts = self.use(loras)
        for denoiser, scales in self._active.items():
            if scales:
                self.pipe.fuse_lora(components=[denoiser], lora_scale=1.0, adapter_names=list(scales))
        if self.loaded:
            self.pipe.unload_lora_weights()  # the merged weights stay; the LoRA layers go
        self.loaded.clear()
        self.fused = True
        log.debug("fused %d LoRAs in %.2f s", len(loras), time.monotonic() - started)
        return [dict(fact, mode="fused") for fact in facts]

    def _load(self, lora: "LoraConfig", name: str, denoiser: str) -> None:
        started = time.monotonic()
        # The file is read once per expert it goes into (Wan2.2 "both": twice, at the first use only).
        with warnings.catch_warnings():  # a second adapter in one model is what we mean: PEFT warns of it
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            self.pipe.load_lora_weights(lora.path, adapter_name=name,
                                        load_into_transformer_2=denoiser == "transformer_2")
        self.loaded.setdefault(name, set()).add(denoiser)
        log.debug("loaded LoRA %s (%s) into %s in %.2f s", lora.name, lora.path, denoiser, time.monotonic() - started)

    def _activate(self, denoiser: str, scales: dict[str, float]) -> None:
        model = getattr(self.pipe, denoiser)
        if not getattr(model, "peft_config", None):
            return  # no adapter was ever loaded into it: nothing to switch
        if scales:
            model.enable_lora()  # (undo an earlier disable_lora: set_adapters does not)
            model.set_adapters(list(scales), list(scales.values()))
            if self.scales_as_tensors:
                self._scales_in_tensors(model)
        else:
            model.disable_lora()

    def _scales_in_tensors(self, model) -> None:
        """Each LoRA layer's scales (floats, as `set_adapters` writes them) moved into tensors kept from one
        switch to the next, so the compiled graph reads them as inputs (see `scales_as_tensors`)."""
        import torch
        for module in model.modules():
            scaling = getattr(module, "scaling", None)
            if not isinstance(scaling, dict) or not hasattr(module, "get_base_layer"):
                continue
            for key, value in scaling.items():
                if not isinstance(value, float):
                    continue
                held = self._scale_tensors.get((id(module), key))
                if held is None:
                    held = torch.tensor(value, device=module.get_base_layer().weight.device)
                    self._scale_tensors[(id(module), key)] = held
                else:
                    held.fill_(value)
                scaling[key] = held

    def _forget_unused(self, wanted: set[str]) -> None:
        """Delete the adapters of the least recently used files beyond `keep_unused_files`."""
        unused = [name for name in self.loaded if name not in wanted]
        for name in unused[:max(0, len(unused) - self.keep_unused_files)]:
            for denoiser in self.loaded.pop(name):
                getattr(self.pipe, denoiser).delete_adapters(name)
            self._scale_tensors = {key: held for key, held in self._scale_tensors.items() if key[1] != name}
            log.debug("deleted LoRA adapter %s", name)
