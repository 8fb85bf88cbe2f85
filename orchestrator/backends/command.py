"""The command backend: one program run per job — Wan2.2's `generate.py`, or any command template.

Each job starts the program as an argument list (never through a shell), reads its output line by
line as the worker's sign of life, and returns the mp4 the program wrote to a temporary name in the
job's output folder (the worker counts its frames and moves it into place with the sidecar). The
program loads the model for every job by nature: `plan` says so and what it costs.

Two ways to say what to run (`model.options`):

  script: path/to/Wan2.2/generate.py     the preset `wan2.2-generate` (the default when `script` is
  preset: wan2.2-generate                set). Per job, with K = the worker's cards:
      K = 1:  PYTHON SCRIPT --task T --size W*H --ckpt_dir MODEL.PATH --frame_num F --sample_steps S
              [--sample_shift generation.shift] [--sample_solver unipc|dpm++]
              [--sample_guide_scale CFG] --base_seed SEED --prompt=PROMPT [--image REFERENCE]
              [--offload_model True|False] [--t5_cpu] [--convert_model_dtype] --save_file TEMP.mp4
      K > 1:  PYTHON -m torch.distributed.run --standalone --nproc_per_node=K SCRIPT …the same…
              --dit_fsdp --t5_fsdp --ulysses_size K --save_file TEMP.mp4
          `python -m torch.distributed.run` is what the `torchrun` console script runs; calling it
          through the interpreter needs nothing on PATH. `--standalone` lets torchrun pick a free
          rendezvous port, so two workers of one host (cards 0+1 and 2+3) never collide on 29500.
          The prompt goes as `--prompt=TEXT`, so a prompt that begins with `-` stays a value.
          generate.py takes one guidance scale: `cfg_scale: 3.5` (or a pair of equal scales) goes
          as --sample_guide_scale; a pair [high-noise, low-noise] equal to the task's own default
          (t2v-A14B: [4.0, 3.0]) leaves the flag out so generate.py uses its pair; any other pair
          is rejected. Without generation.shift generate.py uses its own (5.0 i2v, 12.0 t2v-A14B).

  command: [list, of, arguments]          a template for any other program. Placeholders fill whole
                                          arguments or parts of one (`--size={width}x{height}`):
      {prompt} {seed} {output} (the temporary mp4 the program must write) {reference} (the job's
      image or video) {width} {height} {size} (W*H) {num_frames} {steps} {cfg_scale} (the one
      scale, or the high-noise expert's) {cfg_scale_low} (the low-noise expert's; the same for one
      scale) {shift} (generation.shift) {negative_prompt} {fps} {ckpt_dir} (model.path) {devices}
      (the worker's cards as the program sees them: 0,1,… — CUDA_VISIBLE_DEVICES already names the
      real ones) {nproc} (K) {python}, and any key of generation.extra. `{{`, `}}`: literal braces.

Other options:
  python: interpreter                   for the preset and {python} (default: this interpreter)
  torchrun: auto | always | never       preset: auto = torchrun when the worker has more than 1 card
  wan_task: t2v-A14B | i2v-A14B | ti2v-5B
                                        preset: generate.py's --task; default from model.path's
                                        folder name (Wan2.2-I2V-A14B → i2v-A14B), else model.task
  offload_model: bool                   preset: --offload_model (generate.py's default: True on one
                                        card, False under torchrun)
  t5_cpu, convert_model_dtype: bool     preset: the flags of the same name
  dit_fsdp, t5_fsdp: bool               preset, K > 1: default true (t5_fsdp false with t5_cpu)
  sample_solver: unipc | dpm++          preset: --sample_solver (generate.py's default: unipc)
  env: {VAR: value}                     extra environment for the program
  cwd: folder                           where the program runs (preset default: the script's folder,
                                        as Wan's README runs it; template default: where `run` ran)
Relative `script`, `cwd` and `python` paths resolve against the manifest's folder, like every path.

What `check()` rejects before anything starts (each at its manifest line): a missing script or
checkpoint folder (or one without the task's files), a task generate.py does not have for this
manifest (v2v; s2v-14B and animate-14B need audio or a preprocessed folder), a size not in the
task's SUPPORTED_SIZES, an fps other than the task's own (generate.py writes 16 fps, 24 for
ti2v-5B), a negative prompt, denoising strength, guidance pair, generation.extra key or dtype
generate.py cannot take, steps above 1000, a card count that does not divide the model's attention
heads (Ulysses: 40 heads for A14B, 24 for 5B), `gpus_per_worker: auto` (nothing to measure here),
and a template's unknown placeholders or missing {output}/{reference}.

The sidecar gets what can be known from outside: the command (a list), its exit code, wall seconds,
seconds to the first sampling step (the model load), seconds per step (from generate.py's tqdm bar,
`12/40 [...]`), the output's tail, the script's hash (and git commit), the library versions of its
interpreter and the checkpoint files' identity. Peak GPU memory is the child's and is not measured
here.

Signs of life: every step of the bar, and any other output line (at most once a second), reach the
worker's heartbeat. generate.py logs little while it loads a 14B model, so give
`execution.heartbeat_timeout_s` more than its longest quiet stretch (minutes; the example manifest
uses 900 s); `job_timeout_s` covers loading and sampling.

The child runs in its own session; when the worker stops while it runs (SIGTERM → `Stop`), its
whole process group gets SIGTERM (torchrun passes it to its ranks), then SIGKILL. If the worker
itself is killed, the child gets SIGTERM from the kernel (Linux `PR_SET_PDEATHSIG`), so no
orphaned generate.py keeps holding the cards.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import selectors
import shlex
import shutil
import signal
import string
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from ..checkpoints.releases import download_fix
from .base import Backend, BackendProblem, OutOfMemory, model_files_identity, option_problems
from .cuda import OOM_MARKERS

PRESET = "wan2.2-generate"


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
WAN_TASKS = {
    "t2v-A14B": WanTask(("t2v",), ("720*1280", "1280*720", "480*832", "832*480"), 40, 16, _A14B_FILES, "14B",
                        (4.0, 3.0)),
    "i2v-A14B": WanTask(("i2v",), ("720*1280", "1280*720", "480*832", "832*480"), 40, 16, _A14B_FILES, "14B",
                        (3.5, 3.5)),
    "ti2v-5B": WanTask(("t2v", "i2v"), ("704*1280", "1280*704"), 24, 24,
                       ("models_t5_umt5-xxl-enc-bf16.pth", "Wan2.2_VAE.pth"), "5B", (5.0, 5.0)),
}
OTHER_WAN_TASKS = {  # generate.py has them, but a manifest cannot give what they need
    "s2v-14B": "needs an audio track per job",
    "animate-14B": "needs a preprocessed folder (src_root_path) per job",
}
SOLVERS = ("unipc", "dpm++")
MAX_STEPS = 1000  # the schedulers' num_train_timesteps: more steps than timesteps do not exist

OPTIONS: dict[str, type | tuple] = {
    "preset": str, "script": str, "command": list, "python": str, "torchrun": str, "wan_task": str,
    "offload_model": bool, "t5_cpu": bool, "convert_model_dtype": bool, "dit_fsdp": bool,
    "t5_fsdp": bool, "sample_solver": str, "env": dict, "cwd": str,
}
PRESET_ONLY = ("script", "wan_task", "torchrun", "offload_model", "t5_cpu", "convert_model_dtype",
               "dit_fsdp", "t5_fsdp", "sample_solver")
PLACEHOLDERS = ("prompt", "seed", "output", "reference", "width", "height", "size", "num_frames", "steps",
                "cfg_scale", "cfg_scale_low", "shift", "negative_prompt", "fps", "ckpt_dir", "devices", "nproc",
                "python")

# A sampling bar of tqdm: "…| 12/40 [00:31<01:10,  2.61s/it]".
STEP_LINE = re.compile(r"(\d+)/(\d+) \[")
TAIL_LINES = 60
TAIL_CHARS = 4000
TERM_GRACE_S = 15.0  # torchrun needs a moment to pass SIGTERM to its ranks and reap them
PIPE_GRACE_S = 5.0  # the child has exited but something it started still holds the pipe open

# Run first in the child: ask the kernel for SIGTERM when the worker dies (even by SIGKILL), then
# become the real program. Python code as an argument, not a shell: the argv after it is untouched.
_GUARD = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass  # not Linux: the worker's own clean-up still applies
if os.getppid() != int(sys.argv[1]):
    sys.exit(143)  # the worker died before the request took effect
os.execvp(sys.argv[2], sys.argv[2:])
"""

