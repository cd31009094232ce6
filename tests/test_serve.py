"""The chat server over real HTTP on 127.0.0.1 (uvicorn in a thread, a tiny random model), spoken to with
httpx and with the official openai client; plus the terminal chat on a real saved checkpoint."""
import asyncio
import json
import threading
import time

import httpx
import pytest
import torch

from nanochat_core.common import NanochatError
from nanochat_core.gpt.model import GPT, config_for_depth
from tiny_models import PacedModel, tiny_chat_model as tiny_model
from nanochat_core.inference.serve import content_to_parts, create_app


class LiveServer:
    """uvicorn running an app in a background thread on a free port of 127.0.0.1."""

    def __init__(self, app, limits=None):
        from nanochat_core.inference.serve_net import make_server
        self.server = make_server(app, "127.0.0.1", 0, limits)   # the server run_server runs, limits and all
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return tiny_model(tiny_tokenizer.get_vocab_size())


@pytest.fixture(scope="module")
def url(model, tiny_tokenizer):
    with LiveServer(create_app(model, tiny_tokenizer, model_name="nanochat-test")) as base:
        yield base


def ask(text="Hello, who are you?", **kw):
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 12, **kw}


def sse_events(resp: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]


def test_health_models_and_page(url):
    h = httpx.get(f"{url}/health").json()
    assert h["status"] == "ok" and h["workers"] == 1
    models = httpx.get(f"{url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "nanochat-test"
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    # self-contained: nothing fetched from elsewhere
    assert "<script src" not in page.text and "<link" not in page.text
    assert "http://" not in page.text and "https://" not in page.text


def test_completion_non_streaming(url):
    r = httpx.post(f"{url}/v1/chat/completions", json=ask(seed=7), timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert 1 <= usage["completion_tokens"] <= 12 and usage["prompt_tokens"] > 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # same seed, same reply: deterministic sampling end to end
    again = httpx.post(f"{url}/v1/chat/completions", json=ask(seed=7), timeout=60).json()
    assert again["choices"][0]["message"]["content"] == choice["message"]["content"]


def test_completion_streaming_matches_non_streaming(url):
    plain = httpx.post(f"{url}/v1/chat/completions", json=ask(seed=3, temperature=1.0), timeout=60).json()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=ask(seed=3, temperature=1.0, stream=True), timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert len(chunks) >= 3                 # more than role + finish: the reply arrived in pieces
    assert text == plain["choices"][0]["message"]["content"]


def test_openai_client(url):
    from openai import OpenAI
    client = OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == ["nanochat-test", "nanochat"]   # the exact id, then the alias
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    out = client.chat.completions.create(model="nanochat-test", messages=messages, max_tokens=10, seed=11,
                                         temperature=0.8, extra_body={"top_k": 20})
    text = out.choices[0].message.content
    assert isinstance(text, str) and out.usage.completion_tokens >= 1
    stream = client.chat.completions.create(model="nanochat-test", messages=messages, max_tokens=10, seed=11,
                                            temperature=0.8, extra_body={"top_k": 20}, stream=True)
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == text
    # stream_options.include_usage: one last chunk without choices, with the same counts
    stream = client.chat.completions.create(model="nanochat-test", messages=messages, max_tokens=10, seed=11,
                                            temperature=0.8, extra_body={"top_k": 20}, stream=True,
                                            stream_options={"include_usage": True})
    last = list(stream)[-1]
    assert last.choices == [] and last.usage.completion_tokens == out.usage.completion_tokens
    assert last.usage.prompt_tokens == out.usage.prompt_tokens
    import openai
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], temperature=3)
    assert "temperature" in str(e.value)


