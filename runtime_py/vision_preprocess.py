"""What the Hugging Face Qwen3.5 processors do to pixels, in NumPy and Pillow (no torch).

    image file ─► RGB ─► smart_resize (sides on multiples of patch × merge, pixel count in bounds;
                 Python's round, half to even) ─► Pillow bicubic ─► x/255 ─► (x − mean)/std
               ─► patchify: 2×2 merge blocks in raster order, each patch row [C, T, p, p]
    pixel_values [P, C·T·p·p] float32, grid (t, h, w) in patches

An image is one temporal patch (the frame repeated T times). A video is a folder of frames taken at
`fps`: frames are sampled like transformers' Qwen3VLVideoProcessor (its `fps`, `min_frames`,
`max_frames`), padded to a multiple of T by repeating the last, all resized to one size, and each
pair of frames is one temporal patch. transformers resizes video frames with torchvision and images
with either backend; this module always uses Pillow (equal to transformers' PIL image processor;
within a few uint8 levels of torchvision where a resize happens, identical where none does).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from graphs.errors import QwenEdgeError

IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
VIDEO_PROCESSOR_FILE = "video_preprocessor_config.json"
COMBINED_PROCESSOR_FILE = "processor_config.json"  # transformers 5's save_pretrained layout
MAX_ASPECT_RATIO = 200
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# First bytes of image formats Pillow reads: a file that starts like one but does not open is damaged.
IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")

# The values the published Qwen3.5 processor files carry, used when an export has none.
PUBLISHED_IMAGE = {"size": {"shortest_edge": 65536, "longest_edge": 16777216}, "patch_size": 16,
                   "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                   "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor",
                   "image_processor_type": "Qwen2VLImageProcessorFast"}
PUBLISHED_VIDEO = {**{k: v for k, v in PUBLISHED_IMAGE.items() if k != "image_processor_type"},
                   "size": {"shortest_edge": 4096, "longest_edge": 25165824}, "fps": 2, "min_frames": 4,
                   "max_frames": 768, "video_processor_type": "Qwen3VLVideoProcessor"}

# The steps transformers' Qwen2-VL image and video processors take when a processor file leaves them
# out, which this module implements. The published files leave them out; transformers.js reads a
# missing `do_normalize` as no normalisation and a missing `resample` as bilinear, so the web bundle
# states them (`explicit_image_processor`). 3 is PIL's bicubic.
PROCESSOR_STEPS = {"do_convert_rgb": True, "do_resize": True, "resample": 3, "do_rescale": True,
                   "rescale_factor": 1 / 255, "do_normalize": True}


@dataclass(frozen=True)
class PixelSettings:
    """One processor's numbers (image or video)."""

    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fps: float = 2.0  # video: frames per second sampled
    min_frames: int = 4
    max_frames: int = 768

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, raw: dict) -> "PixelSettings":
        for key, value in PROCESSOR_STEPS.items():
            given = raw.get(key, value)
            if given != value and not (isinstance(given, float) and math.isclose(given, value)):
                raise QwenEdgeError(f"processor setting {key}={given!r} is not supported (qwen-edge preprocesses "
                                    f"as {key}={value!r}, the Qwen3.5 default); remove it from the processor file")
        size = raw.get("size") or {}
        return cls(int(raw.get("min_pixels", size.get("shortest_edge"))), int(raw.get("max_pixels", size.get("longest_edge"))),
                   int(raw["patch_size"]), int(raw["temporal_patch_size"]), int(raw["merge_size"]),
                   tuple(raw["image_mean"]), tuple(raw["image_std"]), float(raw.get("fps", 2.0)),
                   int(raw.get("min_frames", 4)), int(raw.get("max_frames", 768)))


def processor_dicts(folder: Path) -> tuple[dict, dict]:
    """(image, video) processor settings of an export or checkpoint: the flat published files, else
    transformers 5's combined file, else the published Qwen3.5 values."""
    folder = Path(folder)

    def read(name: str) -> dict | None:
        path = folder / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise QwenEdgeError(f"{path}: not valid JSON ({exc}); re-download the checkpoint's processor files") from None

    combined = read(COMBINED_PROCESSOR_FILE) or {}
    image = read(IMAGE_PROCESSOR_FILE) or combined.get("image_processor") or PUBLISHED_IMAGE
    video = read(VIDEO_PROCESSOR_FILE) or combined.get("video_processor") or PUBLISHED_VIDEO
    return {**PUBLISHED_IMAGE, **image}, {**PUBLISHED_VIDEO, **video}


