"""DiffSynth's pipeline units replaced by caching ones, for the diffsynth backend (`install_caches`).

DiffSynth runs a list of `PipelineUnit`s before denoising, each turning inputs into tensors. Those whose
output depends on what a worker sees again and again, not on the job's noise, are replaced by a subclass
that remembers its output in the backend's caches (bounded, least recently used out):
  - prompt embeddings (`WanVideoUnit_PromptEmbedder`): each prompt runs with every seed, and the
    negative prompt with every job, so the text encoder runs once per prompt;
  - the VAE-encoded reference video (`WanVideoUnit_InputVideoEmbedder`), per reference: the encoding
    depends only on the clip and the tiling; the job's noise is still mixed in per job
    (`scheduler.add_noise` with the job's noise);
  - in i2v, per image, the VAE encoding of the first frame followed by empty frames and its CLIP
    embedding (`WanVideoUnit_ImageEmbedderVAE`, `..CLIP`);
  - in the conditioned tasks, the VAE encodings of each control video (with its reference image), pose
    video and Fun reference image (`per_input`), and the wav2vec2 features of each audio file
    (`CachedS2V`), per input; S2V's empty motion frames once per worker.
An input is known by the `cache_key` the backend hangs on it (its path, and the job's size where axes
sweep it).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any


def install_caches(backend, pipe) -> None:
    """Replace the pipeline's units that encode what a worker sees again and again (module docstring)
    by subclasses that remember their output in `backend`'s caches (kept on the backend, so `close`
    drops them and `job_info` reports their use)."""
    from diffsynth.pipelines import wan_video as wv
    prompt_limit = int(backend.options.get("prompt_cache", 64))
    reference_limit = int(backend.options.get("reference_cache", 4))
    backend.prompt_cache: OrderedDict[str, Any] = OrderedDict()
    backend.reference_latents: OrderedDict[tuple, Any] = OrderedDict()
    backend.input_encodings: OrderedDict[tuple, Any] = OrderedDict()  # conditioned tasks' inputs, encoded

    class CachedPromptEmbedder(wv.WanVideoUnit_PromptEmbedder):
        def process(self, pipe, **inputs) -> dict:
            prompt = inputs.get("prompt")
            cached = backend.prompt_cache.get(prompt) if isinstance(prompt, str) else None
            if cached is not None:
                backend.prompt_cache.move_to_end(prompt)
                return {"context": cached}
            out = super().process(pipe, **inputs)
            backend._job["prompt_encodings"] = backend._job.get("prompt_encodings", 0) + 1
            if isinstance(prompt, str):
                backend.prompt_cache[prompt] = out["context"]
                while len(backend.prompt_cache) > prompt_limit:
                    backend.prompt_cache.popitem(last=False)
            return out

    class CachedInputVideoEmbedder(wv.WanVideoUnit_InputVideoEmbedder):
        # The library encodes the clip, then mixes in the job's noise with `scheduler.add_noise`. The
        # encoding depends on the clip and the tiling only, so it is kept: a miss runs the library's
        # own code and keeps what it passes to add_noise; a hit only mixes in this job's noise.
        plain_only = ("vace_reference_image", "animate2_reference_image", "animate2_reference_video")

        def process(self, pipe, **inputs) -> dict:
            key = getattr(inputs.get("input_video"), "cache_key", None)
            if key is None or pipe.scheduler.training or any(inputs.get(k) is not None for k in self.plain_only):
                return super().process(pipe, **inputs)
            key = (key, inputs.get("tiled"), tuple(inputs.get("tile_size") or ()),
                   tuple(inputs.get("tile_stride") or ()), inputs.get("framewise_decoding"))
            latents = backend.reference_latents.get(key)
            backend._job["reference_encoding_reused"] = latents is not None
            if latents is not None:
                backend.reference_latents.move_to_end(key)
                return {"latents": pipe.scheduler.add_noise(latents, inputs["noise"],
                                                            timestep=pipe.scheduler.timesteps[0])}
            kept = {}
            add_noise = pipe.scheduler.add_noise

            def keep(original_samples, noise, timestep):
                kept["latents"] = original_samples
                return add_noise(original_samples, noise, timestep)
            started = time.perf_counter()
            own = vars(pipe.scheduler).get("add_noise")
            pipe.scheduler.add_noise = keep
            try:
                out = super().process(pipe, **inputs)
            finally:
                if own is None:
                    del pipe.scheduler.add_noise  # the class's method again
                else:
                    pipe.scheduler.add_noise = own
            backend._job["reference_encode_seconds"] = round(time.perf_counter() - started, 3)
            if "latents" in kept:
                backend.reference_latents[key] = kept["latents"]
                while len(backend.reference_latents) > reference_limit:
                    backend.reference_latents.popitem(last=False)
            return out

    def per_image(unit_class):
        """An i2v unit whose output depends on the first frame and the worker's fixed settings only
        (the VAE encoding of the frame followed by empty frames, its CLIP embedding): kept per image."""
        class CachedPerImage(unit_class):
            def process(self, pipe, **inputs) -> dict:
                image = inputs.get("input_image")
                key = getattr(image, "cache_key", None)
                if key is None or inputs.get("end_image") is not None:
                    return super().process(pipe, **inputs)
                key = (unit_class.__name__, key, repr(sorted((k, v) for k, v in inputs.items()
                                                             if k not in ("input_image", "end_image"))))
                out = backend.reference_latents.get(key)
                if out is not None:
                    backend.reference_latents.move_to_end(key)
                    backend._job["reference_encoding_reused"] = True
                    return dict(out)
                out = super().process(pipe, **inputs)
                if out:  # {} where the model has no use for it (no CLIP encoder, say)
                    backend._job["reference_encoding_reused"] = False
                    backend.reference_latents[key] = dict(out)
                    while len(backend.reference_latents) > 2 * reference_limit:
                        backend.reference_latents.popitem(last=False)
                return out
        return CachedPerImage

    def per_input(unit_class, keyed: tuple, unless: tuple = ()):
        """A conditioned task's unit whose output depends on the inputs named `keyed` (each read once per
        worker, carrying its cache_key) and the worker's fixed settings only: kept per input, so the
        jobs of one control video, pose video or reference image (prompts × seeds) encode it once.
        Runs uncached when an input in `unless` is given (its output then depends on the job)."""
        class CachedPerInput(unit_class):
            def process(self, pipe, **inputs) -> dict:
                given = [inputs.get(k) for k in keyed]
                keys = tuple(getattr(v, "cache_key", None) for v in given)
                if (all(v is None for v in given) or any(v is not None and k is None for v, k in zip(given, keys))
                        or any(inputs.get(k) is not None for k in unless)):
                    return super().process(pipe, **inputs)
                settings = sorted((k, v) for k, v in inputs.items()
                                  if k not in keyed and (v is None or isinstance(v, (str, int, float, tuple))))
                key = (unit_class.__name__, keys, repr(settings))
                encodings = backend._job.setdefault("input_encodings", {})
                out = backend.input_encodings.get(key)
                if out is not None:
                    backend.input_encodings.move_to_end(key)
                    encodings[unit_class.__name__] = "reused"
                    return dict(out)
                out = super().process(pipe, **inputs)
                encodings[unit_class.__name__] = "encoded"
                backend.input_encodings[key] = dict(out)
                while len(backend.input_encodings) > 4 * reference_limit:
                    backend.input_encodings.popitem(last=False)
                return out
        return CachedPerInput

    class CachedS2V(wv.WanVideoUnit_S2V):
        # The audio features (wav2vec2 over the whole clip) depend on the audio file and the length only;
        # the motion latents without a motion video are the VAE encoding of 73 empty frames of the
        # worker's size: both are kept instead of recomputed per job.
        def process_audio(self, pipe, input_audio, audio_sample_rate, num_frames, fps=16, audio_embeds=None,
                          return_all=False):
            key = getattr(input_audio, "cache_key", None)
            if key is None or audio_embeds is not None or return_all:
                return super().process_audio(pipe, input_audio, audio_sample_rate, num_frames, fps,
                                             audio_embeds, return_all)
            key = ("audio", key, audio_sample_rate, num_frames, fps)
            encodings = backend._job.setdefault("input_encodings", {})
            out = backend.input_encodings.get(key)
            encodings["audio_features"] = "encoded" if out is None else "reused"
            if out is None:
                out = backend.input_encodings[key] = super().process_audio(
                    pipe, input_audio, audio_sample_rate, num_frames, fps)
            return dict(out)

        def process_motion_latents(self, pipe, height, width, tiled, tile_size, tile_stride, motion_video=None):
            if motion_video is not None:
                return super().process_motion_latents(pipe, height, width, tiled, tile_size, tile_stride,
                                                      motion_video)
            key = ("empty motion", height, width, tiled, tuple(tile_size or ()), tuple(tile_stride or ()))
            if key not in backend.input_encodings:
                backend.input_encodings[key] = super().process_motion_latents(
                    pipe, height, width, tiled, tile_size, tile_stride)
            return dict(backend.input_encodings[key])

    replacements = {wv.WanVideoUnit_PromptEmbedder: CachedPromptEmbedder,
                    wv.WanVideoUnit_VACE: per_input(wv.WanVideoUnit_VACE,
                                                    ("vace_video", "vace_video_mask", "vace_reference_image")),
                    wv.WanVideoUnit_FunControl: per_input(wv.WanVideoUnit_FunControl, ("control_video",),
                                                          unless=("clip_feature", "y")),
                    wv.WanVideoUnit_FunReference: per_input(wv.WanVideoUnit_FunReference, ("reference_image",)),
                    wv.WanVideoUnit_AnimatePoseLatents: per_input(wv.WanVideoUnit_AnimatePoseLatents,
                                                                  ("animate_pose_video",)),
                    wv.WanVideoUnit_S2V: CachedS2V,
                    wv.WanVideoUnit_InputVideoEmbedder: CachedInputVideoEmbedder,
                    wv.WanVideoUnit_ImageEmbedderVAE: per_image(wv.WanVideoUnit_ImageEmbedderVAE),
                    wv.WanVideoUnit_ImageEmbedderCLIP: per_image(wv.WanVideoUnit_ImageEmbedderCLIP)}
    replaced = 0
    for index, unit in enumerate(pipe.units):
        if type(unit) in replacements:
            pipe.units[index] = replacements[type(unit)]()
            replaced += 1
    if replaced != len(replacements):
        raise RuntimeError("this diffsynth version's WanVideoPipeline lacks the units the caches replace")