_VERSIONS = """\
import importlib.metadata as m, json, platform
found = {"python": platform.python_version()}
for name in ("torch", "diffusers", "transformers", "flash_attn", "xfuser", "imageio"):
    try:
        found[name] = m.version(name)
    except Exception:
        pass
print(json.dumps(found))
"""


class CommandBackend(Backend):
    name = "command"
    runs_on_cpu = False  # generate.py needs CUDA
    # The child owns its cards: nothing of it can be measured from a worker process (sizing.py),
    # so a worker group is the manifest's card count with one worker on it.
    measured_sizing = False
    checkpoint_layout = "wan"  # generate.py reads the original release folder (--ckpt_dir)
    runtime_options = frozenset({"python", "torchrun", "offload_model", "t5_cpu", "dit_fsdp", "t5_fsdp",
                                 "env", "cwd", "script"})
    path_options = frozenset({"script", "cwd", "python"})  # resolved by the manifest, like model.path

    # ------------------------------------------------------------------------------------------
    # Checks before anything starts

    @classmethod
    def check(cls, manifest) -> list[str | BackendProblem]:
        model, g = manifest.model, manifest.generation
        options = model.options
        problems: list[str | BackendProblem] = []

        def problem(key: str, message: str, fix: str = "") -> None:
            problems.append(BackendProblem(key, message, fix))

        found, failed = option_problems("command", options, OPTIONS)
        problems.extend(found)
        if not model.speed.is_default:
            changed = next(k for k in ("compile", "attention", "quantize")
                           if getattr(model.speed, k) != getattr(type(model.speed)(), k))
            problem(f"speed.{changed}", "the command backend runs Wan's generate.py (or your program) once per "
                    "video, and `speed:` settings are applied inside this process's pipeline: generate.py "
                    "has no such switches",
                    "remove `speed:`; what generate.py offers instead: --offload_model, --t5_cpu, "
                    "--convert_model_dtype (model.options offload_model, t5_cpu, convert_model_dtype), and "
                    "--dit_fsdp --t5_fsdp --ulysses_size K over K cards (resources.gpus_per_worker: K); "
                    "or use backend diffusers or diffsynth, which load the model once and take `speed:`")
        if failed & set(OPTIONS):  # the checks below read these values
            return problems

        env = options.get("env", {})
        for var, value in env.items():
            if not isinstance(var, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var) \
                    or isinstance(value, (dict, list)) or value is None:
                problem("model.options.env", f"env entry {var!r}: {value!r} is not NAME: text",
                        "write env as `VARIABLE: value` lines")
        if "cwd" in options and not os.path.isdir(options["cwd"]):
            problem("model.options.cwd", f"cwd `{options['cwd']}` is not a folder", "fix the path")
        problems.extend(_check_python(options))

        cards = manifest.resources.gpus_per_worker
        if cards == "auto":
            problem("resources.gpus_per_worker", "gpus_per_worker: auto cannot be measured for the command "
                    "backend (the program owns its cards; nothing runs in the worker to measure)",
                    "set the number of cards each program gets, e.g. `gpus_per_worker: 2`")
            cards = 1
        if "command" in options:
            problems.extend(_check_template(manifest, options))
            return problems

        # The generate.py preset.
        if options.get("preset", PRESET) != PRESET:
            problem("model.options.preset", f"unknown preset {options['preset']!r}", f"use `{PRESET}`")
            return problems
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
        if model.task == "v2v" and "wan_task" not in options:
            problem("model.task", "generate.py has no plain video-to-video task (animate-14B needs a "
                    "preprocessed folder, s2v-14B an audio track)",
                    "use `task: i2v` or `t2v`, or a `command:` template for another program")
            return problems
        if task_name in OTHER_WAN_TASKS:
            problem(task_key, f"wan_task {task_name} {OTHER_WAN_TASKS[task_name]}, which a manifest "
                    "cannot give", f"use one of: {', '.join(WAN_TASKS)}, or a `command:` template")
            return problems
        task = WAN_TASKS.get(task_name)
        if task is None:
            problem(task_key, f"wan_task {task_name!r} is not a generate.py task",
                    f"use one of: {', '.join(WAN_TASKS)}")
            return problems
        if model.task not in task.manifest_tasks:
            problem("model.task", f"model.task {model.task} does not match generate.py's --task {task_name}",
                    f"use task: {' or '.join(task.manifest_tasks)}, or set model.options.wan_task")
        _check_checkpoint(model.path, manifest.path.parent, task_name, task, problem)

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
        return problems

    @classmethod
    def plan_notes(cls, manifest) -> list[str]:
        model, options = manifest.model, manifest.model.options
        preset = "command" not in options
        program = "generate.py" if preset else os.path.basename(str((options.get("command") or ["?"])[0]))
        jobs = len(manifest.seeds) * sum(len(ref.prompts) for c in manifest.categories for ref in c.references)
        task_name = wan_task_of(model)[0] if preset else None
        params = WAN_TASKS[task_name].params if task_name in WAN_TASKS else None
        seconds, how = _startup_seconds(manifest, params)
        if seconds is None:
            cost = "how long that takes is known once a job has run"
        else:
            cost = (f"~{_minutes(seconds)} each{f' for a {params} model' if params else ''} ({how}), "
                    f"~{jobs * seconds / 3600:.1f} h of worker time over the {jobs} jobs")
        notes = [f"the command backend starts {program} per job: the model is loaded for every video, {cost}; "
                 "a diffusers or diffsynth backend loads it once per worker"]
        cards = manifest.resources.gpus_per_worker if isinstance(manifest.resources.gpus_per_worker, int) else 1
        try:
            sample = cls(model, manifest.generation, tuple(range(cards)))
            sample.options = dict(options)
            job = _SampleJob(reference="<image>" if model.task != "t2v" else None)
            notes.append("each job runs: " + shlex.join(sample.command_line(job, "<output folder>/.partial-….mp4")))
        except Exception as exc:  # a plan must not fail on a display line
            notes.append(f"each job runs {program} (its command line could not be shown: {exc})")
        if preset and model.task == "i2v":
            g = manifest.generation
            notes.append(f"generate.py sizes each i2v video from its image's aspect ratio within the area of "
                         f"{g.width}×{g.height}: exactly {g.width}×{g.height} only for images of that shape")
        return notes

    # ------------------------------------------------------------------------------------------
    # Running

    @property
    def cards(self) -> int:
        return max(1, len(self.devices))

    def load(self) -> None:
        started = time.monotonic()
        self.options = dict(self.model.options)
        self._last: dict = {}
        info: dict = {"backend": self.name, "mode": "template" if "command" in self.options else PRESET,
                      "model_loaded_per_job": True}
        script = self.options.get("script")
        if "command" not in self.options:
            if not script or not os.path.isfile(script):
                raise RuntimeError(f"generate.py not found at {script!r}")
            info["script"] = {"path": script, "sha256": _sha256(script), "git": _git_commit(Path(script).parent)}
            info["wan_task"] = wan_task_of(self.model)[0]
        info["model_files"] = model_files_identity(self.model.path)
        if "command" not in self.options or any("{python}" in str(a) for a in self.options["command"]):
            info["interpreter"] = _interpreter_versions(self.python)
        info["load_seconds"] = round(time.monotonic() - started, 3)
        self.load_info = info

    @property
    def python(self) -> str:
        return str(self.options.get("python") or sys.executable)

    @property
    def torchrun(self) -> bool:
        mode = self.options.get("torchrun", "auto")
        return mode == "always" or (mode == "auto" and self.cards > 1)

    def command_line(self, job, output: str) -> list[str]:
        """The program's argument list for one job writing its video to `output`."""
        if "command" in self.options:
            values = self._values(job, output)
            return [str(arg).format_map(values) for arg in self.options["command"]]
        o, g, k = self.options, self.generation, self.cards
        argv = [self.python]
        if self.torchrun:
            argv += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={k}"]
        argv += [o["script"], "--task", wan_task_of(self.model)[0], "--size", f"{g.width}*{g.height}",
                 "--ckpt_dir", str(self.model.path), "--frame_num", str(g.num_frames),
                 "--sample_steps", str(g.steps)]
        if g.shift is not None:
            argv += ["--sample_shift", _number(g.shift)]
        if "sample_solver" in o:
            argv += ["--sample_solver", o["sample_solver"]]
        high, low = g.guidance
        if low is None or low == high:
            argv += ["--sample_guide_scale", _number(high)]
        # else: check() let only the task's own pair through, which generate.py uses when not told
        argv += ["--base_seed", str(job.seed), f"--prompt={job.prompt}"]
        if job.reference:
            argv += ["--image", job.reference]
        if "offload_model" in o:
            argv += ["--offload_model", str(bool(o["offload_model"]))]
        if o.get("t5_cpu"):
            argv.append("--t5_cpu")
        if o.get("convert_model_dtype"):
            argv.append("--convert_model_dtype")
        if self.torchrun and k > 1:
            if o.get("dit_fsdp", True):
                argv.append("--dit_fsdp")
            if o.get("t5_fsdp", not o.get("t5_cpu")):
                argv.append("--t5_fsdp")
            argv += ["--ulysses_size", str(k)]
        return argv + ["--save_file", output]

    def _values(self, job, output: str) -> dict:
        g, k = self.generation, self.cards
        return {**{key: value for key, value in g.extra.items() if isinstance(key, str)},
                "prompt": job.prompt, "seed": job.seed, "output": output, "reference": job.reference or "",
                "width": g.width, "height": g.height, "size": f"{g.width}*{g.height}",
                "num_frames": g.num_frames, "steps": g.steps, "cfg_scale": g.guidance[0],
                "cfg_scale_low": g.guidance[1] if g.guidance[1] is not None else g.guidance[0],
                "shift": g.shift, "negative_prompt": g.negative_prompt,
                "fps": g.fps, "ckpt_dir": self.model.path or "", "devices": ",".join(map(str, range(k))),
                "nproc": k, "python": self.python}

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)  # CUDA_VISIBLE_DEVICES: the worker's cards, set by its supervisor
        env["PYTHONUNBUFFERED"] = "1"  # log lines as they happen, not when a pipe buffer fills
        env.update({str(k): str(v) for k, v in self.options.get("env", {}).items()})
        return env

    def working_folder(self) -> str | None:
        if "cwd" in self.options:
            return self.options["cwd"]
        return str(Path(self.options["script"]).parent) if "command" not in self.options else None

    def generate(self, job, progress) -> Path:
        from ..outputs import temp_path_beside
        temp = temp_path_beside(job.output, owner=self.owner)
        argv = self.command_line(job, str(temp))
        handed_over = False
        try:
            run = _ChildRun(argv, self.generation.steps, progress)
            self._last = run.facts
            code = run.run(self.environment(), self.working_folder())
            program = self._program_name(argv)
            if code != 0:
                if run.oom_line:
                    raise OutOfMemory(f"{program} ran out of GPU memory (exit code {code}): {run.oom_line}")
                raise RuntimeError(f"{program} exited with code {code}; its last output:\n{run.tail()}\n"
                                   f"{program} exited with code {code}: {run.summary()}")
            if not temp.exists() or temp.stat().st_size == 0:
                raise RuntimeError(f"{program} exited with code 0 but wrote no video to {temp}; its last "
                                   f"output:\n{run.tail()}\n{program} wrote no video (--save_file/{{output}})")
            handed_over = True
            return temp
        finally:
            if not handed_over:
                temp.unlink(missing_ok=True)

    def _program_name(self, argv: list[str]) -> str:
        return "generate.py" if "command" not in self.options else os.path.basename(argv[0])

    def job_info(self) -> dict:
        return dict(self._last) if getattr(self, "_last", None) else {}


