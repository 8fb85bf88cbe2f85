"""Step caches on the diffusers backend (`speed.cache`): diffusers' own hooks (`transformer.enable_cache`)
set up per job on each transformer (both of Wan2.2's experts, each with the steps it runs), MagCache's
ratios calibrated on the user's model, and the count of what each job computed and reused.

  first_block   FirstBlockCacheConfig(threshold)
  taylorseer    TaylorSeerCacheConfig(cache_interval, disable_cache_before_step, max_order, use_lite_mode):
                lite mode, the output projection predicted and the blocks skipped. (Its default mode
                caches every attention layer's output with its Taylor factors: 2 × (order + 1) activations
                per layer per branch, tens of GB at 14B and 480p; and its default patterns end in `attn`,
                which none of Wan's `attn1`/`attn2` matches: nothing would be cached.)
  magcache      MagCacheConfig(threshold, max_skip_steps, retention_ratio, mag_ratios): the ratios come from
                one calibration run (`calibrate=True`, nothing skipped) of the job's own settings, stored
                under `.sweep/compile_cache/magcache/` per model, expert, step count and shift
  faster_cache  FasterCacheConfig(spatial_attention_block_skip_range, is_guidance_distilled=True)
  pab           PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range)

FasterCache and PAB keep one state per attention layer, not one per cache context: Wan's pipeline runs
the conditional and unconditional passes as two calls, so with guidance their caches would hand one
branch's attention to the other (FasterCache's own guidance path expects both in one batch and fails
with an IndexError). They run where guidance is off (`diffusers_checks` refuses them otherwise).

Counting: a forward hook on each block's feed-forward (it runs only when the block's own forward does)
and on its self-attention's query projection (only when the attention is computed) of each transformer,
read per call of the transformer: a call whose last block did not run reused the step.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from ..manifest.model import parse_cache

log = logging.getLogger(__name__)

EXPERTS = ("transformer", "transformer_2")  # Wan2.2's high-noise expert, then its low-noise one


def steps_per_expert(pipe, steps: int, steps_run: int) -> dict[str, int]:
    """How many of the job's last `steps_run` of `steps` timesteps (v2v runs the last ones) each transformer
    denoises, from the job's own schedule (a copy of the pipeline's scheduler set to `steps`, its shift
    included): on Wan2.2 the high-noise
    expert takes the timesteps at or above the boundary (`boundary_ratio` × the training timesteps, as the
    pipeline's loop decides), the low-noise one the rest; a model of one transformer, all of them."""
    boundary_ratio = getattr(pipe.config, "boundary_ratio", None)
    if getattr(pipe, "transformer_2", None) is None or boundary_ratio is None:
        return {"transformer": steps_run}
    import copy
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    boundary = boundary_ratio * scheduler.config.num_train_timesteps
    timesteps = [float(t) for t in scheduler.timesteps][-steps_run:]
    high = sum(1 for t in timesteps if t >= boundary)
    return {"transformer": high, "transformer_2": steps_run - high}


def cache_config(method: str, options: dict, steps: int, current_timestep, mag_ratios=None):
    """The diffusers config of one method for a transformer that runs `steps` steps."""
    import diffusers
    if method == "first_block":
        return diffusers.FirstBlockCacheConfig(threshold=options["threshold"])
    if method == "taylorseer":
        return diffusers.TaylorSeerCacheConfig(cache_interval=options["interval"],
                                               disable_cache_before_step=options["warmup"],
                                               max_order=options["order"], use_lite_mode=True)
    if method == "magcache":
        if mag_ratios is None:
            return diffusers.MagCacheConfig(calibrate=True, num_inference_steps=steps + 1)  # (+1: no reset)
        return diffusers.MagCacheConfig(threshold=options["threshold"], max_skip_steps=options["max_skip"],
                                        retention_ratio=options["retention"], num_inference_steps=steps,
                                        mag_ratios=list(mag_ratios))
    if method == "faster_cache":
        return diffusers.FasterCacheConfig(spatial_attention_block_skip_range=options["skip"],
                                           current_timestep_callback=current_timestep, is_guidance_distilled=True)
    if method == "pab":
        return diffusers.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=options["skip"],
                                                         current_timestep_callback=current_timestep)
    raise ValueError(f"the diffusers backend has no step cache {method!r}")