BIG = "x" * 7000
BAD_REQUESTS = [
    ("not json", b"{nope", 400),
    ("not an object", b"[1, 2]", 400),
    ("nested 100k deep", b"[" * 100_000 + b"]" * 100_000, 400),
    ("not utf-8", b'{"messages": "\xff\xfe"}', 400),
    ("no messages", {"max_tokens": 5}, 400),
    ("empty messages", {"messages": []}, 400),
    ("too many messages", {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(501)]}, 400),
    ("message too long", {"messages": [{"role": "user", "content": "y" * 8001}]}, 400),
    ("conversation too long", {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": BIG} for i in range(5)]}, 400),
    ("empty user message", {"messages": [{"role": "user", "content": "   "}]}, 400),
    ("tool role", {"messages": [{"role": "tool", "content": "hi"}]}, 400),
    ("no role", {"messages": [{"content": "hi"}]}, 400),
    ("message not an object", {"messages": ["hi"]}, 400),
    ("assistant first", {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "hi"}]}, 400),
    ("ends with assistant", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, 400),
    ("two users in a row", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400),
    ("late system", {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, 400),
    ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400),
    ("content null", {"messages": [{"role": "user", "content": None}]}, 400),
    ("temperature high", ask(temperature=2.5), 400),
    ("temperature negative", ask(temperature=-0.1), 400),
    ("temperature string", ask(temperature="hot"), 400),
    ("top_k high", ask(top_k=201), 400),
    ("top_k float", ask(top_k=2.5), 400),
    ("max_tokens zero", ask(max_tokens=0), 400),
    ("max_tokens huge", ask(max_tokens=4097), 400),
    ("max_tokens bool", ask(max_tokens=True), 400),
    ("top_p zero", ask(top_p=0), 400),
    ("n two", ask(n=2), 400),
    ("stream string", ask(stream="yes"), 400),
    ("seed negative", ask(seed=-1), 400),
    ("body over 1 MB", {"messages": [{"role": "user", "content": "hi"}], "junk": "z" * (1 << 20)}, 413),
    # strict types: no coercion from booleans, floats or strings
    ("n true", ask(n=True), 400),
    ("n 1.0", ask(n=1.0), 400),
    ("max_tokens 5.0", ask(max_tokens=5.0), 400),
    ("max_tokens string", ask(max_tokens="5"), 400),
    ("seed float", ask(seed=1.0), 400),
    ("stream 1", ask(stream=1), 400),
    ("stop too many", ask(stop=["a", "b", "c", "d", "e"]), 400),
    ("stop empty string", ask(stop=""), 400),
    # fields this server would otherwise silently ignore
    ("tools", ask(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), 400),
    ("logprobs true", ask(logprobs=True), 400),
    ("response_format json", ask(response_format={"type": "json_object"}), 400),
    ("unknown field", ask(frobnicate=1), 400),
    ("presence_penalty", ask(presence_penalty=0.5), 400),
    ("message name", {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, 400),
    ("max_tokens past the context", ask(max_tokens=250), 400),
    ("unknown model", ask(model="gpt-4o"), 404),
]


