"""Post-training stages on a tiny run directory (depth-1 model, vocab 512, fp32 CPU): the SFT loss mask and
packing, SFT end to end with resume, chat_eval / base_eval writing eval/<stage>.json offline, and an RL step
that provably raises the expected reward of a toy task."""
import json
import time

import pytest
import torch

from nanochat_core.training import chat_loop as chat_training
from nanochat_core.gpt import checkpoint
from nanochat_core.evaluation import runners as evaluation
from nanochat_core.stages import base_eval, chat_eval, chat_rl, chat_sft
from nanochat_core.common import NanochatError, parse_event
from nanochat_core.gpt.model import GPT, config_for_depth
from nanochat_core.tasks.arc import ARC
from nanochat_core.tasks.common import Task


def _tiny_model(vocab, seed=0):
    torch.manual_seed(seed)
    cfg = config_for_depth(1, vocab, sequence_len=128, head_dim=32)
    model = GPT.build(cfg, "cpu")
    return model


@pytest.fixture
def run_dir(tmp_path, tiny_tokenizer):
    """tokenizer + a base checkpoint that has optimizer state (so SFT can warm-start from it)."""
    run = tmp_path / "run"
    tiny_tokenizer.save(run / "tokenizer")
    model = _tiny_model(tiny_tokenizer.get_vocab_size())
    opt = model.setup_optimizer()
    x = torch.randint(0, 256, (2, 33))
    model(x[:, :-1], x[:, 1:]).backward()
    opt.step()
    model.zero_grad(set_to_none=True)
    checkpoint.save_checkpoint(run / "base", 1, model, opt, {"stage": "base", "tokenizer_hash": tiny_tokenizer.hash,
                                                             "plan": {"lr_scale": 1.0, "total_batch_size": 64}})
    return run


def _events(capsys):
    return [e for e in (parse_event(l) for l in capsys.readouterr().out.splitlines()) if e]


# -----------------------------------------------------------------------------
# SFT data: mask and packing

def test_sft_targets_only_on_assistant_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    conv = {"messages": [{"role": "user", "content": "What is 2+3?"},
                         {"role": "assistant", "content": [{"type": "text", "text": "Let me see: "},
                                                           {"type": "python", "text": "2+3"},
                                                           {"type": "python_output", "text": "5"},
                                                           {"type": "text", "text": " so 5."}]},
                         {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "welcome"}]}
    items = [tok.render_conversation(conv, max_tokens=129)]
    rows, used = chat_training.pack_rows(items, B=1, T=128, pad_id=tok.get_bos_token_id())
    x, y = chat_training.rows_to_batch(rows, "cpu")
    assert x.shape == y.shape == (1, 128) and used == [0]
    trained = tok.decode(y[0][y[0] >= 0].tolist())
    assert trained == ("Let me see: <|python_start|>2+3<|python_end|> so 5.<|assistant_end|>"
                       "welcome<|assistant_end|>")
    ids, mask = items[0]
    assert (y[0] >= 0).sum().item() == sum(mask[1:])       # exactly the mask, shifted by one
    assert (y[0, len(ids) - 1:] == -1).all()               # padding carries no loss
    assert torch.equal(x[0, :len(ids) - 1], torch.tensor(ids[:-1]))
    # the model's loss with these targets ignores everything else
    model = _tiny_model(tok.get_vocab_size())
    logits = model(x)
    ref = torch.nn.functional.cross_entropy(logits[0][y[0] >= 0], y[0][y[0] >= 0])
    assert torch.allclose(model(x, y), ref, atol=1e-5)


def test_best_fit_packing_never_splits_conversations():
    items = [([7] * n, [1] * n) for n in [9, 5, 4, 3, 7, 2]]
    rows, used = chat_training.pack_rows(items, B=2, T=9, pad_id=0)   # rows of 10 tokens
    # row 1: 9 (largest fitting), then nothing of length <= 1; row 2: 7 + 3
    assert [len(r[0]) for r in rows] == [10, 10]
    assert sorted(used) == [0, 3, 4]
    assert rows[0][1] == [1] * 9 + [0] and rows[1][1] == [1] * 10


# -----------------------------------------------------------------------------
# Stages end to end

