"""A sweep on disk: its folders, and the step that reconciles the ledger with the outputs.

`<output_dir>/.sweep/` holds the ledger, the worker spec files and caches; `<output_dir>/logs/` one
log per worker; the mp4s and sidecars live under `<output_dir>/<category>/<stem>/`.

One output folder holds one sweep: `.sweep/sweep.json` names the sweep that owns it, and a folder
that is not a sweep's (not empty, no `.sweep/`), `/` or the home folder is refused (`check_folder`).

Who is alive and who may start the sweep (the locks in `.sweep/`, the workers' processes) is `locks`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import WanSweepError
from .jobs import Job, expand, settings_fingerprint
from .ledger import Ledger
from .locks import alive_workers
from .manifest import Manifest
from .output_names import uses_prompt_index
from .outputs import TEMP_MARK, ProbeCache, inspect_output, read_sidecar, sidecar_path
from .planning import Plan, WorkerSpec

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
OWNER_FILE = "sweep.json"  # in .sweep/: which sweep (manifest name) this output folder belongs to
MIN_FREE_BYTES = 64 * 2**20  # below this a sweep does not start: logs, ledger and a few videos need room


class FolderProblem(WanSweepError):
    """The output folder cannot hold this sweep; `fix` says what to do (the CLI adds file and line)."""

    def __init__(self, message: str, fix: str):
        super().__init__(message)
        self.message, self.fix = message, fix


@dataclass
class DiskScan:
    complete: set[str] = field(default_factory=set)  # job ids whose mp4 is valid (and theirs)
    stale: list[Job] = field(default_factory=list)  # a valid mp4 made with other settings


class Sweep:
    def __init__(self, manifest: Manifest, jobs: list[Job] | None = None):
        self.manifest = manifest
        self.jobs = jobs if jobs is not None else expand(manifest)
        self.root = manifest.output_dir
        self.state_dir = self.root / ".sweep"
        self.logs = self.root / "logs"
        self.ledger_path = self.state_dir / "ledger.sqlite"
        self.specs_dir = self.state_dir / "workers"

    def ledger(self, readonly: bool = False) -> Ledger:
        """The sweep's ledger; `readonly` for a reader (it must exist: see `has_ledger`)."""
        return Ledger(self.ledger_path, readonly=readonly)

    # ---------------------------------------------------------------- the output folder
    def own_folders(self) -> set[Path]:
        """Every folder the sweep writes its files (and so its temporary files) into, and no other."""
        folders = {Path(job.output).parent for job in self.jobs}
        folders |= {self.root, self.state_dir, self.specs_dir}
        folders |= {self.state_dir / "thumbs" / category.name for category in self.manifest.categories}
        return folders

    def owner(self) -> dict | None:
        """What `.sweep/sweep.json` says about the sweep that owns this folder (None: not said)."""
        try:
            owner = json.loads((self.state_dir / OWNER_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return owner if isinstance(owner, dict) and isinstance(owner.get("name"), str) else None

    def check_folder(self, allow_non_empty: bool = False) -> None:
        """Raise FolderProblem unless the output folder is this sweep's, new, or empty.

        Refused always: `/`, the home folder and the folders above it. Refused unless
        `allow_non_empty`: a folder with files in it but no `.sweep/` (not a sweep's). Refused: a
        folder another sweep (another manifest `name`) owns.
        """
        root = self.root
        home = Path.home().resolve()
        if root == Path(root.anchor) or root == home or root in home.parents:
            what = "your home folder" if root == home else "the root of the file system" \
                if root == Path(root.anchor) else "a folder above your home folder"
            raise FolderProblem(f"output_dir is {root}, {what}: a sweep writes and cleans up in its output "
                                "folder, which must be a folder of its own",
                                f"set output_dir to a new folder, e.g. results/{self.manifest.name}")
        if root.exists() and not root.is_dir():
            raise FolderProblem(f"output_dir {root} is a file, not a folder",
                                "set output_dir to a new folder, or move that file away")
        if self.check_owner() or self.state_dir.is_dir():
            return  # ours (a folder of a version that wrote no owner file is adopted by `claim_folder`)
        try:
            with os.scandir(root) as entries:
                non_empty = next(iter(entries), None) is not None
        except FileNotFoundError:
            return
        if non_empty and not allow_non_empty:
            raise FolderProblem(
                f"output_dir {root} is not empty and is not a sweep's output folder (it has no .sweep/)",
                "point output_dir at a new or empty folder, or run again with --allow-non-empty to use "
                "this one (nothing in it is deleted; files at the videos' paths would count as made)")

    def check_owner(self) -> bool:
        """True when `.sweep/sweep.json` names this sweep; FolderProblem when it names another."""
        owner = self.owner()
        if owner is None:
            return False
        self.refuse_other_sweep(owner["name"], owner.get("manifest"))
        return True

    def refuse_other_sweep(self, name: str, manifest: str | None) -> None:
        """FolderProblem when the sweep `name` (of `manifest`) is not this one: one folder, one sweep."""
        if name != self.manifest.name:
            raise FolderProblem(
                f"output_dir {self.root} holds the sweep `{name}` (manifest {manifest}); "
                f"one output folder holds one sweep, and this manifest's is `{self.manifest.name}`",
                f"point output_dir at another folder (e.g. results/{self.manifest.name}), or, if this "
                f"manifest continues that sweep, set its name to `{name}`")

    def check_writable(self) -> None:
        """Raise FolderProblem when a folder the sweep writes into cannot take a file, or its disk has
        no room for a few videos.

        Checked by writing (and removing) a temporary file in each: permission bits say nothing on a
        read-only mount, and an ACL or root may allow what they forbid.
        """
        folders = set()
        for folder in self.own_folders() | {self.logs}:
            while not folder.exists() and folder != folder.parent:
                folder = folder.parent  # made at the start: its parent must take it
            folders.add(folder)
        for folder in sorted(folders):
            try:
                handle, name = tempfile.mkstemp(prefix=TEMP_MARK, dir=folder)
                os.close(handle)
                os.unlink(name)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise FolderProblem(
                    f"{folder} is not writable ({exc.strerror or exc}): its videos would be generated and then "
                    "fail to be written", "make the output folder writable (e.g. chmod -R u+w on it) or point "
                    "output_dir at a writable folder") from None
        top = min(folders, key=lambda f: len(f.parts))
        free = shutil.disk_usage(top).free
        each = self.video_bytes_estimate()
        need = max(MIN_FREE_BYTES, 4 * each)
        if free < need:
            raise FolderProblem(
                f"the disk holding {self.root} has {_size(free)} free; a sweep needs {_size(need)} to start "
                f"(its videos are about {_size(each)} each)", "free some space or point output_dir at another disk")

    def room_note(self, left: int) -> str | None:
        """A warning when the `left` videos look bigger than the free space of the output folder's disk."""
        each, free = self.video_bytes_estimate(), shutil.disk_usage(self.root).free
        if left * each <= free:
            return None
        return (f"the {left} videos left need about {_size(left * each)} and {_size(free)} are free on the "
                f"disk of {self.root}: if it fills up the workers stop cleanly (free some space, run again)")

    def storage_note(self) -> str | None:
        """A line for the report when the output folder takes no more files: its disk has (almost) no
        room left, or it is read-only (where the ledger is too, no worker could say so there)."""
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            return None
        if free < min(MIN_FREE_BYTES, 4 * self.video_bytes_estimate()):
            return (f"the disk of {self.root} is full ({_size(free)} free): the workers stop cleanly when they "
                    "cannot write, and nothing made is lost: free some space and run the same command again")
        try:  # by writing: ext4's emergency read-only state, an ACL or root say nothing to access(2)
            handle, name = tempfile.mkstemp(prefix=TEMP_MARK, dir=self.root)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return (f"the output folder {self.root} takes no more writes ({exc.strerror or exc}): the workers stop "
                    "cleanly when they cannot write, and nothing made is lost: make it writable and run the same "
                    "command again")
        os.close(handle)
        os.unlink(name)
        return None

    def video_bytes_estimate(self) -> int:
        """Bytes per video: the mean of up to 20 made already, else a generous guess from the settings."""
        sizes = []
        for job in self.jobs[:2000]:  # enough to find a few made ones, cheap at 100k jobs
            try:
                sizes.append(os.path.getsize(job.output))
            except OSError:
                continue
            if len(sizes) >= 20:
                break
        if sizes:
            return int(sum(sizes) / len(sizes))
        g = self.manifest.generation
        return int(g.width * g.height * g.num_frames * 0.25)  # H.264 at crf 18 stays well below this

    def claim_folder(self) -> None:
        """Record in `.sweep/sweep.json` that this sweep owns the folder (after `check_folder`)."""
        owner = {"name": self.manifest.name, "manifest": str(self.manifest.path)}
        if self.owner() == owner:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=TEMP_MARK, suffix=".json", dir=self.state_dir)
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(owner, stream, ensure_ascii=False)
        os.replace(temp_name, self.state_dir / OWNER_FILE)

    def has_ledger(self) -> bool:
        return self.ledger_path.exists()

    def scan(self) -> DiskScan:
        """What the disk says: which jobs are done, which outputs came from other settings."""
        # Only in a sweep's own folder: reading another folder must leave nothing behind in it.
        cache = ProbeCache(self.state_dir / "probe-cache.json") if self.state_dir.is_dir() else None
        scan = DiskScan()
        present = _names_by_folder(job.output for job in self.jobs)
        for job in self.jobs:
            folder, _, name = job.output.rpartition(os.sep)
            names = present.get(folder)
            if names is not None and name not in names:
                continue  # no file by that name: not done, not stale (one listing, not a stat per job)
            state = inspect_output(job.output, job.generation.num_frames, cache)
            if state.stale_for(job.id):
                scan.stale.append(job)
            elif state.complete:
                scan.complete.add(job.id)
        if cache is not None:
            cache.save()
        return scan

    def describe_stale(self, stale: list[Job], limit: int = 5) -> str:
        """Say what changed between the settings that made old outputs and the manifest's."""
        now = settings_fingerprint(self.manifest)
        lines = []
        prompts_moved = False
        for job in stale[:limit]:
            sidecar = read_sidecar(job.output) or {}
            diffs = _diff(sidecar.get("settings", {}), now) + _lora_diffs(sidecar.get("model") or {}, job)
            old_prompt = (sidecar.get("job") or {}).get("prompt")
            if not diffs and isinstance(old_prompt, str) and old_prompt != job.prompt:
                prompts_moved = True
                lines.append(f"  {job.key}.mp4: made for another prompt at this position")
            else:
                lines.append(f"  {job.key}.mp4: " + (", ".join(diffs) if diffs else "made for another prompt/input"))
        if len(stale) > limit:
            lines.append(f"  … and {len(stale) - limit} more")
        if prompts_moved and uses_prompt_index(self.manifest):
            lines.append(
                "  outputs are named by the prompt's position (`prompt_<i>`): a prompt inserted or removed "
                "moves every prompt after it. Append new prompts at the end of the list instead, or name "
                "outputs by content (`output: {name: \"{category}/{stem}/seed_{seed}_{prompt_id}\"}`), so "
                "that a prompt's videos keep their name wherever it moves.")
        return "\n".join(lines)

    def move_aside(self, stale: list[Job]) -> Path:
        """Move outputs of old settings (and their sidecars) to .sweep/superseded/<time>/, never delete."""
        target = self.state_dir / "superseded" / time.strftime("%Y%m%d-%H%M%S")
        for job in stale:
            for path in (Path(job.output), sidecar_path(job.output)):
                if path.exists():
                    destination = target / path.relative_to(self.root)
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(path), destination)
        return target

    def alive_workers(self) -> set[str]:
        """Ids of the sweep's workers alive now (`locks.alive_workers`)."""
        if not self.has_ledger():
            return alive_workers(self.state_dir)
        ledger = self.ledger(readonly=True)
        try:
            return alive_workers(self.state_dir, ledger)
        finally:
            ledger.close()

    def write_specs(self, plan: Plan) -> list[tuple[WorkerSpec, Path]]:
        """Write the spec file of each of the plan's workers that is not alive now (`--add-workers`
        leaves the running ones and their spec files alone); return those written."""
        m = self.manifest
        specs = []
        alive = self.alive_workers()
        # The model a worker loads first: the first job's (with a quantize axis, its first value, whose jobs come
        # first; a worker loads the model again for a job of another value, orchestrator/job_loop.py's SlotBackend).
        first = self.jobs[0].model if self.jobs else m.model
        for slot in plan.workers:
            if slot.id in alive:
                continue  # its worker rereads this file at each restart: not ours to change
            spec = WorkerSpec(
                sweep=m.name, worker=slot.id, devices=slot.devices, queue=slot.queue,
                ledger=str(self.ledger_path), output_dir=str(self.root),
                log=str(self.logs / f"{slot.id}.log"), model=first, generation=m.generation,
                execution=m.execution,
                settings=settings_fingerprint(m))
            specs.append((spec, spec.write(self.specs_dir / f"{slot.id}.json")))
        return specs