@pytest.mark.parametrize("name, body, status", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_4xx_in_openai_shape(url, name, body, status):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and err["type"]


def test_refusals_name_the_field_and_the_reason(url):
    def post(body):
        return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    err = post(ask(tools=[{"type": "function", "function": {"name": "f"}}])).json()["error"]
    assert err["param"] == "tools" and "'tools' is not supported" in err["message"] and "calculator" in err["message"]
    err = post(ask(n=True)).json()["error"]
    assert err["param"] == "n" and "integer" in err["message"]
    err = post(ask(stop=["a", "b", "c", "d", "e"])).json()["error"]   # a list of too many, not "not a string"
    assert err["param"] == "stop" and "at most 4" in err["message"]
    err = post(ask(model="gpt-4o")).json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model" and "nanochat-test" in err["message"]
    assert httpx.get(f"{url}/v1/models/gpt-4o").json()["error"]["code"] == "model_not_found"
    assert httpx.get(f"{url}/v1/models/nanochat-test").json()["id"] == "nanochat-test"
    err = post(ask(max_tokens=250)).json()["error"]   # 250 + the prompt > 256
    assert err["code"] == "context_length_exceeded" and "256" in err["message"]
    # values that change nothing are accepted, and so is the model's own name
    r = post(ask(model="nanochat-test", n=1, logprobs=False, presence_penalty=0, frequency_penalty=0.0,
                 user="u1", temperature=1, max_completion_tokens=3))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 3


def test_context_is_the_trained_sequence_length(url, tiny_tokenizer):
    """The tiny model trained at 256 tokens: the server says so and refuses a 300-token prompt (the model's
    rotary table is 10x longer, but attention beyond 256 was never trained)."""
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["max_model_len"] == 256
    text = " ".join(f"w{i}" for i in range(400))
    ids = tiny_tokenizer.render_for_completion({"messages": [{"role": "user", "content": text}]})
    assert 256 < len(ids) < 2000
    r = httpx.post(f"{url}/v1/chat/completions", json=ask(text, max_tokens=None), timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    # without max_tokens, a prompt near the end of the context gets what is left, never more
    ids_short = tiny_tokenizer.render_for_completion({"messages": [{"role": "user", "content": "hi"}]})
    body = {"messages": [{"role": "user", "content": "hi"}], "seed": 1}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 256 - len(ids_short)


def test_tiny_temperature_or_top_p_is_answered_not_a_500(url):
    greedy = httpx.post(f"{url}/v1/chat/completions", json=ask(temperature=0), timeout=60)
    assert greedy.status_code == 200, greedy.text
    for kw in [dict(temperature=1e-300, top_k=0), dict(top_p=1e-300), dict(temperature=5e-324, top_p=1e-300)]:
        r = httpx.post(f"{url}/v1/chat/completions", json=ask(**kw), timeout=60)
        assert r.status_code == 200, (kw, r.text)
        # both leave only the most likely token: the greedy reply
        assert r.json()["choices"][0]["message"]["content"] == greedy.json()["choices"][0]["message"]["content"], kw


def test_stop_sequences_cut_the_reply(url):
    base = httpx.post(f"{url}/v1/chat/completions", json=ask(seed=5, temperature=1.0, max_tokens=40), timeout=60).json()
    text = base["choices"][0]["message"]["content"]
    assert len(text) > 12, text
    stop = text[6:9]
    want = text[:text.find(stop)]
    for stops in (stop, ["zzzz-never", stop]):
        r = httpx.post(f"{url}/v1/chat/completions", json=ask(seed=5, temperature=1.0, max_tokens=40, stop=stops), timeout=60)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["message"]["content"] == want and choice["finish_reason"] == "stop"
        # streaming: the same text, and no piece of the stop sequence ever shown
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                          json=ask(seed=5, temperature=1.0, max_tokens=40, stop=stops, stream=True)) as s:
            chunks = [json.loads(e) for e in sse_events(s)[:-1]]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # a stop sequence the reply never contains changes nothing
    r = httpx.post(f"{url}/v1/chat/completions", json=ask(seed=5, temperature=1.0, max_tokens=40, stop="\x00never"), timeout=60)
    assert r.json()["choices"][0]["message"]["content"] == text


class FailingModel(torch.nn.Module):
    """A real model whose device "fails" (raises) on its Nth forward call, as a GPU out of memory would."""

    def __init__(self, model, fail_at: int):
        super().__init__()
        self.inner, self.config, self.rotary_len = model, model.config, model.rotary_len
        self.fail_at, self.calls = fail_at, 0

    def forward(self, idx, kv_cache=None, last_only=False):
        self.calls += 1
        if self.calls % self.fail_at == 0:
            raise RuntimeError("CUDA out of memory (simulated)")
        return self.inner(idx, kv_cache=kv_cache, last_only=last_only)


def test_an_error_inside_a_stream_ends_it_with_an_error_event(tiny_tokenizer):
    model = FailingModel(endless_model(tiny_tokenizer, 256), fail_at=6)
    with LiveServer(create_app(model, tiny_tokenizer)) as base:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=ask(stream=True, max_tokens=50), timeout=60) as r:
            assert r.status_code == 200
            events = sse_events(r)
        last = json.loads(events[-1])
        assert last["error"]["type"] == "server_error" and "out of memory" in last["error"]["message"]
        assert "[DONE]" not in events                     # a cut reply does not pretend to have finished
        chunks = [json.loads(e) for e in events[:-1]]
        assert len(chunks) >= 2 and all(c["choices"][0]["finish_reason"] is None for c in chunks)
        # non-streaming: a 500 in OpenAI's shape; and the server keeps serving
        model.calls = 0
        r = httpx.post(f"{base}/v1/chat/completions", json=ask(max_tokens=50), timeout=60)
        assert r.status_code == 500 and r.json()["error"]["code"] == "generation_failed"
        model.calls = 0
        assert httpx.post(f"{base}/v1/chat/completions", json=ask(max_tokens=3), timeout=60).status_code == 200


