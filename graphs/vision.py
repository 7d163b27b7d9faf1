"""The Qwen3.5 vision tower, written for export: pixel patches + grid in, image embeddings out.

    pixel_values [P, C·T·p·p] ─► patch embedding (the Conv3d, kernel = stride, as one matmul)
                               + learned 2-D positions (bilinear, align_corners, resampled to each grid)
                               ─► depth × [LayerNorm ─► rotary attention (2-D axial RoPE, within
                                           one frame only) ─► + ; LayerNorm ─► MLP (gelu tanh) ─► +]
                               ─► merger: LayerNorm ─► 2×2 patches as one row ─► fc1 ─► GELU ─► fc2
    image_features [P/4, text hidden]

Patches arrive as the Hugging Face processor emits them: per image or video frame pair, 2×2 merge
blocks in raster order, raster order inside a block. Everything that depends on the grid (each
patch's row and column, its frame, the position-table taps) is computed from `image_grid_thw` with
tensor arithmetic, so one graph takes any number of images of any sizes (`patch_layout`). A fixed
layout can be computed once instead (the Core ML functions of fixed image sizes). Parameter names
are the checkpoint's minus `model.visual.`, so loading is a rename.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from graphs.config import VisionConfig

LAYER_NORM_EPS = 1e-6


@dataclass
class PatchLayout:
    """Where each input patch sits: what attention, rotary and position embedding need (all [P])."""

    row: torch.Tensor  # int64 patch row within its frame
    col: torch.Tensor  # int64 patch column
    segment: torch.Tensor  # int64 key of the frame: patches attend only within their own
    taps: torch.Tensor  # int64 [P, 4] rows of the learned position table
    tap_weights: torch.Tensor  # float32 [P, 4]


def _axis_taps(index: torch.Tensor, size: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear, align_corners=True taps of a `side`-long axis for positions `index` of an axis of
    `size` (the formula of transformers' interpolation helper, in the same fp32 order)."""
    src = index.to(torch.float32) * (side - 1) / torch.clamp(size - 1, min=1).to(torch.float32)
    floor = torch.floor(src)
    offsets = torch.arange(0, 2, dtype=torch.int64)
    taps = (floor.to(torch.int64)[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - offsets.to(torch.float32)).abs()).clamp(min=0)
    return taps, weights


def patch_layout(grid_thw: torch.Tensor, num_patches: int | torch.SymInt, cfg: VisionConfig) -> PatchLayout:
    """The layout of `num_patches` patches described by `grid_thw` [N, 3] (t, h, w per image or video)."""
    m, side = cfg.spatial_merge_size, cfg.position_grid_side
    k = torch.arange(num_patches, dtype=torch.int64)
    sizes = grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]
    ends = torch.cumsum(sizes, 0)
    entry = (k[:, None] >= ends[None, :]).to(torch.int64).sum(-1)  # which image each patch belongs to
    start = (ends - sizes)[entry]
    height, width = grid_thw[:, 1][entry], grid_thw[:, 2][entry]
    frame_size = height * width
    local = k - start
    within = local % frame_size
    block, blocks_w = within // (m * m), width // m
    row = (block // blocks_w) * m + (within // m) % m
    col = (block % blocks_w) * m + within % m
    segment = start + (local // frame_size) * frame_size
    row_taps, row_weights = _axis_taps(row, height, side)
    col_taps, col_weights = _axis_taps(col, width, side)
    taps = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)
    weights = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4)
    return PatchLayout(row, col, segment, taps, weights)


