"""STUB: stands in for Wan2.2's generate.py, which needs the Wan repository and a GPU.

It takes generate.py's arguments with the same argparse definitions (so a flag the real one lacks,
a size it does not support or FSDP flags outside torchrun fail here as they would there), records
what it was given, prints generate.py-like log lines and a tqdm sampling bar, and writes an mp4 of
`--frame_num` frames at `--size` to `--save_file` (rank 0 only, as generate.py does). No model.
s2v-14B writes --infer_frames × --num_clip frames; animate-14B as many frames as its --src_root_path's
src_pose.mp4 holds, at src_ref.png's size (as the real ones do).

Controlled by the environment (tests only):
  GENERATE_STUB_RECORD   write {"argv", "env", "pid", "rank"} as JSON to this path (+ ".rank<R>")
  GENERATE_STUB_STEP_S   seconds per sampling step (default 0)
  GENERATE_STUB_FAIL     "1": fail with a traceback and exit code 1 after a few steps
  GENERATE_STUB_OOM      "1": fail as a CUDA out-of-memory does
  GENERATE_STUB_NO_FILE  "1": exit 0 without writing the video
"""
import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# SUPPORTED_SIZES of Wan2.2's wan/configs/__init__.py (the stub's copy).
SUPPORTED_SIZES = {
    "t2v-A14B": ("720*1280", "1280*720", "480*832", "832*480"),
    "i2v-A14B": ("720*1280", "1280*720", "480*832", "832*480"),
    "ti2v-5B": ("704*1280", "1280*704"),
    "s2v-14B": ("720*1280", "1280*720", "480*832", "832*480", "1024*704", "704*1024", "704*1280", "1280*704"),
    "animate-14B": ("720*1280", "1280*720"),
}
SIZES = sorted({size for sizes in SUPPORTED_SIZES.values() for size in sizes})
TEST_SIZES = ("64*48", "48*64", "32*32")  # tiny sizes for CPU tests (the real one has none)


