"""Your data inside the node's pipeline and the chat stages: documents alone or mixed with a public corpus at a
share, conversations too long for the context refused (or skipped, counted) before base training, and the
SFT mixture giving your conversations and identity their shares with the shipped identity taken out."""
import argparse
import io
import json
from contextlib import redirect_stdout

import pytest

from nanochat_core.data import user_data
from nanochat_core.common import NanochatError
from nanochat_core.stages.pipeline import Pipeline, parse_args, prepare_data

IDENTITY = "You are Ada, the support assistant of Acme."


def convo(q, a):
    return json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"


@pytest.fixture
def bundle(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"d{i}.txt").write_text(f"document {i} about blue widgets. " * 30)
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(convo(f"widget {i}?", "Blue.") for i in range(10)) + convo("long " * 600, "ok"))
    return docs, chat


def test_documents_alone_or_mixed_at_a_share(bundle, tmp_path):
    docs, _ = bundle
    b = user_data.build_bundle(docs, None, None, progress=False, out=io.StringIO())
    a = parse_args(["--run-dir", str(tmp_path / "run"), "--user-data", str(b.path)])
    assert prepare_data(a) == (b.docs, None)                                 # only your documents
    a = parse_args(["--run-dir", str(tmp_path / "run"), "--user-data", str(b.path), "--data", "bundled",
                    "--docs-share", "0.3"])
    with redirect_stdout(io.StringIO()) as out:
        mixed, _ = prepare_data(a)
    assert "your documents: mixed with bundled at 3" in out.getvalue()     # ~30% of the characters
    from nanochat_core.data.dataset import split_shards
    assert split_shards(mixed, "val")[0].resolve().parent.name == "bundled"
    assert any(p.resolve().parent == b.docs.resolve() for p in split_shards(mixed, "train"))


def test_too_long_conversations_stop_the_run_before_base_or_are_skipped(bundle, tmp_path, tiny_tokenizer):
    _, chat = bundle
    for skip in (False, True):
        b = user_data.build_bundle(None, chat, IDENTITY, skip_bad=skip, progress=False, out=io.StringIO())
        run = tmp_path / f"run{skip}"
        tiny_tokenizer.save(run / "tokenizer")
        p = Pipeline(parse_args(["--run-dir", str(run), "--user-data", str(b.path), "--user-data-sha256", b.digest]))
        with redirect_stdout(io.StringIO()) as out:
            p.check_user_data()
            if not skip:
                with pytest.raises(NanochatError, match=r"1 problem\(s\).*chat.jsonl:11: conversation is \d+ tokens, "
                                                        r"longer than the model's context \(257\)"):
                    p.check_user_data_with_tokenizer()
            else:
                p.check_user_data_with_tokenizer()
        if skip:
            assert "skipped: chat.jsonl:11" in out.getvalue() and "skipped 1 bad item(s)" in out.getvalue()


def test_sft_mixture_gives_your_conversations_and_identity_their_shares(bundle, tmp_path, tiny_tokenizer):
    from nanochat_core.training.chat_loop import with_user_data
    from nanochat_core.stages.chat_sft import sft_mixture
    docs, chat = bundle
    chat.write_text("".join(convo(f"widget {i}?", "Blue.") for i in range(20)))
    b = user_data.build_bundle(None, chat, IDENTITY, progress=False, out=io.StringIO())
    a = argparse.Namespace(user_data=b.path, user_data_sha256=b.digest, chat_share=None, identity_share=None,
                           source="local", seed=42)
    build = with_user_data("sft", lambda custom=False: sft_mixture("local", 42, custom), a,
                           local_default_shares=(0.3, 0.5), cloud_default_shares=(0.2, 0.02))
    with redirect_stdout(io.StringIO()):
        mix = build(tiny_tokenizer, 256)
    assert a.system_prompt == IDENTITY                                     # saved in the SFT checkpoint's meta
    names = [mix.tasks[ti].name for ti, _ in mix.index]
    assert names.count("YourIdentity") / len(names) == pytest.approx(0.5, abs=0.02)
    assert names.count("YourChat") / len(names) == pytest.approx(0.3, abs=0.02)
    rows = [mix[i] for i in range(len(mix))]
    # the shipped answers that name 'nanochat' are gone; every conversation of yours carries the identity
    assert not any("nanochat" in str(m["content"]).lower() for r in rows for m in r["messages"] if m["role"] == "assistant")
    mine = [r for r in rows if "source" in r]
    assert mine and all(r["messages"][0] == {"role": "system", "content": IDENTITY} for r in mine)
    held = user_data.split_held_out(user_data.conversations(b))[1]
    assert held and not {h["source"] for h in held} & {r["source"] for r in mine}   # held out: never trained on
    # --chat-share 1: only yours (the shipped mix is dropped)
    a.chat_share, a.identity_share = 1.0, 0.0
    with redirect_stdout(io.StringIO()):
        only = with_user_data("sft", lambda custom=False: sft_mixture("local", 42, custom), a, (0.3, 0.5), (0.2, 0.02))(
            tiny_tokenizer, 256)
    assert {only.tasks[ti].name for ti, _ in only.index} == {"YourChat"}


