"""Videos in conversation records: which frames are taken, and how a video is laid out as images.

A record's `video` is a list of frame images (always accepted) or a video file (read with PyAV, the
`av` package, when it is installed); its one `<video>` placeholder says where it goes in a user turn.
Frames are taken every 1/`fps` seconds from the first frame (the nearest frame to each time), and if
that gives more than `max_frames`, `max_frames` of them evenly spread. A frame list's times come from
the record's `timestamps` (seconds, one per frame) or `fps` (its frame rate); a list with neither is
taken as already sampled (every frame kept, up to `max_frames`). A file's times are its frames' own.

The encoder sees every frame as an image. A bridge that reads a whole video at once (`reads_video`:
the Perceiver Resampler, with its temporal embeddings) takes the video as one input of its
`num_tokens` tokens; any other bridge takes the frames as consecutive images (LLaMA-VID: 2 tokens
each). `expand` rewrites a record accordingly: `<video>` becomes one `<image>` per input, so the
processor counts the video's tokens exactly as the bridge emits them, and never cuts them apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from numbers import Real

import numpy as np

from mmbridge.core import RecipeError
from mmbridge.data.llava import DataError, check_record, record_images
from mmbridge.registry import SETTINGS

VIDEO_TOKEN = "<video>"
IMAGE_TOKEN = "<image>"
_PLACEHOLDER = re.compile(f"({IMAGE_TOKEN}|{VIDEO_TOKEN})")
OPTIONS = ("fps", "max_frames")


@dataclass(frozen=True)
class VideoSampling:
    """How videos are read: frames per second taken, the most frames kept, and whether the bridge takes a
    whole video as one input (`whole`) or each frame as an image."""

    fps: float = 1.0
    max_frames: int = 8
    whole: bool = False

    def __post_init__(self):
        if isinstance(self.fps, bool) or not isinstance(self.fps, Real) or not self.fps > 0:
            raise ValueError(f"video.fps: expected a positive number, got {self.fps!r}")
        if type(self.max_frames) is not int or self.max_frames < 1:
            raise ValueError(f"video.max_frames: expected a positive integer, got {self.max_frames!r}")

    @classmethod
    def from_options(cls, options: dict | None, whole: bool = False) -> VideoSampling:
        """From a recipe's `model.video` ({fps, max_frames})."""
        options = dict(options or {})
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise ValueError(f"model.video: unknown key(s) {sorted(unknown)}; expected some of {list(OPTIONS)}")
        return cls(**options, whole=whole)

    @property
    def key(self) -> str:
        """These settings as a short name (part of a data index's cache key)."""
        return f"video{self.fps:g}x{self.max_frames}{'w' if self.whole else 'f'}"


def sampling_of(processor) -> VideoSampling:
    """The processor's video settings (`build_model` sets them from the recipe; default: 1 fps, 8 frames)."""
    return getattr(processor, "video", None) or VideoSampling()


def sample_indices(times, fps: float, max_frames: int) -> np.ndarray:
    """Indices of the frames taken from frames at `times` (seconds, ascending): the nearest frame to each
    of t0, t0 + 1/fps, … up to the last frame's time (ties: the earlier), each once; then, if more
    than `max_frames`, that many of them evenly spread (first and last kept)."""
    times = np.asarray(times, dtype=np.float64)
    if not len(times):
        return np.zeros(0, dtype=np.int64)
    steps = int(np.floor((times[-1] - times[0]) * fps + 1e-6)) + 1
    targets = times[0] + np.arange(steps) / fps
    right = np.searchsorted(times, targets).clip(0, len(times) - 1)
    left = (right - 1).clip(0)
    nearest = np.where(np.abs(times[left] - targets) <= np.abs(times[right] - targets), left, right)
    return spread(np.unique(nearest), max_frames)


def spread(picks: np.ndarray, max_frames: int) -> np.ndarray:
    """At most `max_frames` of `picks`, evenly spread (positions rounded, first and last kept)."""
    picks = np.asarray(picks, dtype=np.int64)
    if len(picks) <= max_frames:
        return picks
    return picks[np.round(np.linspace(0, len(picks) - 1, max_frames)).astype(np.int64)]


def frame_times(record: dict, n: int, where: str) -> np.ndarray | None:
    """The times of a frame list's `n` frames: its `timestamps`, or i / its `fps`; None if it gives neither."""
    stamps, fps = record.get("timestamps"), record.get("fps")
    if stamps is not None:
        if (
            not isinstance(stamps, list)
            or len(stamps) != n
            or not all(isinstance(t, Real) and not isinstance(t, bool) for t in stamps)
        ):
            raise DataError(
                f"{where}: 'timestamps' must be a list of {n} numbers (seconds, one per frame)", "bad video timestamps"
            )
        times = np.asarray(stamps, dtype=np.float64)
        if (np.diff(times) < 0).any() or not np.isfinite(times).all():
            raise DataError(f"{where}: 'timestamps' must be finite and in order", "bad video timestamps")
        return times
    if fps is not None:
        if isinstance(fps, bool) or not isinstance(fps, Real) or not fps > 0:
            raise DataError(f"{where}: 'fps' must be a positive number, got {fps!r}", "bad video fps")
        return np.arange(n) / float(fps)
    return None


# -- video files (PyAV) -------------------------------------------------------------------------------
def _av(where: str, name: str):
    try:
        import av
    except ImportError as e:
        raise DataError(
            f"{where}: 'video' is a video file ({name}) and reading one needs PyAV: install it "
            "(pip install av), or give the video as a list of frame images",
            "no video decoder",
        ) from e
    return av


