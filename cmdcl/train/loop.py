"""Training and evaluation of CMDCL (`cmdcl-train`, `cmdcl-eval`).

Recipe: videos are decoded once into uint8 clips (cached on disk with
`cache_dir`); the training clips hold `candidates` frames per segment, and
each epoch picks one of them at random per segment (segment-based random
offsets on a fixed sub-grid); `candidates=0` decodes every video anew each
epoch at uniformly random times within its segments (exact, slower).
Evaluation uses the centred frame of each segment. The dictionaries V_P and Z are k-means over the frozen image tower's
tokens of the training frames (cmdcl.train.dictionaries); the frozen tower is
the video encoder as initialised (CLIP with --clip-weights, otherwise the
seeded random tower: see the README). AdamW with a lower learning rate for
the video encoder, linear warm-up then cosine decay per step, bf16 autocast on
GPU. Every random choice comes from `seed` and the epoch number, so a run is
bitwise repeatable on CPU and `resume` continues exactly where the last
completed epoch left off (a resume file that does not fit the run's options,
model or schedule is refused, never loaded as is). Under `torchrun` (WORLD_SIZE > 1) it runs
DistributedDataParallel (NCCL on GPU, gloo on CPU), each process taking its
share of every global batch. The checkpoint records the stream sampling that
matches training (`training_sampling`): F stream frames span the median
training video, as F training frames spanned a training video.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..artifacts import MAX_GRID_RATE, default_sampling
from ..data.datasets import load_dataset
from ..data.manifest import ManifestError, VideoDataset, VideoEntry
from ..errors import CmdclError, describe, first_line
from ..model import CMDCL, CMDCLConfig, load_clip, preset, save_checkpoint
from ..model.config import SAMPLING_LIMITS
from ..output_files import atomic_write, check_outputs
from .dictionaries import build_dictionaries, extract_features
from .metrics import classification_report
from .text_init import resolve_method, text_init

ABLATIONS = {
    "none": {},
    "no-textual": {"textual_intervention": False},
    "no-visual": {"visual_intervention": False},
    "no-both": {"textual_intervention": False, "visual_intervention": False},
}
RESUME_FORMAT = "cmdcl-resume"
RESUME_KEYS = {"format", "epoch", "options", "model", "optimizer", "scheduler", "history", "text_init"}
RESUME_FREE = ("out", "resume", "device", "cache_dir", "val")  # options a resumed run may change


@dataclass
class TrainOptions:
    data: str  # manifest or dataset folder (its train split)
    out: str  # checkpoint path; the resume state goes to `out + ".resume"`
    preset: str = "tiny"
    epochs: int = 10
    batch_size: int = 8  # global: split across processes under torchrun
    frames: int | None = None  # F (default: the preset's)
    image_size: int | None = None  # default: the preset's (or the CLIP weights')
    lr: float = 5e-4
    encoder_lr_scale: float = 0.1  # video encoder lr = lr * this
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    seed: int = 0
    ablation: str = "none"
    model_options: dict = field(default_factory=dict)  # CMDCLConfig fields to override, e.g. {"approximator": "catt"}
    clip_weights: str | None = None
    text_init: str = "auto"
    classes: str | None = None  # class list file (default: the dataset's)
    target: str = "label"  # "segments": multi-label atomic actions from a manifest
    candidates: int = 2  # frames decoded once per segment for random offsets; 0: decode every epoch
    cache_dir: str | None = None
    resume: bool = False
    device: str = "auto"
    val: str | None = None  # manifest evaluated after training, stored in the checkpoint


# ---- data ------------------------------------------------------------------------------------
def _cache_key(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _dataset_fingerprint(dataset: VideoDataset) -> tuple:
    return tuple((str(e.path), e.path.stat().st_size, e.path.stat().st_mtime_ns) for e in dataset.entries)


def _atomic_save(obj, path: Path) -> None:
    """torch.save through `atomic_write`: an interrupted save (Ctrl-C, full disk) leaves the previous file intact."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def _load_cached(path: Path, valid):
    """The object cached in `path` if it loads and `valid(obj)`, else None (the caller rebuilds it and
    overwrites the file): a damaged or stale cache costs time, never the run."""
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, weights_only=True)
        if valid(cached):
            return cached
    except Exception:
        pass
    from tqdm import tqdm

    tqdm.write(f"warning: {path}: unreadable or not the expected data; rebuilding it", file=sys.stderr)
    return None


