"""The fine-tuning program end to end, offline, on artifacts the project makes: a byte-level BPE
trained with `tokenizers` on (part of) the SOTU corpus, a small random Hugging Face-layout Llama
checkpoint, a JSONL of SOTU records. The held-out response loss falls, only response tokens
carry loss, the final model reloads as trained, --resume is bit-exact, and bad data or
tokenizers get a sentence with nothing in --out-dir changed.
"""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from examples.llama import finetune, hf, sft, tiny
from examples.llama.model import LlamaConfig


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    texts = tiny.sotu_texts(12)
    tok_dir = tiny.train_tokenizer([t for _, t in texts], 320, root / "tokenizer")
    cfg = LlamaConfig(n_layer=2, n_head=4, dim=32, hidden=64, vocab_size=320, max_len=256,
                      n_kv_head=2, norm_eps=1e-5)  # fmt: skip
    tiny.random_checkpoint(root / "model", tok_dir, cfg, seed=1)
    recs = tiny.records(texts, 90)
    tiny.write_jsonl(recs[:75], root / "train.jsonl")
    tiny.write_jsonl(recs[75:], root / "val.jsonl")
    return root


def argv(root: Path, out: Path, *extra) -> list[str]:
    return ["--model", str(root / "model"), "--data", str(root / "train.jsonl"),
            "--val-data", str(root / "val.jsonl"), "--out-dir", str(out), "--steps", "12",
            "--batch-size", "4", "--seq-len", "96", "--lr", "1e-2", "--lr-warmup", "2",
            "--layers-per-phase", "1", "--steps-per-mask", "4", "--eval-every", "12",
            "--log-every", "4", "--checkpoint-every", "6", "--no-progress", *extra]  # fmt: skip


def params_of(model) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
    return {"/".join(str(k.key) for k in path): np.asarray(x) for path, x in flat}


def test_only_response_tokens_carry_loss_and_packing_restarts_positions(artifacts):
    tok = sft.load_tokenizer(artifacts / "model")
    recs = sft.read_jsonl(artifacts / "val.jsonl")
    chat = next(r for r in recs if "messages" in r)
    plain = next(r for r in recs if "prompt" in r)
    rows = sft.build_rows("val", tok, 512, records=[plain, chat])
    assert len(rows) == 1 and set(rows.segments[0]) == {0, 1, 2}  # both packed in one row
    for s, response in ((1, plain["response"]), (2, chat["messages"][-1]["content"])):
        at = rows.segments[0] == s
        assert rows.positions[0][at][0] == 0 and np.all(np.diff(rows.positions[0][at]) == 1)
        learned = rows.targets[0][at][rows.weights[0][at] == 1]
        # the response and its end-of-turn token, nothing of the prompt or the template
        assert tok.tokenizer.decode(learned.tolist(), skip_special_tokens=False) == (
            response + "<|end|>"
        )
    assert rows.weights[0][rows.segments[0] == 0].sum() == 0  # padding
    padded = sft.build_rows("val", tok, 512, pad=True, records=[plain, chat])
    assert len(padded) == 2 and padded.weights.sum() == rows.weights.sum()


def test_fine_tuning_lowers_the_held_out_loss_saves_reloads_and_resumes_exactly(artifacts):
    out = artifacts / "run"
    finetune.main(argv(artifacts, out))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_loss"] < summary["initial_val_loss"] - 0.3, summary
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [4, 8, 12] and "val_loss" in metrics[-1]
    assert (out / "loss.png").stat().st_size > 0 and any((out / "tb").iterdir())
    final = out / "final"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in final.iterdir()
    }
    trained = params_of(hf.load(final))
    start = params_of(hf.load(artifacts / "model"))
    moved = [k for k in trained if not np.array_equal(trained[k], start[k])]
    assert "embed/embedding" in moved and any(k.startswith("blocks/") for k in moved)
    # Resume from the step-6 checkpoint: the same final weights, bit for bit.
    kept = artifacts / "straight"
    shutil.copytree(final, kept)
    shutil.rmtree(out / "checkpoints" / "12")
    finetune.main(argv(artifacts, out, "--resume"))
    again = params_of(hf.load(out / "final"))
    first = params_of(hf.load(kept))
    assert all(np.array_equal(again[k], first[k]) for k in first)


@pytest.mark.parametrize(
    "line, match",
    [
        ("", r"train\.jsonl line 2: empty line; expected an object"),
        ("{oops", r"train\.jsonl line 2: not valid JSON"),
        ('{"prompt": "a"}', r"train\.jsonl line 2: key 'response' must be a string, got None"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', r"no 'assistant' turn"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', r"key 'messages'\[0\] must be"),
    ],
)
def test_bad_jsonl_lines_exit_with_a_sentence_and_leave_out_dir_alone(artifacts, tmp_path,
                                                                      line, match):  # fmt: skip
    good = (artifacts / "train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text(good[0] + "\n" + line + "\n" + good[1] + "\n")
    shutil.copyfile(artifacts / "val.jsonl", tmp_path / "val.jsonl")
    (tmp_path / "model").symlink_to(artifacts / "model")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=match):
        finetune.main(argv(tmp_path, out))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_tokenizer_without_the_templates_special_tokens_is_refused(artifacts, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(artifacts / "model", model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace("<|end|>", "<|eot_id|>")
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    missing = r"key 'chat_template' uses the token '<\|eot_id\|>', which tokenizer\.json does not"
    with pytest.raises(sft.DataError, match=r"tokenizer_config\.json: " + missing):
        sft.load_tokenizer(model)
    del config["eos_token"]
    config["chat_template"] = "{{ eos_token }}" + tiny.CHAT_TEMPLATE
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(sft.DataError, match=r"uses eos_token, but tokenizer_config\.json has no"):
        sft.load_tokenizer(model)
    config["eos_token"] = "<|nope|>"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(sft.DataError, match=r"key 'eos_token' is '<\|nope\|>', which tokenizer"):
        sft.load_tokenizer(model)


def test_gpt2_checkpoints_fine_tune_one_example_per_row(artifacts, tmp_path, capsys):
    from examples.gpt2 import hf as gpt2_hf
    from examples.gpt2.model import GPTConfig

    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=96, vocab_size=320)
    tiny.random_checkpoint(tmp_path / "model", artifacts / "tokenizer", cfg, seed=2)
    for name in ("train.jsonl", "val.jsonl"):
        shutil.copyfile(artifacts / name, tmp_path / name)
    with pytest.raises(SystemExit):
        finetune.main(argv(tmp_path, tmp_path / "out"))
    assert "is GPT-2 (learned absolute positions, no segment mask): pass --pad" in (
        capsys.readouterr().err
    )
    finetune.main(argv(tmp_path, tmp_path / "out", "--pad", "--optimizer", "lisa"))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["val_loss"] < summary["initial_val_loss"] - 0.1, summary
    model = gpt2_hf.load(tmp_path / "out" / "final")
    assert model.cfg == cfg and (tmp_path / "out" / "final" / "tokenizer.json").is_file()