def test_unknown_routes_and_methods_are_4xx_json(url):
    for r in (httpx.get(f"{url}/nope"), httpx.get(f"{url}/v1/chat/completions"), httpx.delete(f"{url}/health")):
        assert 400 <= r.status_code < 500
        assert "message" in r.json()["error"]


def test_conversation_longer_than_context_is_400(url):
    words = " ".join(f"w{i}" for i in range(1500))   # < 8000 chars, but many more tokens than the 256 context
    r = httpx.post(f"{url}/v1/chat/completions", json=ask(words[:7900]), timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_eight_concurrent_streams_all_complete(url):
    async def one(client, i):
        body = ask(f"request number {i}", stream=True, max_tokens=16, seed=i)
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        return lines

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(8)))

    results = asyncio.run(main())
    assert len(results) == 8
    for lines in results:
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_full_queue_answers_429(model, tiny_tokenizer):
    with LiveServer(create_app(model, tiny_tokenizer, max_queue=0)) as base:
        r = httpx.post(f"{base}/v1/chat/completions", json=ask(), timeout=30)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"


def test_tool_calls_round_trip_to_the_same_tokens(url, tiny_tokenizer):
    content = "Let me see. [calc 12*7 = 84] It is 84."
    parts = content_to_parts(content)
    assert parts == [{"type": "text", "text": "Let me see. "}, {"type": "python", "text": "12*7"},
                     {"type": "python_output", "text": "84"}, {"type": "text", "text": " It is 84."}]
    ids, _ = tiny_tokenizer.render_conversation({"messages": [{"role": "user", "content": "hi"},
                                                              {"role": "assistant", "content": parts}]})
    assert tiny_tokenizer.encode_special("<|python_start|>") in ids
    assert content_to_parts("cut short [calc 12*") == [{"type": "text", "text": "cut short [calc 12*"}]
    assert content_to_parts("[calc 1+]") == [{"type": "python", "text": "1+"}]   # a call the reply ended in
    # a history with a tool call is accepted and answered
    history = {"messages": [{"role": "user", "content": "what is 12*7?"}, {"role": "assistant", "content": content},
                            {"role": "user", "content": "thanks"}], "max_tokens": 4}
    assert httpx.post(f"{url}/v1/chat/completions", json=history, timeout=60).status_code == 200


def calculator_reply(tok) -> tuple[list[int], str]:
    """A reply that calls the calculator (the tokens the model "samples" and the ones the engine forces) and
    the text every surface must show for it."""
    sp = tok.encode_special
    ids = (tok.encode("Let me compute. ") + [sp("<|python_start|>"), *tok.encode("12*7"), sp("<|python_end|>"),
           sp("<|output_start|>"), *tok.encode("84"), sp("<|output_end|>")] + tok.encode(" So it is 84.")
           + [sp("<|assistant_end|>")])
    return ids, "Let me compute. [calc 12*7 = 84] So it is 84."


