"""Your own data (nanochat_core/data/user_data.py): documents in several formats become shards with a summary and a
held-out slice; conversations are checked line by line; bad input is refused (or skipped, counted) with file
and line; the bundle is deterministic and verified; the identity becomes conversations and a system prompt."""
import json

import pytest

from nanochat_core.data import user_data
from nanochat_core.common import NanochatError


def make_docs(root):
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_text("The mill by the river grinds wheat.\n\n" * 40)
    (root / "sub" / "b.md").write_text("# Manual\n\nAcme widgets are blue.\n" * 30)
    (root / "sub" / "deeper" / "c.jsonl").write_text(
        "".join(json.dumps({"text": f"ticket {i}: the widget works"}) + "\n" for i in range(25)))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": [f"parquet row {i} about lighthouses" for i in range(10)]}),
                   root / "sub" / "d.parquet")
    (root / "logo.png").write_bytes(b"\x89PNG\r\n")
    (root / ".hidden.txt").write_text("never read")
    (root / "empty.txt").write_text("")
    return root


def conv(*turns):
    roles = ["user", "assistant"] * 10
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in zip(roles, turns)]})


def test_documents_of_every_format_nested_become_shards_with_a_summary(tmp_path):
    docs = make_docs(tmp_path / "docs")
    texts, summary, problems = user_data.read_documents(docs, progress=False)
    assert problems == []
    assert summary.files_read == 4                       # txt, md, jsonl, parquet (nested), not the hidden one
    assert any(s.startswith("logo.png: not a document format") for s in summary.skipped)
    assert any(s == "empty.txt: empty" for s in summary.skipped)
    assert sum("ticket" in t for t in texts) == 25 and sum("parquet row" in t for t in texts) == 10
    assert not any("never read" in t for t in texts)
    assert summary.characters == sum(map(len, texts))
    assert summary.estimated_tokens == int(summary.characters / user_data.CHARS_PER_TOKEN)
    user_data.write_shards(texts, tmp_path / "out", summary)
    from nanochat_core.data.dataset import list_shards, split_shards
    import pyarrow.parquet as pq
    val = pq.read_table(split_shards(tmp_path / "out", "val")[0]).column("text").to_pylist()
    train = [t for s in split_shards(tmp_path / "out", "train") for t in pq.read_table(s).column("text").to_pylist()]
    assert val and train and not set(val) & set(train)                  # a held-out slice, never trained on
    assert sorted(val + train) == sorted(texts) and summary.held_out_documents == len(val)
    assert len(list_shards(tmp_path / "out")) == summary.shards


def test_a_long_document_is_cut_at_paragraphs_not_cropped():
    text = ("A paragraph of words. " * 20 + "\n\n") * 100
    chunks = user_data.chunk_text(text, 1000)
    assert all(len(c) <= 1000 for c in chunks) and len(chunks) > 5
    assert "".join(c.replace("\n", "").replace(" ", "") for c in chunks) == text.replace("\n", "").replace(" ", "")


def test_bad_documents_are_named_with_file_and_line(tmp_path):
    docs = tmp_path / "docs"
    (docs / "x").mkdir(parents=True)
    (docs / "good.txt").write_text("fine text")
    (docs / "x" / "latin1.txt").write_bytes("line one\ncaf\xe9\n".encode("latin-1"))
    (docs / "x" / "rows.jsonl").write_text('{"text": "ok"}\nnot json\n{"title": "no text"}\n')
    _, summary, problems = user_data.read_documents(docs, progress=False)
    assert [str(p) for p in problems] == [
        "x/latin1.txt:2: not UTF-8 (byte 0xe9 at column 4); save the file as UTF-8",
        "x/rows.jsonl:2: not valid JSON (Expecting value at column 1)",
        'x/rows.jsonl:3: expected {"text": "..."} with a non-empty string']
    with pytest.raises(NanochatError, match=r"3 problem\(s\) in .*latin1.txt:2.*--skip-bad"):
        user_data.settle(problems, "docs", skip_bad=False)


