"""Qwen3.5 text-decoder configuration, read from a Hugging Face `config.json`.

Accepts the multimodal layout (model_type `qwen3_5`, text settings under `text_config`) and the
text-only layout (model_type `qwen3_5_text`). Unknown keys are ignored; every value the decoder
depends on is checked here so that later stages can trust the numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphs.errors import QwenEdgeError
from graphs.file_checks import read_json

SUPPORTED_MODEL_TYPES = ("qwen3_5", "qwen3_5_text")
PRESETS_DIR = Path(__file__).parent / "presets"
DEFAULT_MAX_POSITIONS = 32768  # transformers' Qwen3_5TextConfig default


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
    max_position_embeddings: int = DEFAULT_MAX_POSITIONS  # the context the model was built for

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


_REQUIRED = object()
_FIX = "fix it or re-download the checkpoint's config.json"

# Upper bounds far above every real shape (the 9B preset: 32 layers, width 4,096, MLP 12,288, a
# 248,320-token vocabulary, a 262,144-token context): a config asking for more is damaged or hostile
# and is refused before anything is built from it (a million layers would take hours to describe).
LIMITS = {
    "num_hidden_layers": 1024,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 19,
    "vocab_size": 1 << 24,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 4096,
    "linear_num_key_heads": 1024,
    "linear_num_value_heads": 1024,
    "linear_key_head_dim": 4096,
    "linear_value_head_dim": 4096,
    "linear_conv_kernel_dim": 64,
    "full_attention_interval": 1024,
    "max_position_embeddings": 1 << 24,
}
MAX_TOKEN_ID = (1 << 31) - 1


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            float: "a number", int: "an integer"}.get(type(value), type(value).__name__)


def _int(section: dict, key: str, default: Any = _REQUIRED, lo: int = 1, where: str = "") -> int:
    """An integer field (JSON integer, not a boolean or a float, as transformers' config classes insist)."""
    if key not in section:
        if default is _REQUIRED:
            raise _bad(f"missing '{where}{key}'; {_FIX}")
        return default
    value = section[key]
    hi = LIMITS.get(key, MAX_TOKEN_ID)
    if type(value) is not int:
        raise _bad(f"'{where}{key}' must be an integer, not {_kind(value)} ({value!r:.40}); {_FIX}")
    if not lo <= value <= hi:
        raise _bad(f"'{where}{key}' is {value}; it must be between {lo} and {hi:,}; {_FIX}")
    return value


def _float(section: dict, key: str, default: float, lo: float, hi: float, where: str = "") -> float:
    """A finite number in (lo, hi]."""
    value = section.get(key, default)
    if type(value) not in (int, float):
        raise _bad(f"'{where}{key}' must be a number, not {_kind(value)} ({value!r:.40}); {_FIX}")
    if not (math.isfinite(value) and lo < value <= hi):
        raise _bad(f"'{where}{key}' is {value}; it must be a finite number above {lo} and at most {hi:g}; {_FIX}")
    return float(value)


def _bool(section: dict, key: str, default: bool) -> bool:
    value = section.get(key, default)
    if type(value) is not bool:
        raise _bad(f"'{key}' must be true or false, not {_kind(value)} ({value!r:.40}); {_FIX}")
    return value


def _token_ids(value: Any, key: str) -> tuple[int, ...]:
    """eos_token_id: null, one id or a list of ids."""
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if any(type(i) is not int or not 0 <= i <= MAX_TOKEN_ID for i in ids):
        raise _bad(f"'{key}' must be a token id (a non-negative integer), a list of them, or null; "
                   f"got {value!r:.60}; {_FIX}")
    return tuple(ids)


def _section(raw: Any, key: str) -> dict:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"'{key}' must be an object, not {_kind(value)}; {_FIX}")
    return value