@dataclass
class VisualInput:
    """One image or video, ready for the vision encoder."""

    kind: str  # "image" | "video"
    pixel_values: np.ndarray  # [t·h·w, C·T·p·p] float32
    grid: tuple[int, int, int]  # (t, h, w) in patches
    timestamps: tuple[float, ...] = ()  # video: seconds of each temporal patch (mean of its frames)

    @property
    def tokens(self) -> int:
        """Prompt tokens it becomes: one per 2×2 block."""
        t, h, w = self.grid
        return t * h * w // 4


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int, frames: int = 1,
                 temporal_factor: int = 1) -> tuple[int, int]:
    """transformers' smart_resize (image form for frames=1; the video form bounds frames × pixels)."""
    if temporal_factor > 1 and (height < factor or width < factor):  # the video form upscales tiny frames
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise QwenEdgeError(f"image of {width}×{height} pixels: aspect ratio above {MAX_ASPECT_RATIO}; crop it first")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(frames / temporal_factor) * temporal_factor if temporal_factor > 1 else 1
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def load_rgb(path: Path) -> Image.Image:
    """An image file as RGB; one clear error for a missing, truncated, corrupt or unsupported file."""
    path = Path(path)
    if not path.is_file():
        raise QwenEdgeError(f"{path}: image not found; pass an image file (PNG, JPEG, WebP, ...)")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except UnidentifiedImageError:
        head = path.read_bytes()[:12]
        if head.startswith(IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
            raise QwenEdgeError(f"{path}: the image is corrupt (its header does not decode); re-save or re-download it") from None
        raise QwenEdgeError(f"{path}: not an image format Pillow reads (PNG, JPEG, WebP, GIF, BMP, TIFF); "
                            "convert it to PNG or JPEG") from None
    except (OSError, SyntaxError, ValueError) as exc:  # Pillow's errors for damaged data
        raise QwenEdgeError(f"{path}: the image is truncated or corrupt ({exc}); re-save or re-download it") from None


def normalize(image: Image.Image, size: tuple[int, int], settings: PixelSettings) -> np.ndarray:
    """Resize (height, width) with Pillow bicubic when needed, then rescale and normalise: [C, H, W] float32."""
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) * np.float32(1 / 255)
    mean = np.asarray(settings.mean, np.float32)[:, None, None]
    std = np.asarray(settings.std, np.float32)[:, None, None]
    return ((x - mean) / std).astype(np.float32)


def patchify(frames: np.ndarray, settings: PixelSettings) -> tuple[np.ndarray, tuple[int, int, int]]:
    """[F, C, H, W] (F a multiple of T) -> rows [F/T·gh·gw, C·T·p·p] in merge-block order, and (t, h, w)."""
    f, c, height, width = frames.shape
    p, m, tp = settings.patch_size, settings.merge_size, settings.temporal_patch_size
    gt, gh, gw = f // tp, height // p, width // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # gt, block row, block col, in-row, in-col, C, T, p, p
    return np.ascontiguousarray(x.reshape(gt * gh * gw, c * tp * p * p)), (gt, gh, gw)


def preprocess_image(path: Path, settings: PixelSettings) -> VisualInput:
    image = load_rgb(path)
    size = smart_resize(image.height, image.width, settings.factor, settings.min_pixels, settings.max_pixels)
    x = normalize(image, size, settings)
    pixels, grid = patchify(np.repeat(x[None], settings.temporal_patch_size, axis=0), settings)
    return VisualInput("image", pixels, grid)


def video_frame_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise QwenEdgeError(f"{folder}: no such folder; --video takes a folder of frame images (sorted by name)")
    frames = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and p.is_file())
    if not frames:
        raise QwenEdgeError(f"{folder}: has no frame images ({', '.join(FRAME_SUFFIXES)}); extract frames into it first")
    return frames


def sample_frame_indices(total: int, video_fps: float, settings: PixelSettings) -> list[int]:
    """Qwen3VLVideoProcessor.sample_frames: `settings.fps` frames per second of a `video_fps` video."""
    count = int(total / video_fps * settings.fps)
    count = min(max(count, settings.min_frames), settings.max_frames, total)
    return [int(i) for i in np.linspace(0, total - 1, count).round().astype(int)]


def preprocess_video(folder: Path, video_fps: float, settings: PixelSettings) -> VisualInput:
    """A folder of frames captured at `video_fps` -> sampled, resized, temporal patches of T frames."""
    if video_fps <= 0:
        raise QwenEdgeError(f"--fps {video_fps}: give the frame rate the frames were taken at (> 0)")
    files = video_frame_files(folder)
    indices = sample_frame_indices(len(files), video_fps, settings)
    images = [load_rgb(files[i]) for i in indices]
    tp = settings.temporal_patch_size
    if len(images) < tp:
        raise QwenEdgeError(f"{folder}: {len(images)} frame(s) sampled; a video needs at least {tp}")
    first = images[0]
    if any(im.size != first.size for im in images):
        raise QwenEdgeError(f"{folder}: frames differ in size; every frame of a video must have the same size")
    size = smart_resize(first.height, first.width, settings.factor, settings.min_pixels, settings.max_pixels,
                        frames=len(images), temporal_factor=tp)
    frames = np.stack([normalize(im, size, settings) for im in images])
    if pad := -len(frames) % tp:  # repeat the last frame, as transformers does
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    pixels, grid = patchify(frames, settings)
    padded = indices + [indices[-1]] * (-len(indices) % tp)
    stamps = tuple((padded[i] / video_fps + padded[i + tp - 1] / video_fps) / 2 for i in range(0, len(padded), tp))
    return VisualInput("video", pixels, grid, stamps)


def explicit_image_processor(folder: Path) -> dict:
    """The image processor settings of an export with every step stated (PROCESSOR_STEPS), as a
    processor that does not apply transformers' defaults (transformers.js) must read them."""
    return {**PROCESSOR_STEPS, **processor_dicts(folder)[0]}


def write_flat_processor_files(src: Path, dst: Path) -> list[str]:
    """Write `preprocessor_config.json` and `video_preprocessor_config.json` into `dst` where missing,
    from `src`'s processor files (transformers 5's combined file included) or the published values:
    transformers.js reads only the flat files. Returns the names written."""
    image, video = processor_dicts(src)
    written = []
    for name, values in ((IMAGE_PROCESSOR_FILE, image), (VIDEO_PROCESSOR_FILE, video)):
        if not (Path(dst) / name).is_file():
            (Path(dst) / name).write_text(json.dumps(values, indent=2) + "\n")
            written.append(name)
    return written
