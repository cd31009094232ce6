"""
Inference: a KV cache, sampling, and the generation loop with calculator tool use.

How a reply is generated:
  1. prefill: the prompt goes through the model ONCE at batch 1, filling a batch-1 KV cache;
  2. that cache is copied (broadcast) into a batch-N cache, one row per sample - the prompt is never
     recomputed per sample;
  3. decode: one token per step for all N rows; each step feeds the N new tokens and reads the cache.
Per row, a small state machine implements the tool: when the model closes <|python_end|>, the tokens
since <|python_start|> are decoded and evaluated by calculator.evaluate (a safe AST walker, never eval),
and <|output_start|> result <|output_end|> is queued as FORCED tokens: the next steps feed them to the
model instead of sampling (mask 0 in the stream, so callers can tell them apart).
A row is done at <|assistant_end|> or <|bos|>.

The KV-cache protocol (docs/ARCHITECTURE.md) is what model.forward calls: get_pos() once, insert_kv()
per layer, advance() at the end.
"""
from __future__ import annotations

import contextlib
import os
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from nanochat_core.inference.calculator import CalculatorError, evaluate
from nanochat_core.common import NanochatError

STOP_TOKENS = ("<|assistant_end|>", "<|bos|>")


class KVCache:
    """Keys and values of every layer, pre-allocated as (layers, B, kv_heads, max_len, head_dim).
    Layers are the outer dim so that one layer's slice is a contiguous block. The storage is allocated on
    the first insert_kv, with that tensor's dtype and device (bf16 under autocast, fp32 on CPU), so the
    cache never has to guess what the model computes in. If a sequence outgrows max_len the cache doubles,
    up to `limit` (the model's context); past that it raises a NanochatError."""

    def __init__(self, batch_size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 max_len: int, limit: int | None = None):
        self.batch_size, self.num_layers = batch_size, num_layers
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.max_len = max_len
        self.limit = limit if limit is not None else max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.pos = 0
        self.prev_embedding: torch.Tensor | None = None   # (B, 1, d): the last token's embedding (the model's smear)

    @classmethod
    def for_model(cls, model: Any, batch_size: int, max_len: int) -> "KVCache":
        c = model.config
        limit = getattr(model, "rotary_len", c.sequence_len)
        return cls(batch_size, c.n_layer, c.n_kv_head, c.head_dim, min(max_len, limit), limit)

    # -- the protocol model.forward uses ---------------------------------------------------------
    def get_pos(self) -> int:
        return self.pos

    def insert_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, T, D = k.shape
        if (B, H, D) != (self.batch_size, self.num_kv_heads, self.head_dim):
            raise ValueError(f"KVCache holds (B={self.batch_size}, H={self.num_kv_heads}, D={self.head_dim}), "
                             f"got k of shape {tuple(k.shape)}")
        kl, vl = self.reserve(layer_idx, T, k.dtype, k.device)
        t0, t1 = self.pos, self.pos + T
        kl[:, :, t0:t1] = k
        vl[:, :, t0:t1] = v
        return kl[:, :, :t1], vl[:, :, :t1]

    def reserve(self, layer_idx: int, T: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's whole key and value buffers (B, H, capacity, D), allocated or grown so that T more
        positions fit: insert_kv writes into them, and so does the fused CPU decode step (cpu_kernels.py)."""
        if self.k is None:
            self._allocate(self.max_len, dtype, device)
        if self.pos + T > self.k.size(3):
            self._grow(self.pos + T)
        return self.k[layer_idx], self.v[layer_idx]

    def advance(self, num_tokens: int) -> None:
        self.pos += num_tokens

    # -- management ------------------------------------------------------------------------------
    def copy_from(self, other: "KVCache") -> None:
        """Fill this fresh (batch N) cache with the contents of a prefilled batch-1 cache: the prompt, which
        Engine.generate has checked fits the context."""
        self._allocate(max(self.max_len, other.pos), other.k.dtype, other.k.device)
        self.k[:, :, :, :other.pos] = other.k[:, :, :, :other.pos]   # broadcasts B=1 -> B=N
        self.v[:, :, :, :other.pos] = other.v[:, :, :, :other.pos]
        self.pos = other.pos
        if other.prev_embedding is not None:
            self.prev_embedding = other.prev_embedding.expand(self.batch_size, -1, -1).clone()

    def _allocate(self, length: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (self.num_layers, self.batch_size, self.num_kv_heads, length, self.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)

    def _grow(self, needed: int) -> None:
        if needed > self.limit:
            raise NanochatError(f"the conversation needs {needed} tokens but the model's context holds {self.limit}: "
                                "start a new conversation (/clear in the terminal chat)")
        old_k, old_v = self.k, self.v
        self._allocate(min(self.limit, max(needed, 2 * old_k.size(3))), old_k.dtype, old_k.device)
        self.k[:, :, :, :self.pos] = old_k[:, :, :, :self.pos]
        self.v[:, :, :, :self.pos] = old_v[:, :, :, :self.pos]


# -----------------------------------------------------------------------------
# Sampling

def sample_next_token(logits: torch.Tensor, generator: torch.Generator, temperature: float = 1.0,
                      top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature 0 = greedy; top_k 0/None = no cut; top_p 1/None = no cut.
    With top_k the draw happens among the k candidates only: a softmax + multinomial over 50 values instead
    of the whole vocab (that was ~10% of a CPU decode step at vocab 32k).
    Any temperature > 0 and top_p > 0 the API accepts is safe: the cut comes first (the order of the logits
    does not depend on the temperature), then the best logit is subtracted before dividing, so a tiny
    temperature makes the others -inf, never +inf or NaN (0/0 of the best, where the temperature rounds to 0
    in float32, is 0), and the best candidate always stays under top_p (a top_p that rounds to 0 in float32
    would otherwise drop them all)."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    nucleus = top_p is not None and 0.0 < top_p < 1.0
    if top_k is not None and 0 < top_k < logits.size(-1):
        values, candidates = torch.topk(logits, top_k, dim=-1)        # sorted, largest first
        best = values[:, :1]
    elif nucleus:
        values, candidates = torch.sort(logits, dim=-1, descending=True)
        best = values[:, :1]
    else:
        values, candidates = logits, None
        best = logits.amax(dim=-1, keepdim=True)
    values = ((values - best) / temperature).nan_to_num(nan=0.0, posinf=0.0, neginf=float("-inf"))
    if nucleus:
        probs = values.softmax(dim=-1)
        # drop a candidate if the ones ranked above it already reach top_p (the first always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        drop[:, 0] = False
        values = values.masked_fill(drop, float("-inf"))
    choice = torch.multinomial(values.softmax(dim=-1), num_samples=1, generator=generator)
    return (choice if candidates is None else candidates.gather(-1, choice)).squeeze(-1)


# -----------------------------------------------------------------------------
# Per-row tool state

class _RowState:
    """What one sample is doing: finished?, inside a <|python_start|> block?, tokens to force next."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.done = False
        self.in_python = False
        self.python_tokens: list[int] = []
        self.forced: deque[int] = deque()

    def observe(self, token: int) -> None:
        e = self.engine
        if token in e.stop_ids:
            self.done = True
        elif token == e.python_start:
            self.in_python, self.python_tokens = True, []
        elif token == e.python_end and self.in_python:
            self.in_python = False
            result = e.run_tool(e.tokenizer.decode(self.python_tokens))
            self.forced.extend([e.output_start, *e.tokenizer.encode(result), e.output_end])
        elif self.in_python:
            self.python_tokens.append(token)


@dataclass
class Piece:
    """A bit of streamed reply text. kind: "text" | "python" (the calculator expression the model wrote) |
    "python_output" (the forced result) | "finish" (last piece; text = "stop" | "length" | "cancelled").
    An empty-text piece marks the start of a new segment. num_tokens (on "finish") = tokens generated."""
    kind: str
    text: str
    num_tokens: int = 0


@contextlib.contextmanager
def decode_threads(device):
    """One CPU thread while decoding: batch-1 decode steps are tiny matmuls, and on a busy 2-core machine two
    threads made them ~10x slower (measured: 280 vs 20 tokens/s for a depth-4 model)."""
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Engine:
    """Generation for one model replica. Not thread-safe: the server runs one Engine per worker."""

    def __init__(self, model: Any, tokenizer: Any):
        self.model = model   # no train()/eval() flip: the model has no dropout, and callers keep their mode
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        sp = tokenizer.encode_special
        self.stop_ids = {sp(s) for s in STOP_TOKENS}
        self.python_start, self.python_end = sp("<|python_start|>"), sp("<|python_end|>")
        self.output_start, self.output_end = sp("<|output_start|>"), sp("<|output_end|>")
        self.special_ids = {sp(s) for s in tokenizer.get_special_tokens()}
        self.vocab_size = tokenizer.get_vocab_size()
        self.context_len = getattr(model, "rotary_len", model.config.sequence_len)

    @staticmethod
    def run_tool(expr: str) -> str:
        """The calculator's answer, or a short error the model (and the user) can read."""
        try:
            return evaluate(expr)
        except CalculatorError as e:
            return f"error: {e}"

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward_last(self, ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """Logits of the last position, fp32. The model itself routes every call with a cache, or of a length
        it was not compiled for, to SDPA (model.forward): prompts come in every length, and the compiled flex
        path would specialise on each. Nothing about the model is switched here, so sampling from a model
        that is training leaves it exactly as it was."""
        with self._autocast():
            return self.model(ids, kv_cache=cache, last_only=True)[:, -1, :self.vocab_size].float()

    @torch.inference_mode()
    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int = 256, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 use_kv_cache: bool = True) -> Iterator[tuple[list[int], list[int]]]:
        """Yield (token_column, mask_column) per step: one token per sample; mask 1 = sampled, 0 = forced
        (tool output). A sample's stop token is yielded too; after it, that row's tokens are filler to ignore.
        Stops when every row is done or after max_tokens steps (or at the model's context limit).
        use_kv_cache=False recomputes the whole sequence every step (the slow yardstick for tests/bench)."""
        self._check_prompt(tokens)
        if num_samples < 1:
            raise NanochatError("num_samples must be >= 1")
        max_tokens = min(max_tokens, self.context_len - len(tokens))
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(7), "little"))
        rows = [_RowState(self) for _ in range(num_samples)]
        prompt = torch.tensor([tokens], dtype=torch.long, device=self.device)

        if use_kv_cache:
            prefill = KVCache.for_model(self.model, 1, len(tokens))
            logits = self._forward_last(prompt, prefill).expand(num_samples, -1)
            cache = KVCache.for_model(self.model, num_samples, len(tokens) + max_tokens)
            cache.copy_from(prefill)
            del prefill
        else:
            seq = prompt.expand(num_samples, -1)
            logits = self._forward_last(seq, None)

        for step in range(max_tokens):
            sampled_t = sample_next_token(logits, generator, temperature, top_k, top_p)
            sampled = sampled_t.tolist()   # the one host sync per step: streaming needs the ids anyway
            column, masks = [], []
            for row, tok in zip(rows, sampled):
                if row.forced:
                    tok, m = row.forced.popleft(), 0
                else:
                    m = 1
                if not row.done:
                    row.observe(tok)
                column.append(tok)
                masks.append(m)
            yield column, masks
            if all(r.done for r in rows) or step == max_tokens - 1:
                return
            if all(masks):   # nothing forced: feed the sampled ids straight back, no host-to-device copy
                new = sampled_t.unsqueeze(1)
            else:
                new = torch.tensor(column, dtype=torch.long, device=self.device).unsqueeze(1)
            if use_kv_cache:
                logits = self._forward_last(new, cache)
            else:
                seq = torch.cat([seq, new], dim=1)
                logits = self._forward_last(seq, None)

    def generate_batch(self, tokens: list[int], num_samples: int = 1, **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """Non-streaming: (sequences, masks), each the prompt followed by the sample's tokens, without the
        stop token."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, mask_column in self.generate(tokens, num_samples, **kwargs):
            for i, (tok, m) in enumerate(zip(column, mask_column)):
                if done[i]:
                    continue
                if tok in self.stop_ids:
                    done[i] = True
                else:
                    results[i].append(tok)
                    masks[i].append(m)
        return results, masks   # (generate itself ends once every row is done)

    def stream_reply(self, tokens: list[int], max_tokens: int = 512, temperature: float = 0.6,
                     top_k: int | None = 50, top_p: float | None = None, seed: int | None = None,
                     cancel: Any = None) -> Iterator[Piece]:
        """One assistant reply as text pieces, for the chat UIs. Special tokens become segment changes
        (text / python / python_output); multi-byte characters split across tokens are held back until
        complete. `cancel` (a threading.Event) stops generation between tokens."""
        kind, pending, count, finish = "text", [], 0, "length"
        transitions = {self.python_start: "python", self.python_end: "text",
                       self.output_start: "python_output", self.output_end: "text"}

        def flush(final: bool) -> str:
            text = self.tokenizer.decode(pending)
            if not final and text.endswith("\ufffd") and len(pending) < 8:
                return ""      # probably half a UTF-8 character: wait for the rest
            pending.clear()
            return text

        for column, _ in self.generate(tokens, 1, max_tokens, temperature, top_k, top_p, seed):
            tok = column[0]
            count += 1
            if tok in self.stop_ids:
                finish = "stop"
                break
            if tok in transitions:
                if text := flush(True):
                    yield Piece(kind, text)
                kind = transitions[tok]
                yield Piece(kind, "")
            elif tok in self.special_ids:
                # a stray <|user_start|> etc. is structure, not text: never show it as "<|...|>"
                if text := flush(True):
                    yield Piece(kind, text)
            else:
                pending.append(tok)
                if text := flush(False):
                    yield Piece(kind, text)
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
        if text := flush(True):
            yield Piece(kind, text)
        yield Piece("finish", finish, num_tokens=count)

    def _check_prompt(self, tokens: list[int]) -> None:
        if not tokens:
            raise NanochatError("the prompt is empty: it needs at least <|bos|>")
        if any((not isinstance(t, int)) or t < 0 or t >= self.vocab_size for t in tokens):
            raise NanochatError(f"prompt token ids must be ints in [0, {self.vocab_size})")
        if len(tokens) >= self.context_len:
            raise NanochatError(f"the prompt has {len(tokens)} tokens but the model's context holds "
                                f"{self.context_len}: shorten the conversation")
