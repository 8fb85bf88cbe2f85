"""Checkpoints on disk: what a checkpoint folder holds, whether it is complete, what fits on which
GPU, getting one, and loading a diffusers checkpoint's components fast.

  files.py     weight files read by their headers only (safetensors JSON, torch.save's pickled index)
  layouts.py   layout detection (`diffusers`: model_index.json and a folder per component; `wan`: the
               original Wan / DiffSynth release, Wan2.2's high_noise_model/ and low_noise_model/,
               models_t5_*.pth, Wan2.x_VAE.pth, google/umt5-xxl/; `single-file`; `weights`),
               verification (`inspect`, `verify`: every file an index names present and complete,
               a truncated file caught without reading its data) and what `models status` prints
  loading.py   `load_components`: each component with its own class's `from_pretrained`, the files
               read ahead in parallel threads (the builds one at a time: concurrent `from_pretrained`
               calls are not safe), timed one by one
  fit.py       one worker's GPU memory per strategy (`estimate`, `fit_report`), from parameter bytes
               in the headers and the generation settings; GPUs of this machine or named (`24GB x2`)
  download.py  `download` through huggingface_hub (resumable; only when asked)
  releases.py  Wan's releases on the hub (family → repository per layout) and the download command
               every missing-checkpoint fix prints (`download_fix`, `repair_fix`)

Must not know: the ledger, executors, workers (a backend calls `load_components`; `cli` the rest).
"""
from .files import CheckpointError, DownloadError, GIB, ST_BYTES
from .layouts import detect_layout, dtype_summary, format_status, inspect, verify
from .loading import load_components, model_index, read_ahead
from .fit import (GPU_FACTOR, K_FFN, K_HIDDEN, K_VAE_CH, K_VAE_PX, PREFERENCE, TEXT_TOKENS, Settings, estimate,
                  fit_report, machine_gpus, measured_profiles, parse_gpu, parts, working_sets)
from .download import download, remove_broken
from .releases import download_fix, family_of, repair_fix, repo_id

__all__ = ["CheckpointError", "DownloadError", "GIB", "ST_BYTES", "detect_layout", "dtype_summary", "format_status",
           "inspect", "verify", "load_components", "model_index", "read_ahead", "GPU_FACTOR", "K_FFN", "K_HIDDEN",
           "K_VAE_CH", "K_VAE_PX", "PREFERENCE", "TEXT_TOKENS", "Settings", "estimate", "fit_report", "machine_gpus",
           "measured_profiles", "parse_gpu", "parts", "working_sets", "download", "remove_broken",
           "download_fix", "family_of", "repair_fix", "repo_id"]
