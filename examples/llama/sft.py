"""Supervised fine-tuning data: JSONL records -> tokens with a response mask -> packed rows.

Records, one JSON object a line:

    {"prompt": "...", "response": "..."}
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}

Both are rendered with the tokenizer's chat template when ``tokenizer_config.json`` (or
``chat_template.jinja``) has one, as transformers renders it (Jinja2, ``trim_blocks`` and
``lstrip_blocks``, ``raise_exception``, ``tojson``); a prompt / response record without one is
``prompt + response + eos``. Loss falls on the response tokens only: for chats, the text each
assistant turn adds to the rendering (its end-of-turn token included).

Rows (`pack`): examples laid end to end in rows of ``seq_len`` tokens, each with its own
segment id (attention stays inside it) and positions restarting at 0; ``pad=True`` puts one
example per row instead. Every row has ``tokens``, ``targets`` (the next token), ``weights``
(1 where the target is a response token), ``positions`` and ``segments`` (0: padding).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

ROLES = ("system", "user", "assistant", "tool")
RECORD = "an object with 'prompt' and 'response' strings or a 'messages' list"
# Literal special tokens in a chat template: <|im_start|>, <|eot_id|>, <|start_header_id|>...
SPECIAL = re.compile(r"<\|[A-Za-z0-9_]+\|>")


class DataError(ValueError):
    """Bad fine-tuning data or tokenizer, said in a sentence naming the file, key and line."""


# ----------------------------------------------------------------------------- records


def read_jsonl(path) -> list[dict]:
    """The records of a JSONL file, each checked; DataError names the file, line and key."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist (expected a JSONL file of {RECORD} per line)")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        where = f"{path} line {n}"
        if not line.strip():
            raise DataError(f"{where}: empty line; expected {RECORD}")
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg}); expected {RECORD}") from None
        records.append(check_record(rec, where))
    if not records:
        raise DataError(f"{path} holds no records; expected {RECORD} per line")
    return records


def check_record(rec, where: str) -> dict:
    """``rec`` if it is a prompt / response or a messages record; DataError otherwise."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: got a JSON {type(rec).__name__}; expected {RECORD}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: key 'messages' must be a non-empty list, got {msgs!r:.80}")
        for i, m in enumerate(msgs):
            ok = isinstance(m, dict) and isinstance(m.get("content"), str)
            if not ok or m.get("role") not in ROLES:
                raise DataError(
                    f"{where}: key 'messages'[{i}] must be an object with 'role' (one of "
                    f"{', '.join(ROLES)}) and 'content' (a string), got {m!r:.80}"
                )
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: key 'messages' has no 'assistant' turn: nothing to learn")
        return rec
    for key in ("prompt", "response"):
        if not isinstance(rec.get(key), str):
            raise DataError(f"{where}: key {key!r} must be a string, got {rec.get(key)!r:.80}")
    if not rec["response"]:
        raise DataError(f"{where}: key 'response' is empty: nothing to learn")
    return rec


# ----------------------------------------------------------------------------- tokenizer


def _token_text(value) -> str | None:
    """A special token of tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@dataclasses.dataclass
class ChatTokenizer:
    """A `tokenizers.Tokenizer` with the chat template and special tokens of a checkpoint."""

    tokenizer: object  # tokenizers.Tokenizer
    template: str | None
    special: dict  # bos_token, eos_token, pad_token... -> their text
    source: Path

    def id_of(self, name: str) -> int | None:
        text = self.special.get(name)
        return None if text is None else self.tokenizer.token_to_id(text)

    def encode(self, text: str, special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=special).ids

    def render(self, messages, add_generation_prompt: bool) -> str:
        return _compiled(self.template)(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special
        )