def _entry_name(entry: VideoEntry) -> str:
    """The video and the manifest line that lists it."""
    return f"{entry.listed_at}: {entry.path}" if entry.listed_at else str(entry.path)


def read_entry_clip(entry: VideoEntry, num_frames: int, size: int, *args, **kwargs) -> torch.Tensor:
    """read_clip(entry.path, ...).frames; any failure, expected (VideoError) or not, raises
    ManifestError naming the video and the manifest line that lists it."""
    from ..data.video import VideoError, read_clip

    try:
        return torch.from_numpy(read_clip(entry.path, num_frames, size, *args, **kwargs).frames)
    except Exception as exc:
        reason = exc.reason if isinstance(exc, VideoError) else describe(exc, VideoError)
        raise ManifestError(f"{_entry_name(entry)}: {reason}") from exc


def decode_clips(dataset: VideoDataset, num_frames: int, size: int, cache_dir: str | None = None, progress: bool = False,
                 skipped: dict[int, str] | None = None, sampling: str = "exact", workers: int = 1) -> torch.Tensor:
    """uint8 [N, num_frames, size, size, 3]: centred frames of num_frames
    equal segments of each video, decoded once (and cached in `cache_dir`);
    `sampling` "keyframe" takes each segment's keyframe where it has one (see read_clip).
    `workers` > 1 decodes that many videos at once, in processes (see cmdcl.runtime.decode_pool).

    A video that cannot be read raises ManifestError naming it; with `skipped`
    it is left out instead (a warning line, its index and message added to
    `skipped`), and the clips are those of the other videos in order."""
    import contextlib

    from tqdm import tqdm

    from ..runtime.decode_pool import Failure, check_workers, decoded_in_order

    shape = (len(dataset.entries), num_frames, size, size, 3)
    cache = None
    if cache_dir:
        cache = Path(cache_dir) / f"clips-{_cache_key(_dataset_fingerprint(dataset), num_frames, size, sampling)}.pt"
        cached = _load_cached(cache, lambda t: isinstance(t, torch.Tensor) and t.shape == shape and t.dtype == torch.uint8)
        if cached is not None:
            return cached
    clips = torch.empty(shape, dtype=torch.uint8)
    kept = 0

    def read(entry):  # numpy crosses from a decoding process as plain bytes
        return read_entry_clip(entry, num_frames, size, sampling=sampling).numpy()

    decoded = decoded_in_order(dataset.entries, read, check_workers(workers), ahead=2 * workers, name=_entry_name)
    with contextlib.closing(decoded):
        for i, (_, result) in enumerate(tqdm(decoded, total=len(dataset.entries), desc="decoding", disable=not progress, unit="video")):
            if not isinstance(result, Failure):
                clips[kept] = torch.from_numpy(result)
                kept += 1
                continue
            if skipped is None:
                raise ManifestError(result.message)
            skipped[i] = result.message
            tqdm.write(f"warning: skipped {skipped[i]}", file=sys.stderr)
    if skipped:
        return clips[:kept]  # not cached: the cache holds every video's clip
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save(clips, cache)
    return clips


def random_offset_clips(dataset: VideoDataset, indices: torch.Tensor, seed: int, epoch: int, num_frames: int, size: int) -> torch.Tensor:
    """uint8 [len(indices), F, size, size, 3]: each video decoded anew at a random
    time within each of its F segments (seeded by seed, epoch and video)."""
    import numpy as np

    return torch.stack([
        read_entry_clip(dataset.entries[i], num_frames, size, "random", np.random.default_rng([seed, epoch, i]))
        for i in indices.tolist()
    ])