class _ChildRun:
    """One run of the program: its output read line by line, steps parsed, its group killed at the end."""

    def __init__(self, argv: list[str], steps: int, progress):
        self.argv, self.steps, self.progress = argv, steps, progress
        self.step = 0
        self.step_times: list[tuple[int, float]] = []  # (step, seconds since start) as steps increase
        self.lines: deque[str] = deque(maxlen=TAIL_LINES)
        self.last_was_bar = False
        self.oom_line: str | None = None
        self.reported = float("-inf")
        self.facts: dict = {"command": list(argv), "exit_code": None}

    def run(self, env: dict, cwd: str | None) -> int:
        started = time.monotonic()
        self.started = started
        proc = subprocess.Popen([sys.executable, "-c", _GUARD, str(os.getpid()), *self.argv],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd, start_new_session=True)
        try:
            self._read(proc)
            code = proc.wait()
        finally:
            if proc.poll() is None:
                _end_group(proc)
            proc.stdout.close()
            self._record(proc.returncode, time.monotonic() - started)
        return code

    def _read(self, proc: subprocess.Popen) -> None:
        fd = proc.stdout.fileno()
        pending = b""
        exited_at = None
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while True:
                if selector.select(timeout=1.0):
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    pending += chunk
                    *lines, pending = re.split(rb"[\r\n]", pending)
                    for line in lines:
                        self._line(line.decode("utf-8", errors="replace"))
                elif proc.poll() is not None:
                    exited_at = exited_at or time.monotonic()
                    if time.monotonic() - exited_at > PIPE_GRACE_S:
                        break  # a grandchild holds the pipe open; the program itself is done
        if pending:
            self._line(pending.decode("utf-8", errors="replace"))

    def _line(self, line: str) -> None:
        if not line.strip():
            return
        if any(marker in line for marker in OOM_MARKERS):
            self.oom_line = line.strip()[:300]
        match = STEP_LINE.search(line)
        bar = match is not None and int(match.group(2)) == self.steps
        # tqdm redraws its bar with \r: keep the latest drawing only, as a terminal would show it
        if bar and self.last_was_bar and self.lines:
            self.lines[-1] = line.rstrip()
        else:
            self.lines.append(line.rstrip())
        self.last_was_bar = bar
        now = time.monotonic()
        if bar:
            step = int(match.group(1))
            if step > self.step or not self.step_times:  # ranks draw the same bar; count it once
                self.step = max(self.step, step)
                self.step_times.append((self.step, now - self.started))
                self.reported = now
                self.progress(self.step, self.steps)
                return
        # Any other line is a sign of life too (a model loading for minutes logs as it goes); once a
        # second is plenty, and keeps the worker from printing the same step again and again.
        if now - self.reported >= 1.0:
            self.reported = now
            self.progress(self.step, self.steps)

    def _record(self, code: int | None, wall: float) -> None:
        facts = self.facts
        facts["exit_code"] = code
        facts["wall_seconds"] = round(wall, 3)
        if self.step_times:
            first_step, first_at = self.step_times[0]
            last_step, last_at = self.step_times[-1]
            # The first drawing of the bar (0/N) comes once the model is loaded and the prompt encoded.
            facts["startup_seconds"] = round(first_at, 3)
            if last_step > first_step:
                facts["seconds_per_step"] = round((last_at - first_at) / (last_step - first_step), 4)
            facts["steps_seen"] = last_step
        facts["output_tail"] = self.tail()

    def tail(self) -> str:
        text = "\n".join(self.lines)
        return text[-TAIL_CHARS:]

    def summary(self) -> str:
        """The line that most likely says what went wrong."""
        for line in reversed(self.lines):
            if re.search(r"(Error|Exception|error:|Traceback|assert)", line) and not line.startswith(" " * 4):
                return line.strip()[:300]
        return next((line.strip()[:300] for line in reversed(self.lines)), "(no output)")


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the child's process group (torchrun passes it to its ranks), then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass(frozen=True)
class _SampleJob:
    """A stand-in job for showing the command line in `plan`."""
    reference: str | None = None
    prompt: str = "<prompt>"
    seed: str = "<seed>"


