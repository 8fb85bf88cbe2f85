"""Wan2.2's `generate.py` as the command backend's preset: what its tasks and configs say
(sizes, attention heads, fps, the checkpoint's files, guidance), which task a manifest runs, and the
checks of a manifest against them."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..checkpoints.releases import download_fix

PRESET = "wan2.2-generate"
CHECKPOINT_LAYOUT = "wan"  # generate.py reads the original release folder (--ckpt_dir)


@dataclass(frozen=True)
class WanTask:
    """What Wan2.2's generate.py and its configs (wan/configs/*.py) say about one --task."""
    manifest_tasks: tuple[str, ...]  # model.task values it serves
    sizes: tuple[str, ...]  # SUPPORTED_SIZES, "width*height"
    heads: int  # num_heads: Ulysses needs it divisible by the card count
    fps: int  # sample_fps: generate.py writes the mp4 at this rate
    files: tuple[str, ...]  # what the checkpoint folder must hold
    params: str
    guidance: tuple[float, float]  # sample_guide_scale as [high-noise, low-noise] (Wan lists low first)


_A14B_FILES = ("models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth", "high_noise_model", "low_noise_model")
_14B_SIZES = ("720*1280", "1280*720", "480*832", "832*480")
WAN_TASKS = {
    "t2v-A14B": WanTask(("t2v",), _14B_SIZES, 40, 16, _A14B_FILES, "14B", (4.0, 3.0)),
    "i2v-A14B": WanTask(("i2v",), _14B_SIZES, 40, 16, _A14B_FILES, "14B", (3.5, 3.5)),
    "ti2v-5B": WanTask(("t2v", "i2v"), ("704*1280", "1280*704"), 24, 24,
                       ("models_t5_umt5-xxl-enc-bf16.pth", "Wan2.2_VAE.pth"), "5B", (5.0, 5.0)),
    # Speech to video: --image and --audio; its wav2vec2 audio encoder sits in the checkpoint folder.
    "s2v-14B": WanTask(("s2v",), _14B_SIZES + ("1024*704", "704*1024", "704*1280", "1280*704"), 40, 16,
                       ("models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth", "wav2vec2-large-xlsr-53-english"),
                       "14B", (4.5, 4.5)),
    # Animate: --src_root_path, a folder of src_pose.mp4, src_face.mp4 and src_ref.png (its preprocessing's
    # output); written at 30 fps, sized like src_ref.png.
    "animate-14B": WanTask(("animate",), ("720*1280", "1280*720"), 40, 30,
                           ("models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth",
                            "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"), "14B", (1.0, 1.0)),
}
# model.task -> generate.py's --task where the checkpoint folder's name does not say
DEFAULT_WAN_TASK = {"t2v": "t2v-A14B", "i2v": "i2v-A14B", "s2v": "s2v-14B", "animate": "animate-14B"}
REFERT_NUMS = (1, 5)  # animate-14B's frames of temporal guidance between its clips (it asserts one of these)
SOLVERS = ("unipc", "dpm++")
MAX_STEPS = 1000  # the schedulers' num_train_timesteps: more steps than timesteps do not exist


def wan_task_of(model) -> tuple[str, str]:
    """generate.py's --task for this model, and the manifest key it comes from."""
    chosen = model.options.get("wan_task")
    if chosen:
        return str(chosen), "model.options.wan_task"
    name = Path(str(model.path or "")).name.lower()
    for task in ("ti2v-5B", "i2v-A14B", "t2v-A14B", "s2v-14B", "animate-14B"):  # ti2v before i2v: one contains the other
        if task.lower() in name:
            return task, "model.path"
    return DEFAULT_WAN_TASK.get(model.task, "t2v-A14B"), "model.task"


