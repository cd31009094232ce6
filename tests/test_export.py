"""`nanochat export`: a Hugging Face folder that transformers loads and that computes what our model computes.
A real tiny model (3 layers, GQA with 1 KV head, sliding windows shorter than the test sequences, value
embeddings, weights perturbed away from the init so every part matters) saved as a real checkpoint in a run
directory, exported, then loaded with AutoModelForCausalLM / AutoTokenizer from the folder alone."""
import json
import os

import pytest
import torch
from typer.testing import CliRunner

from nanochat_core.inference import export as export_mod
from nanochat_core.gpt.checkpoint import save_checkpoint
from nanochat_core.gpt.model import GPT, config_for_depth

CONV = {"messages": [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 12*7? Use the calculator."},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute "},
        {"type": "python", "text": "12*7"},
        {"type": "python_output", "text": "84"},
        {"type": "text", "text": "It is 84."}]},
    {"role": "user", "content": [{"type": "text", "text": "Thanks, and "}, {"type": "text", "text": "héllo 世界!"}]},
    {"role": "assistant", "content": "You're welcome."},
]}


def make_run(run_dir, tokenizer):
    cfg = config_for_depth(3, tokenizer.get_vocab_size(), sequence_len=64, aspect_ratio=32, head_dim=16, n_kv_head=1)
    assert cfg.window_sizes() == [16, 16, None] and cfg.value_embed_layers() == [0, 2] and cfg.n_head == 6
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():   # the init zeroes projections and gates: perturb so every path changes the logits
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    tokenizer.save(run_dir / "tokenizer")
    save_checkpoint(run_dir / "base", 7, model, torch.optim.SGD(model.parameters(), lr=0.1),
                    {"stage": "base", "tokenizer_hash": tokenizer.hash})
    return model.eval()


@pytest.fixture(scope="module")
def exported(tiny_tokenizer, tmp_path_factory):
    # transformers copies the remote code into a module cache under HF_HOME, fixed when it is first imported
    before = os.environ.get("HF_HOME")
    os.environ["HF_HOME"] = str(tmp_path_factory.mktemp("hf_home"))
    from transformers import AutoModelForCausalLM, AutoTokenizer
    root = tmp_path_factory.mktemp("export")
    model = make_run(root / "run", tiny_tokenizer)
    out = export_mod.export(root / "run", root / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    yield model, tiny_tokenizer, hf_model, hf_tok, out
    if before is None:
        os.environ.pop("HF_HOME", None)
    else:
        os.environ["HF_HOME"] = before


def test_folder_has_what_the_hub_expects(exported):
    *_, out = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "modeling_nanochat.py", "configuration_nanochat.py"} <= names
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_nanochat.NanochatForCausalLM"
    assert cfg["window_sizes"] == [16, 16, 0] and cfg["value_embed_layers"] == [0, 2]
    assert (out.stat().st_mode & 0o055) and all(p.stat().st_mode & 0o044 for p in out.iterdir())  # shareable


def test_logits_equal_ours_in_fp32(exported, bundled_texts):
    model, tok, hf_model, _, _ = exported
    ids = torch.tensor([tok.encode(bundled_texts[3])[:60], tok.encode(bundled_texts[4])[:60]])  # > window 16
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(ids).logits
    assert theirs.shape == ours.shape == (2, 60, tok.get_vocab_size())
    assert ours.std() > 0.1                        # not a degenerate model: the comparison means something
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_kv_cache_decoding_matches_a_full_forward(exported, bundled_texts):
    model, tok, hf_model, _, _ = exported
    ids = torch.tensor([tok.encode(bundled_texts[5])[:40]])
    with torch.no_grad():
        full = model(ids)
        out = hf_model(ids[:, :20], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(20, 40):                     # one token at a time past the 16-token window
            out = hf_model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_tokenizer_gives_our_ids_for_text_and_for_a_rendered_conversation(exported, bundled_texts):
    _, tok, _, hf_tok, _ = exported
    for text in bundled_texts[:20] + ["héllo 世界 123456 \n\n  tabs\tand  spaces", "x" * 300]:
        assert hf_tok(text)["input_ids"] == tok.encode(text)
        assert hf_tok.decode(tok.encode(text)) == text
    literal = "a user typing <|bos|> or <|assistant_end|> gets plain text"
    assert hf_tok(literal, split_special_tokens=True)["input_ids"] == tok.encode(literal)
    full = hf_tok.apply_chat_template(CONV["messages"], tokenize=True)
    full = full["input_ids"] if hasattr(full, "keys") else full
    assert list(full) == tok.render_conversation(CONV)[0]
    prompt = hf_tok.apply_chat_template(CONV["messages"][:-1], tokenize=True, add_generation_prompt=True)
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    assert list(prompt) == tok.render_for_completion(CONV)
    with pytest.raises(Exception, match="alternate"):
        hf_tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tokenize=False)


def test_generate_with_the_kv_cache_matches_our_greedy_decoding(exported):
    model, tok, hf_model, hf_tok, _ = exported
    prompt = tok.render_for_completion({"messages": CONV["messages"][:2]})
    ours = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ours.append(int(model(torch.tensor([ours]))[0, -1].argmax()))
    stop = {tok.encode_special("<|assistant_end|>"), tok.encode_special("<|bos|>")}
    ours = ours[len(prompt):]
    ours = ours[:next((i + 1 for i, t in enumerate(ours) if t in stop), len(ours))]
    x = torch.tensor([prompt])
    cached = hf_model.generate(x, max_new_tokens=12, do_sample=False, use_cache=True)[0, len(prompt):].tolist()
    uncached = hf_model.generate(x, max_new_tokens=12, do_sample=False, use_cache=False)[0, len(prompt):].tolist()
    assert cached == uncached == ours
    # a left-padded batch (a shorter prompt beside it) continues the longer prompt exactly the same way
    short = tok.render_for_completion({"messages": [{"role": "user", "content": "Hi"}]})
    batch = torch.full((2, len(prompt)), tok.get_bos_token_id())
    batch[0] = x[0]
    batch[1, -len(short):] = torch.tensor(short)
    mask = torch.zeros_like(batch)
    mask[0] = 1
    mask[1, -len(short):] = 1
    out = hf_model.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert out[0, len(prompt):].tolist()[:len(ours)] == ours


