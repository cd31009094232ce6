"""
`nanochat export --out DIR`: a trained model as a Hugging Face folder, for sharing and serving with the
`transformers` ecosystem:

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    AutoTokenizer.from_pretrained(DIR)

It loads right or not at all. Its model_type is our own, MODEL_TYPE, which transformers' registry does not
know: without trust_remote_code transformers stops with its "contains custom code ... pass
trust_remote_code=True" error (or asks, on a terminal) instead of guessing. The plain "nanochat" would be
the wrong answer: transformers 5 has a built-in NanoChat (a different, simpler model) under that name, and
opening our folder as that class leaves every one of our weights unused and generates noise, silently.
Our architecture is not one that transformers, vLLM or llama.cpp run natively: value embeddings mixed into
attention through a gate, per-layer residual and x0 scalars, smear, backout and per-layer sliding windows
have no counterpart in their model definitions, so there is no conversion to offer (no GGUF either): the
code files shipped in the folder are the one way to run it.

What goes in DIR, and why:
- model.safetensors: the fp32 weights under our own parameter names (the modeling file uses the same module
  tree, so nothing is renamed - one less place for an export to silently disagree with training);
- config.json: the architecture as data (windows per layer, value-embedding layers, softcap, rotary base) and
  an auto_map pointing transformers at the two code files copied next to it (nanochat_core/inference/hf/);
- tokenizer.json (our BPE, which the `tokenizers` library reads natively) + tokenizer_config.json: the special
  tokens and a Jinja chat template that renders exactly like Tokenizer.render_conversation /
  render_for_completion (system prompt folded into the first user turn, calculator calls and outputs);
- generation_config.json: stop at <|assistant_end|> or <|bos|> (as our engine does), our chat's sampling.
One difference stays by design: in plain text, the string "<|bos|>" is ordinary bytes to our encode() but a special
token to transformers' default call; `tokenizer(text, split_special_tokens=True)` gives our ids exactly.
Writing it needs neither transformers nor a GPU; the folder is assembled aside and renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from nanochat_core.common import NanochatError, atomic_dir, atomic_write_json
from nanochat_core.gpt import model
import torch
from safetensors.torch import save_file
from nanochat_core.gpt.checkpoint import load_model
from nanochat_core.node.runlock import LOCK_NAME, holders

HF_CODE = Path(__file__).parent / "hf"
CODE_FILES = ("configuration_nanochat.py", "modeling_nanochat.py")
MODEL_TYPE = "nanochat_gpt"        # hf/configuration_nanochat.py says the same; not a name transformers knows
OLD_MODEL_TYPES = ("nanochat",)    # what earlier exports wrote: such a folder may be exported over

# The chat template: one Jinja expression per line, joined without newlines (transformers renders templates
# with trim_blocks/lstrip_blocks, but a single line leaves nothing to trim). Mirrors render_conversation.
_TEMPLATE_LINES = [
    "{%- macro text_of(c) -%}{%- if c is string -%}{{ c }}{%- else -%}{%- for p in c -%}{{ p['text'] if p['text'] is defined else '' }}{%- endfor -%}{%- endif -%}{%- endmacro -%}",
    "{%- set msgs = messages -%}",
    "{%- set sys = '' -%}",
    "{%- if msgs and msgs[0]['role'] == 'system' -%}",
    "{%- if msgs|length < 2 or msgs[1]['role'] != 'user' -%}{{ raise_exception('a system message must be followed by a user message') }}{%- endif -%}",
    "{%- set sys = text_of(msgs[0]['content']) + '\\n\\n' -%}",
    "{%- set msgs = msgs[1:] -%}",
    "{%- endif -%}",
    "<|bos|>",
    "{%- for m in msgs -%}",
    "{%- set want = 'user' if loop.index0 % 2 == 0 else 'assistant' -%}",
    "{%- if m['role'] != want -%}{{ raise_exception('conversations alternate user/assistant (an optional system message first)') }}{%- endif -%}",
    "{%- if want == 'user' -%}",
    "<|user_start|>{{ (sys if loop.first else '') + text_of(m['content']) }}<|user_end|>",
    "{%- else -%}",
    "<|assistant_start|>",
    "{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}{%- for p in m['content'] -%}",
    "{%- if p['type'] == 'text' -%}{{ p['text'] }}",
    "{%- elif p['type'] == 'python' -%}<|python_start|>{{ p['text'] }}<|python_end|>",
    "{%- elif p['type'] == 'python_output' -%}<|output_start|>{{ p['text'] }}<|output_end|>",
    "{%- else -%}{{ raise_exception('unknown assistant part type: use text, python or python_output') }}",
    "{%- endif -%}",
    "{%- endfor -%}{%- endif -%}",
    "<|assistant_end|>",
    "{%- endif -%}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}",
]
CHAT_TEMPLATE = "".join(_TEMPLATE_LINES)


def hf_config(cfg, tokenizer) -> dict:
    """config.json for a GPTConfig (see nanochat_core/inference/hf/configuration_nanochat.py for the fields)."""
    bos = tokenizer.get_bos_token_id()
    return {
        "architectures": ["NanochatForCausalLM"],
        "model_type": MODEL_TYPE,
        "auto_map": {"AutoConfig": "configuration_nanochat.NanochatConfig",
                     "AutoModelForCausalLM": "modeling_nanochat.NanochatForCausalLM"},
        "vocab_size": cfg.vocab_size,
        "padded_vocab_size": cfg.padded_vocab_size,
        "hidden_size": cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "sequence_len": cfg.sequence_len,
        "max_position_embeddings": 10 * cfg.sequence_len,   # our rotary table's reach (model.py)
        "window_sizes": [w or 0 for w in cfg.window_sizes()],
        "value_embed_layers": cfg.value_embed_layers(),
        "ve_gate_channels": cfg.ve_gate_channels,
        "ve_gate_scale": cfg.ve_gate_scale,
        "smear": cfg.smear,
        "smear_channels": _model_const("SMEAR_CHANNELS"),
        "backout": cfg.backout,
        "logit_softcap": _model_const("SOFTCAP"),
        "rope_theta": float(_model_const("ROPE_BASE")),
        "bos_token_id": bos,
        "eos_token_id": tokenizer.encode_special("<|assistant_end|>"),
        "pad_token_id": bos,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def _model_const(name: str):
    return getattr(model, name)


def tokenizer_config(tokenizer, cfg) -> dict:
    specials = tokenizer.get_special_tokens()
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|assistant_end|>",
        "pad_token": "<|bos|>",
        "additional_special_tokens": [s for s in specials if s not in ("<|bos|>", "<|assistant_end|>")],
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": cfg.sequence_len,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,   # plain text encodes to exactly our ids; the chat template writes <|bos|> itself
    }


def export(checkpoint: str | Path, out: str | Path, dtype: str = "fp32") -> Path:
    """Write the HF folder for `checkpoint` (a run dir - its most trained stage - or a checkpoint dir), weights
    in fp32 or bf16 (half the file; auto = bf16). int8/int4 are refused: the exported modelling code reads plain
    tensors, and transformers has its own quantisation for whoever wants it."""

    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()) and not _is_our_export(out):
        raise NanochatError(f"{out} exists and is not an earlier nanochat export: pass an empty or new --out DIR")
    if dtype not in ("auto", "fp32", "bf16", "int8", "int4"):
        raise NanochatError(f"--dtype must be one of auto, fp32, bf16 (got {dtype!r})")
    if dtype in ("int8", "int4"):
        raise NanochatError("export writes fp32 or bf16 weights (--dtype fp32|bf16): the exported model's code reads "
                            f"plain tensors; {dtype} is for nanochat's own chat/serve")
    wdtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    model, tokenizer, meta = load_model(checkpoint, device="cpu", dtype="fp32")
    cfg = model.config
    state = {k: v.detach().to(wdtype).contiguous() for k, v in model.state_dict().items()}
    # the HF file names the real vocab in its config; tokenizer.json must not encode specials as plain text
    # (ours does on purpose: only our code may emit them) - the chat template writes them as text
    tok_spec = json.loads(tokenizer.hf_tokenizer().to_str())
    with atomic_dir(out) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", hf_config(cfg, tokenizer))
        atomic_write_json(tmp / "generation_config.json", {
            "bos_token_id": tokenizer.get_bos_token_id(),
            "eos_token_id": [tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()],
            "pad_token_id": tokenizer.get_bos_token_id(),
            "do_sample": True, "temperature": 0.6, "top_k": 50,   # `nanochat chat`'s defaults
        })
        (tmp / "tokenizer.json").write_text(json.dumps(tok_spec, ensure_ascii=False), encoding="utf-8")
        atomic_write_json(tmp / "tokenizer_config.json", tokenizer_config(tokenizer, cfg))
        atomic_write_json(tmp / "special_tokens_map.json", {
            "bos_token": "<|bos|>", "eos_token": "<|assistant_end|>", "pad_token": "<|bos|>"})
        for name in CODE_FILES:
            shutil.copyfile(HF_CODE / name, tmp / name)
        atomic_write_json(tmp / "nanochat_export.json", {"checkpoint": meta.get("path"), "step": meta.get("step"),
                                                         "tokenizer_hash": tokenizer.hash})
        # temp dirs and atomic writes are private (0700/0600); a folder meant for sharing gets the usual modes
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
    return out


def summary(folder: Path) -> list[str]:
    """What `nanochat export` prints: the checkpoint the folder was made from (a run dir means its most
    trained stage's latest checkpoint, which for a run still training is only the latest so far) and, when
    that run is still training - its pipeline holds the run dir's lock - that a later export will have more."""
    record = json.loads((folder / "nanochat_export.json").read_text())
    ckpt = Path(record["checkpoint"])
    lines = [f"exported {ckpt} ({ckpt.parent.name}, step {record['step']}) -> {folder}"]
    run = ckpt.parent.parent
    if any(pid != os.getpid() for _, pid in holders(run / LOCK_NAME)):
        lines.append(f"run '{run.name}' is still training: this is its latest checkpoint so far; "
                     "export again when it finishes to get the final model")
    return lines


def _is_our_export(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") in (MODEL_TYPE, *OLD_MODEL_TYPES)
    except (OSError, ValueError, RecursionError, AttributeError):
        return False
