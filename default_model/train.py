"""Train the embedded default model: a tiny Qwen3.5 (all layer kinds) on the generated corpus.

    .venv/bin/python -m default_model.train --steps 1500      # the decoder, then its MTP head
    .venv/bin/python -m default_model.train --mtp-only        # the MTP head of the existing checkpoint

Writes a Hugging Face checkpoint folder (config.json, model.safetensors in bf16, tokenizer.json,
tokenizer_config.json with a chat template, generation_config.json) into default_model/checkpoint/,
plus the held-out text used for quality measurements. A few minutes on two CPU cores.

The multi-token-prediction head (`mtp.*`, graphs/mtp.py) is trained after the decoder, on the
frozen decoder: `mtp.fc`, its two input norms, its decoder layer and `mtp.norm`, with the LM head
shared and frozen. That is how post-hoc draft heads are trained; Qwen3.5 trains its head jointly
with the model. Training it this way leaves every decoder tensor bit-identical (`--mtp-only` copies
them from the existing checkpoint), so the decoder's measurements do not move.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from default_model.make_corpus import END, make_corpus
from graphs.checkpoint import MTP, open_checkpoint
from graphs.config import text_config_from_dict
from graphs.mtp import MTPHead
from graphs.qwen3_5 import Qwen35Decoder, layer_inputs
from graphs.random_checkpoint import random_block
from graphs.recurrent_ops import REFERENCE

HERE = Path(__file__).parent
SPECIAL_TOKENS = [END, "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (HERE / "chat_template.jinja").read_text()  # the training format + the conversation options
VOCAB = 1024
CONFIG = {
    "architectures": ["Qwen3_5ForCausalLM"],
    "model_type": "qwen3_5_text",
    "vocab_size": VOCAB,
    "hidden_size": 128,
    "num_hidden_layers": 8,
    "intermediate_size": 352,
    "layer_types": ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"],
    "full_attention_interval": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 32,
    "linear_value_head_dim": 32,
    "linear_conv_kernel_dim": 4,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "attn_output_gate": True,
    "attention_bias": False,
    "max_position_embeddings": 4096,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                        "mrope_section": [2, 1, 1], "mrope_interleaved": True},
    "tie_word_embeddings": True,
    "mtp_num_hidden_layers": 1,
    "dtype": "bfloat16",
}


def train_tokenizer(text: str) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Special tokens must not be split into bytes: train on text with them removed.
    clean = text.replace(END, "\n").replace("<|im_start|>", "").replace("<|im_end|>", "")
    tok.train_from_iterator(clean.split("\n"), trainer)
    return tok


def write_checkpoint(model: Qwen35Decoder, tok: Tokenizer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    config = dict(CONFIG, eos_token_id=ids["<|im_end|>"], pad_token_id=ids[END], bos_token_id=None)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {f"model.{name}": p.detach().to(torch.bfloat16).contiguous() for name, p in model.named_parameters()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096,
        "eos_token": "<|im_end|>", "pad_token": END, "bos_token": None, "unk_token": None,
        "chat_template": CHAT_TEMPLATE, "add_bos_token": False,
    }, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps({
        "eos_token_id": [ids["<|im_end|>"], ids[END]], "pad_token_id": ids[END],
        "do_sample": False, "temperature": 0.7, "top_p": 0.9,
    }, indent=2) + "\n")


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over 50 steps, then cosine decay to a tenth of the peak."""
    return peak * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))


@torch.no_grad()
def decoder_hidden(decoder: Qwen35Decoder, windows: torch.Tensor, batch: int) -> torch.Tensor:
    """The decoder's final-normed hidden states [N, S, H] of windows [N, S] (what the head reads)."""
    out = []
    for i in range(0, len(windows), batch):
        ids = windows[i : i + batch]
        b, s = ids.shape
        x = decoder.embed_tokens(ids)
        inputs = layer_inputs(decoder.cfg, x, torch.ones(b, s, dtype=torch.long), torch.arange(s).expand(3, b, s))
        hidden, _ = decoder.run_layers(x, *inputs, decoder.initial_state(b))
        out.append(decoder.norm(hidden))
    return torch.cat(out)


