"""
Byte-level BPE tokenizer: trained with the `tokenizers` library, encoded with `tiktoken`.

Why two libraries: `tokenizers` has a solid BPE trainer and a standard on-disk format
(tokenizer.json), while `tiktoken` encodes faster and, crucially, has an `encode_ordinary` that
can never produce a special token from plain text. We train with the first, save its JSON, and on
load build a tiktoken Encoding from the same vocabulary (the token bytes, ranked by id). That works
because the trainer numbers tokens in merge order, so "lowest merge first" (tokenizers) and "lowest
token id first" (tiktoken) pick the same merges; tests check identical ids on real text and on
arbitrary Unicode.

The shape follows nanochat / GPT-4:
- split regex = GPT-4's, except numbers are grouped 1-2 digits (`\\p{N}{1,2}`, not 1-3): a small
  vocab wastes fewer slots on 3-digit numbers (nanochat's choice).
- 9 special tokens, appended at the END of the vocab (ids vocab_size-9 .. vocab_size-1), so that
  ids 0..n-1 are exactly the mergeable byte strings tiktoken ranks.
- chat rendering produces (ids, mask): mask 1 only on tokens the assistant has to produce.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from nanochat_core.common import NanochatError, atomic_write_text
import tiktoken
from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
import torch

SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

SPECIAL_TOKENS = [
    "<|bos|>",            # starts every document (and every chat)
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",   # assistant calls the calculator tool
    "<|output_start|>", "<|output_end|>",   # the tool's answer, forced into the stream (never trained on)
]

DEFAULT_VOCAB_SIZE = 32768  # 2^15, nanochat's default


def _byte_to_unicode() -> dict[int, str]:
    """The byte <-> printable-character table byte-level BPE stores its tokens in (GPT-2's scheme):
    printable Latin-1 bytes stand for themselves, the other 68 are shifted to code points 256+."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    shifted = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(shifted)) for b in range(256)}


class Tokenizer:
    """Load with `Tokenizer.load(dir)` or train with `Tokenizer.train_from_iterator(texts, vocab_size)`."""

    def __init__(self, tokenizer_json: str):
        self._json = tokenizer_json
        try:
            spec = json.loads(tokenizer_json)
            vocab: dict[str, int] = spec["model"]["vocab"]
            added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as e:
            raise NanochatError(f"tokenizer.json is not a byte-level BPE tokenizer ({type(e).__name__}: "
                                f"{str(e)[:120]}); retrain with tok_train") from None
        missing = [s for s in SPECIAL_TOKENS if s not in added]
        if missing:
            raise NanochatError(f"tokenizer.json lacks special tokens {missing}; retrain with tok_train")
        char_to_byte = {c: b for b, c in _byte_to_unicode().items()}
        try:
            ranks = {bytes(char_to_byte[c] for c in tok): i for tok, i in vocab.items()}
        except KeyError:
            raise NanochatError("tokenizer.json is not a byte-level BPE (a token uses characters outside the "
                                "byte alphabet); retrain with tok_train") from None
        self._special = {s: added[s] for s in SPECIAL_TOKENS}
        self._enc = tiktoken.Encoding(
            name="nanochat", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=self._special
        )
        self._token_len = [0] * self._enc.n_vocab      # UTF-8 bytes per id; specials (and any gap) stay 0
        for b, i in ranks.items():
            self._token_len[i] = len(b)
        self.hash = hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()

    # ------------------------------------------------------------------ training / io

    @classmethod
    def train_from_iterator(cls, texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> "Tokenizer":
        """Train byte-level BPE on an iterator of documents. The vocab holds 256 bytes + merges + 9 specials;
        a corpus too small for the requested size yields fewer merges (get_vocab_size() tells)."""
        min_size = 256 + len(SPECIAL_TOKENS)
        if vocab_size < min_size:
            raise NanochatError(f"vocab size {vocab_size} is too small: need at least {min_size} (256 bytes + {len(SPECIAL_TOKENS)} specials)")
        seen = {"docs": 0}

        def batches(n: int = 1000) -> Iterator[list[str]]:
            # lists rather than single strings: fewer Python->Rust crossings (~20% faster training here)
            batch: list[str] = []
            for t in texts:
                if t:
                    seen["docs"] += 1
                    batch.append(t)
                    if len(batch) == n:
                        yield batch
                        batch = []
            if batch:
                yield batch

        hf = HFTokenizer(models.BPE(byte_fallback=False, unk_token=None, fuse_unk=False))
        hf.normalizer = None
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - len(SPECIAL_TOKENS),  # specials are appended after training
            show_progress=False,
            min_frequency=0,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
        )
        hf.train_from_iterator(batches(), trainer=trainer)
        if seen["docs"] == 0:
            raise NanochatError("cannot train a tokenizer on an empty corpus: check the data directory has non-empty text")
        hf.add_special_tokens(SPECIAL_TOKENS)
        # plain text that contains "<|bos|>" must stay plain text in the HF encoder too
        hf.encode_special_tokens = True
        return cls(hf.to_str())

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise NanochatError(f"no tokenizer at {path}: run `python -m nanochat_core.stages.tok_train` first")
        return cls(path.read_text(encoding="utf-8"))

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / "tokenizer.json"
        atomic_write_text(path, self._json)
        return path

    def hf_tokenizer(self):
        """The same tokenizer as a `tokenizers.Tokenizer` (for export / cross-checks)."""
        hf = HFTokenizer.from_str(self._json)
        hf.encode_special_tokens = True
        return hf

    # ------------------------------------------------------------------ vocabulary

    def get_vocab_size(self) -> int:
        return self._enc.n_vocab

    def get_special_tokens(self) -> list[str]:
        return list(SPECIAL_TOKENS)

    def encode_special(self, name: str) -> int:
        try:
            return self._special[name]
        except KeyError:
            raise NanochatError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}") from None

    def get_bos_token_id(self) -> int:
        return self._special["<|bos|>"]

    def token_bytes(self):
        """torch.int32[vocab]: UTF-8 byte length of each token, 0 for specials. Bits-per-byte =
        sum(loss) / ln(2) / sum(token_bytes[targets]) - the loss measure that does not depend on vocab."""
        return torch.tensor(self._token_len, dtype=torch.int32)

    # ------------------------------------------------------------------ encode / decode

    def _resolve(self, tok: int | str | None) -> int | None:
        if tok is None or isinstance(tok, int):
            return tok
        return self.encode_special(tok)

    def encode(self, text: str | list[str], prepend: int | str | None = None, append: int | str | None = None,
               num_threads: int | None = None) -> list[int] | list[list[int]]:
        """Encode a string (-> list[int]) or a list of strings (-> list[list[int]], threaded).
        Special-token text inside `text` is encoded as ordinary bytes: specials only come from
        `prepend`/`append`, `encode_special` or chat rendering."""
        if isinstance(text, str):
            return self.encode([text], prepend, append, num_threads=1)[0]
        if not isinstance(text, list):
            raise NanochatError(f"encode() takes a str or a list of str, got {type(text).__name__}")
        pre, post = self._resolve(prepend), self._resolve(append)
        threads = num_threads or min(8, os.cpu_count() or 1)
        batch = self._enc.encode_ordinary_batch(text, num_threads=threads) if threads > 1 else [self._enc.encode_ordinary(t) for t in text]
        if pre is not None or post is not None:
            batch = [([pre] if pre is not None else []) + ids + ([post] if post is not None else []) for ids in batch]
        return batch

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids. Ids outside the vocab (the model pads its vocab to a multiple of 64, so an untrained
        model can sample them) decode to nothing rather than crash; broken UTF-8 becomes U+FFFD."""
        n = self._enc.n_vocab
        return self._enc.decode([i for i in map(int, ids) if 0 <= i < n], errors="replace")

    # ------------------------------------------------------------------ chat

    def render_conversation(self, conversation: dict[str, Any], max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """A conversation -> (ids, mask), same length, truncated to max_tokens.
        mask = 1 on what the assistant must learn to produce: its text, its <|python_start|>expr<|python_end|>
        calls and its <|assistant_end|>. mask = 0 on <|bos|>, everything user/system, <|assistant_start|> (given
        as the prompt) and the tool's output block (<|output_start|>..<|output_end|>, which the engine forces)."""
        messages = _messages(conversation)
        if messages and messages[0]["role"] == "system":
            # nanochat has no system role: the system prompt becomes the start of the first user turn
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise NanochatError("a system message must be followed by a user message")
            first = dict(messages[1])
            first["content"] = _text_of(messages[0]) + "\n\n" + _text_of(messages[1])
            messages = [first] + messages[2:]
        ids, mask = [], []

        def add(tokens: int | list[int], m: int) -> None:
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        sp = self._special
        add(sp["<|bos|>"], 0)
        for i, msg in enumerate(messages):
            want = "user" if i % 2 == 0 else "assistant"
            if msg["role"] != want:
                raise NanochatError(f"message {i} has role {msg['role']!r}, expected {want!r}: "
                                    "conversations alternate user/assistant (an optional system message first)")
            content = msg["content"]
            if want == "user":
                add(sp["<|user_start|>"], 0)
                add(self.encode(_text_of(msg)), 0)
                add(sp["<|user_end|>"], 0)
                continue
            add(sp["<|assistant_start|>"], 0)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                kind, text = part.get("type"), part.get("text", "")
                if kind == "text":
                    add(self.encode(text), 1)
                elif kind == "python":
                    add(sp["<|python_start|>"], 1)
                    add(self.encode(text), 1)
                    add(sp["<|python_end|>"], 1)
                elif kind == "python_output":
                    add(sp["<|output_start|>"], 0)
                    add(self.encode(text), 0)
                    add(sp["<|output_end|>"], 0)
                else:
                    raise NanochatError(f"unknown assistant part type {kind!r}: use text, python or python_output")
            add(sp["<|assistant_end|>"], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict[str, Any]) -> list[int]:
        """Prompt ids for sampling the next assistant turn: the conversation without its final
        assistant message (if it has one), ending in <|assistant_start|>."""
        messages = _messages(conversation)   # read, never changed: render_conversation copies what it alters
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        ids, _ = self.render_conversation({"messages": messages}, max_tokens=1 << 62)
        ids.append(self._special["<|assistant_start|>"])
        return ids


def _messages(conversation: dict[str, Any]) -> list[dict[str, Any]]:
    msgs = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
        raise NanochatError('a conversation is {"messages": [{"role": ..., "content": ...}, ...]}')
    return msgs


def _text_of(msg: dict[str, Any]) -> str:
    """User/system content as one string (a list of parts is joined)."""
    c = msg["content"]
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        return "".join(p.get("text", "") for p in c if isinstance(p, dict))
    raise NanochatError(f"message content must be a string or a list of parts, got {type(c).__name__}")


def get_tokenizer(run_dir: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a run: run_dir/tokenizer/tokenizer.json."""
    return Tokenizer.load(Path(run_dir) / "tokenizer")
