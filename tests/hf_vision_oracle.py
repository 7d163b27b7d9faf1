"""transformers as the oracle of image and video prompts, runnable without torchvision.

transformers 5.24's Qwen3VLProcessor cannot be built without torchvision (its video processor has
only a torchvision backend), and CI has none (the only torchvision wheel here is a CUDA build).
So the inputs are assembled from transformers' own pieces, each the code the processor runs:

    images       Qwen2VLImageProcessorPil (transformers' PIL backend) -> pixel_values, image_grid_thw
    video        Qwen3VLVideoProcessor.sample_frames (frame indices), the PIL backend's rescale and
                 normalize per frame, Qwen3VLVideoProcessor.patchify (the torch reshape)
    prompt       Qwen3VLProcessor.replace_image_token / replace_video_token (timestamps included)
    token types  1 for <|image_pad|>, 2 for <|video_pad|> (ProcessorMixin.create_mm_token_type_ids)

The one step this skips is the video processor's torchvision resize: the test videos are already at
a size smart_resize keeps (64×96), where no resize happens. Checked once against the real
Qwen3VLProcessor with torchvision (BENCHMARKS.md / README, "vision oracle"): identical input_ids and
pixel values for the test prompts.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, BatchFeature, Qwen3_5ForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.video_utils import VideoMetadata

from runtime_py.vision_preprocess import processor_dicts, video_frame_files


def hf_vl_model(folder: Path) -> Qwen3_5ForConditionalGeneration:
    return Qwen3_5ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


def _video_inputs(folder: Path, frames_dir: Path, fps: float) -> dict:
    _, video_cfg = processor_dicts(folder)
    files = video_frame_files(frames_dir)
    sampler = SimpleNamespace(fps=video_cfg["fps"], min_frames=video_cfg["min_frames"], max_frames=video_cfg["max_frames"])
    metadata = VideoMetadata(total_num_frames=len(files), fps=fps)
    indices = Qwen3VLVideoProcessor.sample_frames(sampler, metadata)
    metadata.frames_indices = list(indices)
    pil = Qwen2VLImageProcessorPil(image_mean=video_cfg["image_mean"], image_std=video_cfg["image_std"])
    frames = []
    for i in indices:
        x = np.asarray(Image.open(files[i]).convert("RGB")).transpose(2, 0, 1)
        frames.append(pil.normalize(pil.rescale(x, 1 / 255), video_cfg["image_mean"], video_cfg["image_std"]))
    video = torch.from_numpy(np.stack(frames).astype(np.float32))[None]
    patches, t, h, w = Qwen3VLVideoProcessor.patchify(None, video, video_cfg["patch_size"], video_cfg["merge_size"],
                                                     video_cfg["temporal_patch_size"])
    return {"pixel_values_videos": patches[0], "video_grid_thw": torch.tensor([[t, h, w]]),
            "video_metadata": [metadata]}


def hf_inputs(folder: Path, text: str, images: list[Path] = (), video: Path | None = None,
              fps: float | None = None) -> BatchFeature:
    """What Qwen3VLProcessor(text=[text], images=..., videos=...) returns for a prompt whose chat
    template already put one <|image_pad|> / <|video_pad|> per image / video."""
    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    image_cfg, video_cfg = processor_dicts(folder)
    data: dict = {}
    if images:
        processor = Qwen2VLImageProcessorPil(**{k: image_cfg[k] for k in (
            "size", "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")})
        data.update(processor([Image.open(p) for p in images], return_tensors="pt"))
    if video is not None:
        data.update(_video_inputs(folder, Path(video), fps))
    this = SimpleNamespace(image_processor=SimpleNamespace(merge_size=image_cfg["merge_size"]),
                           video_processor=SimpleNamespace(merge_size=video_cfg["merge_size"],
                                                           temporal_patch_size=video_cfg["temporal_patch_size"]),
                           image_token="<|image_pad|>", video_token="<|video_pad|>",
                           vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>")
    this._calculate_timestamps = lambda *a: Qwen3VLProcessor._calculate_timestamps(this, *a)
    pieces, counts, rest = [], {"image": 0, "video": 0}, text
    while True:  # each placeholder, in order, replaced by the processor's own expansion
        at = {k: rest.find(tok) for k, tok in (("image", this.image_token), ("video", this.video_token))}
        found = {k: v for k, v in at.items() if v >= 0}
        if not found:
            pieces.append(rest)
            break
        kind = min(found, key=found.get)
        pieces.append(rest[: found[kind]])
        if kind == "image":
            pieces.append(Qwen3VLProcessor.replace_image_token(this, data, counts["image"]))
            rest = rest[found[kind] + len(this.image_token):]
        else:
            pieces.append(Qwen3VLProcessor.replace_video_token(this, data, counts["video"]))
            rest = rest[found[kind] + len(this.video_token):]
        counts[kind] += 1
    enc = tokenizer(["".join(pieces)], return_tensors="pt", add_special_tokens=False)
    ids = enc["input_ids"]
    image_id, video_id = tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"])
    types = torch.zeros_like(ids) + (ids == image_id).long() + 2 * (ids == video_id).long()
    data.pop("video_metadata", None)
    return BatchFeature({**enc, "mm_token_type_ids": types, **data})


@torch.no_grad()
def hf_greedy(model: Qwen3_5ForConditionalGeneration, inputs: BatchFeature, new_tokens: int = 16) -> list[int]:
    out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@torch.no_grad()
def hf_features(model: Qwen3_5ForConditionalGeneration, pixel_values: torch.Tensor, grid: torch.Tensor) -> np.ndarray:
    return model.model.visual(pixel_values, grid_thw=grid).pooler_output.float().numpy()


@torch.no_grad()
def hf_positions(model: Qwen3_5ForConditionalGeneration, inputs: BatchFeature) -> tuple[np.ndarray, int]:
    pos, delta = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                            image_grid_thw=inputs.get("image_grid_thw"),
                                            video_grid_thw=inputs.get("video_grid_thw"),
                                            attention_mask=inputs["attention_mask"])
    return pos[:, 0].numpy(), int(delta[0, 0])
