"""
The request body of POST /v1/chat/completions as pydantic models: FastAPI validates it before the endpoint
runs, and serve.py turns a failure into OpenAI's error shape with `validation_error_body`.

Strict on purpose:
  - types are strict: `n: true`, `n: 1.0`, `max_tokens: "5"` are refused, not coerced (JSON has one number
    type, so an integer where a float is expected is fine: temperature 1 is 1.0);
  - unknown fields are refused by name instead of silently dropped: a client that sends `tools`,
    `logprobs: true` or `response_format: json_object` must learn that it will not get what it asked for.
    Fields whose value changes nothing are accepted at that value only (n 1, penalties 0, logprobs false).
"""
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MAX_OUTPUT_TOKENS = 4096
MAX_STOP = 4             # OpenAI's limit on stop sequences
MAX_STOP_CHARS = 100
DEFAULTS = dict(temperature=0.6, top_k=50, max_tokens=512)

# what an unsupported field is for, to say so in the refusal
_WHY = {"tools": "nanochat's one tool is its built-in calculator, used on its own",
        "tool_choice": "nanochat's one tool is its built-in calculator, used on its own",
        "functions": "nanochat's one tool is its built-in calculator, used on its own",
        "response_format": "the model writes plain text only",
        "logprobs": "log-probabilities are not returned", "top_logprobs": "log-probabilities are not returned",
        "logit_bias": "logit biases are not applied"}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


_Empty = Annotated[list[Any], Field(max_length=0)]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    # Fields a client echoes back on an assistant message it received from an OpenAI-style server: accepted
    # empty (they then mean nothing), refused otherwise.
    refusal: None = None
    tool_calls: _Empty | None = None
    function_call: None = None
    annotations: _Empty | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class ChatCompletionRequest(_Strict):
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    model: str | None = None              # None: the one model this server has
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_k: Annotated[int, Field(ge=0, le=200)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=MAX_OUTPUT_TOKENS)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_OUTPUT_TOKENS)] | None = None
    n: Annotated[int, Field(ge=1, le=1)] | None = None          # one reply per request
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stop: Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)] | \
        Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None   # the caller's end-user id: changes nothing
    presence_penalty: Annotated[float, Field(ge=0.0, le=0.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=0.0, le=0.0)] | None = None
    logprobs: Literal[False] | None = None

    @field_validator("messages")
    @classmethod
    def _conversation(cls, messages: list[Message]) -> list[Message]:
        total = 0
        for i, m in enumerate(messages):
            n = len(m.text)
            if n > MAX_MESSAGE_CHARS:
                raise ValueError(f"messages[{i}] has {n} characters; the limit is {MAX_MESSAGE_CHARS}")
            if m.role != "assistant" and not m.text.strip():
                raise ValueError(f"messages[{i}] ({m.role}) is empty")
            total += n
        if total > MAX_TOTAL_CHARS:
            raise ValueError(f"the conversation has {total} characters; the limit is {MAX_TOTAL_CHARS}")
        roles = ["system" if m.role == "developer" else m.role for m in messages]
        body = roles[1:] if roles[0] == "system" else roles
        if "system" in body:
            raise ValueError("only the first message may be a system (or developer) message")
        for i, role in enumerate(body):
            if role != ("user" if i % 2 == 0 else "assistant"):
                raise ValueError("messages must alternate user, assistant, user, ... (after an optional system message)")
        if not body or body[-1] != "user":
            raise ValueError("the last message must be from the user")
        return messages

    # -- the values generation uses ------------------------------------------------------------
    @property
    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def validation_error_body(errors: list[dict]) -> dict:
    """FastAPI's RequestValidationError.errors() -> OpenAI's error body, naming the first problem.
    A value that fits no member of a union (stop: a string or a list) gets one error per member; the most
    telling is a broken constraint (5 stop sequences: too many) rather than a type mismatch (not a string)."""
    if not errors:
        errors = [{"type": "", "loc": (), "msg": "invalid request"}]
    def top(x):   # the request field an error is about
        return next((p for p in x.get("loc", ()) if p != "body"), None)
    same = [x for x in errors if top(x) == top(errors[0])]
    e = max(same, key=lambda x: (not x.get("type", "").endswith("_type"), len(x.get("loc", ()))))
    # loc is ("body", field, index, ...); drop "body" and the tags pydantic adds for union members
    loc = [p for p in e.get("loc", ()) if p != "body" and not (isinstance(p, str) and ("[" in p or p in
           ("str", "int", "float", "bool", "list", "none", "constrained-str", "constrained-int", "constrained-float")))]
    path = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
    param = str(loc[0]) if loc else None
    kind, msg = e.get("type", ""), str(e.get("msg", "invalid request"))
    if kind == "json_invalid":
        message = "request body is not valid JSON"
    elif not loc and kind in ("model_attributes_type", "dict_type", "model_type"):
        message = "request body must be a JSON object"
    elif kind == "extra_forbidden":
        why = _WHY.get(str(loc[-1]) if loc else "")
        message = f"'{path}' is not supported" + (f": {why}" if why else " by this server")
    elif kind == "missing":
        message = f"'{path}' is required"
    elif kind == "value_error":
        message = msg.removeprefix("Value error, ")
    else:
        got = repr(e.get("input"))[:40] if "input" in e else ""
        message = f"'{path}': {msg}" + (f" (got {got})" if got else "")
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
