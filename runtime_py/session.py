"""ONNX Runtime sessions for an export, with the sequence state owned here between calls.

State tensors stay ORT-owned `OrtValue`s: each step's state outputs are passed as the next step's
state inputs (names from graphs/state.py), so no state is copied through NumPy. With the contrib
recurrent ops, a call writes the conv and recurrent state over the buffers it read, as
onnxruntime-genai does, when no other state shares them (copy on write: `SequenceState.owned`);
the kernels then skip copying 1 MiB of state per layer and step (on the 0.8B shape, LinearAttention's
node time per decode step fell from 4.0 to 1.3 ms under ORT's profiler; BENCHMARKS.md).
Input names, shapes and dtypes are read from the graphs themselves (they carry the I/O spec).

An export with an MTP head (graphs/mtp.py) has a draftable decoder, which also returns the hidden
states and takes `logit_positions`, and an `mtp` graph with its own KV cache: `MtpHead` here runs
it for the speculative loop (runtime_py/speculative.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from graphs.errors import QwenEdgeError
from graphs.io_spec import HIDDEN_STATES, LOGIT_POSITIONS, SEQUENCE
from graphs.state import is_fixed_size_state, is_state_input, is_state_output, past_name_for
from runtime_py.export_format import RECURRENT_FORMS, mtp_variant_file, onnx_variant_files, read_manifest

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


@dataclass
class SequenceState:
    """Everything a batch of sequences carries between calls."""

    values: dict[str, ort.OrtValue]
    attention_mask: np.ndarray  # [B, past] int64
    positions: np.ndarray  # [B] next position per row (counts real tokens only)
    # Values only this state holds (outputs of its own calls), which a call may overwrite in place.
    owned: set[str] = field(default_factory=set)

    @property
    def past_length(self) -> int:
        return self.attention_mask.shape[1]

    def fork(self) -> "SequenceState":
        """A copy to run ahead with: later calls on either leave the other as it is. No tensor is copied:
        both share every value, so neither owns one any more, and each one's next call returns new ones."""
        self.owned.clear()
        return replace(self, values=dict(self.values), owned=set())


GraphRewrite = Callable[[Path], bytes]  # a graph file -> the serialized graph to load in its place


def graph_session(path: Path, threads: int | None, rewrite: GraphRewrite | None = None,
                  model: bytes | None = None, prepack: bool = True) -> ort.InferenceSession:
    """A CPU session of the graph at `path`, or of `model` (a serialized graph: `rewrite(path)`, or a
    piece of it) with its external weights read from beside `path`. `prepack=False` keeps ONNX Runtime
    from holding a second, prepacked copy of each weight (exporter/verify/sliced.py)."""
    if not path.is_file():
        raise QwenEdgeError(f"{path}: not found; pass a folder written by 'qwen-edge export'")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Each session has its own intra-op threads, which spin for a while after a call. When sessions
    # take turns (embedding, decoder and MTP head in a speculative round), the idle one's spinning
    # threads take the cores from the running one: on 2 threads that cost the speculative loop a third
    # of its speed (BENCHMARKS.md). Stopping the spin at the end of each call keeps it within calls.
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    # A draftable decoder's `logit_positions` has a default (an initializer of the same name), which
    # ONNX Runtime reports with a warning at every load; only errors are worth showing here.
    opts.log_severity_level = 3
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if model is None and rewrite is not None:
        model = rewrite(path)
    if model is not None:  # the graph from memory, its external weights from beside the file
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    try:
        return ort.InferenceSession(str(path) if model is None else model, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for unloadable models
        raise QwenEdgeError(f"{path}: ONNX Runtime {ort.__version__} cannot load it ({str(exc).splitlines()[0]})") from exc


def _zero_state(session: ort.InferenceSession, batch: int) -> SequenceState:
    values = {}
    for spec in session.get_inputs():
        if is_state_input(spec.name):
            shape = [batch if d == "batch_size" else (0 if isinstance(d, str) else d) for d in spec.shape]
            values[spec.name] = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, _NP_TYPES[spec.type]))
    return SequenceState(values, np.zeros((batch, 0), np.int64), np.zeros((batch,), np.int64))


