"""--identity at inference: the system prompt a model was fine-tuned with is what `serve` (and `chat`) put in
front of a conversation that brings none; a request's own system message (or `chat --system`) replaces it.
Observed through the API's own token count of the prompt it rendered."""
import httpx
import pytest

from test_serve import LiveServer
from tiny_models import tiny_chat_model
from nanochat_core.inference.serve import create_app

IDENTITY = "You are Ada, the support assistant of Acme."


@pytest.fixture(scope="module")
def ada_url(tiny_tokenizer):
    app = create_app(tiny_chat_model(tiny_tokenizer.get_vocab_size()), tiny_tokenizer, model_name="ada",
                     system_prompt=IDENTITY)
    with LiveServer(app) as base:
        yield base


def prompt_tokens(url, messages):
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens"]


def test_the_trained_identity_is_the_default_system_prompt_and_a_request_overrides_it(ada_url, tiny_tokenizer):
    user = {"role": "user", "content": "who are you?"}
    render = lambda msgs: len(tiny_tokenizer.render_for_completion({"messages": msgs}))
    assert prompt_tokens(ada_url, [user]) == render([{"role": "system", "content": IDENTITY}, user])
    own = {"role": "system", "content": "Be brief."}
    assert prompt_tokens(ada_url, [own, user]) == render([own, user])       # the request's own wins


def test_chat_keeps_the_system_prompt_when_old_turns_are_dropped(tiny_tokenizer, capsys):
    import io
    from nanochat_core.inference.chat import reply
    from nanochat_core.inference.engine import Engine
    from nanochat_core.gpt.model import GPT, config_for_depth
    cfg = config_for_depth(1, tiny_tokenizer.get_vocab_size(), sequence_len=16, aspect_ratio=64, head_dim=16)
    engine = Engine(GPT.build(cfg, "cpu").eval(), tiny_tokenizer)
    seen = []
    original = tiny_tokenizer.render_for_completion
    tiny_tokenizer.render_for_completion = lambda conv: seen.append(conv) or original(conv)
    try:
        long = "the quick brown fox jumps over the lazy dog " * 3
        messages = []
        for i in range(4):
            messages += [{"role": "user", "content": f"{i} {long}"}, {"role": "assistant", "content": long}]
        messages.append({"role": "user", "content": "and now?"})
        reply(engine, messages, io.StringIO(), temperature=0.0, top_k=50, max_tokens=8, system=IDENTITY)
    finally:
        tiny_tokenizer.render_for_completion = original
    assert "dropped the oldest exchange" in capsys.readouterr().err
    assert all(c["messages"][0] == {"role": "system", "content": IDENTITY} for c in seen)
    assert seen[-1]["messages"][1]["role"] == "user" and len(seen[-1]["messages"]) < 10
