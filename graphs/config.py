"""Qwen3.5 text-decoder configuration, read from a Hugging Face `config.json`.

Accepts the multimodal layout (model_type `qwen3_5`, text settings under `text_config`) and the
text-only layout (model_type `qwen3_5_text`). Unknown keys are ignored; every value the decoder
depends on is checked here so that later stages can trust the numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphs.errors import QwenEdgeError

SUPPORTED_MODEL_TYPES = ("qwen3_5", "qwen3_5_text")
PRESETS_DIR = Path(__file__).parent / "presets"


@dataclass(frozen=True)
class TextConfig:
    """Shapes and numerics of the hybrid decoder (Gated DeltaNet + gated attention)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    layer_types: tuple[str, ...]
    # gated full attention
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    # Gated DeltaNet
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    # numerics
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e7
    partial_rotary_factor: float = 0.25
    mrope_section: tuple[int, ...] = (11, 11, 10)
    tie_word_embeddings: bool = True
    eos_token_id: tuple[int, ...] = field(default_factory=tuple)

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv: the concatenated [q | k | v] projections."""
        return 2 * self.key_dim + self.value_dim

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]


def _bad(msg: str) -> QwenEdgeError:
    return QwenEdgeError(f"config.json: {msg}")


def text_config_from_dict(raw: dict[str, Any]) -> TextConfig:
    """Build a validated TextConfig from the parsed contents of a `config.json`."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise _bad(
            f"unsupported model_type {model_type!r}; qwen-edge exports "
            f"{' or '.join(SUPPORTED_MODEL_TYPES)} checkpoints (Qwen3.5 small series)"
        )
    text = dict(raw.get("text_config") or {}) if model_type == "qwen3_5" else dict(raw)
    if model_type == "qwen3_5" and not text:
        raise _bad("model_type 'qwen3_5' needs a 'text_config' section; re-download the checkpoint's config.json")

    def need(key: str) -> Any:
        if key not in text:
            raise _bad(f"missing '{key}'; re-download the checkpoint's config.json")
        return text[key]

    rope = dict(text.get("rope_parameters") or {})
    for key in ("rope_theta", "partial_rotary_factor", "mrope_section"):
        if key not in rope and key in text:
            rope[key] = text[key]
    if rope.get("rope_type", "default") != "default":
        raise _bad(f"rope_type {rope['rope_type']!r} is not supported; only 'default' (Qwen3.5) is")
    if text.get("hidden_act", "silu") != "silu":
        raise _bad(f"hidden_act {text['hidden_act']!r} is not supported; Qwen3.5 uses 'silu'")
    if not text.get("attn_output_gate", True):
        raise _bad("attn_output_gate=false is not Qwen3.5; only gated attention is supported")

    eos = raw.get("eos_token_id")  # a null top-level value defers to text_config, as in transformers
    if eos is None:
        eos = text.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    tie = raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    num_layers = int(need("num_hidden_layers"))
    layer_types = text.get("layer_types")
    if layer_types is None:
        interval = int(text.get("full_attention_interval", 4))
        layer_types = [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers)
        ]
    cfg = TextConfig(
        vocab_size=int(need("vocab_size")),
        hidden_size=int(need("hidden_size")),
        num_hidden_layers=num_layers,
        intermediate_size=int(need("intermediate_size")),
        layer_types=tuple(layer_types),
        num_attention_heads=int(need("num_attention_heads")),
        num_key_value_heads=int(need("num_key_value_heads")),
        head_dim=int(need("head_dim")),
        linear_num_key_heads=int(need("linear_num_key_heads")),
        linear_num_value_heads=int(need("linear_num_value_heads")),
        linear_key_head_dim=int(need("linear_key_head_dim")),
        linear_value_head_dim=int(need("linear_value_head_dim")),
        linear_conv_kernel_dim=int(need("linear_conv_kernel_dim")),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", 1e7)),
        partial_rotary_factor=float(rope.get("partial_rotary_factor", 0.25)),
        mrope_section=tuple(int(s) for s in rope.get("mrope_section", (11, 11, 10))),
        tie_word_embeddings=bool(tie),
        eos_token_id=eos_ids,
    )
    _validate(cfg)
    return cfg