def str2bool(value):
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError("Boolean value expected (True/False)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="STUB of Wan2.2 generate.py")
    parser.add_argument("--task", type=str, default="t2v-A14B", choices=list(SUPPORTED_SIZES))
    parser.add_argument("--size", type=str, default="1280*720", choices=SIZES + list(TEST_SIZES))
    parser.add_argument("--frame_num", type=int, default=None)
    parser.add_argument("--ckpt_dir", type=str, default=None)
    parser.add_argument("--offload_model", type=str2bool, default=None)
    parser.add_argument("--ulysses_size", type=int, default=1)
    parser.add_argument("--t5_fsdp", action="store_true", default=False)
    parser.add_argument("--t5_cpu", action="store_true", default=False)
    parser.add_argument("--dit_fsdp", action="store_true", default=False)
    parser.add_argument("--save_file", type=str, default=None)
    parser.add_argument("--prompt", type=str, default=None)
    parser.add_argument("--base_seed", type=int, default=-1)
    parser.add_argument("--image", type=str, default=None)
    parser.add_argument("--sample_solver", type=str, default="unipc", choices=["unipc", "dpm++"])
    parser.add_argument("--sample_steps", type=int, default=None)
    parser.add_argument("--sample_shift", type=float, default=None)
    parser.add_argument("--sample_guide_scale", type=float, default=None)
    parser.add_argument("--convert_model_dtype", action="store_true", default=False)
    # animate
    parser.add_argument("--src_root_path", type=str, default=None)
    parser.add_argument("--refert_num", type=int, default=77)
    parser.add_argument("--replace_flag", action="store_true", default=False)
    parser.add_argument("--use_relighting_lora", action="store_true", default=False)
    # s2v
    parser.add_argument("--num_clip", type=int, default=None)
    parser.add_argument("--audio", type=str, default=None)
    parser.add_argument("--enable_tts", action="store_true", default=False)
    parser.add_argument("--pose_video", type=str, default=None)
    parser.add_argument("--start_from_ref", action="store_true", default=False)
    parser.add_argument("--infer_frames", type=int, default=80)
    args = parser.parse_args(argv)
    assert args.ckpt_dir is not None, "Please specify the checkpoint directory."
    if args.task == "i2v-A14B":
        assert args.image is not None, "Please specify the image path for i2v."
    if args.task == "s2v-14B":  # the real one falls back to its example files; a sweep must never
        assert args.image and os.path.isfile(args.image), "s2v needs --image"
        assert args.audio and os.path.isfile(args.audio), "s2v needs --audio"
        assert args.infer_frames % 4 == 0, "infer_frames must be a multiple of 4"
    if args.task == "animate-14B":
        assert args.refert_num in (1, 5), "refert_num should be 1 or 5."
        for name in ("src_pose.mp4", "src_face.mp4", "src_ref.png"):
            assert os.path.isfile(os.path.join(args.src_root_path or "", name)), f"no {name} in --src_root_path"
    if args.size not in TEST_SIZES and args.task != "s2v-14B":  # generate.py checks no size for s2v
        assert args.size in SUPPORTED_SIZES[args.task], f"Unsupport size {args.size} for task {args.task}"
    return args


def main():
    args = parse_args()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR,
                        format="[%(asctime)s] %(levelname)s: %(message)s", stream=sys.stdout)
    record = os.environ.get("GENERATE_STUB_RECORD")
    if record:
        wanted = ("CUDA_VISIBLE_DEVICES", "RANK", "WORLD_SIZE", "LOCAL_RANK", "PYTHONUNBUFFERED", "STUB_MARK")
        Path(f"{record}.rank{rank}").write_text(json.dumps({
            "argv": sys.argv[1:], "env": {k: os.environ[k] for k in wanted if k in os.environ},
            "pid": os.getpid(), "rank": rank, "cwd": os.getcwd()}), encoding="utf-8")
    # The real generate.py's checks of its distributed setup.
    if world_size == 1:
        assert not (args.t5_fsdp or args.dit_fsdp), \
            "t5_fsdp and dit_fsdp are not supported in non-distributed environments."
        assert not args.ulysses_size > 1, "sequence parallel are not supported in non-distributed environments."
    if args.ulysses_size > 1:
        assert args.ulysses_size == world_size, "The number of ulysses_size should be equal to the world size."

    logging.info(f"Generation job args: {args}")
    logging.info(f"Input prompt: {args.prompt}")
    logging.info("Creating WanI2V pipeline." if args.image else "Creating WanT2V pipeline.")
    logging.info("Generating video ...")
    from tqdm import tqdm
    step_s = float(os.environ.get("GENERATE_STUB_STEP_S", "0"))
    steps = args.sample_steps or 40
    for step in tqdm(range(steps), mininterval=0):
        if step == min(2, steps - 1) and os.environ.get("GENERATE_STUB_OOM") == "1":
            print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a "
                  "total capacity of 79.19 GiB of which 1.2 GiB is free.", file=sys.stderr, flush=True)
            sys.exit(1)
        if step == min(2, steps - 1) and os.environ.get("GENERATE_STUB_FAIL") == "1":
            print("Traceback (most recent call last):\n  File \"generate.py\", line 1, in <module>\n"
                  "RuntimeError: STUB failure as asked", file=sys.stderr, flush=True)
            sys.exit(1)
        time.sleep(step_s)

    if rank == 0 and os.environ.get("GENERATE_STUB_NO_FILE") != "1":
        sys.path.insert(0, str(ROOT))
        import numpy as np
        from orchestrator.outputs import write_mp4_file
        width, height = (int(v) for v in args.size.split("*"))
        count, fps = args.frame_num, 16
        if args.task == "s2v-14B":
            count = args.infer_frames * (args.num_clip or 1)
        if args.task == "animate-14B":
            import av
            from orchestrator.outputs import count_frames
            count, fps = count_frames(os.path.join(args.src_root_path, "src_pose.mp4")), 30
            with av.open(os.path.join(args.src_root_path, "src_ref.png")) as image:
                width, height = image.streams.video[0].width, image.streams.video[0].height
        frames = np.zeros((count, height, width, 3), dtype=np.uint8)
        frames[..., 0] = (np.arange(count) * 7 % 256)[:, None, None]
        frames[..., 1] = args.base_seed % 256
        logging.info(f"Saving generated video to {args.save_file}")
        write_mp4_file(frames, args.save_file, fps=fps)
    logging.info("Finished.")


if __name__ == "__main__":
    main()