def load_tokenizer(directory) -> ChatTokenizer:
    """The tokenizer of a checkpoint directory (``tokenizer.json``, ``tokenizer_config.json``,
    ``chat_template.jinja``), its special tokens checked against the vocabulary.

    Raises:
      DataError: a missing or unreadable tokenizer.json; a special token, or a literal
        ``<|...|>`` token of the chat template, that tokenizer.json does not have.
    """
    from tokenizers import Tokenizer

    directory = Path(directory)
    tj = directory / "tokenizer.json"
    if not tj.is_file():
        raise DataError(f"{tj} does not exist: fine-tuning needs the checkpoint's tokenizer")
    try:
        tok = Tokenizer.from_file(str(tj))
    except Exception as e:  # noqa: BLE001 - tokenizers raises its own exception type
        raise DataError(f"{tj} is not a readable tokenizers file ({e})") from None
    cfg_path = directory / "tokenizer_config.json"
    cfg = {}
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{cfg_path} is not valid JSON ({e})") from None
    template, where = cfg.get("chat_template"), f"{cfg_path}: key 'chat_template'"
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        template, where = jinja.read_text(), str(jinja)
    special = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        text = _token_text(cfg.get(key))
        if text is not None:
            if tok.token_to_id(text) is None:
                raise DataError(
                    f"{cfg_path}: key {key!r} is {text!r}, which {tj.name} does not have"
                )
            special[key] = text
    if template is not None:
        if not isinstance(template, str):
            raise DataError(f"{where} must be a string (a Jinja template)")
        for key in ("bos_token", "eos_token"):
            if re.search(rf"\b{key}\b", template) and key not in special:
                raise DataError(
                    f"{where} uses {key}, but {cfg_path.name} has no key {key!r} (expected the "
                    "token's text, one of tokenizer.json's)"
                )
        for text in sorted(set(SPECIAL.findall(template))):
            if tok.token_to_id(text) is None:
                raise DataError(
                    f"{where} uses the token {text!r}, which {tj.name} does not have (expected "
                    "it among its added tokens)"
                )
        _compiled(template)  # a syntax error is said now, naming the file
    return ChatTokenizer(tok, template, special, directory)


_TEMPLATES: dict[str, object] = {}


def _compiled(template: str):
    """The template compiled as transformers compiles chat templates."""
    if template not in _TEMPLATES:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False,
                                                                  indent=indent)  # fmt: skip
        env.globals["raise_exception"] = raise_exception
        try:
            _TEMPLATES[template] = env.from_string(template).render
        except TemplateError as e:
            raise DataError(f"the chat template does not compile ({e})") from None
    return _TEMPLATES[template]


# ----------------------------------------------------------------------------- tokens


def pieces(tok: ChatTokenizer, rec: dict, where: str) -> list[tuple[str, bool]]:
    """The record as (text, is_response) pieces in order."""
    msgs = rec.get("messages")
    if msgs is None:
        if tok.template is None:
            return [(rec["prompt"], False), (rec["response"], True)]
        msgs = [{"role": "user", "content": rec["prompt"]},
                {"role": "assistant", "content": rec["response"]}]  # fmt: skip
    if tok.template is None:
        raise DataError(
            f"{where}: key 'messages' needs a chat template, and {tok.source} has none "
            "(tokenizer_config.json key 'chat_template' or chat_template.jinja)"
        )
    out, done = [], ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = tok.render(msgs[:i], add_generation_prompt=True)
        after = tok.render(msgs[: i + 1], add_generation_prompt=False)
        if not before.startswith(done) or not after.startswith(before):
            raise DataError(
                f"{where}: the chat template's rendering of the first {i} messages is not a "
                "prefix of the next one; the response tokens cannot be told apart"
            )
        out += [(before[len(done) :], False), (after[len(before) :], True)]
        done = after
    rest = tok.render(msgs, add_generation_prompt=False)[len(done) :]
    return out + ([(rest, False)] if rest else [])