def test_chat_sft_trains_saves_and_resumes(run_dir, capsys, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DEADLINE", str(time.time() - 1))   # already past: stop after the first step
    chat_sft.main(["--run-dir", str(run_dir), "--source", "local", "--steps", "4", "--device-batch-size", "2"])
    assert [p.name for p in (run_dir / "sft").iterdir() if p.name.startswith("ckpt")] == ["ckpt_000001"]
    monkeypatch.delenv("NANOCHAT_DEADLINE")
    chat_sft.main(["--run-dir", str(run_dir), "--source", "local", "--steps", "4", "--device-batch-size", "2"])
    events = _events(capsys)
    assert any(e["event"] == "resumed" and e["stage"] == "sft" and e["step"] == 1 for e in events)
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and all(e["total_steps"] == 4 and e["stage"] == "sft" for e in progress)
    latest = checkpoint.find_latest(run_dir / "sft")
    assert latest.name == "ckpt_000004"
    meta = checkpoint.read_meta(latest)
    assert meta["stage"] == "sft" and meta["loader_states"][0]["consumed"] > 0
    assert any(e["event"] == "sample" for e in events)
    # load_model on the run dir now picks the SFT model
    _, _, m = checkpoint.load_model(run_dir)
    assert m["path"].endswith("sft/ckpt_000004")


def test_sft_without_base_says_what_to_do(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save(tmp_path / "r" / "tokenizer")
    with pytest.raises(NanochatError, match="run the earlier stages first"):
        chat_sft.main(["--run-dir", str(tmp_path / "r"), "--source", "local", "--steps", "1"])


def test_chat_eval_offline_writes_results_and_unavailable(run_dir, capsys):
    chat_eval.main(["--run-dir", str(run_dir), "--stage", "base", "--max-per-task", "2", "--max-new-tokens", "6",
                    "--tasks", "ARC-Easy,SpellingBee,Arithmetic"])
    rec = json.loads((run_dir / "eval" / "base.json").read_text())
    assert rec["stage"] == "base" and rec["unavailable"] == ["ARC-Easy"]
    assert set(rec["metrics"]) == {"SpellingBee", "Arithmetic"}
    assert all(0.0 <= v <= 1.0 for v in rec["metrics"].values())
    assert "ChatCORE" not in rec["metrics"]  # only with all six anchor tasks
    assert any(e["event"] == "eval" for e in _events(capsys))


def test_letter_scoring_is_independent_of_batching(tmp_path, tiny_tokenizer):
    rows = [{"question": f"Question number {i} about {'x' * i}?", "answerKey": "ABCD"[i % 4],
             "choices": {"text": ["one", "two", "three", "four"], "label": list("ABCD")}} for i in range(6)]
    (tmp_path / "arc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = ARC("ARC-Easy", data_files=tmp_path / "arc.jsonl")
    model = _tiny_model(tiny_tokenizer.get_vocab_size(), seed=3)
    batched = evaluation.run_categorical(model, tiny_tokenizer, task, list(range(6)), 0, 1, "cpu", batch_size=6)
    single = evaluation.run_categorical(model, tiny_tokenizer, task, list(range(6)), 0, 1, "cpu", batch_size=1)
    # by hand: the letter with the largest logit after <|assistant_start|>
    expected = 0
    for conv in task:
        ids = tiny_tokenizer.render_for_completion(conv)
        logits = model(torch.tensor([ids]))[0, -1]
        letter_ids = [tiny_tokenizer.encode(letter)[0] for letter in "ABCD"]
        expected += "ABCD"[int(logits[letter_ids].argmax())] == conv["messages"][1]["content"]
    assert batched == single == (expected, 6)
    # two ranks split the examples without overlap
    assert sum(evaluation.run_categorical(model, tiny_tokenizer, task, list(range(6)), r, 2, "cpu")[1]
               for r in range(2)) == 6


def test_base_eval_bpb_and_core_from_cached_bundle(run_dir, tiny_tokenizer):
    from nanochat_core.tasks import core
    bundle = core.eval_bundle_dir()
    (bundle / "eval_data").mkdir(parents=True)
    rows = [{"query": f"Q{i}:", "choices": ["yes", "no"], "gold": i % 2} for i in range(4)]
    (bundle / "eval_data" / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (bundle / "core.yaml").write_text("icl_tasks:\n- label: toy\n  dataset_uri: mc.jsonl\n  num_fewshot: [1]\n"
                                      "  icl_task_type: multiple_choice\n")
    (bundle / "eval_meta_data.csv").write_text("Eval Task,Random baseline\ntoy,50.0\n")
    base_eval.main(["--run-dir", str(run_dir), "--skip", "samples", "--eval-tokens", "1024"])
    rec = json.loads((run_dir / "eval" / "base.json").read_text())
    acc = rec["core_tasks"]["accuracy"]["toy"]
    assert acc in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert rec["metrics"]["CORE"] == pytest.approx((acc - 0.5) / 0.5)
    assert 0.5 < rec["metrics"]["bpb"] < 20 and rec["unavailable"] == []


# -----------------------------------------------------------------------------
# RL

class FirstLetterTask(Task):
    """Toy reward: 1 if the reply starts with a vowel. Exactly p(first token's text starts with a vowel)."""
    name = "first-letter"

    def num_examples(self):
        return 2

    def get_example(self, i):
        return {"messages": [{"role": "user", "content": ["Say something.", "Another one."][i]},
                             {"role": "assistant", "content": "a"}]}

    def evaluate(self, conversation, response):
        return response[:1] in ("a", "e", "i", "o", "u")


def _expected_reward(model, tok, task):
    liked = [t for t in range(tok.get_vocab_size()) if tok.decode([t])[:1] in "aeiou" and tok.decode([t])]
    total = 0.0
    with torch.no_grad():
        for conv in task:
            logits = model(torch.tensor([tok.render_for_completion(conv)]))[0, -1]
            total += logits.softmax(-1)[liked].sum().item()
    return total / len(task)


def test_rl_step_raises_expected_reward(tiny_tokenizer):
    tok, task = tiny_tokenizer, FirstLetterTask()
    model = _tiny_model(tok.get_vocab_size(), seed=1)
    opt = model.setup_optimizer(matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.02, scalar_lr=0.1)
    before = _expected_reward(model, tok, task)
    out = chat_rl.rl_step(model, opt, tok, task, list(task), num_samples=16, max_new_tokens=3, temperature=1.0,
                          top_k=None, seed=0)
    after_one = _expected_reward(model, tok, task)
    for s in range(1, 3):
        chat_rl.rl_step(model, opt, tok, task, list(task), num_samples=16, max_new_tokens=3, top_k=None, seed=s)
    after_three = _expected_reward(model, tok, task)
    assert 0.0 <= out["reward"] <= 1.0 and out["tokens"] > 0
    assert after_one > before
    assert after_three > after_one


def test_policy_loss_ignores_forced_tokens(tiny_tokenizer):
    model = _tiny_model(tiny_tokenizer.get_vocab_size())
    prompt = tiny_tokenizer.render_for_completion({"messages": [{"role": "user", "content": "hi"}]})
    rows = [[5, 6, 7], [8, 9]]
    zero = chat_rl.policy_loss(model, prompt, rows, [[0, 0, 0], [0, 0]], [1.0, -1.0], 0, torch.device("cpu"))
    assert zero.item() == 0.0
    one = chat_rl.policy_loss(model, prompt, rows, [[1, 0, 0], [0, 0]], [2.0, -1.0], 0, torch.device("cpu"))
    logp = model(torch.tensor([prompt]))[0, -1].log_softmax(-1)[5]
    assert one.item() == pytest.approx(-(2.0 * logp).item(), rel=1e-4)


def test_mid_then_sft_then_eval_all_stages(run_dir, capsys):
    from nanochat_core.stages import mid_train
    mid_train.main(["--run-dir", str(run_dir), "--source", "local", "--steps", "2", "--device-batch-size", "2"])
    chat_sft.main(["--run-dir", str(run_dir), "--source", "local", "--steps", "1", "--device-batch-size", "2"])
    out = capsys.readouterr().out
    assert "sft: from mid/ckpt_000002" in out   # SFT starts from midtraining when there is one
    chat_eval.main(["--run-dir", str(run_dir), "--stage", "all", "--tasks", "Arithmetic", "--max-per-task", "2",
                    "--max-new-tokens", "4"])
    for stage in ("mid", "sft"):
        rec = json.loads((run_dir / "eval" / f"{stage}.json").read_text())
        assert rec["stage"] == stage and "Arithmetic" in rec["metrics"]
    with pytest.raises(NanochatError, match="--stage"):
        chat_eval.main(["--run-dir", str(run_dir), "--stage", "final"])


def test_chat_rl_stage_runs_offline_and_checkpoints(run_dir, capsys):
    chat_rl.main(["--run-dir", str(run_dir), "--task", "arithmetic", "--steps", "2", "--prompts-per-step", "2",
                  "--num-samples", "3", "--max-new-tokens", "4", "--eval-every", "0"])
    events = _events(capsys)
    rewards = [e["metrics"]["reward"] for e in events if e["event"] == "eval" and e["stage"] == "rl"]
    assert len(rewards) == 2 and all(0.0 <= r <= 1.0 for r in rewards)
    latest = checkpoint.find_latest(run_dir / "rl")
    assert latest.name == "ckpt_000002" and checkpoint.read_meta(latest)["task"] == "arithmetic"
    with pytest.raises(NanochatError, match="--task"):
        chat_rl.main(["--run-dir", str(run_dir), "--task", "chess"])


def test_chatcore_is_the_mean_centred_accuracy_over_all_six_tasks():
    from nanochat_core.evaluation.runners import chatcore
    chance = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0, "SpellingBee": 0.0}
    assert chatcore(chance) == pytest.approx(0.0)                       # guessing everywhere scores 0
    assert chatcore({k: 1.0 for k in chance}) == pytest.approx(1.0)     # perfect everywhere scores 1
    m = dict(chance, **{"ARC-Easy": 0.625, "GSM8K": 0.3})               # centred: 0.5 and 0.3, the rest 0
    assert chatcore(m) == pytest.approx((0.5 + 0.3) / 6)
    del m["HumanEval"]
    assert chatcore(m) is None                                          # no partial means


def test_sft_warm_starts_from_the_base_optimizer(run_dir, capsys):
    chat_sft.main(["--run-dir", str(run_dir), "--source", "local", "--steps", "1", "--device-batch-size", "2"])
    assert "warm optimizer" in capsys.readouterr().out
