"""Tokenizer: round trips, special tokens, chat rendering masks, save/load, agreement with `tokenizers`."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanochat_core.common import NanochatError
from nanochat_core.data.tokenizer import SPECIAL_TOKENS, Tokenizer, get_tokenizer

HYP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@given(text=st.text(max_size=300))
@HYP
def test_round_trip_arbitrary_unicode(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text
    assert all(0 <= i < tiny_tokenizer.get_vocab_size() for i in ids)


@given(text=st.lists(st.sampled_from(list("<|>_bosuertaildypnh ") + SPECIAL_TOKENS), max_size=20).map("".join))
@HYP
def test_specials_never_produced_from_plain_text(tiny_tokenizer, text):
    specials = {tiny_tokenizer.encode_special(s) for s in SPECIAL_TOKENS}
    ids = tiny_tokenizer.encode(text)
    assert not specials & set(ids)
    assert tiny_tokenizer.decode(ids) == text
    # the batch (threaded) path obeys the same rule
    assert tiny_tokenizer.encode([text, text], num_threads=2) == [ids, ids]


def test_decode_ignores_ids_outside_the_vocab(tiny_tokenizer):
    ids = tiny_tokenizer.encode("Alas, poor Yorick!")
    V = tiny_tokenizer.get_vocab_size()
    assert tiny_tokenizer.decode([V + 5, *ids, -1, V]) == "Alas, poor Yorick!"


def test_special_ids_are_last_and_distinct(tiny_tokenizer):
    V = tiny_tokenizer.get_vocab_size()
    ids = [tiny_tokenizer.encode_special(s) for s in SPECIAL_TOKENS]
    assert sorted(ids) == list(range(V - len(SPECIAL_TOKENS), V))
    assert tiny_tokenizer.get_bos_token_id() == tiny_tokenizer.encode_special("<|bos|>")
    assert tiny_tokenizer.decode([tiny_tokenizer.get_bos_token_id()]) == "<|bos|>"
    with pytest.raises(NanochatError):
        tiny_tokenizer.encode_special("<|nope|>")


def test_prepend_append_and_batch(tiny_tokenizer):
    bos = tiny_tokenizer.get_bos_token_id()
    end = tiny_tokenizer.encode_special("<|assistant_end|>")
    one = tiny_tokenizer.encode("To be, or not to be", prepend="<|bos|>", append=end)
    assert one[0] == bos and one[-1] == end
    batch = tiny_tokenizer.encode(["To be, or not to be", "that is the question"], prepend=bos, num_threads=2)
    assert batch[0] == one[:-1]
    assert batch[1][0] == bos and tiny_tokenizer.decode(batch[1][1:]) == "that is the question"


def test_same_ids_as_hf_tokenizers(tiny_tokenizer, bundled_texts):
    """Our fast path (tiktoken over the same vocabulary) must match the `tokenizers` encoder exactly."""
    hf = tiny_tokenizer.hf_tokenizer()
    texts = bundled_texts[:60] + ["hello <|bos|> world 12345 ünïcödé 😀\r\n\t  x", "  leading and trailing  "]
    for t in texts:
        assert tiny_tokenizer.encode(t) == hf.encode(t, add_special_tokens=False).ids


@given(text=st.text(max_size=80))
@HYP
def test_same_ids_as_hf_tokenizers_on_arbitrary_unicode(tiny_tokenizer, text):
    if tiny_tokenizer.hash not in _HF:
        _HF[tiny_tokenizer.hash] = tiny_tokenizer.hf_tokenizer()
    hf = _HF[tiny_tokenizer.hash]
    assert tiny_tokenizer.encode(text) == hf.encode(text, add_special_tokens=False).ids


_HF = {}


def test_compresses_real_text(tiny_tokenizer, bundled_texts):
    text = "\n".join(bundled_texts[:50])
    ids = tiny_tokenizer.encode(text)
    assert len(text.encode()) / len(ids) > 2.0  # 512-vocab BPE on its own training text: ~2.5-3 bytes/token


def test_token_bytes(tiny_tokenizer):
    tb = tiny_tokenizer.token_bytes()
    assert tb.dtype.is_floating_point is False and tb.shape == (tiny_tokenizer.get_vocab_size(),)
    for s in SPECIAL_TOKENS:
        assert tb[tiny_tokenizer.encode_special(s)] == 0
    text = "The quality of mercy is not strain'd"
    ids = tiny_tokenizer.encode(text)
    assert int(tb[ids].sum()) == len(text.encode("utf-8"))
    assert int(tb.min()) == 0 and (tb[: -len(SPECIAL_TOKENS)] >= 1).all()


def test_save_load_hash(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path / "run" / "tokenizer")
    again = get_tokenizer(tmp_path / "run")
    assert again.hash == tiny_tokenizer.hash and len(again.hash) == 64
    assert again.encode("Friends, Romans, countrymen") == tiny_tokenizer.encode("Friends, Romans, countrymen")
    with pytest.raises(NanochatError, match="tok_train"):
        Tokenizer.load(tmp_path / "missing")
    import json
    not_bytes = {"model": {"vocab": {"\u4e00": 0}}, "added_tokens": [{"content": t, "id": i + 1} for i, t in enumerate(SPECIAL_TOKENS)]}
    for bad in ["{not json", json.dumps({**not_bytes, "added_tokens": []}), json.dumps(not_bytes)]:
        (tmp_path / "bad").mkdir(exist_ok=True)
        (tmp_path / "bad" / "tokenizer.json").write_text(bad)
        with pytest.raises(NanochatError, match="retrain with tok_train"):
            Tokenizer.load(tmp_path / "bad")


def test_bad_training_input():
    with pytest.raises(NanochatError, match="at least 265"):
        Tokenizer.train_from_iterator(iter(["abc"]), vocab_size=264)
    with pytest.raises(NanochatError, match="empty corpus"):
        Tokenizer.train_from_iterator(iter(["", ""]), vocab_size=300)


def test_training_is_deterministic(bundled_texts):
    a = Tokenizer.train_from_iterator(iter(bundled_texts[:40]), vocab_size=300)
    b = Tokenizer.train_from_iterator(iter(bundled_texts[:40]), vocab_size=300)
    assert a.hash == b.hash and a.get_vocab_size() == 300


# ----------------------------------------------------------------------------- chat rendering

CONV = {"messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 12*7? <|assistant_end|>"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute."},
        {"type": "python", "text": "12*7"},
        {"type": "python_output", "text": "84"},
        {"type": "text", "text": "It is 84."},
    ]},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You are welcome."},
]}


def _segments(tok, ids, mask):
    """Decode runs of equal mask into (mask, text) pairs for readable assertions."""
    out = []
    for i, m in zip(ids, mask):
        if out and out[-1][0] == m:
            out[-1] = (m, out[-1][1] + tok.decode([i]))
        else:
            out.append((m, tok.decode([i])))
    return out


def test_chat_mask_multi_turn_with_tool_calls(tiny_tokenizer):
    tok = tiny_tokenizer
    ids, mask = tok.render_conversation(CONV)
    assert len(ids) == len(mask)
    assert _segments(tok, ids, mask) == [
        (0, "<|bos|><|user_start|>You are terse.\n\nWhat is 12*7? <|assistant_end|><|user_end|><|assistant_start|>"),
        (1, "Let me compute.<|python_start|>12*7<|python_end|>"),
        (0, "<|output_start|>84<|output_end|>"),
        (1, "It is 84.<|assistant_end|>"),
        (0, "<|user_start|>Thanks<|user_end|><|assistant_start|>"),
        (1, "You are welcome.<|assistant_end|>"),
    ]
    # the "<|assistant_end|>" typed by the user is plain text, not the special token
    end = tok.encode_special("<|assistant_end|>")
    assert [i for i, m in zip(ids, mask) if i == end] == [end, end]
    assert all(m == 1 for i, m in zip(ids, mask) if i == end)


def test_chat_truncation(tiny_tokenizer):
    ids, mask = tiny_tokenizer.render_conversation(CONV)
    short_ids, short_mask = tiny_tokenizer.render_conversation(CONV, max_tokens=10)
    assert short_ids == ids[:10] and short_mask == mask[:10]


def test_render_for_completion(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = tok.render_for_completion(CONV)
    ids, _ = tok.render_conversation(CONV)
    first_turns = {"messages": CONV["messages"][:4]}
    assert prompt == tok.render_conversation(first_turns)[0] + [tok.encode_special("<|assistant_start|>")]
    assert ids[: len(prompt)] == prompt  # the prompt is a prefix of the full rendering
    # no assistant message at the end: nothing is dropped
    assert tok.render_for_completion(first_turns) == prompt
    assert len(CONV["messages"]) == 5  # the input is not mutated


@pytest.mark.parametrize("conv", [
    {"messages": [{"role": "assistant", "content": "hi"}]},
    {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": ""}]}]},
    {"msgs": []},
])
def test_bad_conversations(tiny_tokenizer, conv):
    with pytest.raises(NanochatError):
        tiny_tokenizer.render_conversation(conv)


# ----------------------------------------------------------------------------- tokenizer training stage

def test_tok_train_stage(tmp_path):
    """`python -m nanochat_core.stages.tok_train` on the bundled corpus: trains on train shards only, reports
    compression, saves a loadable tokenizer.json, emits events; bad input is one line, exit 2."""
    import json
    import subprocess
    import sys

    import pyarrow.parquet as pq

    from nanochat_core.common import parse_event
    from nanochat_core.data.dataset import ensure_bundled, list_shards

    data = ensure_bundled(tmp_path / "data")
    out = tmp_path / "run" / "tokenizer"
    cmd = [sys.executable, "-m", "nanochat_core.stages.tok_train", "--data", str(data), "--out", str(out),
           "--vocab-size", "400", "--max-chars", "300000", "--doc-cap", "2000"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    events = [e for e in map(parse_event, r.stdout.splitlines()) if e]
    assert [e["event"] for e in events][0] == "stage_start" and events[-1]["event"] == "stage_end"
    metrics = next(e for e in events if e["event"] == "eval")["metrics"]
    assert metrics["vocab_size"] == 400 and 1.5 < metrics["bytes_per_token"] < 5.0   # measured: 1.85
    assert 250_000 < metrics["measured_chars"] <= 300_000     # max-chars is honoured
    assert "bytes/token" in r.stdout
    tok = Tokenizer.load(out)
    assert tok.get_vocab_size() == 400 and json.loads((out / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    # never the validation shard: its distinctive documents are not what was measured
    val = pq.read_table(list_shards(data)[-1]).column("text").to_pylist()
    from nanochat_core.data.dataset import iter_training_text
    used = set(iter_training_text(data, 10**9, 10**9))
    assert not used & set(val)

    bad = subprocess.run(cmd[:-6] + ["--vocab-size", "100"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["error: vocab size 100 is too small: need at least 265 (256 bytes + 9 specials)"]
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = subprocess.run(cmd[:3] + ["--data", str(empty)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "no parquet shards" in bad.stderr
