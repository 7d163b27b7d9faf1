"""Train the embedded default model: a tiny Qwen3.5 (all layer kinds) on the generated corpus.

    .venv/bin/python -m default_model.train --steps 1500

Writes a Hugging Face checkpoint folder (config.json, model.safetensors in bf16, tokenizer.json,
tokenizer_config.json with a chat template, generation_config.json) into default_model/checkpoint/,
plus the held-out text used for quality measurements. A few minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from default_model.make_corpus import END, make_corpus
from graphs.config import text_config_from_dict
from graphs.qwen3_5 import Qwen35Decoder
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=HERE / "checkpoint")
    args = parser.parse_args()
    torch.manual_seed(0)

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
        lr = args.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
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
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
