"""Every task's rendering (through the real tokenizer, with its loss mask) and answer checking, on small
fixtures written here. No network: hub-backed tasks read local parquet/jsonl through the same loader."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat_core.common import NanochatError
from nanochat_core.tasks.arc import ARC
from nanochat_core.tasks.arithmetic import Arithmetic
from nanochat_core.tasks.common import Task, TaskMixture
from nanochat_core.tasks.gsm8k import GSM8K, extract_answer, render_solution
from nanochat_core.tasks.humaneval import HumanEval, extract_code
from nanochat_core.tasks.identity import ChatLocal, Identity, JSONLChat
from nanochat_core.tasks.mmlu import MMLU
from nanochat_core.tasks.smoltalk import SmolTalk
from nanochat_core.tasks.spelling import SimpleSpelling, SpellingBee


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _assistant_text(tok, conv):
    """The tokens the loss sees (mask == 1), decoded."""
    ids, mask = tok.render_conversation(conv)
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_arc_rendering_and_letters(tmp_path, tiny_tokenizer):
    rows = [{"id": "1", "question": "Which is a planet?", "answerKey": "B",
             "choices": {"text": ["Sun", "Mars", "Moon"], "label": ["A", "B", "C"]}},
            {"id": "2", "question": "Water freezes at?", "answerKey": "1",
             "choices": {"text": ["0 C", "50 C"], "label": ["1", "2"]}}]
    task = ARC("ARC-Easy", "test", data_files=_jsonl(tmp_path / "arc.jsonl", rows))
    assert len(task) == 2 and task.eval_type == "categorical" and task.name == "ARC-Easy"
    conv = task[0]
    user = conv["messages"][0]["content"]
    assert "Which is a planet?" in user and "B. Mars" in user and "C. Moon" in user
    assert conv["letters"] == ["A", "B", "C"] and conv["messages"][1]["content"] == "B"
    assert task[1]["messages"][1]["content"] == "A"  # numeric labels answered by position
    assert _assistant_text(tiny_tokenizer, conv) == "B<|assistant_end|>"
    assert task.evaluate(conv, "B") and task.evaluate(conv, " B. Mars") and not task.evaluate(conv, "A")
    with pytest.raises(NanochatError):
        ARC("ARC-Medium")


def test_mmlu_all_and_auxiliary_train(tmp_path):
    row = {"question": "2+2?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1}
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "mmlu.parquet")
    task = MMLU("all", "test", data_files=tmp_path / "mmlu.parquet")
    conv = task[0]
    assert conv["messages"][1]["content"] == "B" and conv["subject"] == "math"
    assert task.evaluate(conv, "B") and not task.evaluate(conv, "D")
    aux = MMLU("auxiliary_train", "train", data_files=_jsonl(tmp_path / "aux.jsonl", [{"train": row}]))
    assert aux[0]["messages"] == conv["messages"]
    with pytest.raises(NanochatError):
        MMLU("auxiliary_train", "test")


def test_gsm8k_calculator_calls_and_answer_checking(tmp_path, tiny_tokenizer):
    answer = "She sold 48/2 = <<48/2=24>>24 in May.\nIn total 48+24 = <<48+24=72>>72.\n#### 72"
    task = GSM8K("main", "test", data_files=_jsonl(tmp_path / "g.jsonl", [{"question": "Q?", "answer": answer}]))
    parts = task[0]["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["text", "python", "python_output", "text", "python", "python_output", "text"]
    assert parts[1]["text"] == "48/2" and parts[2]["text"] == "24" and parts[4]["text"] == "48+24"
    assert parts[-1]["text"].endswith("#### 72")
    # the tool output is forced by the engine, so it carries no loss; the calls do
    learned = _assistant_text(tiny_tokenizer, task[0])
    assert "<|python_start|>48/2<|python_end|>" in learned and "<|output_start|>" not in learned
    conv = task[0]
    assert task.evaluate(conv, "blah\n#### 72") and task.evaluate(conv, "#### 72.0")
    assert not task.evaluate(conv, "#### 71") and not task.evaluate(conv, "72")
    assert task.reward(conv, "#### 72") == 1.0 and task.reward(conv, "no") == 0.0
    assert extract_answer("#### 1,234") == "1234" and extract_answer("#### -3.50") == "-3.5"
    assert render_solution("no calls #### 5") == [{"type": "text", "text": "no calls #### 5"}]


@pytest.mark.needs_tool("bwrap")
def test_humaneval_renders_and_runs_in_sandbox(tmp_path):
    row = {"task_id": "HumanEval/0", "entry_point": "add",
           "prompt": 'def add(a: int, b: int) -> int:\n    """Sum of a and b."""\n',
           "canonical_solution": "    return a + b\n",
           "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}
    task = HumanEval(data_files=_jsonl(tmp_path / "he.jsonl", [row]), timeout=1)
    conv = task[0]
    assert conv["messages"][0]["content"] == row["prompt"]
    assert conv["messages"][1]["content"].startswith("```python\ndef add")
    assert task.evaluate(conv, conv["messages"][1]["content"])          # the reference passes
    assert task.evaluate(conv, "    return b + a\n")                     # a body-only completion passes
    assert not task.evaluate(conv, "```python\ndef add(a, b):\n    return a * b\n```")
    assert not task.evaluate(conv, "def add(a, b):\n    while True: pass\n")
    assert extract_code("Here:\n```py\nx = 1\n```\nbye") == "x = 1"


def test_smoltalk_keeps_system_and_ends_with_assistant(tmp_path, tiny_tokenizer):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "dangling"}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "st.parquet")
    task = SmolTalk("train", data_files=tmp_path / "st.parquet")
    conv = task[0]
    assert [m["role"] for m in conv["messages"]] == ["system", "user", "assistant"]
    assert _assistant_text(tiny_tokenizer, conv) == "Hello.<|assistant_end|>"
    assert "Be brief." in tiny_tokenizer.decode(tiny_tokenizer.render_conversation(conv)[0])


def test_spelling_tasks_are_deterministic_and_checkable(tiny_tokenizer):
    bee = SpellingBee(50, "train")
    assert bee[3] == SpellingBee(50, "train")[3]
    assert [bee[i] for i in range(10)] != [SpellingBee(50, "test")[i] for i in range(10)]
    for conv in bee:
        parts = conv["messages"][1]["content"]
        word, letter = parts[1]["text"].split("'")[1], parts[1]["text"].split("'")[3]
        assert parts[2]["text"] == str(word.count(letter))  # the calculator call and its output agree
        assert bee.evaluate(conv, f"... #### {word.count(letter)}")
        assert not bee.evaluate(conv, f"#### {word.count(letter) + 1}")
    assert "<|python_start|>" in _assistant_text(tiny_tokenizer, bee[0])
    simple = SimpleSpelling(20, "test")
    conv = simple[0]
    word = conv["messages"][1]["content"].replace("-", "")
    assert simple.evaluate(conv, "-".join(word)) and not simple.evaluate(conv, word + "x")
    assert not simple.evaluate(conv, word) or len(word) == 1


def test_arithmetic_task_answers_are_right():
    task = Arithmetic(100, "test")
    for conv in task:
        parts = conv["messages"][1]["content"]
        assert parts[2]["text"] == str(int(eval(parts[1]["text"])))
        assert task.evaluate(conv, "#### " + parts[2]["text"]) and not task.evaluate(conv, "#### x")


def test_identity_and_shipped_local_chat_set(tmp_path, tiny_tokenizer):
    ident, local = Identity(), ChatLocal()
    assert len(ident) >= 20 and 200 <= len(local) <= 1000
    for conv in list(ident) + [local[i] for i in range(0, len(local), 7)]:
        ids, mask = tiny_tokenizer.render_conversation(conv)
        assert sum(mask) > 0
    with pytest.raises(NanochatError, match="line 1|:1:"):
        JSONLChat(_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "x"}]}]))


class _Numbers(Task):
    name = "numbers"

    def __init__(self, n, **kw):
        super().__init__(**kw)
        self.n = n

    def num_examples(self):
        return self.n

    def get_example(self, i):
        return {"i": i, "n": self.n}


def test_slicing_and_mixture_epochs():
    t = _Numbers(10, start=2, stop=9, step=3)
    assert [x["i"] for x in t] == [2, 5, 8]
    mix = TaskMixture([_Numbers(10), _Numbers(4)], epochs=[0.5, 3], seed=1)
    items = [(x["n"], x["i"]) for x in mix]
    assert len(items) == 5 + 12
    assert sorted(i for n, i in items if n == 4) == sorted(list(range(4)) * 3)
    assert len({i for n, i in items if n == 10}) == 5
    assert items == [(x["n"], x["i"]) for x in TaskMixture([_Numbers(10), _Numbers(4)], epochs=[0.5, 3], seed=1)]
    with pytest.raises(IndexError):
        t[3]


def test_unavailable_hub_task_names_itself(tmp_path):
    # conftest sets HF_DATASETS_OFFLINE=1 and an empty HF_HOME: nothing is cached
    with pytest.raises(NanochatError, match="GSM8K is unavailable"):
        GSM8K("main", "test")
    with pytest.raises(NanochatError, match="ARC-Challenge is unavailable"):
        ARC("ARC-Challenge", data_files=tmp_path / "missing.jsonl")
