"""Images and video in a prompt: placeholder tokens, the vision encoder, mRoPE positions, the scatter.

    text with <|image_pad|> / <|video_pad|>  ─► expand_placeholders (one pad per merged 2×2 block;
                                                 a video becomes "<t seconds>" + one start/pads/end
                                                 per temporal patch, as Qwen3VLProcessor writes it)
    token ids ─► embed_tokens ─┐
    pixels ─► vision_encoder ──┴► scatter: the features replace the pad rows, in order
    token ids + grids ─► rope_index: 3-row positions (time, height, width) and the delta

The positions are transformers' Qwen3.5 `get_rope_index`: text runs advance all three rows by one per
token; a vision run of an (h, w) grid in merged blocks puts block (i, j) at (cur, cur + i, cur + j)
and then advances `cur` by max(h, w); video frames are single-frame grids. After the prompt, decode
token k sits at max(position) + 1 + k in all three rows (= prompt length + k + delta).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from graphs.config import VisionConfig, vision_config_from_dict
from graphs.errors import QwenEdgeError
from graphs.file_checks import member
from runtime_py.export_format import onnx_vision_file
from runtime_py.session import OnnxModel
from runtime_py.tokenizer import TextTokenizer
from runtime_py.vision_preprocess import (PixelSettings, VisualInput, preprocess_image, preprocess_video,
                                          processor_dicts)

TEXT, IMAGE, VIDEO = 0, 1, 2  # transformers' mm_token_type_ids


@dataclass(frozen=True)
class VisionTokens:
    """The four special tokens of a vision prompt, as text and as ids."""

    image_pad: str
    video_pad: str
    start: str
    end: str
    image_id: int
    video_id: int

    @classmethod
    def of(cls, cfg: VisionConfig, token_text: Callable[[int], str | None]) -> "VisionTokens":
        names = [token_text(i) for i in (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
                                         cfg.vision_end_token_id)]
        if None in names:
            raise QwenEdgeError("tokenizer.json lacks the vision tokens config.json names (image_token_id, ...); "
                                "export from a checkpoint whose tokenizer has them")
        return cls(*names, cfg.image_token_id, cfg.video_token_id)

    def placeholder(self, kind: str) -> str:
        """What a chat template writes for one image or video (before expansion)."""
        return self.start + (self.image_pad if kind == "image" else self.video_pad) + self.end


def expand_placeholders(text: str, visuals: list[VisualInput], tokens: VisionTokens) -> str:
    """Replace the i-th image/video pad of `text` by the pads of the i-th image/video (in order)."""
    images = [v for v in visuals if v.kind == "image"]
    videos = [v for v in visuals if v.kind == "video"]
    for kind, pad, items in (("image", tokens.image_pad, images), ("video", tokens.video_pad, videos)):
        found = text.count(pad)
        if found != len(items):
            raise QwenEdgeError(f"the prompt has {found} {kind} placeholder(s) ({pad}) for {len(items)} {kind}(s); "
                                f"give one {kind} per placeholder")
    out, images_left, videos_left, i = [], iter(images), iter(videos), 0
    while i < len(text):
        if text.startswith(tokens.image_pad, i):
            out.append(tokens.image_pad * next(images_left).tokens)
            i += len(tokens.image_pad)
        elif text.startswith(tokens.video_pad, i):
            video = next(videos_left)
            per_frame = video.tokens // video.grid[0]
            out.append("".join(f"<{ts:.1f} seconds>" + tokens.start + tokens.video_pad * per_frame + tokens.end
                               for ts in video.timestamps))
            i += len(tokens.video_pad)
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def token_types(ids: list[int], tokens: VisionTokens) -> np.ndarray:
    kinds = {tokens.image_id: IMAGE, tokens.video_id: VIDEO}
    return np.array([kinds.get(t, TEXT) for t in ids], np.int64)


def rope_index(types: np.ndarray, visuals: list[VisualInput], merge: int) -> tuple[np.ndarray, int]:
    """3-row mRoPE positions [3, L] of one unpadded prompt and its delta (max + 1 − L)."""
    grids = {IMAGE: iter([v.grid for v in visuals if v.kind == "image"]),
             VIDEO: iter([(1, h, w) for v in visuals if v.kind == "video" for t, h, w in [v.grid] for _ in range(t)])}
    pieces, cur, start = [], 0, 0
    bounds = np.flatnonzero(np.diff(types)) + 1
    for end in [*bounds.tolist(), len(types)]:
        kind, n = int(types[start]), end - start
        if kind == TEXT:
            pieces.append(np.broadcast_to(np.arange(cur, cur + n), (3, n)))
            cur += n
        else:
            t, h, w = next(grids[kind])
            gh, gw = h // merge, w // merge
            if n != t * gh * gw:
                raise QwenEdgeError(f"a run of {n} vision pad tokens does not match its grid {t}×{h}×{w}; "
                                    "the prompt and the images disagree")
            tt, hh, ww = np.meshgrid(np.zeros(t, np.int64), np.arange(gh), np.arange(gw), indexing="ij")
            pieces.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + cur)
            cur += max(gh, gw)
        start = end
    positions = np.concatenate(pieces, axis=1).astype(np.int64)
    return positions, int(positions.max()) + 1 - len(types)


def scatter_features(embeds: np.ndarray, types: np.ndarray, features: dict[int, np.ndarray]) -> np.ndarray:
    """inputs_embeds [L, hidden] with the rows of each vision kind replaced by its features, in order."""
    out = embeds.copy()
    for kind, rows in features.items():
        where = np.flatnonzero(types == kind)
        if len(where) != len(rows):
            raise QwenEdgeError(f"{len(where)} placeholder tokens but {len(rows)} feature rows; the prompt and the "
                                "images disagree")
        out[where] = rows.astype(out.dtype)
    return out


class VisionEncoder:
    """`vision_encoder{suffix}.onnx` of one export variant, with the export's processor settings."""

    def __init__(self, export_dir: Path, variant: str, threads: int | None = None) -> None:
        export_dir = Path(export_dir)
        self.config = vision_config_from_dict(json.loads((export_dir / "config.json").read_text()))
        path = onnx_vision_file(export_dir, variant)
        if self.config is None:
            raise QwenEdgeError(f"{export_dir}: config.json has no vision tower; --image and --video need an export "
                                "of a qwen3_5 checkpoint with model.visual.* weights")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        image, video = processor_dicts(export_dir)
        self.image_settings, self.video_settings = PixelSettings.from_dict(image), PixelSettings.from_dict(video)

    def image(self, path: Path) -> VisualInput:
        return preprocess_image(path, self.image_settings)

    def video(self, folder: Path, fps: float) -> VisualInput:
        return preprocess_video(folder, fps, self.video_settings)

    def encode(self, visual: VisualInput) -> np.ndarray:
        """Image features [tokens, hidden] in the variant's activation dtype."""
        grid = np.array([visual.grid], np.int64)
        return self.session.run(None, {"pixel_values": visual.pixel_values, "image_grid_thw": grid})[0]