def tokenize(tok: ChatTokenizer, rec: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, response mask) of one record."""
    ids, mask = [], []
    for n, (text, response) in enumerate(pieces(tok, rec, where)):
        # Without a template the first piece takes the tokenizer's own specials (a bos).
        t = tok.encode(text, special=tok.template is None and n == 0)
        ids += t
        mask += [response] * len(t)
    eos = tok.id_of("eos_token")
    if tok.template is None and eos is not None:  # the template ends its turns itself
        ids.append(eos)
        mask.append(True)
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


@dataclasses.dataclass
class Rows:
    """Rows of ``seq_len`` tokens (arrays (N, seq_len)) and what building them dropped."""

    tokens: np.ndarray
    targets: np.ndarray
    weights: np.ndarray  # float32, 1 where the target is a response token
    positions: np.ndarray
    segments: np.ndarray  # 1, 2, ... per example in the row; 0 = padding
    truncated: int = 0  # examples cut to seq_len + 1 tokens
    dropped: int = 0  # examples left with no response token after the cut

    def __len__(self):
        return len(self.tokens)

    def take(self, idx) -> tuple[np.ndarray, ...]:
        return tuple(a[idx] for a in self.arrays())

    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.tokens, self.targets, self.weights, self.positions, self.segments


def pack(examples, seq_len: int, pad: bool = False, pad_id: int = 0) -> Rows:
    """Rows of ``seq_len`` from (ids, mask) examples, in order (see the module docstring).

    An example of n tokens takes n - 1 slots (inputs ``ids[:-1]``, targets ``ids[1:]``); one
    longer than ``seq_len + 1`` tokens is cut (counted in ``truncated``).
    """
    rows: list[list[tuple]] = []
    used = seq_len  # start a row at the first example
    truncated = dropped = 0
    for ids, mask in examples:
        if len(ids) > seq_len + 1:
            ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
            truncated += 1
        if len(ids) < 2 or not mask[1:].any():
            dropped += 1
            continue
        n = len(ids) - 1
        if pad or used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((ids, mask))
        used += n
    N = len(rows)
    out = Rows(
        np.full((N, seq_len), pad_id, np.int32),
        np.full((N, seq_len), pad_id, np.int32),
        np.zeros((N, seq_len), np.float32),
        np.zeros((N, seq_len), np.int32),
        np.zeros((N, seq_len), np.int32),
        truncated,
        dropped,
    )
    for r, row in enumerate(rows):
        at = 0
        for s, (ids, mask) in enumerate(row, 1):
            n = len(ids) - 1
            span = slice(at, at + n)
            out.tokens[r, span], out.targets[r, span] = ids[:-1], ids[1:]
            out.weights[r, span] = mask[1:]
            out.positions[r, span] = np.arange(n)
            out.segments[r, span] = s
            at += n
    return out


def build_rows(path, tok: ChatTokenizer, seq_len: int, pad: bool = False,
               records: list[dict] | None = None) -> Rows:  # fmt: skip
    """`pack` of the tokenized records of a JSONL file (or of ``records``, read from it)."""
    records = read_jsonl(path) if records is None else records
    examples = [tokenize(tok, rec, f"{path} record {n}") for n, rec in enumerate(records, 1)]
    pad_id = tok.id_of("pad_token")
    if pad_id is None:
        pad_id = tok.id_of("eos_token") or 0
    rows = pack(examples, seq_len, pad, pad_id)
    if len(rows) == 0:
        raise DataError(f"{path}: no record keeps a response token within --seq-len {seq_len}")
    return rows


class RowBatches:
    """Global batches of rows in reshuffled epochs; the whole position is ``step``.

    Every host draws the same permutation (``seed``, epoch), as the GPT-2 loader does, and the
    state (``state_dict``) is what `examples.gpt2.checkpoint` saves and resumes.
    """

    def __init__(self, rows: Rows, batch: int, seed: int):
        if len(rows) < batch:
            raise DataError(
                f"the training data packs into {len(rows)} rows of --seq-len tokens, fewer than "
                f"one batch of {batch}; lower --batch-size x --microbatches"
            )
        self.rows, self.batch, self.seed, self.step = rows, batch, seed, 0

    def __iter__(self):
        return self

    def __next__(self):
        per_epoch = len(self.rows) // self.batch
        epoch, k = divmod(self.step, per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        self.step += 1
        return self.rows.take(order[k * self.batch : (k + 1) * self.batch])

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict):
        if int(state.get("step", -1)) < 0:
            raise ValueError(f"bad data position {state!r}")
        self.step = int(state["step"])