def rotary_inv_freq(cfg: VisionConfig) -> torch.Tensor:
    """head_dim/4 frequencies, used once for the row and once for the column (axial 2-D RoPE)."""
    half = cfg.head_dim // 2
    return 1.0 / cfg.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        p = x.shape[1]
        q, k, v = self.qkv(x).reshape(p, 3, self.heads, self.head_dim).unbind(1)  # [P, H, d] each
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(x.dtype)  # rotary in fp32, as transformers
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [H, P, d]
        scores = torch.matmul(q, k.transpose(1, 2)).float() / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + mask
        out = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)  # [H, P, d]
        return self.proj(out.transpose(0, 1).reshape(1, p, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm per patch, then each 2×2 block (four consecutive rows) as one row through the MLP."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.width = cfg.hidden_size * cfg.merge_unit
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.linear_fc1 = nn.Linear(self.width, self.width)
        self.linear_fc2 = nn.Linear(self.width, cfg.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(self.norm(x).reshape(1, -1, self.width))))


class PatchEmbed(nn.Module):
    """transformers' Conv3d with kernel = stride over each [C, T, p, p] patch: one matmul per row."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=kernel, stride=kernel, bias=True)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        return F.linear(pixel_values.to(weight.dtype), weight.reshape(weight.shape[0], -1), self.proj.bias)


class VisionEncoder(nn.Module):
    """`vision_encoder`: (pixel_values [P, patch_dim] fp32, image_grid_thw [N, 3] int64) ->
    image_features [P / merge², out_hidden] in the tower's dtype."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        # (x, i) -> x before block i and before the merger (i = depth): the ONNX exporter's block
        # template sets a marker op there (exporter/onnx/layer_stack.py); every other use leaves None
        self.block_boundary: Callable[[torch.Tensor, int], torch.Tensor] | None = None

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        return self.encode(pixel_values, patch_layout(image_grid_thw, pixel_values.shape[0], self.cfg))

    def encode(self, pixel_values: torch.Tensor, layout: PatchLayout, one_segment: bool = False) -> torch.Tensor:
        """The tower on a known layout; `one_segment` drops the attention mask (a single image)."""
        # Rows carry a leading batch axis of 1 inside the tower: linear layers then trace as MatMul + Add
        # (which the int variants turn into MatMulNBits), not Gemm.
        x = self.patch_embed(pixel_values[None])
        pos = (self.pos_embed(layout.taps).float() * layout.tap_weights[:, :, None]).sum(1)
        x = x + pos.to(x.dtype)[None]
        inv_freq = rotary_inv_freq(self.cfg)  # fp32 whatever the tower's dtype (rotary runs in fp32)
        angles = torch.cat([layout.row[:, None].float() * inv_freq, layout.col[:, None].float() * inv_freq], -1)
        angles = torch.cat([angles, angles], -1)[:, None, :]  # [P, 1, head_dim], shared by the heads
        cos, sin = angles.cos(), angles.sin()
        mask = None
        if not one_segment:  # -inf outside the patch's own frame (transformers' cu_seqlens segments)
            same = layout.segment[:, None] == layout.segment[None, :]
            mask = torch.where(same, 0.0, float("-inf"))[None]
        mark = self.block_boundary
        for i, block in enumerate(self.blocks):
            x = x if mark is None else mark(x, i)
            x = block(x, cos, sin, mask)
        return self.merger(x if mark is None else mark(x, len(self.blocks)))[0]


def vision_parameter_shapes(cfg: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Every tower parameter with its shape (checkpoint names minus `model.visual.`), from the config."""
    with torch.device("meta"):
        model = VisionEncoder(cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


class FixedSizeVisionEncoder(nn.Module):
    """The tower for one image size (Core ML functions have fixed shapes): the layout is computed
    once here, so the converted program holds it as constants. pixel_values [P, patch_dim] fp32 ->
    image_features [P / merge², out_hidden]."""

    def __init__(self, encoder: VisionEncoder, height: int, width: int) -> None:
        super().__init__()
        cfg = encoder.cfg
        self.encoder = encoder
        self.grid = (1, height // cfg.patch_size, width // cfg.patch_size)
        layout = patch_layout(torch.tensor([self.grid]), self.grid[1] * self.grid[2], cfg)
        for name in ("row", "col", "taps", "tap_weights"):
            self.register_buffer(name, getattr(layout, name), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        layout = PatchLayout(self.row, self.col, self.row, self.taps, self.tap_weights)
        return self.encoder.encode(pixel_values, layout, one_segment=True)
