"""The inputs of a diffusers job as the Wan pipelines take them, task by task: the reference and
`Job.inputs` read ahead and fitted by media.py's rules (through the worker's ReferenceCache, at the
job's size, length and rate), and what the pipeline would encode again for every job of a reference
(v2v's VAE latents, i2v's CLIP embedding, VACE's control video, Animate's pose and image encodings)
encoded once and kept by the backend (`_remember`).
"""
from __future__ import annotations

# How a worker reads ahead each role of Job.inputs (the face video has its own cache, at its size)
INPUT_KINDS = {"reference_image": "image", "pose_video": "video"}


def prefetch(backend, job) -> None:
    """The backend's `prepare`: start reading `job`'s reference and inputs (the face video at its own size)."""
    if job.reference:
        g = backend.generation_for(job)
        backend.reference_cache(g).prefetch(job.reference, kind="image" if backend.model.task in ("i2v", "animate")
                                         else "video")
    for role, value in (getattr(job, "inputs", None) or {}).items():
        g = backend.generation_for(job)
        if role == "face_video":
            backend.reference_cache(g, square=backend.face_size).prefetch(value, "video")
        elif role in INPUT_KINDS:
            backend.reference_cache(g).prefetch(value, INPUT_KINDS[role])


def task_inputs(backend, job, kwargs: dict, g, generator) -> None:
    """The pipeline arguments of `job`'s task on `backend` (at the job's generation settings `g`): v2v's
    starting latents (drawn from the job's `generator`), the frame count, VACE's and Animate's inputs,
    i2v's first frame; each reference's encodings kept for the jobs that follow (`backend._remember`)."""
    task, pipe = backend.model.task, backend.pipe
    if task == "v2v":
        kwargs.update(latents=_video_latents(backend, job, generator), strength=g.denoising_strength)
    elif task == "animate":
        kwargs["segment_frame_length"] = g.num_frames  # one segment: num_frames of pose make the video
    else:
        kwargs["num_frames"] = g.num_frames
    if task in ("vace", "animate"):
        _conditioned_inputs(backend, job, kwargs, g)
    if task == "i2v":
        from PIL import Image
        image = Image.fromarray(backend.reference_cache(g).image(job.reference))
        kwargs["image"] = image
        if getattr(pipe, "image_encoder", None) is not None:
            # The pipeline takes `image_embeds` only without `image`, which it needs for the
            # VAE condition, so the CLIP embedding is remembered at its own call instead.
            original = type(pipe).encode_image
            key = f"image:{job.reference}:{g.width}x{g.height}"
            pipe.encode_image = lambda image, device=None: backend._remember(
                key, lambda: original(pipe, image, device))


def _video_latents(backend, job, generator):
    """The v2v starting latents: the reference encoded once per video, noised per job.

    The same calls, in the same order, as `WanVideoToVideoPipeline` makes when given `video`
    (its timesteps, then `add_noise` at the first kept timestep), so the frames are identical;
    only the VAE encoding is not repeated for the next prompt or seed of the video.
    """
    from diffusers.pipelines.wan.pipeline_wan_video2video import retrieve_latents, retrieve_timesteps
    from diffusers.utils.torch_utils import randn_tensor
    torch, pipe, g = backend.torch, backend.pipe, backend.generation_for(job)

    def encode():
        from PIL import Image
        frames = [Image.fromarray(f) for f in backend.reference_cache(g).video(job.reference)]
        video = pipe.video_processor.preprocess_video(frames, height=g.height, width=g.width)
        video = video.to(backend.device, dtype=torch.float32)
        with torch.no_grad():
            latents = retrieve_latents(pipe.vae.encode(video.to(pipe.vae.dtype)), sample_mode="argmax")
        z = pipe.vae.config.z_dim
        mean = torch.tensor(pipe.vae.config.latents_mean).view(1, z, 1, 1, 1).to(backend.device, torch.float32)
        inverse_std = 1.0 / torch.tensor(pipe.vae.config.latents_std).view(1, z, 1, 1, 1).to(
            backend.device, torch.float32)
        return (latents.to(torch.float32) - mean) * inverse_std

    start = backend._remember(f"video:{job.reference}:{g.width}x{g.height}x{g.num_frames}@{g.fps}", encode)
    timesteps, steps = retrieve_timesteps(pipe.scheduler, g.steps, backend.device, None)
    timesteps, steps = pipe.get_timesteps(steps, timesteps, g.denoising_strength, backend.device)
    noise = randn_tensor(start.shape, generator=generator, device=backend.device, dtype=torch.float32)
    if hasattr(pipe.scheduler, "add_noise"):
        return pipe.scheduler.add_noise(start, noise, timesteps[:1])
    return pipe.scheduler.scale_noise(start, timesteps[:1], noise)


def _conditioned_inputs(backend, job, kwargs: dict, g) -> None:
    """VACE's and Animate's pipeline arguments, from the job's reference and `inputs` (read by
    orchestrator.media's rules through the worker's ReferenceCache at the job's size, length and
    rate `g`; what is kept per file is kept per that shape too)."""
    from PIL import Image
    inputs = dict(getattr(job, "inputs", None) or {})
    references, shape = backend.reference_cache(g), f"{g.width}x{g.height}x{g.num_frames}@{g.fps}"

    def frames(path, cache=None):
        return [Image.fromarray(f) for f in (cache or references).video(path)]

    def needs(role):
        if not inputs.get(role):
            raise ValueError(f"task {backend.model.task} needs the job's `{role}` input, which {job.key} lacks")
        return inputs[role]
    if backend.model.task == "vace":
        kwargs["video"] = frames(job.reference)
        if inputs.get("reference_image"):
            kwargs["reference_images"] = [Image.fromarray(references.image(inputs["reference_image"]))]
        # The control video's VAE encoding (with its reference image) depends on those files only
        # (argmax latents, no noise): kept per (video, image), so their prompts × seeds encode it once.
        original = type(backend.pipe).prepare_video_latents
        key = f"vace:{job.reference}:{inputs.get('reference_image')}:{shape}"
        backend.pipe.prepare_video_latents = lambda *a, **k: backend._remember(
            key, lambda: original(backend.pipe, *a, **k))
    else:
        kwargs["image"] = Image.fromarray(references.image(job.reference))
        kwargs["pose_video"] = frames(needs("pose_video"))
        kwargs["face_video"] = frames(needs("face_video"), backend.reference_cache(g, square=backend.face_size))
        kwargs["mode"] = "animate"
        # The pose video's and the image's VAE latents (argmax, no noise) and the image's CLIP embedding
        # depend on those files only: kept per file, so their prompts × seeds encode each once. (The
        # face video runs through the transformer's own motion encoder at every step.)
        pipe, pipeline_class = backend.pipe, type(backend.pipe)
        for method, key in (("prepare_pose_latents", f"pose:{inputs['pose_video']}:{shape}"),
                            ("prepare_reference_image_latents", f"animate-image:{job.reference}:{shape}"),
                            ("encode_image", f"clip:{job.reference}:{shape}")):
            original = getattr(pipeline_class, method)
            setattr(pipe, method, lambda *a, _original=original, _key=key, **k: backend._remember(
                _key, lambda: _original(pipe, *a, **k)))