def epoch_sampling(seed: int, epoch: int, num_videos: int, num_frames: int, candidates: int):
    """(video order [N], frame index into the candidate clips [N, F]) for one epoch."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_videos, generator=generator)
    picks = torch.randint(0, candidates, (num_videos, num_frames), generator=generator)
    return order, torch.arange(num_frames) * candidates + picks


def declared_seconds(path) -> float | None:
    """A video's duration as its header declares it, read without decoding a frame; None when it declares
    none (or an absurd one) or cannot be opened (decoding reports that video)."""
    from ..data.video import VideoError, declared_duration, open_video

    try:
        container, stream = open_video(path)
    except VideoError:
        return None
    with container:
        seconds = declared_duration(container, stream)
    return seconds if seconds is not None and math.isfinite(seconds) and seconds > 0 else None


def training_sampling(dataset: VideoDataset, num_frames: int, warn) -> dict | None:
    """The stream sampling that matches training: F grid frames over the median duration D of the training videos
    (a training clip spreads F frames over its whole video), a window every F // 2 frames. Videos that declare no
    duration are left out; with none left, None. A median outside what a model may record (SAMPLING_LIMITS, at most
    MAX_GRID_RATE frames per second) is clamped into it. `warn` takes each warning line."""
    durations = [seconds for seconds in map(declared_seconds, (e.path for e in dataset.entries)) if seconds is not None]
    unknown = len(dataset.entries) - len(durations)
    if not durations:
        warn(f"{dataset.source}: none of its {unknown} videos declares its duration: no stream sampling recorded "
             f"(stream mode will use the defaults)")
        return None
    if unknown:
        warn(f"{dataset.source}: {unknown} of its {len(dataset.entries)} videos declare no duration; "
             f"the stream sampling is the median of the other {len(durations)}")
    median = statistics.median(durations)
    low, high = SAMPLING_LIMITS["window_seconds"]
    seconds = min(max(median, low, num_frames / MAX_GRID_RATE), high)
    source = f"median duration of {len(durations)} training videos"
    if seconds != median:
        source += f" ({median:.4g} s, clamped)"
        warn(f"{dataset.source}: the training videos' median duration {median:.4g} s is outside what a stream window of "
             f"{num_frames} frames may span; recording {seconds:g} s")
    return {**default_sampling(num_frames), "window_seconds": seconds, "stream_fps": num_frames / seconds, "clip_seconds": seconds,
            "source": source}


# ---- model ---------------------------------------------------------------------------------
def model_config(opts: TrainOptions, multi_label: bool, clip=None) -> CMDCLConfig:
    if opts.ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {', '.join(ABLATIONS)}, not {opts.ablation!r}")
    d = preset(opts.preset).to_dict()
    if clip is not None:
        d["vision"] = dataclasses.asdict(clip.visual.cfg)
        if clip.text_config is not None:  # a MiniLM text side (cmdcl-mini-vlm) has no tower config: keep the preset's
            d["text"] = dataclasses.asdict(clip.text_config)
    if opts.image_size:
        d["vision"]["image_size"] = opts.image_size
    if opts.frames:
        d["num_frames"] = opts.frames
    overridden = sorted(set(opts.model_options) & ({"vision", "text", "multi_label"} | set(ABLATIONS["no-both"])))
    if overridden:
        raise ValueError(f"model options cannot set {', '.join(overridden)} (use --ablation, --target or --clip-weights)")
    d.update(opts.model_options)
    d.update(ABLATIONS[opts.ablation], multi_label=multi_label)
    return CMDCLConfig.from_dict(d)


def build_model(opts: TrainOptions, dataset: VideoDataset, with_text_init: bool = True, progress: bool = False) -> tuple[CMDCL, str]:
    """A seeded, untrained CMDCL for `dataset`, and the text-init method used."""
    clip = load_clip(opts.clip_weights) if opts.clip_weights else None
    if clip is not None and opts.image_size and opts.image_size != clip.visual.cfg.image_size:
        raise ValueError(f"--image-size {opts.image_size} differs from the CLIP weights' {clip.visual.cfg.image_size}")
    cfg = model_config(opts, dataset.multi_label, clip)
    method = resolve_method(opts.text_init, clip is not None, clip.text_package if clip else "open_clip") if with_text_init else "random"
    if progress and method == "random" and opts.text_init == "auto":
        import click

        click.echo("warning: no text embedder installed (pip install 'cmdcl[train]'); label texts T start random", err=True)
    init = text_init(dataset.classes, cfg.embed_dim, method, clip)
    torch.manual_seed(opts.seed)
    model = CMDCL.from_clip(cfg, dataset.classes, clip, init) if clip is not None else CMDCL(cfg, dataset.classes, init)
    return model, method


def param_groups(model: CMDCL, opts: TrainOptions) -> list[dict]:
    """Video encoder at lr * encoder_lr_scale; no weight decay on 1-D parameters."""
    groups = {}
    for name, p in model.named_parameters():
        encoder = name.startswith("video_encoder.")
        decay = p.ndim >= 2
        key = (encoder, decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "lr": opts.lr * (opts.encoder_lr_scale if encoder else 1.0),
                "weight_decay": opts.weight_decay if decay else 0.0,
            }
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def warmup_cosine(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def pick_device(name: str) -> torch.device:
    """`--device`: auto (cuda when PyTorch sees a GPU), cpu, cuda or cuda:N; ValueError for a GPU PyTorch does not see."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: PyTorch sees {torch.cuda.device_count()} CUDA GPU(s) on this machine")
    return device