def mtp_loss(decoder: Qwen35Decoder, head: MTPHead, window: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the head's drafts over windows [B, S+2] whose decoder hidden states are
    `hidden` [B, S+1, H]: from the hidden state at t and the embedding of token t+1 it predicts token t+2."""
    b, s = window.shape[0], window.shape[1] - 2
    with torch.no_grad():
        embeds = decoder.embed_tokens(window[:, 1 : s + 1])
    cache = [torch.zeros(b, decoder.cfg.num_key_value_heads, 0, decoder.cfg.head_dim)] * 2
    inputs = layer_inputs(decoder.cfg, embeds, torch.ones(b, s, dtype=torch.long), torch.arange(s).expand(3, b, s))
    out, _, _ = head(embeds, hidden[:, :s], *inputs, *cache)
    logits = decoder.lm_head(out).float()
    return F.cross_entropy(logits.reshape(-1, decoder.cfg.vocab_size), window[:, 2:].reshape(-1))


def train_mtp(decoder: Qwen35Decoder, data: torch.Tensor, steps: int, batch: int, seq: int, peak_lr: float,
              pool: int = 2048) -> MTPHead:
    """The MTP head, trained on the frozen decoder (its LM head shared and frozen). The decoder's
    hidden states are computed once for a pool of `pool` windows, which the steps sample from."""
    decoder.eval().requires_grad_(False)
    head = MTPHead(replace(decoder.cfg, mtp_num_hidden_layers=1))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in head.named_parameters():
            p.copy_(random_block(name, tuple(p.shape), decoder.cfg, gen))
    start = time.time()
    offsets = torch.randint(0, len(data) - seq - 2, (pool,), generator=gen)
    windows = torch.stack([data[o : o + seq + 2] for o in offsets])
    hidden = decoder_hidden(decoder, windows[:, : seq + 1], 64)
    print(f"mtp: decoder hidden states of {pool} windows, {time.time() - start:.0f}s", flush=True)
    head.train()
    opt = torch.optim.AdamW(head.parameters(), lr=peak_lr, weight_decay=0.01, betas=(0.9, 0.95))
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr)
        pick = torch.randint(0, pool, (batch,), generator=gen)
        loss = mtp_loss(decoder, head, windows[pick], hidden[pick])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"mtp step {step:5d}  loss {loss.item():.3f}  {time.time() - start:.0f}s", flush=True)
    return head.eval()


def add_mtp_head(folder: Path, head: MTPHead) -> None:
    """Add the head's `mtp.*` tensors to the checkpoint in `folder`, every other tensor copied as it is."""
    weights = folder / "model.safetensors"
    with safe_open(weights, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(MTP)}
    tensors.update({MTP + n: p.detach().to(torch.bfloat16).contiguous() for n, p in head.named_parameters()})
    save_file(tensors, weights, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["mtp_num_hidden_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=HERE / "checkpoint")
    parser.add_argument("--mtp-steps", type=int, default=800)
    parser.add_argument("--mtp-pool", type=int, default=2048, help="windows whose decoder hidden states the head trains on")
    parser.add_argument("--mtp-only", action="store_true",
                        help="only train the MTP head of the checkpoint in --out (its decoder stays bit-identical)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.mtp_only:
        tok = Tokenizer.from_file(str(args.out / "tokenizer.json"))
        data = torch.tensor(tok.encode(make_corpus(3_000_000, seed=0)).ids, dtype=torch.long)
        decoder = open_checkpoint(args.out, mtp=False).build_decoder(kernels=REFERENCE)
        add_mtp_head(args.out, train_mtp(decoder, data, args.mtp_steps, args.batch, args.seq, args.lr, args.mtp_pool))
        print(f"wrote the MTP head into {args.out}")
        return

    text = make_corpus(3_000_000, seed=0)
    (HERE / "heldout.txt").write_text(make_corpus(60_000, seed=12345))
    tok = train_tokenizer(text)
    data = torch.tensor(tok.encode(text).ids, dtype=torch.long)
    print(f"corpus: {len(text):,} chars, {len(data):,} tokens")

    cfg = text_config_from_dict(CONFIG)
    model = Qwen35Decoder(cfg, kernels=REFERENCE)  # the differentiable kernels
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(random_block(name, tuple(p.shape), cfg, gen))
        model.embed_tokens.weight.mul_(0.25)  # start near uniform predictions
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    pos = torch.arange(args.seq).expand(3, args.batch, args.seq)
    mask = torch.ones(args.batch, args.seq, dtype=torch.long)
    start = time.time()
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.lr)
        for group in opt.param_groups:
            group["lr"] = lr
        offsets = torch.randint(0, len(data) - args.seq - 1, (args.batch,))
        window = torch.stack([data[o : o + args.seq + 1] for o in offsets])
        logits = model(model.embed_tokens(window[:, :-1]), mask, pos, *model.initial_state(args.batch))[0]
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), window[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  lr {lr:.2e}  {time.time() - start:.0f}s", flush=True)
    write_checkpoint(model.eval(), tok, args.out)
    add_mtp_head(args.out, train_mtp(model, data, args.mtp_steps, args.batch, args.seq, args.lr, args.mtp_pool))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
