"""
Pre-training loader: parquet shards -> (inputs, targets) int64 (B, T) batches, forever (epoch after epoch).

What it does, in the order a batch is made:
1. Units of work are parquet row groups. Each epoch visits every row group of the split once, in an order
   fixed by (seed, epoch). Rank r of W takes the row groups at positions p with p % W == r, so W ranks
   together read each row group exactly once per epoch. (If the split has fewer row groups than ranks -
   e.g. a small validation shard on 8 GPUs - every rank reads every row group but keeps only documents
   i with i % W == r.)
2. Worker threads read and tokenise the next few row groups ahead of need; every document gets <|bos|> in
   front. Tokenising is deterministic, so prefetching never changes what comes out.
3. Rows of T+1 tokens are packed best-fit from a buffer of ~1000 documents (nanochat's BOS-aligned best
   fit): repeatedly place the LARGEST document that still fits whole; when none fits, take the SHORTEST one
   and crop it to fill the row. Every row therefore starts with <|bos|>, there is no padding (100%
   utilisation), and the price is the cropped tails (~35% of tokens at T=2048 on web text, per nanochat).
4. inputs = row[:-1], targets = row[1:]. On CUDA the batch goes through pinned memory with a non-blocking copy.

Exact resume: `state_dict()` holds the epoch, the next row-group position and the buffer as document
references (shard, row group, index) - small JSON, no token ids. Documents in the buffer are always whole
(cropped ones are dropped when used), so re-reading and re-tokenising them reproduces the buffer exactly,
and a resumed loader yields exactly the batches an uninterrupted one would. Resuming with a different
number of ranks continues every rank after the furthest row group any old rank had read and deals the old
buffers out between the new ranks: some data may be skipped, none is repeated.
"""
from __future__ import annotations

import bisect
import os
import random
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from nanochat_core.common import NanochatError, print0
from nanochat_core.data.dataset import open_parquet, split_shards
import torch

STATE_VERSION = 1
Ref = tuple[str, int, int]   # (shard file name, row group, document index in the row group)