def _validate(cfg: TextConfig) -> None:
    if len(cfg.layer_types) != cfg.num_hidden_layers:
        raise _bad(f"layer_types has {len(cfg.layer_types)} entries but num_hidden_layers is {cfg.num_hidden_layers}")
    unknown = sorted(set(cfg.layer_types) - {"linear_attention", "full_attention"})
    if unknown:
        raise _bad(f"unknown layer types {unknown}; expected 'linear_attention' or 'full_attention'")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise _bad("num_attention_heads must be a multiple of num_key_value_heads")
    if cfg.linear_num_value_heads % cfg.linear_num_key_heads:
        raise _bad("linear_num_value_heads must be a multiple of linear_num_key_heads")
    if cfg.rotary_dim % 2 or sum(cfg.mrope_section) != cfg.rotary_dim // 2:
        raise _bad(
            f"mrope_section {list(cfg.mrope_section)} must sum to half the rotary dim ({cfg.rotary_dim // 2})"
        )
    if cfg.linear_conv_kernel_dim < 2:
        raise _bad("linear_conv_kernel_dim must be at least 2")


def load_config_json(path: Path) -> dict[str, Any]:
    """Parse a config.json, turning file problems into one clear line."""
    if not path.is_file():
        raise QwenEdgeError(f"{path}: config.json not found; point at a Hugging Face checkpoint folder")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QwenEdgeError(f"{path}: not valid JSON ({exc}); re-download the checkpoint's config.json") from exc


def load_text_config(checkpoint_dir: Path) -> TextConfig:
    return text_config_from_dict(load_config_json(Path(checkpoint_dir) / "config.json"))


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def preset_config_dict(name: str) -> dict[str, Any]:
    """The config.json of one of the real Qwen3.5 small checkpoints (shapes only, no weights)."""
    path = PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        raise QwenEdgeError(f"unknown preset {name!r}; choose one of {', '.join(preset_names())}")
    return json.loads(path.read_text())


GENERATION_CONFIG = "generation_config.json"


@dataclass(frozen=True)
class TokenIds:
    """The special token ids a checkpoint declares, resolved as transformers' generate() resolves them."""

    eos: tuple[int, ...]  # every end token declared anywhere (generation config, config, text_config)
    pad: int | None  # generation_config.json's when that file exists, else config.json's (top, then text_config)
    bos: int | None


def _ids(value: Any, where: str, key: str) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [] if value is None else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise QwenEdgeError(f"{where}: {key} {value!r} is not a token id (a non-negative integer or a list of them); "
                                f"fix {key} in {where}")
    return tuple(values)


def declared_token_ids(folder: Path, vocab_size: int | None = None) -> TokenIds:
    """bos/eos/pad of a checkpoint or export folder. transformers reads only generation_config.json when
    it exists (else config.json, top level first, then text_config for unset or null keys); the end
    tokens are the union of all three, since generation must stop on every end token declared."""
    folder = Path(folder)
    config = load_config_json(folder / "config.json")
    sources = [(config, "config.json"), (config.get("text_config") or {}, "config.json text_config")]
    generation_path = folder / GENERATION_CONFIG
    if generation_path.is_file():
        try:
            generation = json.loads(generation_path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise QwenEdgeError(f"{generation_path}: not valid JSON ({exc}); fix or remove it") from None
        if not isinstance(generation, dict):
            raise QwenEdgeError(f"{generation_path}: expected a JSON object; fix or remove it")
        sources.insert(0, (generation, GENERATION_CONFIG))
    resolving = sources[:1] if generation_path.is_file() else sources

    def first(key: str) -> int | None:
        for source, where in resolving:
            ids = _ids(source.get(key), where, key)
            if ids:
                return ids[0]
        return None

    eos = tuple(dict.fromkeys(i for source, where in sources for i in _ids(source.get("eos_token_id"), where,
                                                                            "eos_token_id")))
    found = TokenIds(eos, first("pad_token_id"), first("bos_token_id"))
    if vocab_size is not None:
        for token in (*found.eos, found.pad, found.bos):
            if token is not None and token >= vocab_size:
                raise QwenEdgeError(f"{folder}: token id {token} is outside the vocabulary ({vocab_size} tokens); "
                                    "fix the ids in config.json / generation_config.json")
    return found