def test_a_tool_call_reaches_api_clients_as_text_without_special_tokens(tiny_tokenizer):
    """The model calls the calculator (a scripted token source driven by the real Engine, which runs the tool
    and forces its output): streaming and non-streaming content carry [calc 12*7 = 84], no <|...|> token,
    no tool_calls field; sent back as history, the model sees its own tokens again."""
    from tiny_models import ScriptedReplyModel
    reply_ids, shown = calculator_reply(tiny_tokenizer)
    model = ScriptedReplyModel(reply_ids, tiny_tokenizer.get_vocab_size())
    with LiveServer(create_app(model, tiny_tokenizer, model_name="nanochat-run-sft")) as base:
        body = ask("What is 12*7?", max_tokens=60)
        r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        message = r.json()["choices"][0]["message"]
        assert message["content"] == shown and "tool_calls" not in message
        assert r.json()["choices"][0]["finish_reason"] == "stop"
        with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as s:
            events = sse_events(s)
        deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1]]
        assert "".join(d.get("content", "") for d in deltas) == shown
        assert not any("<|" in d.get("content", "") or "tool_calls" in d for d in deltas)
    history = {"messages": [{"role": "user", "content": "What is 12*7?"},
                            {"role": "assistant", "content": content_to_parts(shown)}]}
    prompt = tiny_tokenizer.render_for_completion({"messages": history["messages"][:1]})
    assert tiny_tokenizer.render_conversation(history)[0] == prompt + reply_ids