def _distributed() -> tuple[int, int]:
    """(rank, world size), starting the process group under torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


# ---- training ------------------------------------------------------------------------------
def _dictionaries(model: CMDCL, clips: torch.Tensor, data_key: tuple, opts: TrainOptions, device, progress: bool) -> dict:
    """Dictionaries from the frozen (as-initialised) tower; features cached on disk."""
    cache = None
    if opts.cache_dir:
        tower = hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes()
                                        for t in model.video_encoder.state_dict().values())).hexdigest()[:16]
        cache = Path(opts.cache_dir) / f"features-{_cache_key(tower, data_key, clips.shape, model.cfg.token_grid)}.pt"

    def of_these_clips(features) -> bool:
        return (isinstance(features, dict) and features.keys() == {"frame", "patch"}
                and all(isinstance(t, torch.Tensor) for t in features.values())
                and len(features["frame"]) == clips.shape[0] * clips.shape[1])

    features = _load_cached(cache, of_these_clips) if cache is not None else None
    if features is None:
        model.eval()
        features = extract_features(model, clips.flatten(0, 1), device=device, progress=progress)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            _atomic_save(features, cache)
    return build_dictionaries(features, model.cfg.num_bias, model.cfg.num_confounders, opts.seed, progress)


class ResumeError(CmdclError, ValueError):
    """A resume file that cannot continue this run; the message names it."""


class TrainingDiverged(CmdclError):
    """The loss or the weights went NaN or infinite (usually too high a learning rate)."""


def check_finite(loss: float, model: torch.nn.Module, when: str, kept: str) -> None:
    """TrainingDiverged unless `loss` and every floating-point tensor of `model`'s state are finite, so that a
    model that diverged is never saved and no NaN reaches a report; `kept` says what the outputs hold instead."""
    problem = None if math.isfinite(loss) else f"the loss is {loss}"
    if problem is None:
        name = next((name for name, value in model.state_dict().items()
                     if value.is_floating_point() and not bool(torch.isfinite(value).all())), None)
        problem = name and f"weight {name} is not finite"
    if problem:
        raise TrainingDiverged(f"training diverged {when}: {problem} (try a lower --lr); {kept}")


def _read_resume(path: Path, opts: TrainOptions) -> dict:
    """The resume state, loaded weights-only and memory-mapped (tensors are read only when loaded,
    after their shapes are checked), with its plain fields checked against this run's options."""
    from ..model.checkpoint import archive_tensor_bytes

    try:
        archive_tensor_bytes(path)  # as for checkpoints: a zip as torch.save writes it (no compressed entries), of bounded size
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # every way the file can be unreadable, as one line naming it
        raise ResumeError(f"{path}: not a readable cmdcl-train resume file ({first_line(str(exc).removeprefix(f'{path}: '))})") from exc
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise ResumeError(f"{path}: not a cmdcl-train resume file")
    if state.keys() != RESUME_KEYS:
        raise ResumeError(f"{path}: not a complete cmdcl-train resume file (it holds {', '.join(sorted(map(str, state)))})")
    saved = state["options"] if isinstance(state["options"], dict) else {}
    for key, value in dataclasses.asdict(opts).items():
        if key not in RESUME_FREE and saved.get(key) != value:
            raise ResumeError(f"{path}: cannot resume: it was trained with {key}={saved.get(key)!r:.60}, not {getattr(opts, key)!r}")
    epoch, history = state["epoch"], state["history"]
    if type(epoch) is not int or not 1 <= epoch <= opts.epochs:
        raise ResumeError(f"{path}: cannot resume: epoch {epoch!r:.40} is not one of this run's epochs 1-{opts.epochs}")
    if not (isinstance(history, list) and len(history) == epoch and all(
            isinstance(h, dict) and h.keys() == {"epoch", "loss", "accuracy"} and h["epoch"] == n
            and all(type(h[k]) is float for k in ("loss", "accuracy")) for n, h in enumerate(history, start=1))):
        raise ResumeError(f"{path}: cannot resume: its history is not one loss and accuracy for each of its {epoch} epochs")
    if state["text_init"] not in ("clip", "minilm", "random"):
        raise ResumeError(f"{path}: cannot resume: unknown text init {state['text_init']!r:.40}")
    return state


