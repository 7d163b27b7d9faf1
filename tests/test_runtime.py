"""Runtime pieces that need no model: sampling and streaming text."""

from __future__ import annotations

import numpy as np
import pytest

from runtime_py.generate import Sampling, choose_token
from runtime_py.tokenizer import StreamDecoder, TextTokenizer


def test_greedy_is_argmax():
    logits = np.array([0.1, 3.0, 2.9, -1.0], np.float32)
    assert choose_token(logits, Sampling(), np.random.default_rng(0)) == 1


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    picks = {choose_token(logits, Sampling(temperature=1.0, top_p=0.75), rng) for _ in range(300)}
    assert picks == {0, 1}
    picks = {choose_token(logits, Sampling(temperature=1.0, top_p=0.85), rng) for _ in range(500)}
    assert picks == {0, 1, 2}


def test_sampling_frequencies_follow_temperature():
    logits = np.log(np.array([0.6, 0.4]))
    rng = np.random.default_rng(1)
    hot = [choose_token(logits, Sampling(temperature=1.0), rng) for _ in range(4000)]
    assert abs(hot.count(0) / 4000 - 0.6) < 0.03
    cold = [choose_token(logits, Sampling(temperature=0.25), rng) for _ in range(4000)]
    expected = 0.6**4 / (0.6**4 + 0.4**4)
    assert abs(cold.count(0) / 4000 - expected) < 0.03


def test_seed_makes_sampling_reproducible():
    logits = np.random.default_rng(5).normal(size=50)
    s = Sampling(temperature=0.9, top_p=0.95, seed=42)
    a = [choose_token(logits, s, np.random.default_rng(s.seed)) for _ in range(20)]
    b = [choose_token(logits, s, np.random.default_rng(s.seed)) for _ in range(20)]
    assert a == b


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_settings_are_refused(bad):
    with pytest.raises(ValueError):
        Sampling(**bad)


def test_stream_decoder_emits_whole_characters(default_checkpoint):
    tok = TextTokenizer(default_checkpoint)
    text = "On 3 März 1921 the baker — happy — sold 7 loaves. ✓"
    ids = tok.encode(text)
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_chat_template_renders_the_model_format(default_checkpoint):
    tok = TextTokenizer(default_checkpoint)
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 2?"}])
    assert text == "<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode("<|im_end|>") == [tok.token_id("<|im_end|>")]


def test_runtime_does_not_import_torch():
    """runtime_py must run where an app-side Python would: onnxruntime, numpy and tokenizers only."""
    import subprocess
    import sys

    code = ("import sys, runtime_py.session, runtime_py.generate, runtime_py.tokenizer; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sessions_stop_spinning_after_each_call(tiny_mtp_export):
    """Every session of an export (embedding, decoder, MTP head) stops its threads' spin when a call
    ends, so the sessions a speculative round alternates do not take the cores from each other."""
    from runtime_py.session import OnnxModel

    model = OnnxModel(tiny_mtp_export, "fp32", threads=2)
    for session in (model.embed, model.decoder, model.mtp.session):
        assert session.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