def check_preset(manifest, cards: int, problem) -> None:
    """The generate.py preset's checks: its script, task, checkpoint folder, and what generate.py
    takes of the generation settings; `problem(key, message, fix)` records each."""
    model, g = manifest.model, manifest.generation
    options = model.options
    if options.get("preset", PRESET) != PRESET:
        problem("model.options.preset", f"unknown preset {options['preset']!r}", f"use `{PRESET}`")
        return
    script = options.get("script")
    if not script:
        problem("model.options", "the command backend needs `script: path/to/Wan2.2/generate.py` "
                "(the generate.py preset) or `command: [...]` (a template)",
                "add `script:` with the path of Wan2.2's generate.py")
    elif not os.path.isfile(script):
        problem("model.options.script", f"script `{script}` does not exist",
                "clone https://github.com/Wan-Video/Wan2.2 and point `script` at its generate.py "
                "(relative paths start at the manifest's folder)")
    task_name, task_key = wan_task_of(model)
    if model.task in ("v2v", "vace", "control") and "wan_task" not in options:
        problem("model.task", f"generate.py has no {'plain video-to-video' if model.task == 'v2v' else model.task} "
                "task (it has t2v, i2v, ti2v, s2v and animate)",
                "use task i2v, t2v, s2v or animate, a `command:` template for another program, or backend diffsynth")
        return
    task = WAN_TASKS.get(task_name)
    if task is None:
        problem(task_key, f"wan_task {task_name!r} is not a generate.py task",
                f"use one of: {', '.join(WAN_TASKS)}")
        return
    if model.task not in task.manifest_tasks:
        problem("model.task", f"model.task {model.task} does not match generate.py's --task {task_name}",
                f"use task: {' or '.join(task.manifest_tasks)}, or set model.options.wan_task")
    check_checkpoint(model.path, manifest.path.parent, task_name, task, problem)

    refert = options.get("refert_num", 1)
    if "refert_num" in options and task_name != "animate-14B":
        problem("model.options.refert_num", "refert_num is animate-14B's setting", "remove it")
    elif refert not in REFERT_NUMS:
        problem("model.options.refert_num", f"refert_num is {refert!r}",
                f"use {' or '.join(map(str, REFERT_NUMS))} (animate-14B's frames of guidance between clips)")
    size = f"{g.width}*{g.height}"
    if size not in task.sizes:
        problem("generation.width", f"{g.width}x{g.height} is not a size generate.py supports for "
                f"{task_name}", "use width × height " + ", ".join(s.replace("*", "×") for s in task.sizes))
    if g.fps != task.fps:
        problem("generation.fps", f"generate.py writes {task_name} videos at {task.fps} fps, not {g.fps}",
                f"set `fps: {task.fps}`")
    if g.steps > MAX_STEPS:
        problem("generation.steps", f"generation.steps is {g.steps}", f"use at most {MAX_STEPS}")
    if g.negative_prompt:
        problem("generation.negative_prompt", "generate.py takes no negative prompt (it uses its "
                "config's own)", "remove negative_prompt, or use a `command:` template")
    if g.denoising_strength != 1.0:
        problem("generation.denoising_strength", "generate.py takes no denoising strength",
                "remove denoising_strength")
    if model.dtype != "bfloat16":
        problem("model.dtype", f"generate.py runs in bfloat16, not {model.dtype}",
                "remove model.dtype (or set bfloat16)")
    for key in g.extra:
        problem(f"generation.extra.{key}", f"generate.py has no setting `{key}`",
                "remove it (model.options lists what the generate.py preset takes)")
    high, low = g.guidance
    if low is not None and low != high and (high, low) != task.guidance:
        problem("generation.cfg_scale", f"generate.py takes one guidance scale on its command line, not "
                f"the pair [{high:g}, {low:g}]", f"use one scale, or {task_name}'s own pair "
                f"[{task.guidance[0]:g}, {task.guidance[1]:g}] (high-noise, low-noise expert)")
    solver = options.get("sample_solver")
    if solver is not None and solver not in SOLVERS:
        problem("model.options.sample_solver", f"sample_solver is {solver!r}", f"use one of: {', '.join(SOLVERS)}")
    torchrun = options.get("torchrun", "auto")
    if torchrun not in ("auto", "always", "never"):
        problem("model.options.torchrun", f"torchrun is {torchrun!r}", "use auto, always or never")
    elif cards > 1 and torchrun == "never":
        problem("model.options.torchrun", f"without torchrun generate.py uses one of the worker's {cards} cards",
                "remove `torchrun: never`, or set resources.gpus_per_worker: 1")
    elif cards > 1 and task.heads % cards:
        fits = [k for k in range(2, 9) if task.heads % k == 0]
        problem("resources.gpus_per_worker", f"{task_name} has {task.heads} attention heads, which "
                f"Ulysses cannot split over {cards} cards", f"use {', '.join(map(str, fits))} cards per worker")


def check_checkpoint(path: str | None, base: Path, task_name: str, task: WanTask, problem) -> None:
    if not path:
        problem("model", f"generate.py needs model.path: the {task_name} checkpoint folder (--ckpt_dir)",
                "add `path:` with the folder you downloaded")
        return
    if not os.path.isdir(path):
        # the path as the manifest gives it (relative to its folder), and where that is
        problem("model.path", f"checkpoint folder `{os.path.relpath(path, base)}` does not exist (looked at {path})",
                download_fix(path, CHECKPOINT_LAYOUT, family=task_name))
        return
    missing = [name for name in task.files if not os.path.exists(os.path.join(path, name))]
    if missing:
        problem("model.path", f"`{path}` is not a {task_name} checkpoint: it lacks {', '.join(missing)}",
                f"point model.path at the {task_name} download, or set model.options.wan_task")