def test_an_empty_folder_is_refused(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    with pytest.raises(NanochatError, match="holds no documents to train on"):
        user_data.read_documents(tmp_path / "docs", progress=False)
    (tmp_path / "docs" / "sub" / "pic.jpg").write_bytes(b"jpg")
    with pytest.raises(NanochatError, match="pic.jpg: not a document format"):
        user_data.read_documents(tmp_path / "docs", progress=False)


def test_conversations_good_and_bad_lines(tmp_path):
    f = tmp_path / "my.jsonl"
    lines = [
        conv("hi", "hello!"),                                                            # 1 good
        "{not json",                                                                     # 2
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),   # 3
        conv("question", ""),                                                            # 4 empty message
        json.dumps({"messages": [{"role": "bot", "content": "x"}]}),                     # 5 unknown role
        "",                                                                              # 6 blank: ignored
        json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"},
                                 {"role": "assistant", "content": "a"}]}),               # 7 good, with system
        conv("only a question"),                                                         # 8 ends with the user
    ]
    raw = ("\n".join(lines) + "\n").encode() + "caf\xe9\n".encode("latin-1")            # 9 not UTF-8
    f.write_bytes(raw)
    rows, problems = user_data.read_conversations(f)
    assert [r["source"] for r in rows] == ["my.jsonl:1", "my.jsonl:7"]
    got = {p.line: p.why for p in problems}
    assert set(got) == {2, 3, 4, 5, 8, 9} and all(p.file == "my.jsonl" for p in problems)
    assert got[2].startswith("not valid JSON")
    assert "must alternate" in got[3] and "message 2" in got[3]
    assert got[4] == "message 2 (assistant) is empty"
    assert "unknown role 'bot'" in got[5]
    assert "does not end with an assistant" in got[8]
    assert got[9].startswith("not UTF-8")
    with pytest.raises(NanochatError, match=r"^6 problem\(s\)"):
        user_data.settle(problems, "my.jsonl", skip_bad=False)
    import io
    out = io.StringIO()
    user_data.settle(problems, "my.jsonl", skip_bad=True, out=out)                      # skipped: listed and counted
    assert "skipped: my.jsonl:5: message 1 has unknown role 'bot'" in out.getvalue()
    assert "skipped 6 bad item(s) in my.jsonl" in out.getvalue()


def test_a_conversation_longer_than_the_context_is_named(tiny_tokenizer):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
             "source": "my.jsonl:1"},
            {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}],
             "source": "my.jsonl:2"}]
    (p,) = user_data.too_long(rows, tiny_tokenizer, 257)
    assert p.file == "my.jsonl" and p.line == 2 and "longer than the model's context (257)" in p.why


def test_identity_becomes_conversations_and_a_system_prompt():
    ident = "You are Ada, the support assistant of Acme. Be kind."
    assert user_data.assistant_name(ident) == "Ada"
    assert user_data.first_person(ident) == "I am Ada, the support assistant of Acme."
    convs = user_data.identity_conversations(ident)
    with_sys = [c for c in convs if c["messages"][0]["role"] == "system"]
    assert len(with_sys) * 2 == len(convs) and all(c["messages"][0]["content"] == ident for c in with_sys)
    assert all("Ada" in c["messages"][-1]["content"] for c in convs)
    assert all(user_data.check_conversation(c) is None for c in convs)
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert user_data.with_system(row, ident)["messages"][0] == {"role": "system", "content": ident}
    own = {"messages": [{"role": "system", "content": "mine"}] + row["messages"]}
    assert user_data.with_system(own, ident) == own                      # a conversation's own system prompt wins


def test_identity_from_a_file(tmp_path):
    (tmp_path / "who.txt").write_text("You are Bob.\n")
    assert user_data.read_identity(str(tmp_path / "who.txt")) == "You are Bob."
    assert user_data.read_identity("You are Bob, a bot.") == "You are Bob, a bot."
    with pytest.raises(NanochatError, match="--identity is empty"):
        user_data.read_identity("  ")


def test_share_epochs_give_each_set_its_share():
    base_e, (chat_e, id_e) = user_data.share_epochs(1000, [(100, 0.2), (10, 0.5)])
    total = 1000 * base_e + 100 * chat_e + 10 * id_e
    assert base_e == 1.0 and 100 * chat_e / total == pytest.approx(0.2) and 10 * id_e / total == pytest.approx(0.5)
    assert user_data.share_epochs(1000, [(100, 1.0)]) == (0.0, [1.0])    # only yours: the shipped mix is dropped
    with pytest.raises(NanochatError, match="add up to 1.30"):
        user_data.share_epochs(1000, [(100, 0.8), (10, 0.5)])