def _tensor_problem(saved, expected: dict) -> str | None:
    """Why the tensors `saved` cannot replace `expected` (name -> tensor), or None."""
    if not isinstance(saved, dict) or saved.keys() != expected.keys():
        return "different names"
    for name, want in expected.items():
        got = saved[name]
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
            return f"{name} is not a {want.dtype} tensor of shape {tuple(want.shape)}"
        if got.is_floating_point() and not torch.isfinite(got).all():
            return f"{name} holds NaN or infinite values"
    return None


def _same(a, b) -> bool:
    """a == b, False where comparing them fails (e.g. a tensor where a number belongs)."""
    try:
        return bool(a == b)
    except Exception:
        return False


def _restore(state: dict, path: Path, model: CMDCL, optimizer, scheduler, steps_per_epoch: int) -> None:
    """Load a resume state into a fresh model, optimizer and scheduler, after checking that it is
    this model's and sits exactly at the end of its epoch in this schedule: a file that does not
    fit raises ResumeError instead of silently changing the model or the learning rates."""
    step = state["epoch"] * steps_per_epoch

    def refuse(problem: str):
        raise ResumeError(f"{path}: cannot resume: {problem}")

    problem = _tensor_problem(state["model"], model.state_dict())
    if problem:
        refuse(f"its model state does not fit this model ({problem})")
    # The schedule after `step` steps, and the optimizer's settings that go with it.
    lrs = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    schedule = {**scheduler.state_dict(), "last_epoch": step, "_step_count": step + 1, "_last_lr": lrs}
    if not _same(state["scheduler"], schedule):
        refuse(f"its learning-rate schedule is not at step {step} ({state['epoch']} epochs of {steps_per_epoch} batches; "
               f"was the data changed?)")
    saved, fresh = state["optimizer"], optimizer.state_dict()
    groups = [{**group, "lr": lr} for group, lr in zip(fresh["param_groups"], lrs)]
    if not (isinstance(saved, dict) and saved.keys() == fresh.keys() and _same(saved["param_groups"], groups)):
        refuse("its optimizer settings (parameter groups, learning rates, weight decay) differ from this run's")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    moments = saved["state"]
    if not isinstance(moments, dict) or not set(moments) <= set(range(len(params))):
        refuse("its optimizer state is for another model")
    for i, moment in moments.items():
        expected = {"step": torch.tensor(float(step)), "exp_avg": params[i], "exp_avg_sq": params[i]}
        problem = _tensor_problem(moment, expected)
        if problem is None and not (moment["step"].item() == step and (moment["exp_avg_sq"] >= 0).all()):
            problem = f"step {moment['step'].item():g} or negative second moments"
        if problem:
            refuse(f"its optimizer state does not fit this model at step {step} ({problem})")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(saved)
    scheduler.load_state_dict(state["scheduler"])


