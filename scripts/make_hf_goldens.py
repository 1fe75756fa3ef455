"""Tiny Hugging Face checkpoints and their logits from transformers: the suite's parity goldens.

Run with a Python that has torch and transformers (they are not dependencies of omgd_jax):

    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch transformers safetensors
    /tmp/refenv/bin/python scripts/make_hf_goldens.py --ours .venv/bin/python

It writes, under tests/examples/goldens/hf/, one directory per variant (config.json and
safetensors weights as ``save_pretrained`` writes them; one variant sharded with an index) with
``expected.npz`` (``input_ids`` and transformers' float32 ``logits``), and bf16 / fp16 copies
of one variant. Then it checks the other direction: for every variant it runs
``<ours> -m examples.{llama,gpt2}.hf roundtrip`` (our load, then our save), loads what our
save wrote with transformers and compares the logits. Versions and the measured differences go
to scripts/make_hf_goldens.json (committed beside this script).

Weights are drawn larger than the models' default init (std 0.2, norms 1 + N(0, 0.1), biases
N(0, 0.1)) so that logits are of order one and every parameter matters.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "examples" / "goldens" / "hf"
REPORT = Path(__file__).with_suffix(".json")
SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, vocab_size=64,
             max_position_embeddings=64)  # fmt: skip
LONG = {**SMALL, "max_position_embeddings": 128}  # past llama3's original 64 positions
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)  # fmt: skip


def variants():
    """name -> (config, save_pretrained kwargs). Each is a family member at tiny size."""
    return {
        # Llama 2: multi-head attention, rms_norm_eps 1e-5, untied head.
        "llama2": (
            LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5),
            {},
        ),
        # Llama 3.1: grouped-query attention, head_dim 16, llama3 rope scaling (the three
        # wavelength regimes all occur: 6.3 < 16 kept, 19.9 and 62.8 blended, longer divided).
        "llama31": (
            LlamaConfig(
                **LONG,
                num_attention_heads=2,
                num_key_value_heads=1,
                rms_norm_eps=1e-5,
                rope_theta=10000.0,
                rope_scaling=dict(LLAMA3_ROPE),
            ),  # fmt: skip
            {"max_shard_size": "20KB"},  # sharded, with model.safetensors.index.json
        ),
        # Llama 3.2: tied embeddings, GQA, llama3 scaling.
        "llama32": (
            LlamaConfig(
                **LONG,
                num_attention_heads=4,
                num_key_value_heads=2,
                rms_norm_eps=1e-5,
                rope_theta=500000.0,
                rope_scaling=dict(LLAMA3_ROPE),
                tie_word_embeddings=True,
            ),  # fmt: skip
            {},
        ),
        # Qwen2 / 2.5: q/k/v biases, tied embeddings, GQA, rope_theta 1e6.
        "qwen2": (
            Qwen2Config(
                **SMALL,
                num_attention_heads=4,
                num_key_value_heads=2,
                rms_norm_eps=1e-6,
                rope_theta=1000000.0,
                tie_word_embeddings=True,
                use_sliding_window=False,
            ),  # fmt: skip
            {},
        ),
        # Mistral: head_dim (16) != hidden_size / heads (8), GQA, a sliding window longer
        # than the sequence.
        "mistral": (
            MistralConfig(
                **SMALL,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                rms_norm_eps=1e-5,
                sliding_window=4096,
            ),  # fmt: skip
            {},
        ),
        "gpt2": (
            GPT2Config(
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_positions=32,
                vocab_size=64,
                bos_token_id=63,
                eos_token_id=63,
            ),
            {},
        ),
    }


def randomize(model, seed: int):
    """Weights of order one: matrices N(0, 0.2), norm scales 1 + N(0, 0.1), biases N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name or "ln_" in name:
                p.copy_((1.0 + 0.1 * noise) if name.endswith("weight") else 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.2 * noise)


def logits_of(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.float().numpy()


def make(name, config, save_kw, seed) -> dict:
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    randomize(model, seed)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.vocab_size, size=(2, 12)).astype(np.int64)
    logits = logits_of(model, ids)
    out = OUT / name
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, safe_serialization=True, **save_kw)
    (out / "generation_config.json").unlink(missing_ok=True)
    np.savez(out / "expected.npz", input_ids=ids.astype(np.int32), logits=logits)
    rec = {"files": sorted(p.name for p in out.iterdir()), "logit_std": float(logits.std())}
    if name == "llama32":  # the same weights stored in 16 bits
        for dt, tag in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
            d = OUT / f"{name}_{tag}"
            shutil.rmtree(d, ignore_errors=True)
            copy.deepcopy(model).to(dt).save_pretrained(d, safe_serialization=True)
            (d / "generation_config.json").unlink(missing_ok=True)
    return rec


def roundtrip(name, ours: str, tmp: Path) -> dict:
    """Our load then our save of the golden, loaded back by transformers: max |logit diff|."""
    module = "examples.gpt2.hf" if name == "gpt2" else "examples.llama.hf"
    dst = tmp / name
    cmd = [ours, "-m", module, "roundtrip", str(OUT / name), str(dst)]
    if name == "llama31":  # our save sharded too: transformers reads our index
        cmd += ["--max-shard-size", "20000"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    expected = np.load(OUT / name / "expected.npz")
    model = AutoModelForCausalLM.from_pretrained(dst, attn_implementation="eager").eval()
    got = logits_of(model, expected["input_ids"].astype(np.int64))
    return {
        "files_written_by_ours": sorted(p.name for p in dst.iterdir()),
        "transformers_class": type(model).__name__,
        "max_abs_diff_vs_golden": float(np.abs(got - expected["logits"]).max()),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ours", help="the Python of omgd_jax's venv (for the round-trip check)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    report = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "variants": {},
    }
    for seed, (name, (config, save_kw)) in enumerate(variants().items()):
        report["variants"][name] = make(name, config, save_kw, seed)
        print(name, report["variants"][name], flush=True)
    if a.ours:
        with tempfile.TemporaryDirectory() as tmp:
            for name in variants():
                rec = roundtrip(name, a.ours, Path(tmp))
                report["variants"][name]["roundtrip"] = rec
                print(name, "roundtrip", rec, flush=True)
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    report["golden_bytes"] = total
    REPORT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {OUT} ({total} bytes) and {REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
