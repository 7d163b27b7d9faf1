"""A tiny random multimodal Qwen3.5 checkpoint (text decoder + vision tower) with everything a real
one ships: the default model's tokenizer plus the four vision tokens, a chat template that renders
image and video parts, and the flat processor files of the published checkpoints."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer

from default_model import CHECKPOINT_DIR
from graphs.random_checkpoint import write_random_checkpoint
from runtime_py.vision_preprocess import PUBLISHED_IMAGE, PUBLISHED_VIDEO

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# Qwen3.5's template reduced to what matters here: string or list content, image (and OpenAI image_url),
# video and text parts, each as the published template tests them.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' or 'image_url' in c %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Small pixel bounds keep the test prompts short (a 64×64 image is 4 tokens).
IMAGE_PIXELS = {"shortest_edge": 4096, "longest_edge": 65536}
VIDEO_PIXELS = {"shortest_edge": 4096, "longest_edge": 262144}
TINY_VISION = {"model_type": "qwen3_5_vision", "depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64,
               "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "patch_size": 16, "temporal_patch_size": 2,
               "spatial_merge_size": 2, "num_position_embeddings": 64, "out_hidden_size": 64,
               "deepstack_visual_indexes": []}


def tiny_vl_config(text: dict, ids: dict[str, int]) -> dict:
    text = copy.deepcopy(text)
    text["model_type"] = "qwen3_5_text"
    text["max_position_embeddings"] = 4096
    return {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5", "text_config": text,
            "vision_config": dict(TINY_VISION), "image_token_id": ids["<|image_pad|>"],
            "video_token_id": ids["<|video_pad|>"], "vision_start_token_id": ids["<|vision_start|>"],
            "vision_end_token_id": ids["<|vision_end|>"], "tie_word_embeddings": text["tie_word_embeddings"]}


def write_tiny_vl_checkpoint(text: dict, folder: Path, seed: int = 11) -> Path:
    """`text` is a tiny text config (tests/conftest.py); its vocab is replaced by the tokenizer's."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(CHECKPOINT_DIR / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in VISION_TOKENS])
    ids = {t: tok.token_to_id(t) for t in VISION_TOKENS}
    text = dict(text, vocab_size=(tok.get_vocab_size() + 15) // 16 * 16)
    write_random_checkpoint(tiny_vl_config(text, ids), folder, seed=seed, dtype=torch.float32)
    tok.save(str(folder / "tokenizer.json"))
    tok_config = json.loads((CHECKPOINT_DIR / "tokenizer_config.json").read_text())
    tok_config["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (folder / "generation_config.json").write_text((CHECKPOINT_DIR / "generation_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps(dict(PUBLISHED_IMAGE, size=IMAGE_PIXELS), indent=2))
    (folder / "video_preprocessor_config.json").write_text(json.dumps(dict(PUBLISHED_VIDEO, size=VIDEO_PIXELS),
                                                                      indent=2))
    return folder


def write_test_images(folder: Path) -> dict[str, Path]:
    """A square image, a non-square one (resized: 100×150 -> 96×160), one at an exact .5 of the
    resize factor (80 px: Python rounds half to even), and a two-frame video folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)

    def smooth(h: int, w: int) -> np.ndarray:  # gradients + noise: realistic resampling, not pure noise
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], -1)
        return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)

    paths = {"square": folder / "square.png", "wide": folder / "wide.png", "half": folder / "half.png"}
    Image.fromarray(smooth(64, 64)).save(paths["square"])
    Image.fromarray(smooth(100, 150)).save(paths["wide"])
    Image.fromarray(smooth(80, 144)).save(paths["half"])
    video = folder / "video"
    video.mkdir(exist_ok=True)
    for i in range(2):
        Image.fromarray(smooth(64, 96)).save(video / f"frame_{i:03d}.png")
    paths["video"] = video
    return paths