def test_the_model_answers_to_its_exact_id_and_to_the_alias(url):
    listed = httpx.get(f"{url}/v1/models").json()["data"]
    assert [m["id"] for m in listed] == ["nanochat-test", "nanochat"]
    assert all(m["root"] == "nanochat-test" for m in listed)
    assert httpx.get(f"{url}/v1/models/nanochat").json()["root"] == "nanochat-test"
    for name in ("nanochat", "nanochat-test"):
        r = httpx.post(f"{url}/v1/chat/completions", json=ask(model=name, max_tokens=2), timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "nanochat-test"   # replies name the exact model
    r = httpx.post(f"{url}/v1/chat/completions", json=ask(model="nanochat-other", max_tokens=2), timeout=60)
    assert r.status_code == 404 and "'nanochat-test' or 'nanochat'" in r.json()["error"]["message"]


def test_terminal_chat_and_run_samples_show_a_tool_call_as_text(tiny_tokenizer):
    """The same reply in the terminal chat and in the sample a chat stage prints at the end of a run (what
    `nanochat train` shows last): [calc 12*7 = 84], no special token."""
    import io
    from nanochat_core.inference.chat import reply
    from nanochat_core.training.chat_loop import chat_sample
    from nanochat_core.inference.engine import Engine
    from nanochat_core.stages.base_eval import greedy_complete
    from tiny_models import ScriptedReplyModel
    reply_ids, shown = calculator_reply(tiny_tokenizer)
    model = ScriptedReplyModel(reply_ids, tiny_tokenizer.get_vocab_size())
    out = io.StringIO()
    parts, finish = reply(Engine(model, tiny_tokenizer), [{"role": "user", "content": "What is 12*7?"}], out,
                          temperature=0.6, top_k=50, max_tokens=60)
    assert out.getvalue() == shown + "\n" and finish == "stop"
    assert [(p["type"], p["text"]) for p in parts if p["text"]] == [
        ("text", "Let me compute. "), ("python", "12*7"), ("python_output", "84"), ("text", " So it is 84.")]
    model.train()
    sample = chat_sample(model, tiny_tokenizer, "What is 12*7?", max_tokens=60)
    assert sample == f"User: What is 12*7?\nAssistant: {shown}"
    assert greedy_complete(model, tiny_tokenizer, "The", max_tokens=60) == "The" + shown


# -----------------------------------------------------------------------------
# Terminal chat, on a checkpoint saved the way training saves it

@pytest.fixture
def saved_run(model, tiny_tokenizer):
    from nanochat_core.gpt.checkpoint import save_checkpoint
    from nanochat_core.common import runs_dir
    run = runs_dir() / "tiny"
    tiny_tokenizer.save(run / "tokenizer")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    save_checkpoint(run / "sft", 1, model, opt, {"stage": "sft", "tokenizer_hash": tiny_tokenizer.hash}, 0, 1)
    return run


def test_chat_one_shot_prints_the_reply(saved_run, capsys):
    from nanochat_core.inference.chat import run_chat
    run_chat(prompt="Hello there", temperature=0.0, max_tokens=8, device="cpu")
    out = capsys.readouterr()
    assert out.out.endswith("\n") and len(out.out.strip()) > 0
    assert "sft" in out.err          # status line on stderr names the checkpoint it loaded
    run_chat(checkpoint=str(saved_run), prompt="Hello there", temperature=0.0, max_tokens=8, device="cpu")
    assert capsys.readouterr().out == out.out   # greedy: the same reply again


def test_chat_interactive_turns_and_commands(saved_run, capsys, monkeypatch):
    from nanochat_core.inference.chat import run_chat
    lines = iter(["Hello", "And again?", "/clear", "Hi", "/exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    run_chat(temperature=0.0, max_tokens=6, device="cpu")
    out = capsys.readouterr().out
    assert out.count("nanochat: ") == 3 and "(new conversation)" in out
    assert next(lines) == "never read"


def test_chat_without_a_checkpoint_says_what_to_do():
    from nanochat_core.inference.chat import run_chat
    with pytest.raises(NanochatError, match="nanochat train --local.*nanochat pull"):
        run_chat(prompt="hi")
    with pytest.raises(NanochatError, match="does not exist"):
        run_chat(checkpoint="/nonexistent/run", prompt="hi")
    with pytest.raises(NanochatError, match="temperature"):
        run_chat(prompt="hi", temperature=5)


def test_serve_entry_point_binds_localhost_and_answers(saved_run, tmp_path):
    """`python -m nanochat_core.inference.serve` for real: loads the latest run, listens on 127.0.0.1, answers."""
    import os
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "nanochat_core.inference.serve", "--port", str(port), "--device", "cpu"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, f"server exited: {(tmp_path / 'serve.log').read_text()}"
            assert time.time() < deadline, "server did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=ask(max_tokens=4), timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "nanochat-tiny-sft"
        # bound to the loopback interface only (the default): the socket's address is 127.0.0.1
        import shutil
        ss = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True) if shutil.which("ss") else None
        if ss is not None and ss.returncode == 0 and ss.stdout.strip():   # (skipped where `ss` is missing)
            local_addresses = [line.split()[3] for line in ss.stdout.splitlines()]
            assert local_addresses == [f"127.0.0.1:{port}"]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def test_serve_on_a_busy_port_is_a_one_line_error(saved_run):
    import socket
    from nanochat_core.inference.serve import run_server
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(NanochatError, match="pick another --port"):
            run_server(port=s.getsockname()[1])


def endless_model(tiny_tokenizer, sequence_len: int = 4096):
    """A tiny model that never samples a stop token (logit 0 is never in the top 50 of 512): replies run
    to max_tokens."""
    model = tiny_model(tiny_tokenizer.get_vocab_size(), sequence_len=sequence_len)
    with torch.no_grad():
        for name in tiny_tokenizer.get_special_tokens():
            model.lm_head.weight[tiny_tokenizer.encode_special(name)] = 0.0
    return model


class CountingModel(PacedModel):
    """A paced real model that counts its forward calls per generation: `calls[i]` is how many the i-th
    generation made, in the order the worker ran them (a generation starts with its prefill, a call on an empty
    KV cache). A generation of max_tokens tokens that runs to its end makes exactly max_tokens calls (the
    prefill, then one per token but the last), so fewer says it was stopped - a count, not a duration. The
    pace only puts a long reply's natural end far away (minutes), so that a server that stops nothing fails by
    that count (or by the client's hang guard) rather than by seconds."""

    def __init__(self, model, seconds_per_call: float):
        super().__init__(model, seconds_per_call)
        self.calls: list[int] = []   # appended to by the worker thread only

    def forward(self, idx, kv_cache=None, last_only=False):
        if kv_cache is None or kv_cache.get_pos() == 0:
            self.calls.append(0)
        self.calls[-1] += 1
        return super().forward(idx, kv_cache=kv_cache, last_only=last_only)


def test_disconnected_stream_frees_the_worker(tiny_tokenizer):
    model = CountingModel(endless_model(tiny_tokenizer), 0.02)
    with LiveServer(create_app(model, tiny_tokenizer)) as base:
        # a reply of 4000 tokens would hold the only worker for minutes; read two chunks (the role, then a token:
        # its generation is under way) and hang up
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=ask(max_tokens=4000, stream=True), timeout=60) as r:
            events = (line for line in r.iter_lines() if line.startswith("data: "))
            assert json.loads(next(events)[6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            assert "content" in json.loads(next(events)[6:])["choices"][0]["delta"]
        # the next request waits for the only worker; its timeout is a hang guard, not a bound
        r = httpx.post(f"{base}/v1/chat/completions", json=ask(max_tokens=2), timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 2
        abandoned, ours = model.calls            # one worker: the abandoned generation ended before ours began
        assert abandoned < 4000, "the abandoned generation ran to its end: the server never stopped it"
        assert ours == 2


def test_chat_drops_the_oldest_exchange_when_the_context_is_full(tiny_tokenizer, capsys):
    import io
    from nanochat_core.inference.chat import reply
    from nanochat_core.inference.engine import Engine
    cfg = config_for_depth(1, tiny_tokenizer.get_vocab_size(), sequence_len=16, aspect_ratio=64, head_dim=16)
    small = GPT.build(cfg, "cpu")
    engine = Engine(small.eval(), tiny_tokenizer)       # context: 10 x 16 = 160 tokens
    long = "the quick brown fox jumps over the lazy dog " * 3
    messages = []
    for i in range(4):
        messages += [{"role": "user", "content": f"{i} {long}"}, {"role": "assistant", "content": long}]
    messages.append({"role": "user", "content": "and now?"})
    assert len(tiny_tokenizer.render_for_completion({"messages": messages})) > engine.context_len
    parts, finish = reply(engine, messages, io.StringIO(), temperature=0.0, top_k=50, max_tokens=8)
    assert finish in ("stop", "length")
    assert messages[-1]["content"] == "and now?" and messages[0]["role"] == "user"
    assert len(tiny_tokenizer.render_for_completion({"messages": messages})) + 8 <= engine.context_len
    assert "dropped the oldest exchange" in capsys.readouterr().err


def test_request_model_never_fails_with_anything_but_a_validation_error():
    """Whatever JSON a client sends, the request model accepts it or raises pydantic's ValidationError (which
    the app answers with a 400), never anything else; what it accepts is within the limits."""
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from pydantic import ValidationError
    from nanochat_core.inference.api_models import ChatCompletionRequest, validation_error_body
    scalars = st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True) | st.text(max_size=20)
    values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                          max_leaves=12)
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", 3]),
                                     "content": st.text(max_size=30) | values})
    body = st.fixed_dictionaries({"messages": st.lists(message, max_size=5) | values},
                                 optional={k: values | st.floats(-1, 5) | st.integers(-5, 5000)
                                           for k in ["temperature", "top_k", "top_p", "max_tokens", "n", "seed",
                                                     "stream", "stop", "stream_options", "tools"]})

    @given(body)
    @settings(max_examples=300, deadline=None)
    def check(b):
        try:
            req = ChatCompletionRequest.model_validate_json(json.dumps(b))
        except ValidationError as e:
            err = validation_error_body(e.errors())["error"]
            assert isinstance(err["message"], str) and err["message"]
        else:
            assert req.messages[-1].role == "user" and req.n in (None, 1)
            assert req.temperature is None or 0 <= req.temperature <= 2
            assert req.top_k is None or 0 <= req.top_k <= 200
            assert req.max_tokens is None or 1 <= req.max_tokens <= 4096
    check()