# --------------------------------------------------------------------------------------------------
# Helpers for check and plan


def wan_task_of(model) -> tuple[str, str]:
    """generate.py's --task for this model, and the manifest key it comes from."""
    chosen = model.options.get("wan_task")
    if chosen:
        return str(chosen), "model.options.wan_task"
    name = Path(str(model.path or "")).name.lower()
    for task in ("ti2v-5B", "i2v-A14B", "t2v-A14B"):  # ti2v before i2v: one contains the other
        if task.lower() in name:
            return task, "model.path"
    return {"i2v": "i2v-A14B"}.get(model.task, "t2v-A14B"), "model.task"


def _check_python(options) -> list[BackendProblem]:
    python = options.get("python")
    if python is None:
        return []
    found = os.path.isfile(python) and os.access(python, os.X_OK) if os.sep in python else shutil.which(python)
    if not found:
        return [BackendProblem("model.options.python", f"python `{python}` is not an executable here",
                               "give the interpreter of Wan's environment, e.g. /opt/wan/venv/bin/python")]
    return []


def _check_checkpoint(path: str | None, base: Path, task_name: str, task: WanTask, problem) -> None:
    if not path:
        problem("model", f"generate.py needs model.path: the {task_name} checkpoint folder (--ckpt_dir)",
                "add `path:` with the folder you downloaded")
        return
    if not os.path.isdir(path):
        # the path as the manifest gives it (relative to its folder), and where that is
        problem("model.path", f"checkpoint folder `{os.path.relpath(path, base)}` does not exist (looked at {path})",
                download_fix(path, CommandBackend.checkpoint_layout, family=task_name))
        return
    missing = [name for name in task.files if not os.path.exists(os.path.join(path, name))]
    if missing:
        problem("model.path", f"`{path}` is not a {task_name} checkpoint: it lacks {', '.join(missing)}",
                f"point model.path at the {task_name} download, or set model.options.wan_task")