def train(opts: TrainOptions, command: str = "", progress: bool = True, stop_after: int | None = None) -> CMDCL:
    """Train, writing `opts.out` (checkpoint) and `opts.out.resume` after every epoch.

    `stop_after`: end this run after that many epochs (as an interruption would);
    a later run with `resume=True` finishes the schedule. Returns the model (eval
    mode) with `checkpoint_extra` as written to the checkpoint.
    """
    from tqdm import tqdm

    rank, world = _distributed()
    main_process = rank == 0
    show = progress and main_process
    device = pick_device(opts.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if opts.batch_size % world:
        raise ValueError(f"--batch-size {opts.batch_size} must be divisible by the {world} processes")
    if opts.candidates < 0:
        raise ValueError("candidates must be >= 0")

    dataset = load_dataset(opts.data, "train", opts.classes, opts.target)
    steps_per_epoch = len(dataset.entries) // opts.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{dataset.source}: {len(dataset.entries)} videos are fewer than one batch of {opts.batch_size}")
    # --val is read now, so that a bad manifest is reported before training rather than after it.
    val = load_dataset(opts.val, "test", dataset.classes, opts.target) if opts.val and main_process else None
    out = Path(opts.out)
    resume_path = out.with_name(out.name + ".resume")
    check_outputs([("--out", out), ("--out's resume state", resume_path)],
                  [("a training video", e.path) for e in dataset.entries]
                  + [("a --val video", e.path) for e in (val.entries if val else [])])
    resume_state = None
    if opts.resume and resume_path.exists():
        resume_state = _read_resume(resume_path, opts)
    # Only the main process needs the text embedder and the dictionaries:
    # DDP copies its parameters and buffers to the others.
    fresh = main_process and resume_state is None
    model, method = build_model(opts, dataset, with_text_init=fresh, progress=show)
    cfg = model.cfg
    size, num_frames, candidates = cfg.vision.image_size, cfg.num_frames, opts.candidates
    # With candidates == 0 these centred clips only feed the dictionaries, which only a fresh main process builds.
    clips = decode_clips(dataset, num_frames * max(candidates, 1), size, opts.cache_dir, show) if candidates or fresh else None
    targets = dataset.targets(cfg.multi_label)
    sampling = None  # the stream sampling the checkpoint records: only the main process writes it
    if main_process:
        sampling = training_sampling(dataset, num_frames, lambda line: tqdm.write(f"warning: {line}", file=sys.stderr))

    model.to(device)
    if fresh:
        dictionaries = _dictionaries(model, clips, _dataset_fingerprint(dataset), opts, device, show)
        model.set_dictionaries(*(dictionaries[k].to(device) for k in ("bias_dict", "bias_prior", "conf_dict", "conf_prior")))
    optimizer = torch.optim.AdamW(param_groups(model, opts))
    total = steps_per_epoch * opts.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(round(opts.warmup_epochs * steps_per_epoch), total))
    start_epoch, history = 0, []
    if resume_state is not None:
        _restore(resume_state, resume_path, model, optimizer, scheduler, steps_per_epoch)
        start_epoch, history, method = resume_state["epoch"], resume_state["history"], resume_state["text_init"]

    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ablated = not (cfg.textual_intervention and cfg.visual_intervention)
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=ablated)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    end_epoch = opts.epochs if stop_after is None else min(opts.epochs, start_epoch + stop_after)
    for epoch in range(start_epoch, end_epoch):
        model.train()
        order, frame_index = epoch_sampling(opts.seed, epoch, len(dataset.entries), num_frames, max(candidates, 1))
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, videos (this process)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{opts.epochs}", disable=not show, unit="batch")
        for step in bar:
            batch = order[step * opts.batch_size : (step + 1) * opts.batch_size][rank::world]
            if candidates:
                frames = clips[batch[:, None], frame_index[batch]].to(device)
            else:
                frames = random_offset_clips(dataset, batch, opts.seed, epoch, num_frames, size).to(device)
            y = targets[batch].to(device)
            with autocast:
                logits, _ = net(frames)
            loss = model.loss(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            top1 = logits.argmax(dim=1)
            correct = (y[torch.arange(len(y)), top1] > 0) if cfg.multi_label else (top1 == y)
            totals += torch.tensor([loss.item() * len(batch), correct.sum().item(), len(batch)], dtype=torch.float64)
            bar.set_postfix(loss=f"{totals[0] / totals[2]:.3f}", acc=f"{totals[1] / totals[2]:.3f}")
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(totals)
        history.append({"epoch": epoch + 1, "loss": totals[0].item() / totals[2].item(), "accuracy": totals[1].item() / totals[2].item()})
        # the same on every process (the loss is all-reduced, DDP keeps the weights equal): all of them stop
        check_finite(history[-1]["loss"], model, f"in epoch {epoch + 1}",
                     f"{out} and its .resume file keep the last epoch before it, if any")
        if main_process:
            extra = _extra(opts, command, method, history, dataset, sampling)
            save_checkpoint(model, out, extra)
            _atomic_save(
                {
                    "format": RESUME_FORMAT,
                    "epoch": epoch + 1,
                    "options": dataclasses.asdict(opts),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "history": history,
                    "text_init": method,
                },
                resume_path,
            )

    model.checkpoint_extra = _extra(opts, command, method, history, dataset, sampling)
    if val is not None and end_epoch == opts.epochs:
        report = evaluate(model, val, cache_dir=opts.cache_dir, device=device, progress=show)
        model.checkpoint_extra["metrics"]["val"] = report
        save_checkpoint(model, out, model.checkpoint_extra)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return model.eval()


def _extra(opts: TrainOptions, command: str, method: str, history: list, dataset: VideoDataset, sampling: dict | None) -> dict:
    extra = {
        "command": command,
        "options": dataclasses.asdict(opts),
        "text_init": method,
        "frozen_vlm": ("CLIP image tower from --clip-weights" if opts.clip_weights
                       else f"video encoder as initialised with seed {opts.seed} (no pretrained VLM)"),
        "train_data": dataset.source,
        "train_videos": len(dataset.entries),
        "history": history,
        "metrics": {},
    }
    if sampling is not None:
        extra["sampling"] = sampling
    return extra


# ---- evaluation ----------------------------------------------------------------------------
@torch.no_grad()
def predict(model: CMDCL, clips: torch.Tensor, batch_size: int = 16, device="cpu", progress: bool = False) -> torch.Tensor:
    """Logits [N, C] for uint8 clips [N, F, H, W, 3]."""
    from tqdm import tqdm

    model.eval().to(device)
    out = []
    for start in tqdm(range(0, len(clips), batch_size), desc="evaluating", disable=not progress, unit="batch"):
        out.append(model(clips[start : start + batch_size].to(device))[0].float().cpu())
    return torch.cat(out)


def evaluate(model: CMDCL, dataset: VideoDataset, cache_dir: str | None = None, batch_size: int = 16, device="cpu", progress: bool = False,
             sampling: str = "exact", workers: int = 1) -> dict:
    """Metrics of `model` on `dataset` (centred frames, or keyframes with `sampling` "keyframe"), see cmdcl.train.metrics;
    `workers` > 1 decodes that many videos at once (see decode_clips).

    Videos that cannot be read are left out with a warning line each (one bad
    file should not cost a long evaluation); the report's `skipped` lists them
    and `videos` counts those evaluated."""
    if dataset.classes != model.class_names:
        raise ValueError(f"{dataset.source}: its classes differ from the model's ({len(dataset.classes)} vs {len(model.class_names)})")
    skipped: dict[int, str] = {}
    clips = decode_clips(dataset, model.cfg.num_frames, model.cfg.vision.image_size, cache_dir, progress, skipped, sampling, workers)
    return evaluate_clips(model, dataset, clips, skipped, batch_size, device, progress)


def evaluate_clips(model: CMDCL, dataset: VideoDataset, clips: torch.Tensor, skipped: dict[int, str], batch_size: int = 16,
                   device="cpu", progress: bool = False) -> dict:
    """evaluate() on clips already decoded by decode_clips (`skipped`: the entries it could not read)."""
    if len(skipped) == len(dataset.entries):
        raise ValueError(f"{dataset.source}: none of its {len(dataset.entries)} videos could be read")
    dataset = dataclasses.replace(dataset, entries=[e for i, e in enumerate(dataset.entries) if i not in skipped])
    logits = predict(model, clips, batch_size, device, progress)
    report = classification_report(model.probabilities(logits), dataset.targets(model.cfg.multi_label), model.cfg.multi_label,
                                   model.class_names)
    report["skipped"] = list(skipped.values())
    return report
