"""
Chat with a trained model in the terminal:  python -m nanochat_core.inference.chat [--checkpoint DIR] [--prompt TEXT]

Interactive by default (multi-turn; /clear starts over, /exit quits, Ctrl-C stops a reply). With
--prompt it answers once, prints ONLY the reply on stdout (status goes to stderr) and exits: for scripts.
Calculator calls show inline as [calc 12*7 = 84] (coloured on a terminal).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from nanochat_core.inference.calculator import ToolText
from nanochat_core.common import NanochatError, autodetect_device_type, latest_trained_run, run_main, runs_dir
from nanochat_core.gpt.checkpoint import load_model
from nanochat_core.inference.engine import Engine
from nanochat_core.gpt.quantize import resolve_dtype

HELP = "commands: /clear (new conversation), /exit (quit), /help. Ctrl-C stops a reply, Ctrl-D quits."


def find_checkpoint(checkpoint: str | Path | None = None) -> Path:
    """The checkpoint to chat with: the given path, else the latest run with a trained model (a run trained
    locally or brought back by `nanochat pull`; common.latest_trained_run is the rule the CLI uses too)."""
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.exists():
            raise NanochatError(f"checkpoint {path} does not exist: pass a run directory or a checkpoint directory")
        return path
    found = latest_trained_run()
    if found is None:
        raise NanochatError(f"no trained model found under {runs_dir()}: run `nanochat train --local` to train a "
                            "tiny one on this machine, or `nanochat pull` to bring one back from your cluster")
    return found


def load_engine(checkpoint: str | Path | None = None, device: str | None = None, dtype: str = "auto"):
    """(Engine, meta) for the checkpoint (see find_checkpoint) on the device (auto-detected if None: CUDA, then
    Apple MPS, then the CPU) with weights in `dtype` (auto | fp32 | bf16 | int8 | int4, see quantize.py)."""
    path = find_checkpoint(checkpoint)
    try:  # load_model turns damage into NanochatError; what is left is the environment saying no
        model, tokenizer, meta = load_model(path, device or autodetect_device_type(), dtype=dtype)
    except OSError as e:
        raise NanochatError(f"cannot read the checkpoint at {path}: {e.strerror or e}"
                            + (f" ({e.filename})" if e.filename else "")) from None
    return Engine(model, tokenizer), meta


def check_sampling(temperature: float, top_k: int, max_tokens: int) -> None:
    if not 0.0 <= temperature <= 2.0:
        raise NanochatError(f"--temperature must be between 0 and 2 (got {temperature})")
    if not 0 <= top_k <= 200:
        raise NanochatError(f"--top-k must be between 0 (no limit) and 200 (got {top_k})")
    if not 1 <= max_tokens <= 4096:
        raise NanochatError(f"--max-tokens must be between 1 and 4096 (got {max_tokens})")


class _Painter:
    """Writes reply pieces to a stream: text as is, a calculator call and its forced result as
    [calc EXPR = RESULT] (calculator.ToolText, the form every surface uses), coloured on a terminal."""
    COLORS = {"python": "\033[33m", "python_output": "\033[32m"}
    RESET = "\033[0m"

    def __init__(self, out: TextIO):
        self.out, self.view = out, ToolText()
        self.color = out.isatty()

    def write(self, kind: str, text: str) -> None:
        self.out.write(self.view.frame(kind, text))
        if self.color and kind in self.COLORS and text:
            text = self.COLORS[kind] + text + self.RESET
        self.out.write(text)
        self.out.flush()

    def finish(self) -> None:
        self.out.write(self.view.close() + "\n")
        self.out.flush()


def reply(engine: Any, messages: list[dict], out: TextIO, temperature: float, top_k: int, max_tokens: int,
          seed: int | None = None, system: str | None = None) -> tuple[list[dict], str]:
    """Stream one assistant reply to `out`; return (its content parts, finish reason). Old turns are dropped
    (with a note on stderr) when the conversation no longer fits the model's context; the system prompt
    (`system`) is kept in front of whatever is left."""
    tok = engine.tokenizer
    head = [{"role": "system", "content": system}] if system else []
    while True:
        ids = tok.render_for_completion({"messages": head + messages})
        if len(ids) + min(max_tokens, 64) <= engine.context_len or len(messages) <= 1:
            break
        messages[:] = messages[2:]   # forget the oldest user/assistant exchange
        print("(conversation too long for the model's context: dropped the oldest exchange)", file=sys.stderr)
    parts: list[dict] = []
    painter = _Painter(out)
    finish = "length"
    for piece in engine.stream_reply(ids, max_tokens=max_tokens, temperature=temperature, top_k=top_k or None,
                                     seed=seed):
        if piece.kind == "finish":
            finish = piece.text
            break
        if not parts or parts[-1]["type"] != piece.kind:
            parts.append({"type": piece.kind, "text": ""})
        parts[-1]["text"] += piece.text
        painter.write(piece.kind, piece.text)
    painter.finish()
    return parts, finish


def run_chat(checkpoint: str | Path | None = None, prompt: str | None = None, temperature: float = 0.6,
             top_k: int = 50, max_tokens: int = 512, device: str | None = None, dtype: str = "auto",
             system: str | None = None) -> None:
    """Terminal chat (see module doc). checkpoint=None: the latest local run. system: the system prompt
    (None: the one the model was fine-tuned with - its --identity - if any; "" for none)."""
    check_sampling(temperature, top_k, max_tokens)
    if prompt is not None and not prompt.strip():
        raise NanochatError("--prompt is empty: pass the message to send")
    resolve_dtype(dtype, "cpu")   # a bad --dtype is a usage error before anything loads
    engine, meta = load_engine(checkpoint, device, dtype)
    print(f"nanochat: {meta.get('path', checkpoint)} on {engine.device}, {meta['dtype']} weights, loaded in "
          f"{meta['load_s']:.1f} s ({meta['load_how']})", file=sys.stderr, flush=True)
    if system is None:
        system = meta.get("system_prompt")
    kw = dict(temperature=temperature, top_k=top_k, max_tokens=max_tokens, system=system or None)
    if prompt is not None:
        reply(engine, [{"role": "user", "content": prompt}], sys.stdout, **kw)
        return
    print(HELP, file=sys.stderr)
    messages: list[dict] = []
    while True:
        try:
            line = input("\nYou: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return
        if cmd == "/clear":
            messages = []
            print("(new conversation)")
            continue
        if cmd == "/help":
            print(HELP)
            continue
        messages.append({"role": "user", "content": line})
        print("\nnanochat: ", end="", flush=True)
        try:
            parts, _ = reply(engine, messages, sys.stdout, **kw)
        except KeyboardInterrupt:
            # the partial reply is not kept: the next turn starts from the user's last message again
            print("\n(stopped)")
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": parts})


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m nanochat_core.inference.chat", description="Chat with a trained nanochat model.")
    p.add_argument("--checkpoint", default=None, help="run directory or checkpoint directory (default: the latest run)")
    p.add_argument("--prompt", default=None, help="send one message, print the reply, exit")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-k", type=int, default=50, help="0 = no limit")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--device", default=None, help="cuda | cpu | mps (default: auto)")
    p.add_argument("--dtype", default="auto", help="weights: auto | fp32 | bf16 | int8 | int4 (default auto: int4 on a CPU)")
    p.add_argument("--system", default=None, help="system prompt (default: the model's own identity, if trained with one)")
    a = p.parse_args()
    run_chat(a.checkpoint, a.prompt, a.temperature, a.top_k, a.max_tokens, a.device, a.dtype, a.system)


if __name__ == "__main__":
    run_main(main)
