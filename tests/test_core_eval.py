"""CORE scoring on a tiny bundle written here, scored by a bigram model whose preferences we set by hand,
so the expected accuracy of every task is known exactly before the real scoring code runs."""
import functools
import http.server
import json
import threading
import zipfile

import pytest
import torch

from nanochat_core.common import NanochatError
from nanochat_core.tasks import core


class Bigram(torch.nn.Module):
    """logits[b, t] = table[idx[b, t]]: the next-token preference depends only on the current token."""

    def __init__(self, vocab_size):
        super().__init__()
        self.table = torch.zeros(vocab_size, vocab_size)

    def forward(self, idx):
        return self.table[idx]

    def like(self, prev, nxt, value=8.0):
        self.table[prev, nxt] = value


def test_render_prompts_fewshot_formats():
    shots = [{"query": "Q1", "choices": ["x", "y"], "gold": 1}]
    assert core.render_prompts({"query": "Q", "choices": ["a", "b"], "gold": 0}, "multiple_choice", " ", shots) \
        == ["Q1 y\n\nQ a", "Q1 y\n\nQ b"]
    shots = [{"context_options": ["c0", "c1"], "continuation": "k", "gold": 0}]
    assert core.render_prompts({"context_options": ["A", "B"], "continuation": "z", "gold": 1}, "schema", " ", shots) \
        == ["c0 k\n\nA z", "c0 k\n\nB z"]
    shots = [{"context": "ctx ", "continuation": "one"}]
    assert core.render_prompts({"context": " The end ", "continuation": "two"}, "language_modeling", " ", shots) \
        == ["ctx one\n\nThe end", "ctx one\n\nThe end two"]
    with pytest.raises(NanochatError):
        core.render_prompts({}, "bogus", " ", [])


def test_common_length():
    assert core.common_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert core.common_length([[9, 2, 3], [8, 2, 3]], from_end=True) == 2
    assert core.common_length([[1], [2]]) == 0


def test_centered_accuracy_exact():
    assert core.centered_accuracy(0.75, 50.0) == pytest.approx(0.5, abs=1e-12)
    assert core.centered_accuracy(0.25, 25.0) == pytest.approx(0.0, abs=1e-12)
    assert core.centered_accuracy(1.0, 25.0) == pytest.approx(1.0, abs=1e-12)
    assert core.centered_accuracy(0.5, 0.0) == 0.5


def _write_bundle(root, tok):
    """Three tasks (one per format) and the bigram model that gets a known subset right."""
    V = tok.get_vocab_size()
    model = Bigram(V)
    # multiple choice, 0-shot: the model likes the first token after ":" to be the first token of the
    # word "apple" and strongly dislikes nothing else, so it picks whichever choice is " apple".
    mc = []
    for i, (choices, gold) in enumerate([([" apple", " zebra"], 0), ([" zebra", " apple"], 1),
                                         ([" apple", " zebra"], 0), ([" apple", " zebra"], 1)]):
        mc.append({"query": f"Item {i}:", "choices": [c.strip() for c in choices], "gold": gold})
    # the scored span starts at the first token where the choices differ
    for item in mc:
        toks = tok.encode([f"{item['query']} {c}" for c in item["choices"]], prepend=tok.get_bos_token_id())
        s = core.common_length(toks)
        apple = item["choices"].index("apple")
        model.like(toks[apple][s - 1], toks[apple][s])
    # -> picks "apple" every time: correct on items 0, 1, 2, wrong on 3 => accuracy 3/4
    # schema, 0-shot: contexts differ, continuation shared; like (last token of the context we want -> first
    # continuation token). Item 0 favours its gold context, item 1 the wrong one => accuracy 1/2.
    sc = [{"context_options": ["The cat", "The dog"], "continuation": "ran", "gold": 0},
          {"context_options": ["A bird", "A fish"], "continuation": "swam", "gold": 0}]
    for item, favour in zip(sc, [0, 1]):
        toks = tok.encode([f"{c} {item['continuation']}" for c in item["context_options"]],
                          prepend=tok.get_bos_token_id())
        n = core.common_length(toks, from_end=True)
        t = toks[favour]
        model.like(t[len(t) - n - 1], t[len(t) - n], 12.0)
    # language modelling, 1-shot: greedy decoding must reproduce the continuation; we teach the chain
    # for item 0 only => accuracy 1/2 (the untaught item's argmax is token 0, never its continuation).
    lm = [{"context": "Roses are red, violets are", "continuation": "blue"},
          {"context": "Once upon a", "continuation": "time"}]
    item = lm[0]
    shot_idx = [i for i in range(len(lm)) if i != 0]  # the only possible shot for item 0 is item 1
    prompts = core.render_prompts(item, "language_modeling", " ", [lm[j] for j in shot_idx])
    _, starts, ends = core.score_spans(tok, prompts, "language_modeling")
    with_ids = tok.encode(prompts[1], prepend=tok.get_bos_token_id())
    for p in range(starts[0] - 1, ends[0] - 1):
        model.like(with_ids[p], with_ids[p + 1], 30.0)
    assert 0 not in tok.encode(" time") and 0 not in tok.encode("time")

    (root / "eval_data").mkdir(parents=True)
    for name, rows in [("mc.jsonl", mc), ("schema.jsonl", sc), ("lm.jsonl", lm)]:
        (root / "eval_data" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "core.yaml").write_text(
        "icl_tasks:\n"
        "- label: toy_mc\n  dataset_uri: mc.jsonl\n  num_fewshot: [0]\n  icl_task_type: multiple_choice\n"
        "- label: toy_schema\n  dataset_uri: schema.jsonl\n  num_fewshot: [0]\n  icl_task_type: schema\n"
        "- label: toy_lm\n  dataset_uri: lm.jsonl\n  num_fewshot: [1]\n  icl_task_type: language_modeling\n"
        "  continuation_delimiter: ' '\n")
    (root / "eval_meta_data.csv").write_text("Eval Task,Task Category,Random baseline\n"
                                             "toy_mc,test,50.0\ntoy_schema,test,50.0\ntoy_lm,test,0.0\n")
    return model