def test_data_spec_spelling(tmp_path):
    public = {"bundled", "climbmix"}.__contains__
    assert user_data.parse_data_spec("bundled", public) == user_data.DataSpec("bundled", None, None)
    assert user_data.parse_data_spec("./docs", public) == user_data.DataSpec(None, "./docs", None)
    assert user_data.parse_data_spec("climbmix,./docs:0.2", public) == user_data.DataSpec("climbmix", "./docs", 0.2)
    assert user_data.parse_data_spec("bundled,./docs", public).docs_share == 0.5
    for bad, why in [("./docs:0.2", "needs a public corpus"), ("bundled,./docs:1.5", "between 0 and 1"),
                     ("bundled,climbmix", "one public corpus"), ("bundled:0.3,./docs", "put the share on your folder")]:
        with pytest.raises(NanochatError, match=why):
            user_data.parse_data_spec(bad, public)


def test_bundle_is_built_once_deterministic_and_verified(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path / "home"))
    docs = make_docs(tmp_path / "docs")
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(conv(f"q{i}", f"a{i}") + "\n" for i in range(12)))
    import io
    out = io.StringIO()
    b1 = user_data.build_bundle(docs, chat, "You are Ada.", progress=False, out=out)
    assert "your documents: 4 file(s) read, 2 skipped" in out.getvalue()
    assert "your conversations: 12 read, 0 skipped, 1 held out" in out.getvalue()
    assert b1.identity == "You are Ada." and b1.info["chat"]["conversations"] == 12
    again = user_data.build_bundle(docs, chat, "You are Ada.", progress=False, out=io.StringIO())
    assert again.path == b1.path and again.digest == b1.digest          # unchanged inputs: reused
    # built afresh elsewhere from the same inputs: the very same bytes (what a relaunch relies on)
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path / "home2"))
    b2 = user_data.build_bundle(docs, chat, "You are Ada.", progress=False, out=io.StringIO())
    assert b2.path != b1.path and b2.digest == b1.digest
    assert user_data.load_bundle(b2.path).verify(b1.digest).digest == b1.digest
    with pytest.raises(NanochatError, match="not the data this run was started with"):
        user_data.load_bundle(b2.path).verify("0" * 64)
    shard = next((b2.path / "docs").glob("shard_*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(NanochatError, match=r"docs/shard_0000\d.parquet is missing or damaged"):
        user_data.load_bundle(b2.path).verify(b1.digest)


def test_bad_conversations_refuse_the_bundle_or_are_skipped_with_a_count(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path / "home"))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(conv("q", "a") + "\n{oops\n" + conv("q2", "a2") + "\n")
    import io
    with pytest.raises(NanochatError, match=r"1 problem\(s\) in the conversations .*chat.jsonl:2: not valid JSON"):
        user_data.build_bundle(None, chat, None, progress=False, out=io.StringIO())
    assert not list((tmp_path / "home" / "data").glob("yours-*"))        # nothing half-built left behind
    out = io.StringIO()
    b = user_data.build_bundle(None, chat, None, skip_bad=True, progress=False, out=out)
    assert "skipped: chat.jsonl:2: not valid JSON" in out.getvalue() and "skipped 1 bad item(s)" in out.getvalue()
    assert b.info["chat"] == {"file": "chat.jsonl", "conversations": 2, "held_out": 0, "skipped": 1}


def test_mix_dir_gives_your_documents_their_share(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path / "home"))
    from nanochat_core.data.dataset import ensure_bundled, split_shards
    public = ensure_bundled(tmp_path / "home" / "data" / "bundled")
    texts = [f"my document number {i} " * 40 for i in range(200)]
    s = user_data.DocSummary()
    user_data.write_shards(texts, tmp_path / "mine", s)
    mixed, share = user_data.mix_dir(public, tmp_path / "mine", 0.2)
    assert share == pytest.approx(0.2, abs=0.03)
    names = [p.name for p in split_shards(mixed, "train")]
    targets = [p.resolve() for p in split_shards(mixed, "train")]
    mine = (tmp_path / "mine" / "shard_00000.parquet").resolve()
    assert targets.count(mine) > 1                                      # repeated as often as the share needs
    assert mine in targets[:len(targets) // 2 + 1]                      # interleaved, not all at the end
    assert split_shards(mixed, "val")[0].resolve() == split_shards(public, "val")[0].resolve()
    assert names == sorted(names)