def call_positions(past_mask: np.ndarray, positions: np.ndarray, new_mask: np.ndarray,
                   position_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(attention_mask, position_ids [3, B, T], the next call's positions) of one decoder call, from
    the mask and next positions of what came before and the `new_mask` of its new tokens."""
    b, t = new_mask.shape
    if position_ids is None:
        # Positions count real tokens only, so a left-padded row starts at 0 like an unpadded one.
        ids = positions[:, None] + np.cumsum(new_mask, axis=1) - 1
        ids = np.where(new_mask > 0, ids, 0).astype(np.int64)
        position_ids = np.broadcast_to(ids, (3, b, t))
        next_positions = positions + new_mask.sum(axis=1)
    else:
        next_positions = position_ids.max(axis=(0, 2)) + 1
    mask = np.concatenate([past_mask, new_mask], axis=1)
    return mask, np.ascontiguousarray(position_ids, dtype=np.int64), next_positions


def _run_stateful(session: ort.InferenceSession, feeds: dict[str, np.ndarray], state: SequenceState,
                  new_mask: np.ndarray, wanted: list[str], position_ids: np.ndarray | None = None,
                  in_place: frozenset[str] = frozenset()) -> list[np.ndarray]:
    """One call: `feeds` plus the mask, positions and state of `state`, which it then advances by
    the `new_mask` tokens. Returns the `wanted` outputs. `position_ids` [3, B, T]: explicit mRoPE
    positions; the next call then continues from their maximum + 1. `in_place`: the state inputs
    whose outputs may be written over them, when `state` owns them."""
    mask, position_ids, next_positions = call_positions(state.attention_mask, state.positions, new_mask, position_ids)
    arrays = {**feeds, "attention_mask": mask, "position_ids": position_ids}
    names = [o.name for o in session.get_outputs() if o.name in wanted or is_state_output(o.name)]
    pasts = {name: past_name_for(name) for name in names if is_state_output(name)}  # present -> past
    overwrite = in_place & state.owned
    # IO binding refuses an input that has a default (logit_positions); run_with_ort_values takes it
    # but cannot write an output into a given buffer.
    if overwrite and LOGIT_POSITIONS not in feeds:
        binding = session.io_binding()
        for name, array in arrays.items():
            binding.bind_cpu_input(name, array)
        for name, value in state.values.items():
            binding.bind_ortvalue_input(name, value)
        for name in names:
            if pasts.get(name) in overwrite:
                binding.bind_ortvalue_output(name, state.values[pasts[name]])
            else:
                binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
    else:
        inputs = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
        outputs = session.run_with_ort_values(names, {**inputs, **state.values})
    results = {}
    for name, value in zip(names, outputs):
        past = pasts.get(name)
        if past is not None:
            state.values[past] = value
            if past in in_place:
                state.owned.add(past)
        else:
            results[name] = value.numpy()
    state.attention_mask = mask
    state.positions = next_positions
    return [results[n] for n in wanted]


class OnnxModel:
    """embed_tokens + decoder_model_merged of one export folder."""

    def __init__(self, export_dir: Path | str, variant: str = "fp32", threads: int | None = None,
                 prefill_chunk: int = 64, rewrite: GraphRewrite | None = None) -> None:
        """prefill_chunk: long prompts run in chunks of this many tokens. On the 0.8B shape (int4, 2 threads)
        a 512-token prompt took 3.4 s in chunks of 64 against 4.8 s in one call, with peak RSS 903 MiB
        against 1,331 MiB: smaller activations, and no extra cost since the state carries over exactly.
        rewrite: load each graph as this function returns it, weights still read from the export
        (how `verify` runs a quantized variant's MatMulNBits in fp32)."""
        self.export_dir, self.variant, self.threads = Path(export_dir), variant, threads
        self.prefill_chunk = prefill_chunk
        embed, decoder = onnx_variant_files(self.export_dir, variant)
        # The decoder first: its load peaks above its steady size (ONNX Runtime repacks the int4 weights),
        # and that peak should not sit on top of the embedding's memory.
        self.decoder = graph_session(decoder, threads, rewrite)
        self.embed = graph_session(embed, threads, rewrite)
        self.state_inputs = [i for i in self.decoder.get_inputs() if is_state_input(i.name)]
        form = RECURRENT_FORMS.get(read_manifest(self.export_dir).get("recurrent_ops", "standard"))
        self.in_place = frozenset(i.name for i in self.state_inputs
                                  if form is not None and form.state_in_place and is_fixed_size_state(i.name))
        self.output_names = [o.name for o in self.decoder.get_outputs()]
        self.embeds_dtype = _NP_TYPES[self.decoder.get_inputs()[0].type]
        # An export with an MTP head: the decoder also returns hidden states, logits where asked.
        self.draftable = HIDDEN_STATES in self.output_names
        self.selects_logits = any(i.name == LOGIT_POSITIONS for i in self.decoder.get_overridable_initializers())
        # Exports give logits for the last position only unless exported with --all-logits (a draftable
        # decoder's logit rows are a dynamic dim too, `logit_positions`, but default to the last one).
        self.all_logits = self.decoder.get_outputs()[0].shape[1] == SEQUENCE
        self._mtp: MtpHead | None = None

    @property
    def mtp(self) -> "MtpHead":
        """The export's MTP head (loaded on first use)."""
        if self._mtp is None:
            path = mtp_variant_file(self.export_dir, self.variant)
            if path is None or not self.draftable:
                raise QwenEdgeError(f"{self.export_dir}: variant '{self.variant}' has no MTP head, so it cannot "
                                    "draft; export a checkpoint that carries one (`mtp.*` weights), without --no-mtp")
            self._mtp = MtpHead(path, self.threads, self.prefill_chunk, vocab=self.decoder.get_outputs()[0].shape[-1])
        return self._mtp

    def new_state(self, batch: int) -> SequenceState:
        """Zero state: empty KV cache, zero conv and recurrent state."""
        return _zero_state(self.decoder, batch)

    def embed_ids(self, input_ids: np.ndarray) -> np.ndarray:
        return self.embed.run(None, {"input_ids": input_ids.astype(np.int64)})[0]

    def forward(self, input_ids: np.ndarray, state: SequenceState, token_mask: np.ndarray | None = None) -> np.ndarray:
        """Run T new tokens per row ([B, T] ids) through the decoder; updates `state`.

        Returns logits [B, T, V], or [B, 1, V] for exports with last-position logits (the default).

        token_mask [B, T] marks padding (0) among the new tokens, e.g. left padding of a batch prompt.
        """
        return self.forward_embeds(self.embed_ids(input_ids), state, token_mask)

    def forward_embeds(self, embeds: np.ndarray, state: SequenceState, token_mask: np.ndarray | None = None,
                       position_ids: np.ndarray | None = None) -> np.ndarray:
        """`position_ids` [3, B, T]: explicit mRoPE positions (an image prompt, runtime_py/vision.py);
        the next call then continues from their maximum + 1. Default: text positions."""
        t = embeds.shape[1]
        if t <= self.prefill_chunk:
            return self._run(embeds, state, token_mask, position_ids=position_ids)[0]
        pieces = [self._run(embeds[:, i : i + self.prefill_chunk], state,
                            None if token_mask is None else token_mask[:, i : i + self.prefill_chunk],
                            position_ids=None if position_ids is None else position_ids[:, :, i : i + self.prefill_chunk])[0]
                  for i in range(0, t, self.prefill_chunk)]
        return np.concatenate(pieces, axis=1) if self.all_logits else pieces[-1]

    def forward_hidden(self, input_ids: np.ndarray, state: SequenceState,
                       logits_last: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Like `forward` (one row, no padding), on a draftable decoder: the logits of the last
        `logits_last` tokens [1, n, V] and the hidden states of every token [1, T, hidden]."""
        if not self.draftable:
            raise QwenEdgeError(f"{self.export_dir}: this export has no MTP head; its decoder gives no hidden states")
        embeds = self.embed_ids(input_ids)
        hidden, logits = [], None
        for i in range(0, embeds.shape[1], self.prefill_chunk):
            piece = embeds[:, i : i + self.prefill_chunk]
            last = i + self.prefill_chunk >= embeds.shape[1]
            keep = min(logits_last, piece.shape[1]) if last else 1
            logits, h = self._run(piece, state, None, keep)
            hidden.append(h)
        if self.all_logits:
            logits = logits[:, -logits_last:]
        return logits, np.concatenate(hidden, axis=1)

    def _run(self, embeds: np.ndarray, state: SequenceState, token_mask: np.ndarray | None,
             logits_last: int | None = None, position_ids: np.ndarray | None = None) -> list[np.ndarray]:
        """One decoder call. With `logits_last` (draftable decoders): logits of the last n positions,
        and the hidden states too. `position_ids`: explicit mRoPE positions (see `forward_embeds`)."""
        b, t = embeds.shape[:2]
        new_mask = np.ones((b, t), np.int64) if token_mask is None else token_mask.astype(np.int64)
        feeds = {"inputs_embeds": np.ascontiguousarray(embeds, dtype=self.embeds_dtype)}
        if logits_last is None:
            return _run_stateful(self.decoder, feeds, state, new_mask, ["logits"], position_ids, self.in_place)
        if self.selects_logits:
            feeds[LOGIT_POSITIONS] = np.arange(-logits_last, 0, dtype=np.int64)
        return _run_stateful(self.decoder, feeds, state, new_mask, ["logits", HIDDEN_STATES], position_ids,
                             self.in_place)


class MtpHead:
    """The `mtp` graph of an export: drafts the token after next from a hidden state and the next token.

    A head exported with --draft-vocab N scores the first N tokens only (exporter/onnx/draft_vocab.py);
    its logits are padded to the decoder's `vocab` with -inf, so the rest are never drafted and have
    draft probability 0 (which the speculative sampling rule handles like any other q)."""

    def __init__(self, path: Path, threads: int | None, chunk: int = 64, vocab: int | None = None) -> None:
        self.session = graph_session(path, threads)
        self.chunk = chunk
        self.embeds_dtype = _NP_TYPES[self.session.get_inputs()[0].type]
        self.draft_vocab = self.session.get_outputs()[0].shape[-1]
        self.vocab = vocab or self.draft_vocab

    def new_state(self, batch: int) -> SequenceState:
        """An empty cache for the head."""
        return _zero_state(self.session, batch)

    def forward(self, next_embeds: np.ndarray, hidden: np.ndarray, state: SequenceState) -> tuple[np.ndarray, np.ndarray]:
        """Add T entries (hidden state at t, embedding of token t+1; [1, T, hidden] each) to the
        head's cache in `state`. Returns the draft logits [V] and the head's hidden state [1, 1, hidden]
        of the last entry."""
        logits = head_hidden = None
        for i in range(0, next_embeds.shape[1], self.chunk):
            e, h = next_embeds[:, i : i + self.chunk], hidden[:, i : i + self.chunk]
            feeds = {"inputs_embeds": np.ascontiguousarray(e, dtype=self.embeds_dtype),
                     HIDDEN_STATES: np.ascontiguousarray(h, dtype=self.embeds_dtype)}
            logits, head_hidden = _run_stateful(self.session, feeds, state, np.ones(e.shape[:2], np.int64),
                                                ["logits", "mtp_hidden_states"])
        draft = logits[0, -1]
        if self.draft_vocab < self.vocab:
            draft = np.concatenate([draft, np.full(self.vocab - self.draft_vocab, -np.inf, draft.dtype)])
        return draft, head_hidden