class DataLoader:
    def __init__(self, tokenizer, B: int, T: int, data_dir: str | os.PathLike, split: str = "train",
                 rank: int = 0, world_size: int = 1, device: Any = "cpu", seed: int = 0,
                 buffer_size: int = 1000, prefetch: int = 4, tokenizer_threads: int = 4):
        if B < 1 or T < 1:
            raise NanochatError(f"batch size and sequence length must be positive, got B={B}, T={T}")
        if not 0 <= rank < world_size:
            raise NanochatError(f"rank {rank} is outside world size {world_size}")
        self.tokenizer, self.B, self.T = tokenizer, B, T
        self.split, self.rank, self.world_size, self.seed = split, rank, world_size, seed
        self.device = device
        self.buffer_size, self.prefetch, self.tokenizer_threads = max(1, buffer_size), max(1, prefetch), tokenizer_threads
        self.bos = tokenizer.get_bos_token_id()
        self.shards: list[Path] = split_shards(data_dir, split)
        self._shard_index = {p.name: i for i, p in enumerate(self.shards)}
        # every (shard, row group) of the split, in file order; opening each file also validates it up front
        self.groups: list[tuple[int, int]] = []
        rows = 0
        for si, path in enumerate(self.shards):
            meta = open_parquet(path).metadata
            self.groups += [(si, g) for g in range(meta.num_row_groups)]
            rows += meta.num_rows
        if not self.groups or rows == 0:
            raise NanochatError(f"the {split} shards in {data_dir} contain no rows")
        self.doc_stride = len(self.groups) < world_size   # too few row groups: split documents instead
        # A buffer bigger than half of what this rank sees per epoch would hold several copies of the
        # same documents (a small validation shard): cap it there. Derived from file metadata only, so
        # it is the same number on every run and resume.
        self.buffer_size = min(self.buffer_size, max(1, rows // (2 * world_size)))
        # progress state (everything state_dict() saves)
        self._epoch = 0
        self._next_pos = 0            # the next position in the epoch's row-group order this rank may read
        self._buf: dict[int, tuple[Ref, list[int]]] = {}   # insertion number -> (document ref, token ids)
        self._keys: list[tuple[int, int]] = []             # sorted (length, insertion number): best-fit lookups
        self._seq = 0
        self.tokens_used = self.tokens_cropped = 0   # packing statistics since construction (not part of the state)
        self.last_docs: list[Ref] = []    # the documents (whole or cropped) packed into the last batch
        self._order_cache: tuple[int, list[int]] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: deque[tuple[tuple[int, int], Future]] = deque()

    # ------------------------------------------------------------------ which row groups, in which order

    def _order(self, epoch: int) -> list[int]:
        """Indices into self.groups in the order epoch `epoch` visits them (the same on every rank)."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = list(range(len(self.groups)))
            if self.split == "train":     # validation always reads in file order
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def _unit_at_or_after(self, epoch: int, pos: int) -> tuple[int, int]:
        """The next (epoch, position) this rank reads, starting the search at `pos`."""
        n, w, r = len(self.groups), self.world_size, self.rank
        p = pos if self.doc_stride else pos + (r - pos) % w
        if p < n:
            return epoch, p
        return epoch + 1, 0 if self.doc_stride else r

    def row_groups_for_epoch(self, epoch: int = 0) -> list[tuple[str, int]]:
        """(shard name, row group) this rank reads in an epoch, in reading order."""
        order = self._order(epoch)
        positions = range(len(order)) if self.doc_stride else range(self.rank, len(order), self.world_size)
        return [(self.shards[self.groups[order[p]][0]].name, self.groups[order[p]][1]) for p in positions]

    # ------------------------------------------------------------------ reading + tokenising (worker threads)

    def _read_docs(self, shard: int, group: int, doc_ids: list[int] | None) -> list[tuple[Ref, list[int]]]:
        texts = open_parquet(self.shards[shard]).read_row_group(group, columns=["text"]).column("text").to_pylist()
        if doc_ids is None:
            doc_ids = list(range(self.rank, len(texts), self.world_size)) if self.doc_stride else list(range(len(texts)))
        picked = [texts[i] or "" for i in doc_ids]
        ids = self.tokenizer.encode(picked, prepend=self.bos, num_threads=self.tokenizer_threads) if picked else []
        name = self.shards[shard].name
        return [((name, group, i), toks) for i, toks in zip(doc_ids, ids)]

    def _submit(self, key: tuple[int, int]) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        epoch, pos = key
        shard, group = self.groups[self._order(epoch)[pos]]
        return self._pool.submit(self._read_docs, shard, group, None)

    def _next_unit_docs(self) -> list[tuple[Ref, list[int]]]:
        key = self._unit_at_or_after(self._epoch, self._next_pos)
        if self._ahead and self._ahead[0][0] != key:       # state was reloaded: the prefetch is stale
            for _, f in self._ahead:
                f.cancel()
            self._ahead.clear()
        if not self._ahead:
            self._ahead.append((key, self._submit(key)))
        while len(self._ahead) < self.prefetch:             # keep the workers busy on what comes next
            last_epoch, last_pos = self._ahead[-1][0]
            nxt = self._unit_at_or_after(last_epoch, last_pos + 1)
            self._ahead.append((nxt, self._submit(nxt)))
        _, fut = self._ahead.popleft()
        docs = fut.result()
        if key[0] > self._epoch and self.split == "train" and self.rank == 0:
            print0(f"data: starting epoch {key[0] + 1} over the training shards")
        self._epoch, self._next_pos = key[0], key[1] + 1
        return docs

    # ------------------------------------------------------------------ packing

    def _add(self, ref: Ref, tokens: list[int]) -> None:
        self._buf[self._seq] = (ref, tokens)
        bisect.insort(self._keys, (len(tokens), self._seq))
        self._seq += 1

    def _fill(self) -> None:
        empty_units = 0
        while len(self._buf) < self.buffer_size:
            docs = self._next_unit_docs()
            for ref, toks in docs:
                self._add(ref, toks)
            empty_units = 0 if docs else empty_units + 1
            if empty_units > 2 * len(self.groups) and not self._buf:
                raise NanochatError(f"rank {self.rank} of {self.world_size} gets no documents from the {self.split} "
                                    "split: use fewer ranks or more data")
            if not docs and self._buf:
                break   # nothing new for this rank right now: pack from what the buffer holds

    def _take(self, index: int) -> tuple[Ref, list[int]]:
        _, seq = self._keys.pop(index)
        return self._buf.pop(seq)

    def _row(self, docs_used: list[Ref]) -> list[int]:
        row: list[int] = []
        remaining = self.T + 1
        while remaining > 0:
            self._fill()
            i = bisect.bisect_right(self._keys, (remaining, float("inf"))) - 1   # largest doc that fits whole
            if i >= 0:
                ref, toks = self._take(i)
            else:                                                                # none fits: crop the shortest
                ref, toks = self._take(0)
                self.tokens_cropped += len(toks) - remaining
                toks = toks[:remaining]
            self.tokens_used += len(toks)
            row.extend(toks)
            remaining -= len(toks)
            docs_used.append(ref)
        return row

    @property
    def crop_fraction(self) -> float:
        """Share of document tokens thrown away by cropping so far (nanochat: ~35% at T=2048 on web text)."""
        total = self.tokens_used + self.tokens_cropped
        return self.tokens_cropped / total if total else 0.0

    def next_batch(self):
        docs: list[Ref] = []
        rows = [self._row(docs) for _ in range(self.B)]
        batch = torch.tensor(rows, dtype=torch.long)
        device = torch.device(self.device)
        if device.type == "cuda":
            batch = batch.pin_memory().to(device, non_blocking=True)
        elif device.type != "cpu":
            batch = batch.to(device)
        self.last_docs = docs
        return batch[:, :-1], batch[:, 1:]

    def __iter__(self):
        return self

    def __next__(self):
        return self.next_batch()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._ahead.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION, "split": self.split, "seed": self.seed,
            "rank": self.rank, "world_size": self.world_size,
            "epoch": self._epoch, "next_pos": self._next_pos,
            "buffer": [list(self._buf[s][0]) for s in sorted(self._buf)],
        }

    def load_state_dict(self, states: list[dict[str, Any]] | dict[str, Any]) -> None:
        """Continue from saved states, one per old rank. Exact when the world size is unchanged;
        otherwise every rank starts after the furthest row group read and the old buffers are dealt out."""
        states = [states] if isinstance(states, dict) else list(states)
        if not states or not all(isinstance(s, dict) and s.get("version") == STATE_VERSION for s in states):
            raise NanochatError("data loader state is missing or from an incompatible version; restart the stage without resume")
        if any(s.get("split") != self.split for s in states):
            raise NanochatError(f"data loader state is for split {states[0].get('split')!r}, not {self.split!r}")
        if len(states) == self.world_size:
            mine = states[self.rank]
            epoch, next_pos, refs = mine["epoch"], mine["next_pos"], [tuple(r) for r in mine["buffer"]]
        else:
            epoch, next_pos = max((s["epoch"], s["next_pos"]) for s in states)
            pooled = [tuple(r) for s in sorted(states, key=lambda s: s.get("rank", 0)) for r in s["buffer"]]
            refs = pooled[self.rank::self.world_size]
        self.close()
        self._buf, self._keys, self._seq = {}, [], 0
        self._epoch, self._next_pos = int(epoch), int(next_pos)
        # re-read and re-tokenise the buffered documents, a row group at a time, keeping their order
        wanted: dict[tuple[int, int], list[int]] = {}
        for name, group, doc in refs:
            if name not in self._shard_index:
                raise NanochatError(f"data loader state refers to shard {name}, which is not in the {self.split} data")
            wanted.setdefault((self._shard_index[name], int(group)), []).append(int(doc))
        tokens = {ref: toks for (shard, group), docs in wanted.items()
                  for ref, toks in self._read_docs(shard, group, sorted(set(docs)))}
        for name, group, doc in refs:
            self._add((name, int(group), int(doc)), tokens[(name, int(group), int(doc))])