def text_config_from_dict(raw: Any) -> TextConfig:
    """Build a validated TextConfig from the parsed contents of a `config.json`."""
    if not isinstance(raw, dict):
        raise _bad(f"must hold a JSON object, not {_kind(raw)}; {_FIX}")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise _bad(
            f"unsupported model_type {model_type!r:.60}; qwen-edge exports "
            f"{' or '.join(SUPPORTED_MODEL_TYPES)} checkpoints (Qwen3.5 small series)"
        )
    text = _section(raw, "text_config") if model_type == "qwen3_5" else raw
    if model_type == "qwen3_5" and not text:
        raise _bad("model_type 'qwen3_5' needs a 'text_config' section; re-download the checkpoint's config.json")
    where = "text_config." if text is not raw else ""

    rope = dict(_section(text, "rope_parameters"))
    for key in ("rope_theta", "partial_rotary_factor", "mrope_section"):
        if key not in rope and key in text:
            rope[key] = text[key]
    if rope.get("rope_type", "default") != "default":
        raise _bad(f"rope_type {rope['rope_type']!r:.40} is not supported; only 'default' (Qwen3.5) is")
    if text.get("hidden_act", "silu") != "silu":
        raise _bad(f"hidden_act {text['hidden_act']!r:.40} is not supported; Qwen3.5 uses 'silu'")
    if not _bool(text, "attn_output_gate", True):
        raise _bad("attn_output_gate=false is not Qwen3.5; only gated attention is supported")
    section = rope.get("mrope_section", [11, 11, 10])
    if (not isinstance(section, list) or not 1 <= len(section) <= 8
            or any(type(s) is not int or not 0 <= s <= LIMITS["head_dim"] for s in section)):
        raise _bad(f"'rope_parameters.mrope_section' must be a short list of non-negative integers, "
                   f"not {section!r:.60}; {_FIX}")

    eos = raw.get("eos_token_id")  # a null top-level value defers to text_config, as in transformers
    if eos is None:
        eos = text.get("eos_token_id")
    eos = _token_ids(eos, "eos_token_id")
    for key in ("bos_token_id", "pad_token_id"):
        for part in (raw, text):
            if part.get(key) is not None:
                _token_ids(part[key], key)
    tie = _bool(raw if "tie_word_embeddings" in raw else text, "tie_word_embeddings", False)
    num_layers = _int(text, "num_hidden_layers", where=where)
    layer_types = text.get("layer_types")
    if layer_types is None:
        interval = _int(text, "full_attention_interval", 4, where=where)
        layer_types = [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers)
        ]
    if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
        raise _bad(f"'layer_types' must be a list of strings, not {layer_types!r:.60}; {_FIX}")
    dims = {key: _int(text, key, where=where) for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
        "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim")}
    cfg = TextConfig(
        num_hidden_layers=num_layers,
        layer_types=tuple(layer_types),
        linear_conv_kernel_dim=_int(text, "linear_conv_kernel_dim", lo=2, where=where),
        rms_norm_eps=_float(text, "rms_norm_eps", 1e-6, 0.0, 1.0, where),
        rope_theta=_float(rope, "rope_theta", 1e7, 0.0, 1e30, "rope_parameters."),
        partial_rotary_factor=_float(rope, "partial_rotary_factor", 0.25, 0.0, 1.0, "rope_parameters."),
        mrope_section=tuple(section),
        tie_word_embeddings=tie,
        eos_token_id=eos,
        max_position_embeddings=_int(text, "max_position_embeddings", DEFAULT_MAX_POSITIONS, where=where),
        **dims,
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
    if cfg.rotary_dim % 2:
        raise _bad(f"the rotary dim ({cfg.rotary_dim}, head_dim × partial_rotary_factor) must be even")
    # transformers slices the height/width sections out of the rotary frequencies, so sections that
    # do not sum to half the rotary dim are clipped (graphs/qwen3_5.rope_cos_sin does the same)
    if len(cfg.mrope_section) != 3:
        raise _bad(f"mrope_section {list(cfg.mrope_section)} must have 3 entries (time, height, width)")
    if cfg.linear_conv_kernel_dim < 2:
        raise _bad("linear_conv_kernel_dim must be at least 2")


def check_within_context(cfg: TextConfig, tokens: int, what: str) -> None:
    """Refuse a run of `tokens` positions beyond the model's context (positions it was never built for)."""
    if tokens > cfg.max_position_embeddings:
        raise QwenEdgeError(f"{what}: {tokens:,} tokens is longer than the model's context "
                            f"({cfg.max_position_embeddings:,}, config.json max_position_embeddings); ask for fewer")


def load_config_json(path: Path) -> Any:
    """Parse a config.json, turning file problems into one clear line."""
    if not path.exists():
        raise QwenEdgeError(f"{path}: config.json not found; point at a Hugging Face checkpoint folder")
    return read_json(path, "re-download the checkpoint's config.json")


def load_text_config(checkpoint_dir: Path) -> TextConfig:
    path = Path(checkpoint_dir) / "config.json"
    raw = load_config_json(path)
    try:
        return text_config_from_dict(raw)
    except QwenEdgeError as exc:  # name the file itself, not just "config.json"
        raise QwenEdgeError(f"{path}: {str(exc).removeprefix('config.json: ')}") from None


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
    if not isinstance(config, dict) or not isinstance(config.get("text_config") or {}, dict):
        raise QwenEdgeError(f"{folder / 'config.json'}: must hold a JSON object (and text_config an object); {_FIX}")
    sources = [(config, "config.json"), (config.get("text_config") or {}, "config.json text_config")]
    generation_path = folder / GENERATION_CONFIG
    if generation_path.exists():
        generation = read_json(generation_path, "fix or remove it")
        if not isinstance(generation, dict):
            raise QwenEdgeError(f"{generation_path}: expected a JSON object; fix or remove it")
        sources.insert(0, (generation, GENERATION_CONFIG))
    resolving = sources[:1] if generation_path.exists() else sources

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