@dataclass
class MultimodalPrompt:
    """A prompt ready for prefill: its token ids, embeddings with the features in, and positions."""

    ids: list[int]
    embeds: np.ndarray  # [1, L, hidden]
    positions: np.ndarray  # [3, 1, L]
    delta: int


def embed_prompt(ids: list[int], visuals: list[VisualInput], encoder: VisionEncoder, tokens: VisionTokens,
                 embed_ids: Callable[[np.ndarray], np.ndarray]) -> MultimodalPrompt:
    """Token ids of an expanded prompt -> embeddings with the encoded pixels scattered in, and positions."""
    types = token_types(ids, tokens)
    positions, delta = rope_index(types, visuals, encoder.config.spatial_merge_size)
    embeds = embed_ids(np.array([ids], np.int64))[0]
    features = {}
    for kind, name in ((IMAGE, "image"), (VIDEO, "video")):
        rows = [encoder.encode(v) for v in visuals if v.kind == name]
        if rows:
            features[kind] = np.concatenate(rows)
    embeds = scatter_features(embeds, types, features)
    return MultimodalPrompt(ids, embeds[None], positions[:, None, :], delta)


@dataclass(frozen=True)
class VisualRequest:
    """Images and a video for one prompt (`generate --image FILE ... --video DIR --fps N`)."""

    images: tuple[Path, ...] = ()
    video: Path | None = None
    fps: float | None = None  # the rate the video's frames were taken at

    def __bool__(self) -> bool:
        return bool(self.images) or self.video is not None

    def parts(self) -> list[dict]:
        """The images and the video as chat message parts (images first, as given)."""
        parts = [{"type": "image", "image": str(p)} for p in self.images]
        if self.video is not None:
            parts.append({"type": "video", "video": str(self.video), **({"fps": self.fps} if self.fps else {})})
        return parts


VISUAL_PART_TYPES = ("image", "image_url", "video")


def visual_parts(messages: list[dict]) -> list[dict]:
    """Every image and video part of a conversation, in order."""
    return [part for message in messages if isinstance(message.get("content"), list)
            for part in message["content"] if isinstance(part, dict) and part.get("type") in VISUAL_PART_TYPES]


def with_visuals(messages: list[dict], request: VisualRequest) -> list[dict]:
    """`messages` with the command line's images and video put in front of the last user turn's text."""
    if not request:
        return messages
    out = [dict(m) for m in messages]
    users = [i for i, m in enumerate(out) if m.get("role") == "user"]
    if not users:
        raise QwenEdgeError("--image / --video go into a user turn, and the conversation has none")
    last = out[users[-1]]
    content = last.get("content")
    text = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
    last["content"] = request.parts() + text
    return out