def probe_times(path, where: str, name: str) -> np.ndarray:
    """Presentation times (seconds, ascending) of every frame of a video file's first video stream."""
    av = _av(where, name)
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            pts = [p.pts for p in container.demux(stream) if p.pts is not None]
            base = float(stream.time_base)
    except (av.FFmpegError, IndexError, OSError) as e:
        raise DataError(f"{where}: cannot read the video file {name}: {e}", "unreadable video") from e
    if not pts:
        raise DataError(f"{where}: the video file {name} has no frames", "unreadable video")
    return np.sort(np.asarray(pts, dtype=np.float64)) * base


def decode_frames(path, indices: list[int]) -> dict[int, object]:
    """Frames `indices` (in presentation order) of a video file as RGB PIL images; OSError if unreadable."""
    import av

    wanted, out = set(indices), {}
    try:
        with av.open(str(path)) as container:
            for k, frame in enumerate(container.decode(video=0)):
                if k in wanted:
                    out[k] = frame.to_image().convert("RGB")
                if len(out) == len(wanted):
                    break
    except av.FFmpegError as e:
        raise OSError(str(e)) from e
    if len(out) != len(wanted):
        raise OSError(f"frames {sorted(wanted - set(out))} not found")
    return out


# -- records ------------------------------------------------------------------------------------------
def video_frames(record: dict, sampling: VideoSampling, where: str, locate) -> list:
    """The frames taken from a record's video: names from its frame list, or (file name, frame index) pairs.
    `locate(name)` is where a video file is (for PyAV); None: files cannot be read here."""
    video = record["video"]
    if isinstance(video, str):
        if locate is None:
            raise DataError(
                f"{where}: video files are read from a folder of files, not from shards; give the "
                "video as a list of frame images",
                "video file in shards",
            )
        from mmbridge.data.images import ImageError

        try:
            path = locate(video)  # a regular file under the image root (`media.media_path`)
        except ImageError as e:
            raise DataError(f"{where}: 'video': {e}", getattr(e, "kind", "unreadable video")) from e
        times = probe_times(path, where, video)
        return [(video, int(k)) for k in sample_indices(times, sampling.fps, sampling.max_frames)]
    times = frame_times(record, len(video), where)
    picks = (
        spread(np.arange(len(video)), sampling.max_frames)
        if times is None
        else sample_indices(times, sampling.fps, sampling.max_frames)
    )
    return [video[int(k)] for k in picks]


def expand(record: dict, sampling: VideoSampling, where: str, locate=None) -> dict:
    """A record with a `video`, as images the processor and the bridge read: `<video>` replaced by one
    `<image>` per input (one per frame, or one for the whole video), `image` naming each input in text
    order and `frames` listing each input's frames (a name, or a (file, frame index) pair). A record
    without a video comes back as it is. Raises DataError naming `where` for a bad record."""
    if "video" not in record:
        return record
    check_record(record, where)
    frames = video_frames(record, sampling, where, locate)
    if not frames:
        raise DataError(f"{where}: the video has no frames", "empty video")
    units = [frames] if sampling.whole else [[f] for f in frames]
    names = [_name(u[0]) for u in units]
    images = iter(record_images(record))
    layout, conversations = [], []
    for turn in record["conversations"]:
        value = turn["value"]
        if VIDEO_TOKEN in value:
            for mark in _PLACEHOLDER.findall(value):
                layout += list(zip(names, units)) if mark == VIDEO_TOKEN else [(next(images),) * 2]
            turn = {**turn, "value": value.replace(VIDEO_TOKEN, IMAGE_TOKEN * len(units))}
        else:
            layout += [(next(images),) * 2 for _ in range(value.count(IMAGE_TOKEN))]
        conversations.append(turn)
    out = {k: v for k, v in record.items() if k not in ("video", "fps", "timestamps")}
    out["image"] = [name for name, _ in layout]
    out["frames"] = [unit if isinstance(unit, list) else [unit] for _, unit in layout]
    out["conversations"] = conversations
    return out


def _name(frame) -> str:
    return frame if isinstance(frame, str) else f"{frame[0]}#frame{frame[1]}"


def record_units(record: dict) -> list[list]:
    """Each visual input of an expanded record with its frames (an image is one input of one frame)."""
    return record.get("frames") or [[name] for name in record_images(record)]


def load_frames(units: list[list], open_image, locate) -> list:
    """Every frame of `units`, in order, as PIL images: `open_image(name)` for a frame image, a video
    file's frames decoded once per file from `locate(name)`. Raises ImageError for an unreadable one."""
    from mmbridge.data.images import ImageError

    flat = [f for unit in units for f in unit]
    wanted: dict[str, list[int]] = {}
    for f in flat:
        if not isinstance(f, str):
            wanted.setdefault(f[0], []).append(int(f[1]))
    decoded = {}
    for name, indices in wanted.items():
        try:
            decoded[name] = decode_frames(locate(name), indices)
        except (OSError, ImportError) as e:
            raise ImageError(locate(name), f"cannot decode the video's frames: {e}") from e
    return [open_image(f) if isinstance(f, str) else decoded[f[0]][int(f[1])] for f in flat]


@SETTINGS.register("model.video")
def check_video_settings(options, where: str) -> None:
    """`model.video`: how frames are taken from a video (`VideoSampling.from_options`)."""
    try:
        VideoSampling.from_options(options)
    except (TypeError, ValueError) as e:
        prefix = where.removesuffix("model.video")  # a message may name its own key under model.video
        raise RecipeError(f"{prefix}{e}" if str(e).startswith("model.video") else f"{where}: {e}") from e