class StepCaches:
    """The step cache of the jobs of one loaded pipeline: `use` sets it up for a job (again only when the
    setting or an expert's step count changed), `counts` says what the last job computed and reused."""

    def __init__(self, pipe, model_identity: dict):
        self.pipe = pipe
        self.model_identity = model_identity
        self.active: tuple | None = None  # (cache text, steps per expert) now set up
        self.calibrations: dict[str, list[float]] = {}
        self._calls: dict[str, list[list[int]]] = {}  # expert -> per call [blocks run, attentions computed]
        self._handles = []

    def _count(self, on: bool) -> None:
        """The counting hooks (a call's blocks run and self-attentions computed, per expert), installed only while
        a cache is set up: under torch.compile a hook's Python counters are guarded values, so the blocks' graph
        would compile again at every call (measured on an H100: the recompile limit hit at the first forward of
        a compiled 14B). A cache and compile never go together (refused), so the counters never meet compile."""
        if on == bool(self._handles):
            return
        if not on:
            self.close()
            self._calls = {}
            return
        for name in EXPERTS:
            transformer = getattr(self.pipe, name, None)
            if transformer is None:
                continue
            self._calls[name] = []
            self._handles.append(transformer.register_forward_pre_hook(self._call_started(name)))
            for block in transformer.blocks:
                self._handles.append(block.ffn.register_forward_hook(self._tally(name, 0)))
                self._handles.append(block.attn1.to_q.register_forward_hook(self._tally(name, 1)))

    def _call_started(self, name):
        def hook(module, args):
            self._calls[name].append([0, 0])
        return hook

    def _tally(self, name, index):
        def hook(module, args, output):
            calls = self._calls[name]
            if calls:
                calls[-1][index] += 1
        return hook

    def use(self, cache: str, steps: int, steps_run: int, calibration_dir: Path | None, run_uncached=None) -> dict:
        """Set up `cache` (SpeedConfig.cache) for a job of `steps` steps of which it runs `steps_run`; MagCache without stored ratios
        first calibrates through `run_uncached()` (the job itself, nothing skipped). Returns what was done."""
        try:
            return self._use(cache, steps, steps_run, calibration_dir, run_uncached)
        finally:
            for calls in self._calls.values():
                calls.clear()  # (a calibration run's calls are not the job's)

    def _use(self, cache: str, steps: int, steps_run: int, calibration_dir: Path | None, run_uncached) -> dict:
        method, options = parse_cache(cache)
        steps = steps_per_expert(self.pipe, steps, steps_run) if method != "none" else {}
        wanted = (cache, tuple(sorted(steps.items())))
        facts: dict = {"method": method, "steps_per_expert": steps} if method != "none" else {}
        if wanted == self.active:
            return facts
        self.disable()
        self._count(method != "none")
        if method == "none":
            self.active = wanted
            return facts
        ratios = {}
        if method == "magcache":
            ratios, facts["calibration"] = self._mag_ratios(steps, calibration_dir, run_uncached)
        for name, count in steps.items():
            transformer = getattr(self.pipe, name)
            if count > 0:
                transformer.enable_cache(cache_config(method, options, count, lambda: self.pipe.current_timestep,
                                                      ratios.get(name)))
        self.active = wanted
        return facts

    def disable(self) -> None:
        for name in EXPERTS:
            transformer = getattr(self.pipe, name, None)
            if transformer is not None and transformer.is_cache_enabled:
                transformer.disable_cache()
        self.active = None

    def counts(self) -> dict:
        """Per transformer: its calls (steps × guidance passes), the calls that reused the step (the last
        block did not run), blocks run and self-attentions computed out of calls × blocks."""
        out = {}
        for name, calls in self._calls.items():
            if not calls:
                continue
            blocks = len(getattr(self.pipe, name).blocks)
            out[name] = {"calls": len(calls), "calls_reused": sum(1 for run, _ in calls if run < blocks),
                         "blocks_computed": sum(run for run, _ in calls),
                         "attention_computed": sum(attention for _, attention in calls),
                         "blocks_total": len(calls) * blocks}
        return out

    # ---------------------------------------------------------------------------------------------
    # MagCache's ratios

    def calibration_file(self, calibration_dir: Path, expert: str, steps: int) -> Path:
        shift = getattr(self.pipe.scheduler.config, "flow_shift", None) or getattr(self.pipe.scheduler.config,
                                                                                    "shift", None)
        key = json.dumps({"model": self.model_identity, "expert": expert, "steps": steps, "shift": shift},
                         sort_keys=True, default=str)
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return calibration_dir / f"{expert}-{steps}steps-{digest}.json"

    def _mag_ratios(self, steps: dict[str, int], calibration_dir: Path | None, run_uncached) -> tuple[dict, str]:
        files = {name: self.calibration_file(calibration_dir, name, count) if calibration_dir else None
                 for name, count in steps.items() if count > 0}
        ratios = {}
        for name, file in files.items():
            if file is not None and file.is_file():
                ratios[name] = json.loads(file.read_text())["mag_ratios"]
            elif name in self.calibrations.get(str(steps), {}):
                ratios[name] = self.calibrations[str(steps)][name]
        if len(ratios) == len(files):
            return ratios, "stored"
        if run_uncached is None:
            raise RuntimeError("speed.cache magcache has no calibration for this model and step count")
        log.info("magcache: calibrating on this model (%s steps per expert): one run of the job, nothing skipped",
                 steps)
        recorded: dict[str, dict] = {}
        for name in files:
            transformer = getattr(self.pipe, name)
            transformer.enable_cache(cache_config("magcache", {}, steps[name], None))
            recorded[name] = _keep_calibration(transformer)
        try:
            run_uncached()
        finally:
            for name in files:
                getattr(self.pipe, name).disable_cache()
        for name, kept in recorded.items():
            found = kept.get("cond") or next(iter(kept.values()), None)
            if not found:
                raise RuntimeError(f"magcache calibration of {name} recorded nothing")
            ratios[name] = found[: steps[name]]
        self.calibrations[str(steps)] = dict(ratios)
        for name, file in files.items():
            if file is not None:
                file.parent.mkdir(parents=True, exist_ok=True)
                file.write_text(json.dumps({"mag_ratios": ratios[name], "steps": steps[name], "expert": name}))
        return ratios, "calibrated"

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _keep_calibration(transformer) -> dict[str, list[float]]:
    """MagCache's calibration records its ratios in its hooks' state, per cache context ("cond", "uncond"),
    and the pipeline resets that state at the end of its call: the state manager's reset is wrapped to keep
    a copy first. Returns the dict the ratios land in (context name -> ratios)."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.mag_cache import _MAG_CACHE_LEADER_BLOCK_HOOK
    kept: dict[str, list[float]] = {}
    for block in transformer.blocks:
        registry = getattr(block, "_diffusers_hook", None)
        hook = registry.get_hook(_MAG_CACHE_LEADER_BLOCK_HOOK) if isinstance(registry, HookRegistry) else None
        if hook is None:
            continue
        manager = hook.state_manager
        reset = manager.reset

        def keep_then_reset(*args, **kwargs):
            for context, state in manager._state_cache.items():
                if state.calibration_ratios:
                    kept[context] = [float(r) for r in state.calibration_ratios]
            return reset(*args, **kwargs)
        manager.reset = keep_then_reset
        return kept
    raise RuntimeError("magcache calibration: diffusers set up no leader hook")
