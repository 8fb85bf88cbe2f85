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
              [s2v-14B: --audio AUDIO --infer_frames 4⌈F/4⌉ --num_clip 1]
              [animate-14B, instead of --image: --src_root_path FOLDER --refert_num 1|5]
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
          s2v-14B (task s2v) makes whole 4-frame groups: it is asked for the group count covering F
          and the first F frames of its video are kept (re-encoded by the worker, without the audio
          track generate.py adds; the sidecar names the audio file). animate-14B (task animate)
          animates the whole pose video of its --src_root_path folder: per job the backend writes a
          temporary folder as Wan's preprocessing lays it out, src_pose.mp4 and src_face.mp4 (the
          job's driving videos timed at generation.fps and cut to F frames) and src_ref.png (its
          image fitted to width × height), so the video has F frames of that size.

  command: [list, of, arguments]          a template for any other program. Placeholders fill whole
                                          arguments or parts of one (`--size={width}x{height}`):
      {prompt} {seed} {output} (the temporary mp4 the program must write) {reference} (the job's
      image or video) {width} {height} {size} (W*H) {num_frames} {steps} {cfg_scale} (the one
      scale, or the high-noise expert's) {cfg_scale_low} (the low-noise expert's; the same for one
      scale) {shift} (generation.shift) {negative_prompt} {fps} {ckpt_dir} (model.path) {devices}
      (the worker's cards as the program sees them: 0,1,… — CUDA_VISIBLE_DEVICES already names the
      real ones) {nproc} (K) {python}, a conditioned task's inputs {audio} {reference_image}
      {pose_video} {face_video} {camera} (empty where a job has none), and any key of
      generation.extra. `{{`, `}}`: literal braces.

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
  refert_num: 1 | 5                     preset, animate-14B: --refert_num (default 1)
  env: {VAR: value}                     extra environment for the program
  cwd: folder                           where the program runs (preset default: the script's folder,
                                        as Wan's README runs it; template default: where `run` ran)
Relative `script`, `cwd` and `python` paths resolve against the manifest's folder, like every path.

What `check()` rejects before anything starts (each at its manifest line): a missing script or
checkpoint folder (or one without the task's files), a task generate.py does not have for this
manifest (v2v, vace, control), a size not in the
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

Here: the backend (checks, plan notes, the argument list, a job's run). The generate.py preset's
tasks and checks are in wan_generate.py, the child-process runner in child_run.py, the per-job cost
that `plan` shows in command_costs.py.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..backend import Backend, BackendProblem, OutOfMemory
from ..media import read_image, read_video, video_facts
from ..outputs import temp_path_beside, write_mp4_file
from .child_run import ChildRun
from .command_costs import minutes, startup_seconds
from .shared import model_files_identity, option_problems
from .wan_generate import CHECKPOINT_LAYOUT, PRESET, WAN_TASKS, check_preset, wan_task_of

log = logging.getLogger(__name__)

OPTIONS: dict[str, type | tuple] = {
    "preset": str, "script": str, "command": list, "python": str, "torchrun": str, "wan_task": str,
    "offload_model": bool, "t5_cpu": bool, "convert_model_dtype": bool, "dit_fsdp": bool,
    "t5_fsdp": bool, "sample_solver": str, "env": dict, "cwd": str, "refert_num": int,
}
PRESET_ONLY = ("script", "wan_task", "torchrun", "offload_model", "t5_cpu", "convert_model_dtype",
               "dit_fsdp", "t5_fsdp", "sample_solver", "refert_num")
INPUT_PLACEHOLDERS = ("audio", "reference_image", "pose_video", "face_video", "camera")  # Job.inputs roles
PLACEHOLDERS = ("prompt", "seed", "output", "reference", "width", "height", "size", "num_frames", "steps",
                "cfg_scale", "cfg_scale_low", "shift", "negative_prompt", "fps", "ckpt_dir", "devices", "nproc",
                "python") + INPUT_PLACEHOLDERS

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
    # The child owns its cards: nothing of it can be measured from a worker process (sizing),
    # so a worker group is the manifest's card count with one worker on it.
    measured_sizing = False
    checkpoint_layout = CHECKPOINT_LAYOUT
    runtime_options = frozenset({"python", "torchrun", "offload_model", "t5_cpu", "dit_fsdp", "t5_fsdp",
                                 "env", "cwd", "script"})
    path_options = frozenset({"script", "cwd", "python"})  # resolved by the manifest, like model.path

    # ------------------------------------------------------------------------------------------
    # Checks before anything starts

    @classmethod
    def check_loras(cls, manifest, files) -> list[BackendProblem]:
        return [BackendProblem(
            "model.loras", "the command backend runs Wan's generate.py (or your program) once per video, which "
            "takes no LoRA files (its only LoRA is Animate's own relighting one, --use_relighting_lora); a LoRA "
            "listed here would silently not be applied",
            "use backend diffusers or diffsynth, which load each LoRA once and switch between them per job; or "
            "pass your program's own LoRA flag under model.options.command")] if files else []

    @classmethod
    def check(cls, manifest) -> list[str | BackendProblem]:
        model = manifest.model
        options = model.options
        problems: list[str | BackendProblem] = []

        def problem(key: str, message: str, fix: str = "") -> None:
            problems.append(BackendProblem(key, message, fix))

        found, failed = option_problems("command", options, OPTIONS)
        problems.extend(found)
        if model.speed.cache != "none":
            problem("speed.cache", f"speed.cache {model.speed.cache_method[0]}: Wan's generate.py has no step cache "
                    "(its flags: --offload_model, --t5_cpu, --convert_model_dtype, --sample_steps, --sample_shift, "
                    "--sample_guide_scale, --dit_fsdp, --t5_fsdp, --ulysses_size; none skips or reuses steps)",
                    "remove speed.cache, or use backend diffusers (first_block, taylorseer, magcache, faster_cache, "
                    "pab) or diffsynth (teacache)")
        changed = next((k for k in ("compile", "attention", "quantize")
                        if getattr(model.speed, k) != getattr(type(model.speed)(), k)), None)
        if changed:
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

        check_preset(manifest, cards, problem)
        return problems

    @classmethod
    def plan_notes(cls, manifest) -> list[str]:
        model, options = manifest.model, manifest.model.options
        preset = "command" not in options
        program = "generate.py" if preset else os.path.basename(str((options.get("command") or ["?"])[0]))
        jobs = len(manifest.seeds) * sum(len(ref.prompts) for c in manifest.categories for ref in c.references)
        task_name = wan_task_of(model)[0] if preset else None
        params = WAN_TASKS[task_name].params if task_name in WAN_TASKS else None
        seconds, how = startup_seconds(manifest, params)
        if seconds is None:
            cost = "how long that takes is known once a job has run"
        else:
            cost = (f"~{minutes(seconds)} each{f' for a {params} model' if params else ''} ({how}), "
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

    def command_line(self, job, output: str, src_root: str = "<the job's src folder>") -> list[str]:
        """The program's argument list for one job writing its video to `output` (animate-14B: reading
        the folder `src_root` that `generate` builds for the job)."""
        if "command" in self.options:
            values = self._values(job, output)
            return [str(arg).format_map(values) for arg in self.options["command"]]
        o, g, k = self.options, self.generation_for(job), self.cards
        argv = [self.python]
        if self.torchrun:
            argv += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={k}"]
        wan_task = wan_task_of(self.model)[0]
        argv += [o["script"], "--task", wan_task, "--size", f"{g.width}*{g.height}",
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
        if wan_task == "animate-14B":  # the image goes into the src folder, beside the driving videos
            argv += ["--src_root_path", src_root, "--refert_num", str(o.get("refert_num", 1))]
        elif job.reference:
            argv += ["--image", job.reference]
        if wan_task == "s2v-14B":
            # one clip of whole 4-frame groups covering num_frames; `generate` keeps the first num_frames
            argv += ["--audio", getattr(job, "inputs", {}).get("audio", "<audio>"),
                     "--infer_frames", str(s2v_clip_frames(g.num_frames)), "--num_clip", "1"]
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
        g, k = self.generation_for(job), self.cards
        return {**{key: value for key, value in g.extra.items() if isinstance(key, str)},
                "prompt": job.prompt, "seed": job.seed, "output": output, "reference": job.reference or "",
                "width": g.width, "height": g.height, "size": f"{g.width}*{g.height}",
                "num_frames": g.num_frames, "steps": g.steps, "cfg_scale": g.guidance[0],
                "cfg_scale_low": g.guidance[1] if g.guidance[1] is not None else g.guidance[0],
                "shift": g.shift, "negative_prompt": g.negative_prompt,
                "fps": g.fps, "ckpt_dir": self.model.path or "", "devices": ",".join(map(str, range(k))),
                "nproc": k, "python": self.python,
                **{role: getattr(job, "inputs", {}).get(role, "") for role in INPUT_PLACEHOLDERS}}

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)  # CUDA_VISIBLE_DEVICES: the worker's cards, set by its supervisor
        env["PYTHONUNBUFFERED"] = "1"  # log lines as they happen, not when a pipe buffer fills
        env.update({str(k): str(v) for k, v in self.options.get("env", {}).items()})
        return env

    def working_folder(self) -> str | None:
        if "cwd" in self.options:
            return self.options["cwd"]
        return str(Path(self.options["script"]).parent) if "command" not in self.options else None

    def generate(self, job, progress) -> "Path | np.ndarray":
        temp = temp_path_beside(job.output, owner=self.owner)
        wan_task = wan_task_of(self.model)[0] if "command" not in self.options else None
        handed_over = False
        src_folder = tempfile.TemporaryDirectory(prefix="wan-animate-src-") if wan_task == "animate-14B" else None
        try:
            if src_folder is not None:
                self._animate_folder(job, Path(src_folder.name))
            argv = self.command_line(job, str(temp), src_folder.name if src_folder else "")
            log.debug("%s: running %s", job.key, shlex.join(argv))
            run = ChildRun(argv, self.generation_for(job).steps, progress)
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
            if wan_task == "s2v-14B":
                return self._first_frames(temp, job)  # (temp is removed below)
            handed_over = True
            return temp
        finally:
            if not handed_over:
                temp.unlink(missing_ok=True)
            if src_folder is not None:
                src_folder.cleanup()

    def _animate_folder(self, job, folder: Path) -> None:
        """animate-14B's --src_root_path for one job, as its preprocessing lays it out: the driving pose
        and face videos timed at the generation's fps and cut to num_frames (so the video has exactly
        num_frames frames: animate-14B animates the whole pose video), and the image fitted to
        width × height as src_ref.png (animate-14B sizes its video like that image)."""
        g = self.generation_for(job)
        for role, name in (("pose_video", "src_pose.mp4"), ("face_video", "src_face.mp4")):
            width, height, _ = video_facts(job.inputs[role])
            write_mp4_file(read_video(job.inputs[role], width, height, g.num_frames, g.fps), str(folder / name), g.fps)
        _write_png(read_image(job.reference, g.width, g.height), folder / "src_ref.png")

    def _first_frames(self, video: Path, job) -> "np.ndarray":
        """s2v-14B makes whole 4-frame groups (s2v_clip_frames): the first num_frames of its video."""
        import av
        import numpy as np
        wanted = self.generation_for(job).num_frames
        frames = []
        with av.open(str(video)) as container:
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) == wanted:
                    break
        if len(frames) < wanted:
            raise RuntimeError(f"generate.py wrote {len(frames)} frames, fewer than the {wanted} asked for")
        return np.stack(frames)

    def _program_name(self, argv: list[str]) -> str:
        return "generate.py" if "command" not in self.options else os.path.basename(argv[0])

    def job_info(self) -> dict:
        return dict(self._last) if getattr(self, "_last", None) else {}


@dataclass(frozen=True)
class _SampleJob:
    """A stand-in job for showing the command line in `plan`."""
    reference: str | None = None
    prompt: str = "<prompt>"
    seed: str = "<seed>"


# --------------------------------------------------------------------------------------------------
# Helpers for check and plan


def _check_python(options) -> list[BackendProblem]:
    python = options.get("python")
    if python is None:
        return []
    found = os.path.isfile(python) and os.access(python, os.X_OK) if os.sep in python else shutil.which(python)
    if not found:
        return [BackendProblem("model.options.python", f"python `{python}` is not an executable here",
                               "give the interpreter of Wan's environment, e.g. /opt/wan/venv/bin/python")]
    return []


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
    roles = {"s2v": {"audio"}, "vace": {"reference_image"}, "control": {"reference_image", "camera"},
             "animate": {"pose_video", "face_video"}}.get(model.task, set())
    for role in INPUT_PLACEHOLDERS:
        if role in used and role not in roles:
            problems.append(BackendProblem(key, f"the command uses {{{role}}}, but task {model.task} has no "
                                                f"{role.replace('_', ' ')}", f"remove {{{role}}}"))
        elif role in roles - {"reference_image", "camera"} and role not in used:  # (those two are optional)
            problems.append(BackendProblem(key, f"task {model.task} has a {role.replace('_', ' ')} per job, but "
                                                f"the command never passes {{{role}}}", f"pass {{{role}}} to the program"))
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


def s2v_clip_frames(num_frames: int) -> int:
    """s2v-14B's --infer_frames for a video of num_frames: the multiple of 4 it needs, at least num_frames."""
    return -(-num_frames // 4) * 4


def _write_png(picture, path: Path) -> None:
    import av
    frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = frame.width, frame.height, "rgb24"
        for packet in stream.encode(frame):
            container.mux(packet)


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
        log.debug("the library versions of %s could not be read: %s", python, exc)
        return {"error": str(exc)}
