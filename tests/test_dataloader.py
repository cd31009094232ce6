"""Loader: packing properties, determinism, exact resume, rank splits, bad data."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat_core.common import NanochatError
from nanochat_core.data.dataloader import DataLoader

B, T = 2, 48


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, bundled_texts):
    """3 train shards x 5 row groups x 8 docs + a val shard of 2 row groups; docs of 40-340 characters."""
    d = tmp_path_factory.mktemp("corpus")
    docs = [t[: 40 + (i * 37) % 300] for i, t in enumerate(bundled_texts[:136])]
    chunks = [docs[0:40], docs[40:80], docs[80:120], docs[120:136]]
    for i, chunk in enumerate(chunks):
        pq.write_table(pa.table({"text": chunk}), d / f"shard_{i:05d}.parquet", row_group_size=8)
    return d


def doc_tokens(tok, corpus, ref):
    name, group, doc = ref
    text = pq.ParquetFile(corpus / name).read_row_group(group).column("text")[doc].as_py()
    return tok.encode(text, prepend="<|bos|>")


def batches(loader, n):
    out = []
    for _ in range(n):
        x, y = next(loader)
        out.append((x.clone(), y.clone(), list(loader.last_docs)))
    return out


def test_rows_are_packed_documents_without_padding(tiny_tokenizer, corpus):
    loader = DataLoader(tiny_tokenizer, B, T, corpus, buffer_size=12)
    bos = tiny_tokenizer.get_bos_token_id()
    for x, y, refs in batches(loader, 6):
        assert x.shape == y.shape == (B, T) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert (x[:, 0] == bos).all()
        # rebuild the rows from the documents the loader says it used: whole documents, only the
        # last one in a row cropped, nothing else (no padding, no stray tokens)
        rows, cur = [], []
        for ref in refs:
            cur += doc_tokens(tiny_tokenizer, corpus, ref)
            if len(cur) >= T + 1:
                rows.append(cur[: T + 1])
                cur = []
        assert cur == [] and len(rows) == B
        assert torch.equal(torch.tensor(rows), torch.cat([x[:, :1], y], dim=1))


def test_best_fit_places_whole_documents_first(tiny_tokenizer, corpus):
    """With short documents most rows hold several whole documents: crops are the exception."""
    loader = DataLoader(tiny_tokenizer, 4, 256, corpus, buffer_size=16)
    _, _, refs = batches(loader, 1)[0]
    assert len(refs) > 2 * 4
    assert loader.tokens_used == 4 * 257
    whole = sum(len(doc_tokens(tiny_tokenizer, corpus, r)) for r in refs)
    assert loader.tokens_cropped == whole - 4 * 257 and 0 <= loader.crop_fraction < 0.3


def test_deterministic(tiny_tokenizer, corpus):
    a = batches(DataLoader(tiny_tokenizer, B, T, corpus, seed=3, buffer_size=12), 5)
    b = batches(DataLoader(tiny_tokenizer, B, T, corpus, seed=3, buffer_size=12), 5)
    c = batches(DataLoader(tiny_tokenizer, B, T, corpus, seed=4, buffer_size=12), 5)
    assert all(torch.equal(p[0], q[0]) and p[2] == q[2] for p, q in zip(a, b))
    assert any(p[2] != q[2] for p, q in zip(a, c))


@pytest.mark.parametrize("split,warmup", [("train", 3), ("train", 90), ("val", 9)])
def test_resume_yields_exactly_the_same_batches(tiny_tokenizer, corpus, split, warmup):
    """warmup=90 crosses epoch boundaries (120 short docs), val wraps around its 16 docs."""
    ref = DataLoader(tiny_tokenizer, B, T, corpus, split=split, buffer_size=12)
    batches(ref, warmup)
    state = ref.state_dict()
    expected = batches(ref, 8)
    resumed = DataLoader(tiny_tokenizer, B, T, corpus, split=split, buffer_size=12)
    resumed.load_state_dict([state])
    got = batches(resumed, 8)
    assert [g[2] for g in got] == [e[2] for e in expected]
    assert all(torch.equal(g[0], e[0]) and torch.equal(g[1], e[1]) for g, e in zip(got, expected))
    if warmup == 90:
        assert state["epoch"] >= 1


def test_two_ranks_cover_every_row_group_once(tiny_tokenizer, corpus):
    loaders = [DataLoader(tiny_tokenizer, B, T, corpus, rank=r, world_size=2, seed=1) for r in range(2)]
    for epoch in range(3):
        groups = [set(l.row_groups_for_epoch(epoch)) for l in loaders]
        assert not groups[0] & groups[1]
        assert groups[0] | groups[1] == {(f"shard_{s:05d}.parquet", g) for s in range(3) for g in range(5)}
    # and what each rank actually packs comes from its own row groups (first epoch)
    for r, loader in enumerate(loaders):
        mine = set(loader.row_groups_for_epoch(0))
        loader.buffer_size = 4
        used = [ref for _, _, refs in batches(loader, 4) for ref in refs]
        assert {(n, g) for n, g, _ in used} <= mine


def test_val_split_smaller_than_world_splits_documents(tiny_tokenizer, corpus):
    """2 val row groups, 3 ranks: each rank keeps every 3rd document; together they see each once."""
    seen = []
    for r in range(3):
        loader = DataLoader(tiny_tokenizer, 1, T, corpus, split="val", rank=r, world_size=3)
        assert loader.buffer_size == 16 // 6   # capped: a bigger buffer would hold the same documents twice
        loader.buffer_size = 4                 # enough to read each row group exactly once
        refs = set(loader.row_groups_for_epoch(0))
        assert refs == {("shard_00003.parquet", 0), ("shard_00003.parquet", 1)}
        loader._fill()
        seen += [ref for ref, _ in loader._buf.values()]
    assert sorted(seen) == [("shard_00003.parquet", g, i) for g in range(2) for i in range(8)]


@pytest.mark.parametrize("new_world", [1, 3])
def test_resume_with_other_world_size_never_repeats(tiny_tokenizer, corpus, new_world):
    old = [DataLoader(tiny_tokenizer, B, T, corpus, rank=r, world_size=2, buffer_size=6) for r in range(2)]
    before = [ref for l in old for _, _, refs in batches(l, 3) for ref in refs]
    states = [l.state_dict() for l in old]
    new = [DataLoader(tiny_tokenizer, B, T, corpus, rank=r, world_size=new_world, buffer_size=6) for r in range(new_world)]
    for l in new:
        l.load_state_dict(states)
    after = [ref for l in new for _, _, refs in batches(l, 3) for ref in refs]
    assert all(l._epoch == 0 for l in new)   # still in the first epoch: a repeat would be a bug
    assert len(set(before)) == len(before) and len(set(after)) == len(after)
    assert not set(before) & set(after)


def test_bad_data(tiny_tokenizer, tmp_path, corpus):
    with pytest.raises(NanochatError, match="no parquet shards"):
        DataLoader(tiny_tokenizer, B, T, tmp_path / "nothing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "shard_00000.parquet").write_bytes(b"this is not parquet")
    (bad / "shard_00001.parquet").write_bytes(b"PAR1 nor this")
    with pytest.raises(NanochatError, match="cannot read parquet"):
        DataLoader(tiny_tokenizer, B, T, bad)
    one = tmp_path / "one"
    one.mkdir()
    pq.write_table(pa.table({"text": ["a"]}), one / "shard_00000.parquet")
    with pytest.raises(NanochatError, match="at least 2"):
        DataLoader(tiny_tokenizer, B, T, one)
    empty = tmp_path / "empty"
    empty.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty / f"shard_{i:05d}.parquet")
    with pytest.raises(NanochatError, match="no rows"):
        DataLoader(tiny_tokenizer, B, T, empty)
    with pytest.raises(NanochatError):
        DataLoader(tiny_tokenizer, 0, T, corpus)
    loader = DataLoader(tiny_tokenizer, B, T, corpus)
    with pytest.raises(NanochatError, match="split"):
        loader.load_state_dict([DataLoader(tiny_tokenizer, B, T, corpus, split="val").state_dict()])