def _source_slot(part: dict) -> tuple[dict, str]:
    """Where an image / video message part names its file: (the dict holding it, its key)."""
    if part["type"] == "video":
        return part, "video" if part.get("video") else "path"
    if part["type"] == "image_url" and isinstance(part.get("image_url"), dict):
        return part["image_url"], "url"
    keys = ("image_url",) if part["type"] == "image_url" else ("image", "path", "url")
    return part, next((k for k in keys if part.get(k)), keys[0])


def _part_source(part: dict, where: str) -> tuple[str, Path, float | None]:
    """(kind, file or folder, fps) of one image / video message part."""
    kind = "video" if part["type"] == "video" else "image"
    fps = part.get("fps") if kind == "video" else None
    holder, key = _source_slot(part)
    source = holder.get(key)
    if not isinstance(source, str) or not source:
        raise QwenEdgeError(f"{where}: {'a video' if kind == 'video' else 'an image'} part names no file; give "
                            + ('{"type": "video", "video": "FRAMES_DIR", "fps": N}' if kind == "video"
                               else '{"type": "image", "image": "PATH"}'))
    if source.startswith("file://"):
        source = source[len("file://"):]
    elif "://" in source or source.startswith("data:"):
        raise QwenEdgeError(f"{where}: {source[:40]!r} is not a local file; qwen-edge reads images from disk")
    return kind, Path(source), fps


def anchor_visual_sources(messages: list[dict], folder: Path, where: str) -> None:
    """Resolve the image and video files a message file names against that file's folder, in place;
    a name that leads outside the folder is refused (only what the user handed over is read; an image
    from elsewhere goes on the command line, `--image FILE`)."""
    for i, part in enumerate(visual_parts(messages)):
        at = f"{where} (image/video part {i + 1})"
        holder, key = _source_slot(part)
        if not isinstance(holder.get(key), str) or not holder.get(key):
            continue  # names no file: reported where the part is used (or that the export has no tower)
        _, source, _ = _part_source(part, at)
        if source.is_absolute():  # e.g. a file:// URL: fine if it is inside the folder
            try:
                source = Path(os.path.abspath(source)).relative_to(os.path.abspath(folder))
            except ValueError:
                raise QwenEdgeError(f"{at}: names a file outside {folder}: {str(source)!r:.80}; a message file's "
                                    "images and video must be inside its folder (or give them with --image / "
                                    "--video)") from None
        holder[key] = str(member(folder, source.as_posix(), at, follow_links=True))


def context_length(export_dir: Path) -> int:
    config = json.loads((Path(export_dir) / "config.json").read_text())
    text = config.get("text_config", config)
    return int(text.get("max_position_embeddings", config.get("max_position_embeddings", 4096)))


def plain_prompt_text(prompt: str, visuals: list[VisualInput], tokens: VisionTokens) -> str:
    """A plain prompt as written when it already has one placeholder per image/video, else with the
    placeholders in front of it."""
    if tokens.image_pad in prompt or tokens.video_pad in prompt:
        return prompt
    return "".join(tokens.placeholder(v.kind) for v in visuals) + prompt


def visual_prompt(export_dir: Path, variant: str, text: str, parts: list[dict], tokenizer: TextTokenizer,
                  model: OnnxModel, max_new_tokens: int, threads: int | None = None, *,
                  plain: bool = False, default_fps: float | None = None) -> MultimodalPrompt:
    """Everything between a prompt with images or video and prefill: preprocess the parts' files,
    expand the placeholders of `text` (a rendered chat prompt, or with `plain` a prompt that gets the
    placeholders in front unless it has them), encode, scatter, positions. Refuses a prompt the
    context cannot hold."""
    encoder = VisionEncoder(export_dir, variant, threads)
    visuals = []
    for i, part in enumerate(parts):
        kind, source, fps = _part_source(part, f"image/video part {i + 1}")
        if kind == "video":
            fps = fps or default_fps
            if not fps:
                raise QwenEdgeError("--video needs --fps (or the video part an \"fps\"): the frame rate the frames "
                                    "in the folder were taken at")
            visuals.append(encoder.video(source, float(fps)))
        else:
            visuals.append(encoder.image(source))
    tokens = VisionTokens.of(encoder.config, tokenizer.tokenizer.id_to_token)
    if plain:
        text = plain_prompt_text(text, visuals, tokens)
    ids = tokenizer.encode(expand_placeholders(text, visuals, tokens))
    limit = context_length(export_dir)
    if len(ids) + max_new_tokens > limit:
        patch = encoder.config.patch_size
        sizes = ", ".join(f"{v.kind} resized to {v.grid[2] * patch}×{v.grid[1] * patch} = {v.tokens} tokens"
                          for v in visuals)
        raise QwenEdgeError(f"the prompt is {len(ids)} tokens ({sizes}) plus {max_new_tokens} new ones, more than the "
                            f"model's context of {limit}; use a smaller image, fewer frames or fewer new tokens")
    return embed_prompt(ids, visuals, encoder, tokens, model.embed_ids)