def _names_by_folder(outputs) -> dict[str, set[str] | None]:
    """The file names in each folder that holds outputs: one directory listing per folder.

    None for a folder that exists but cannot be listed: its outputs are checked one by one.
    """
    names: dict[str, set[str]] = {}
    for output in outputs:
        folder = output.rpartition(os.sep)[0]
        if folder in names:
            continue
        try:
            with os.scandir(folder) as entries:
                names[folder] = {entry.name for entry in entries}
        except (FileNotFoundError, NotADirectoryError):  # no such folder (yet)
            names[folder] = set()
        except OSError:
            names[folder] = None
    return names


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _lora_diffs(old_model: dict, job: Job) -> list[str]:
    """What changed in a job's LoRAs since its sidecar's model was recorded: one turned on or off, another
    strength or expert, another file, or the same file with other content (retrained)."""
    old = {lora.get("name"): lora for lora in old_model.get("loras") or [] if isinstance(lora, dict)}
    new = {lora.name: lora.to_dict() for lora in (job.model.loras if job.model else ())}
    diffs = []
    for name in sorted(set(old) | set(new), key=str):
        a, b = old.get(name), new.get(name)
        if a is None or b is None:
            diffs.append(f"LoRA {name} {'on' if a is None else 'off'}")
            continue
        for key in ("strength", "expert", "path"):
            if a.get(key) != b.get(key):
                diffs.append(f"LoRA {name} {key} {a.get(key)!r} → {b.get(key)!r}")
        if a.get("path") == b.get("path") and a.get("digest") != b.get("digest"):
            diffs.append(f"LoRA {name}: {Path(b['path']).name} has other content (sha256 "
                         f"{str(a.get('digest'))[:12]}… → {str(b.get('digest'))[:12]}…)")
    return diffs


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(_diff(a, b, f"{prefix}{key}."))
        elif a != b:
            diffs.append(f"{prefix}{key} {a!r} → {b!r}")
    return diffs


def python_env() -> dict[str, str]:
    """The environment for worker programs: the package importable even when not installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env