def test_core_scores_known_model_exactly(tmp_path, tiny_tokenizer):
    model = _write_bundle(tmp_path / "bundle", tiny_tokenizer)
    tasks = core.load_core_tasks(tmp_path / "bundle")
    assert [t.label for t in tasks] == ["toy_mc", "toy_schema", "toy_lm"]
    # the loader shuffles (seed 1337); accuracy does not depend on order, but LM shots do: restore order
    for t in tasks:
        t.data.sort(key=lambda r: json.dumps(r))
    lm = next(t for t in tasks if t.label == "toy_lm")
    lm.data.sort(key=lambda r: r["context"] != "Roses are red, violets are")
    out = core.evaluate_core(model, tiny_tokenizer, "cpu", tasks)
    assert out["accuracy"] == {"toy_mc": 0.75, "toy_schema": 0.5, "toy_lm": 0.5}
    assert out["centered"]["toy_mc"] == pytest.approx(0.5, abs=1e-9)
    assert out["centered"]["toy_schema"] == pytest.approx(0.0, abs=1e-9)
    assert out["centered"]["toy_lm"] == pytest.approx(0.5, abs=1e-9)
    assert out["CORE"] == pytest.approx((0.5 + 0.0 + 0.5) / 3, abs=1e-9)
    # an untrained (all-zero) model ties everywhere: MC picks option 0, LM never reproduces
    flat = core.evaluate_core(Bigram(tiny_tokenizer.get_vocab_size()), tiny_tokenizer, "cpu", tasks)
    assert flat["accuracy"]["toy_lm"] == 0.0
    # cropping to a short context keeps the scored span, so the bigram scores are unchanged
    cropped = core.evaluate_core(model, tiny_tokenizer, "cpu", tasks, max_seq_len=12)
    assert cropped["accuracy"]["toy_mc"] == 0.75


def test_max_per_task_is_a_fixed_subset(tmp_path, tiny_tokenizer):
    _write_bundle(tmp_path / "bundle", tiny_tokenizer)
    a = core.load_core_tasks(tmp_path / "bundle", max_per_task=2)
    b = core.load_core_tasks(tmp_path / "bundle", max_per_task=2)
    assert [len(t.data) for t in a] == [2, 2, 2]
    assert [t.data for t in a] == [t.data for t in b]


def test_bundle_download_caches_and_fails_clearly(tmp_path, monkeypatch, tiny_tokenizer):
    # unreachable server: a one-line error naming CORE
    with pytest.raises(NanochatError, match="CORE is unavailable"):
        core.ensure_eval_bundle("http://127.0.0.1:9/eval_bundle.zip")
    # a real HTTP download from a local server, unpacked and cached
    _write_bundle(tmp_path / "src" / "eval_bundle", tiny_tokenizer)
    zpath = tmp_path / "www" / "eval_bundle.zip"
    zpath.parent.mkdir()
    with zipfile.ZipFile(zpath, "w") as z:
        for p in (tmp_path / "src").rglob("*"):
            z.write(p, p.relative_to(tmp_path / "src"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(zpath.parent))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/eval_bundle.zip"
        d = core.ensure_eval_bundle(url)
        assert (d / "core.yaml").exists() and (d / "eval_data" / "mc.jsonl").exists()
    finally:
        server.shutdown()
    assert core.ensure_eval_bundle("http://127.0.0.1:9/gone.zip") == d  # cached: no network needed
    assert [t.label for t in core.load_core_tasks(d)] == ["toy_mc", "toy_schema", "toy_lm"]