def test_cli_exports_the_latest_local_run(tiny_tokenizer, tmp_path, monkeypatch):
    from nanochat_cli.main import app
    home = tmp_path / "home"
    monkeypatch.setenv("NANOCHAT_HOME", str(home))
    make_run(home / "runs" / "local", tiny_tokenizer)
    r = CliRunner().invoke(app, ["export", "--out", str(tmp_path / "hf")])
    assert r.exit_code == 0, r.stderr
    assert "trust_remote_code=True" in r.stdout
    meta = json.loads((tmp_path / "hf" / "nanochat_export.json").read_text())
    assert meta["step"] == 7 and meta["tokenizer_hash"] == tiny_tokenizer.hash
    # again into the same folder: an earlier export is replaced
    assert CliRunner().invoke(app, ["export", "--out", str(tmp_path / "hf")]).exit_code == 0


def test_cli_export_of_a_pulled_run_and_bad_input(tiny_tokenizer, tmp_path):
    from nanochat_cli import pull as pull_mod
    from nanochat_cli.main import app
    make_run(tmp_path / "node" / "run", tiny_tokenizer)
    pull_mod.copy_local(tmp_path / "node" / "run", tmp_path / "pulled")   # what `nanochat pull --dest` leaves
    r = CliRunner().invoke(app, ["export", "--checkpoint", str(tmp_path / "pulled"), "--out", str(tmp_path / "hf")])
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "hf" / "model.safetensors").stat().st_size > 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    r = CliRunner().invoke(app, ["export", "--checkpoint", str(tmp_path / "pulled"), "--out", str(tmp_path / "mine")])
    assert r.exit_code == 2 and "not an earlier nanochat export" in r.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    r = CliRunner().invoke(app, ["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_without_trust_remote_code_the_folder_fails_loudly_instead_of_loading_wrong(exported):
    """transformers 5 ships its own NanoChat under model_type "nanochat": a folder naming that type loads as
    that class without trust_remote_code, every weight of ours unused and randomly initialised. Ours names a
    type the real registry does not know, so every way of opening it without the flag stops with
    transformers' own "pass trust_remote_code=True" error."""
    from transformers import AutoConfig, AutoModelForCausalLM, pipeline
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    *_, out = exported
    config_type = json.loads((out / "config.json").read_text())["model_type"]
    assert "nanochat" in CONFIG_MAPPING and config_type not in CONFIG_MAPPING
    for open_it in (lambda: AutoModelForCausalLM.from_pretrained(out),
                    lambda: AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False),
                    lambda: AutoConfig.from_pretrained(out),
                    lambda: pipeline("text-generation", model=str(out))):
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            open_it()


def test_pipeline_with_trust_remote_code_generates_what_the_model_does(exported):
    from transformers import pipeline
    model, tok, hf_model, hf_tok, out = exported
    pipe = pipeline("text-generation", model=str(out), trust_remote_code=True)
    assert type(pipe.model).__name__ == "NanochatForCausalLM"
    torch.testing.assert_close(pipe.model.lm_head.weight, hf_model.lm_head.weight, atol=0, rtol=0)
    text = "The sea and the ships"
    got = pipe(text, max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    ids = torch.tensor([tok.encode(text)])
    want = hf_model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.size(1):].tolist()
    assert got == hf_tok.decode(want, skip_special_tokens=True)


def test_cli_export_names_the_checkpoint_it_took_and_says_when_the_run_is_still_training(tiny_tokenizer, tmp_path,
                                                                                          monkeypatch):
    """A run that is still training (its pipeline holds the run dir's lock) is exported from its latest
    checkpoint so far: the command says which one, and that a later export will have more."""
    import subprocess
    import sys
    from nanochat_cli.main import app
    home = tmp_path / "home"
    monkeypatch.setenv("NANOCHAT_HOME", str(home))
    rd = home / "runs" / "local"
    make_run(rd, tiny_tokenizer)
    ckpt = rd / "base" / "ckpt_000007"
    assert ckpt.is_dir()
    r = CliRunner().invoke(app, ["export", "--out", str(tmp_path / "hf")])
    assert r.exit_code == 0, r.stderr
    assert f"{ckpt} (base, step 7)" in r.stdout and "still training" not in r.stdout
    # a pipeline at work on the run: the real lock a pipeline takes, held by another process (make_run's save
    # took the lock for this process, as a trainer's does: let go of it first, as a finished trainer would)
    from nanochat_core.node import runlock
    os.close(runlock._held.pop(str(rd.resolve())))
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from nanochat_core.node import runlock; "
                               f"runlock.acquire({str(rd)!r}); print('locked', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = CliRunner().invoke(app, ["export", "--out", str(tmp_path / "hf")])
        assert r.exit_code == 0, r.stderr
        assert f"{ckpt} (base, step 7)" in r.stdout
        assert "run 'local' is still training" in r.stdout and "export again" in r.stdout
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