def _check_template(manifest, options: dict) -> list[BackendProblem]:
    problems: list[BackendProblem] = []
    model, g = manifest.model, manifest.generation
    key = "model.options.command"
    for name in PRESET_ONLY:
        if name in options:
            problems.append(BackendProblem(f"model.options.{name}", f"`{name}` belongs to the generate.py "
                                           "preset, not to a `command:` template", f"remove `{name}`"))
    if "preset" in options:
        problems.append(BackendProblem("model.options.preset", "`preset` and `command` exclude each other",
                                       "keep one of them"))
    command = options["command"]
    if not command or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in command):
        problems.append(BackendProblem(key, "command must be a non-empty list of arguments (texts or numbers)",
                                       'write e.g. `command: ["{python}", "gen.py", "--out", "{output}"]`'))
        return problems
    known = set(PLACEHOLDERS) | {k for k in g.extra if isinstance(k, str)}
    used: set[str] = set()
    for arg in map(str, command):
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(arg) if f is not None]
        except ValueError as exc:
            problems.append(BackendProblem(key, f"argument {arg!r}: {exc}", "write a literal brace as {{ or }}"))
            continue
        for field in fields:
            if field not in known:
                problems.append(BackendProblem(key, f"argument {arg!r} has an unknown placeholder {{{field}}}",
                                               "use: " + ", ".join(f"{{{p}}}" for p in sorted(known))))
            used.add(field)
    if problems:
        return problems
    if "output" not in used:
        problems.append(BackendProblem(key, "the command never names {output}, the mp4 it must write",
                                       "pass {output} where the program takes its output file"))
    if "reference" in used and model.task == "t2v":
        problems.append(BackendProblem(key, "the command uses {reference}, but task t2v has no reference files",
                                       "remove {reference}, or use task i2v/v2v"))
    if "reference" not in used and model.task != "t2v":
        problems.append(BackendProblem(key, f"task {model.task} has a reference per job, but the command "
                                            "never passes {reference}", "pass {reference} to the program"))
    if "shift" in used and g.shift is None:
        problems.append(BackendProblem(key, "the command uses {shift}, but generation.shift is not set",
                                       "set generation.shift"))
    if "ckpt_dir" in used and not model.path:
        problems.append(BackendProblem(key, "the command uses {ckpt_dir}, but model.path is not set",
                                       "set model.path"))
    program = str(command[0])
    if "{" not in program:
        base = options.get("cwd") or os.getcwd()
        found = (shutil.which(program) if os.sep not in program
                 else os.path.exists(program if os.path.isabs(program) else os.path.join(base, program)))
        if not found:
            problems.append(BackendProblem(key, f"program `{program}` is not found here",
                                           "give its absolute path, or a name on PATH"))
    return problems