def test_report_shows_what_the_run_learned_of_your_data(tmp_path):
    from nanochat_core.evaluation.report import build_report
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    info = {"docs": {"files_read": 3, "skipped": ["a.png: not a document format"], "characters": 9000,
                     "documents": 12, "held_out_documents": 1, "estimated_tokens": 2250},
            "chat": {"file": "chats.jsonl", "conversations": 20, "held_out": 2, "skipped": 1}, "identity": True}
    (run / "user_data.json").write_text(json.dumps({"sha256": "ab" * 32, "info": info, "docs_tokens": 2100}))
    (run / "eval" / "base.json").write_text(json.dumps({"stage": "base", "metrics": {"docs_bpb": 2.5}}))
    (run / "eval" / "sft.json").write_text(json.dumps({"stage": "sft", "metrics": {"docs_bpb": 2.25},
        "held_out_answers": [{"source": "chats.jsonl:7", "question": "How do I start it?",
                              "expected": "Turn the dial.", "answer": "Turn the dial left."}]}))
    report = build_report(run)
    assert "## Your data" in report and "3 file(s) read, 1 skipped" in report and "a.png: not a document" in report
    assert "Training tokens of your documents: 2,100" in report
    assert "bpb on your held-out documents: BASE 2.5000, SFT 2.2500" in report
    assert "**chats.jsonl:7** Q: How do I start it?" in report and "model: Turn the dial left." in report
    assert "| docs_bpb" in report
    assert "## Your data" not in build_report(tmp_path / "plain")         # a run without your data: no section


def test_the_pipeline_hands_your_data_to_mid_sft_and_eval(bundle, tmp_path):
    from nanochat_core.stages.pipeline import stage_commands
    docs, chat = bundle
    chat.write_text("".join(convo(f"widget {i}?", "Blue.") for i in range(10)))
    b = user_data.build_bundle(docs, chat, IDENTITY, progress=False, out=io.StringIO())
    a = parse_args(["--run-dir", str(tmp_path / "run"), "--preset", "cloud", "--user-data", str(b.path),
                    "--user-data-sha256", b.digest, "--chat-share", "0.4"])
    for stage in ("mid", "sft"):
        (cmd,) = stage_commands(stage, a, b.docs, ["python"])
        assert cmd[cmd.index("--user-data") + 1] == str(b.path) and cmd[cmd.index("--chat-share") + 1] == "0.4"
        assert cmd[cmd.index("--user-data-sha256") + 1] == b.digest
    evals = stage_commands("eval", a, b.docs, ["python"])
    docs_bpb = [c for c in evals if "--docs" in c]
    assert [c[c.index("--stage") + 1] for c in docs_bpb] == ["base", "sft"]           # base and after SFT
    assert any("--held-out" in c for c in evals)
    plain = parse_args(["--run-dir", str(tmp_path / "run2"), "--preset", "cloud"])
    assert not any("--user-data" in c for s in ("mid", "sft") for c in stage_commands(s, plain, b.docs, ["python"]))


def test_a_run_trained_without_your_data_is_not_silently_reused(bundle, tmp_path):
    docs, _ = bundle
    b = user_data.build_bundle(docs, None, None, progress=False, out=io.StringIO())
    run = tmp_path / "run"
    run.mkdir()
    (run / "stages.json").write_text(json.dumps({"tok": {}, "base": {}, "sft": {}}))
    p = Pipeline(parse_args(["--run-dir", str(run), "--user-data", str(b.path)]))
    with pytest.raises(NanochatError, match="already trained base, sft without your data: use --name NEW"):
        p.check_user_data()