def _startup_seconds(manifest, params: str | None) -> tuple[float | None, str]:
    """Seconds one job spends loading: measured from earlier sidecars, else estimated."""
    measured = _measured_startups(manifest.output_dir)
    if measured:
        measured.sort()
        return measured[len(measured) // 2], f"measured: median of {len(measured)} earlier jobs' start"
    identity = model_files_identity(manifest.model.path)
    gigabytes = identity.get("weight_bytes", 0) / 1e9
    if gigabytes:
        # Reading the weights at ~1 GB/s (page cache helps, sharding and the move to the cards cost),
        # plus starting Python, torch and CUDA.
        return 30 + gigabytes, f"estimated from its {gigabytes:.0f} GB of weights at ~1 GB/s"
    if params:
        guess = {"14B": 180.0, "5B": 60.0}.get(params, 120.0)
        return guess, "estimated: no weights at model.path to size it by"
    return None, ""


def _measured_startups(output_dir: Path, want: int = 20, scan: int = 500) -> list[float]:
    found: list[float] = []
    seen = 0
    for root, dirs, files in os.walk(output_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.endswith(".json") or name.startswith("."):
                continue
            seen += 1
            try:
                record = json.loads(Path(root, name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and record.get("backend") == "command" \
                    and isinstance(record.get("startup_seconds"), (int, float)):
                found.append(float(record["startup_seconds"]))
            if len(found) >= want or seen >= scan:
                return found
    return found


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _number(value) -> str:
    return str(float(value))


def _sha256(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def _git_commit(folder: Path) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def _interpreter_versions(python: str) -> dict:
    """Versions of the libraries the program will import, read by its own interpreter (no import)."""
    try:
        done = subprocess.run([python, "-c", _VERSIONS], capture_output=True, text=True, timeout=60)
        return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr.strip()[-300:]}
    except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
        return {"error": str(exc)}
