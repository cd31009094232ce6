"""
Your own data: a folder of documents to pre-train on, a JSONL file of conversations to fine-tune on, and
an identity for the assistant. Read, checked and packed ONCE (on the machine that starts the run) into a
"bundle" directory that the pipeline reads locally and that travels to a cloud node as it is:

    <bundle>/docs/shard_00000.parquet ...   documents as parquet shards; the LAST shard is the held-out slice
    <bundle>/docs/summary.json              files read, files skipped and why, characters, estimated tokens
    <bundle>/chat.jsonl                     the conversations that passed every check, one per line, each
                                            with "source": "file:line" so later problems still name the line
    <bundle>/identity.txt                   the system prompt ("You are Ada, ...")
    <bundle>/bundle.json                    what is in it, and whether bad input was skipped (--skip-bad)
    <bundle>/MANIFEST.sha256                sha256 of every file above; sha256(MANIFEST) names the bundle

Building is deterministic (same inputs -> the same bytes, so the same digest): a relaunched or resumed run
proves it reads exactly the bytes it started with by comparing that digest (Bundle.verify).

Documents: .txt/.md/.markdown/.text are one document per file; .jsonl one per line (its "text" field);
.parquet one per row (its "text" column); nested folders are walked, hidden files ignored, anything else
skipped with the reason in the summary. Long documents are cut into chunks at paragraph breaks: the
pre-training loader crops a document that does not fit a row and drops its tail, so a 1 MB file kept whole
would mostly never be read. Roughly one document in twenty (chosen by a hash of its text, so the choice does
not move when files are added) is held out for validation.

Bad input is never dropped silently: every problem is a `Problem(file, line, why)`; `settle` refuses the
run listing them (the default) or, with skip_bad, prints them and the count and goes on without them.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from nanochat_core.common import NanochatError, atomic_dir, atomic_write_text, data_dir, sha256_file
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from nanochat_core.data.dataset import open_parquet, split_shards
import pyarrow as pa
import pyarrow.parquet as pq

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".text"}
DOC_SUFFIXES = TEXT_SUFFIXES | {".jsonl", ".parquet"}
ROLES = ("system", "user", "assistant")
CHARS_PER_TOKEN = 4.0        # an estimate before the tokenizer exists (English prose with a 32K BPE: ~4.2-4.8)
CHUNK_CHARS = 4000           # a document is cut into pieces of at most this many characters
HOLD_OUT_EVERY = 20          # ~5% of documents become the validation slice
ROWS_PER_GROUP = 256         # documents per parquet row group (the loader's unit of shuffling)
DOCS_PER_SHARD = 50_000
BUNDLE_VERSION = 1
SHOW_PROBLEMS = 20           # problems listed in full; the rest are counted


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    why: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.why}" if self.line else f"{self.file}: {self.why}"


def settle(problems: list[Problem], what: str, skip_bad: bool, out=None) -> None:
    """Refuse (default) or report-and-skip the problems found in `what`; always with their count."""
    if not problems:
        return
    shown = "; ".join(str(p) for p in problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
    if not skip_bad:
        raise NanochatError(f"{len(problems)} problem(s) in {what}: {shown}. Fix them, or pass --skip-bad to "
                            "train without them")
    out = out or sys.stderr
    for p in problems[:SHOW_PROBLEMS]:
        print(f"skipped: {p}", file=out)
    more = f" ({len(problems) - SHOW_PROBLEMS} not listed)" if len(problems) > SHOW_PROBLEMS else ""
    print(f"skipped {len(problems)} bad item(s) in {what}{more} (--skip-bad)", file=out, flush=True)


def _decode_lines(raw: bytes, name: str) -> tuple[list[str | None], list[Problem]]:
    """Lines of a file; a line that is not UTF-8 becomes None with a Problem naming it."""
    lines, problems = [], []
    for n, chunk in enumerate(raw.split(b"\n"), 1):
        try:
            lines.append(chunk.decode("utf-8").removeprefix("\ufeff") if n == 1 else chunk.decode("utf-8"))
        except UnicodeDecodeError as e:
            problems.append(Problem(name, n, f"not UTF-8 (byte 0x{chunk[e.start]:02x} at column {e.start + 1}); "
                                             "save the file as UTF-8"))
            lines.append(None)
    return lines, problems


def _json_rows(lines: list[str | None], name: str, problems: list[Problem]):
    """(line number, parsed value) of each non-blank decoded line; one that is not JSON becomes a Problem."""
    for n, line in enumerate(lines, 1):
        if line is None or not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(Problem(name, n, f"not valid JSON ({e.msg} at column {e.colno})"))


# -----------------------------------------------------------------------------
# Documents

@dataclass
class DocSummary:
    files_read: int = 0
    skipped: list[str] = field(default_factory=list)     # "path: why" for every file not read (or read in part)
    documents: int = 0                                    # after chunking
    characters: int = 0
    estimated_tokens: int = 0
    held_out_documents: int = 0
    held_out_characters: int = 0
    shards: int = 0

    def line(self) -> str:
        skipped = f", {len(self.skipped)} skipped" if self.skipped else ""
        return (f"{self.files_read} file(s) read{skipped}; {self.characters:,} characters in {self.documents:,} "
                f"documents, about {self.estimated_tokens:,} tokens (estimated at {CHARS_PER_TOKEN:g} characters per "
                f"token); {self.held_out_documents} held out for validation")


def chunk_text(text: str, limit: int = CHUNK_CHARS) -> list[str]:
    """Pieces of at most `limit` characters, cut at a paragraph break, else a line break, else a space."""
    text = text.strip()
    out = []
    while len(text) > limit:
        window = text[:limit]
        cut = max(window.rfind("\n\n"), 0) or max(window.rfind("\n"), 0) or max(window.rfind(" "), 0) or limit
        if cut < limit // 4:     # no break in a sensible place: cut hard
            cut = limit
        out.append(text[:cut].strip())
        text = text[cut:].strip()
    if text:
        out.append(text)
    return [t for t in out if t]


def iter_document_files(folder: Path) -> Iterator[Path]:
    """Every file under `folder` (nested included) in a fixed order; hidden files and folders left out."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(root) / name


def read_documents(folder: str | os.PathLike, progress: bool = True) -> tuple[list[str], DocSummary, list[Problem]]:
    """All documents under `folder` (chunked), the summary, and the problems (bad lines, non-UTF-8 files).
    A folder with no readable document at all is refused whatever skip_bad says: there is nothing to train on."""
    folder = Path(folder).expanduser()
    files = list(iter_document_files(folder))
    summary, problems, docs = DocSummary(), [], []
    bar = Progress(TextColumn("[bold]your documents[/]"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[name]}"), disable=not progress, transient=True)
    with bar:
        task = bar.add_task("read", total=len(files), name="")
        for path in files:
            rel = path.relative_to(folder).as_posix()
            bar.update(task, name=rel[-40:])
            texts = _read_one(path, rel, summary, problems)
            if texts is not None:
                summary.files_read += 1
                for t in texts:
                    docs += chunk_text(t)
            bar.advance(task)
    if not docs:
        if problems:
            shown = "; ".join(str(p) for p in problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
            raise NanochatError(f"--data {folder}: no document could be read ({len(problems)} problem(s): {shown})")
        why = "; ".join(summary.skipped[:3]) or "the folder is empty"
        raise NanochatError(f"--data {folder} holds no documents to train on ({why}); put .txt, .md, .jsonl "
                            "(a \"text\" field per line) or .parquet (a \"text\" column) files in it")
    summary.documents = len(docs)
    summary.characters = sum(len(d) for d in docs)
    summary.estimated_tokens = int(summary.characters / CHARS_PER_TOKEN)
    return docs, summary, problems


def _read_one(path: Path, rel: str, summary: DocSummary, problems: list[Problem]) -> list[str] | None:
    suffix = path.suffix.lower()
    if suffix not in DOC_SUFFIXES:
        summary.skipped.append(f"{rel}: not a document format nanochat reads ({suffix or 'no extension'}; "
                               "use .txt, .md, .jsonl or .parquet)")
        return None
    if suffix == ".parquet":
        try:
            pf = open_parquet(path)
        except NanochatError as e:
            problems.append(Problem(rel, None, str(e).split(" (")[0].replace(str(path), "not readable parquet")
                                    if "column" not in str(e) else "has no 'text' column"))
            return None
        texts = [t for g in range(pf.num_row_groups)
                 for t in pf.read_row_group(g, columns=["text"]).column("text").to_pylist() if t and t.strip()]
        if not texts:
            summary.skipped.append(f"{rel}: no non-empty 'text' rows")
            return None
        return texts
    raw = path.read_bytes()
    if not raw.strip():
        summary.skipped.append(f"{rel}: empty")
        return None
    lines, bad = _decode_lines(raw, rel)
    if suffix in TEXT_SUFFIXES:
        if bad:   # one problem per file is enough: the whole file has the wrong encoding
            problems.append(bad[0])
            return None
        return ["\n".join(lines)]
    problems += bad
    texts = []
    for n, row in _json_rows(lines, rel, problems):
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            problems.append(Problem(rel, n, 'expected {"text": "..."} with a non-empty string'))
            continue
        texts.append(text)
    return texts


def held_out(text: str) -> bool:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % HOLD_OUT_EVERY == 0


def write_shards(docs: list[str], out: Path, summary: DocSummary) -> None:
    """Training shards then one validation shard (the held-out slice) into `out`, deterministically."""
    val = [d for d in docs if held_out(d)]
    train = [d for d in docs if not held_out(d)]
    if not val:                       # a tiny corpus: still hold something out
        val, train = train[-1:], train[:-1]
    if not train:                     # a single document: its last tenth is the held-out slice
        cut = max(1, len(val[0]) * 9 // 10)
        train, val = [val[0][:cut]], [val[0][cut:]]
    out.mkdir(parents=True, exist_ok=True)
    groups = [train[i:i + DOCS_PER_SHARD] for i in range(0, len(train), DOCS_PER_SHARD)] + [val]
    for i, rows in enumerate(groups):
        pq.write_table(pa.table({"text": pa.array(rows, pa.string())}), out / f"shard_{i:05d}.parquet",
                       row_group_size=ROWS_PER_GROUP, compression="zstd")
    summary.shards = len(groups)
    summary.held_out_documents = len(val)
    summary.held_out_characters = sum(len(v) for v in val)


# -----------------------------------------------------------------------------
# Conversations

def check_conversation(row: Any) -> str | None:
    """Why a parsed JSONL row is not a usable conversation, or None when it is."""
    msgs = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(msgs, list) or not msgs:
        return 'expected {"messages": [{"role": ..., "content": ...}, ...]}'
    expect = "user"
    for k, m in enumerate(msgs, 1):
        if not isinstance(m, dict):
            return f"message {k} is not an object with role and content"
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            return f"message {k} has unknown role {role!r} (use system, user or assistant)"
        if not isinstance(content, str) or not content.strip():
            return f"message {k} ({role}) is empty"
        if role == "system":
            if k != 1:
                return f"message {k} is a system message; only the first message may be one"
            continue
        if role != expect:
            return (f"message {k} is {role!r} where {expect!r} was expected: turns must alternate user/assistant, "
                    "starting with the user")
        expect = "assistant" if role == "user" else "user"
    if msgs[-1]["role"] != "assistant":
        return "the conversation does not end with an assistant message (nothing to learn from its last turn)"
    return None


def read_conversations(path: str | os.PathLike) -> tuple[list[dict], list[Problem]]:
    """The good conversations of a chat JSONL (each with "source": "name:line") and every problem found."""
    path = Path(path).expanduser()
    name = path.name
    lines, problems = _decode_lines(path.read_bytes(), name)
    rows = []
    for n, row in _json_rows(lines, name, problems):
        why = check_conversation(row)
        if why:
            problems.append(Problem(name, n, why))
            continue
        rows.append({"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]],
                     "source": f"{name}:{n}"})
    if not rows and not problems:
        raise NanochatError(f"--chat-data {path} holds no conversations: one "
                            '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]} per line')
    problems.sort(key=lambda p: p.line or 0)
    return rows, problems


def too_long(rows: list[dict], tokenizer, max_tokens: int) -> list[Problem]:
    """Conversations that do not fit the model's context (they would be cut mid-answer)."""
    out = []
    for row in rows:
        n = len(tokenizer.render_conversation(row, max_tokens=1 << 62)[0])
        if n > max_tokens:
            file, _, line = row.get("source", "chat:0").rpartition(":")
            out.append(Problem(file, int(line) if line.isdigit() else None,
                               f"conversation is {n} tokens, longer than the model's context ({max_tokens})"))
    return out


def fitting(bundle: Bundle, rows: list[dict], tokenizer, max_tokens: int) -> list[dict]:
    """`rows` (the bundle's conversations) without those longer than the model's context: refused, or with
    --skip-bad listed on stdout, counted and left out."""
    long = too_long(rows, tokenizer, max_tokens)
    if long:
        settle(long, f"the conversations in {bundle.info['chat']['file']}", bundle.info["skip_bad"], out=sys.stdout)
    dropped = {f"{p.file}:{p.line}" for p in long}
    return [r for r in rows if r["source"] not in dropped]


def split_held_out(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, held out): a few conversations (at most 3, about one in ten, none below 4) that training never
    sees; the report shows the model answering their questions."""
    if len(rows) < 4:
        return rows, []
    k = min(3, max(1, len(rows) // 10))
    ranked = sorted(range(len(rows)), key=lambda i: hashlib.sha256(rows[i]["source"].encode()).hexdigest())
    held = set(ranked[:k])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


# -----------------------------------------------------------------------------
# Identity

def read_identity(spec: str) -> str:
    """--identity: the text itself, or a file holding it."""
    text = spec
    if len(spec) < 4096 and "\n" not in spec:
        p = Path(spec).expanduser()
        if p.is_file():
            try:
                text = p.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise NanochatError(f"--identity {p}: not UTF-8 (byte {e.start}); save it as UTF-8") from None
    text = text.strip()
    if not text:
        raise NanochatError("--identity is empty: say who the assistant is, e.g. \"You are Ada, the support "
                            "assistant of Example Corp.\"")
    return text


def assistant_name(identity: str) -> str | None:
    m = re.search(r"\b(?:[Yy]ou are|[Yy]ou're|[Yy]our name is|I am|I'm|[Mm]y name is)\s+(?:called\s+)?([A-Z][\w'-]*)",
                  identity)
    return m.group(1) if m else None


def first_person(identity: str) -> str:
    """The identity's first sentence as the assistant would say it: "You are Ada, ..." -> "I am Ada, ..."."""
    first = re.split(r"(?<=[.!?])\s", identity.strip(), maxsplit=1)[0]
    swaps = [(r"\bYou are\b", "I am"), (r"\byou are\b", "I am"), (r"\bYou're\b", "I'm"), (r"\byou're\b", "I'm"),
             (r"\bYour\b", "My"), (r"\byour\b", "my"), (r"\bYou\b", "I"), (r"\byou\b", "me")]
    for pat, rep in swaps:
        first = re.sub(pat, rep, first)
    if not first.endswith((".", "!", "?")):
        first += "."
    return first


IDENTITY_QUESTIONS = ["Who are you?", "who are you?", "who are you", "What is your name?", "what's your name?",
                      "Tell me about yourself.", "Introduce yourself.", "Hi! Who am I talking to?", "hello",
                      "What should I call you?", "Are you ChatGPT?", "Who am I talking to?"]


def identity_conversations(identity: str) -> list[dict]:
    """Who-are-you conversations answered from the identity, each once with the identity as its system
    prompt (what `nanochat chat` and `serve` send by default) and once without (a client that sends none)."""
    me = first_person(identity)
    name = assistant_name(identity)
    out = []
    for q in IDENTITY_QUESTIONS:
        # Every answer starts with the same sentence: a toy model fine-tuned for a minute learns the most
        # frequent opening first, and this makes it the identity's (a larger model learns the rest too).
        answer = me
        if q == "Are you ChatGPT?":
            answer = f"{me} I am not ChatGPT."
        elif ("name" in q.lower() or "call you" in q.lower()) and name:
            answer = f"{me} You can call me {name}."
        elif q == "hello":
            answer = f"{me} How can I help you?"
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]
        out.append({"messages": [{"role": "system", "content": identity}] + msgs})
        out.append({"messages": msgs})
    return out


def with_system(row: dict, identity: str | None) -> dict:
    """A conversation with the identity as its system prompt, unless it brings its own."""
    msgs = row["messages"]
    if not identity or (msgs and msgs[0]["role"] == "system"):
        return row
    return {**row, "messages": [{"role": "system", "content": identity}] + msgs}


def share_epochs(base_size: int, extras: list[tuple[int, float]]) -> tuple[float, list[float]]:
    """Epochs for a base mixture of `base_size` conversations and extra sets (size, share of the result) so
    that each extra set makes up its share. Shares summing to 1 drop the base mixture."""
    total_share = sum(s for _, s in extras)
    if any(not 0 <= s <= 1 for _, s in extras) or total_share > 1 + 1e-9:
        raise NanochatError(f"the shares of your conversations and identity add up to {total_share:.2f}; "
                            "keep them within 0-1")
    if total_share >= 1 - 1e-9 or base_size == 0:
        biggest = max((n for n, s in extras if s > 0), default=1)
        return 0.0, [s / max(total_share, 1e-9) * biggest / n if n else 0.0 for n, s in extras]
    total = base_size / (1 - total_share)
    return 1.0, [s * total / n if n else 0.0 for n, s in extras]


# -----------------------------------------------------------------------------
# The bundle

@dataclass
class Bundle:
    path: Path
    digest: str                   # sha256 of MANIFEST.sha256
    info: dict                    # bundle.json

    @property
    def docs(self) -> Path | None:
        return self.path / "docs" if self.info.get("docs") else None

    @property
    def chat(self) -> Path | None:
        return self.path / "chat.jsonl" if self.info.get("chat") else None

    @property
    def identity(self) -> str | None:
        return (self.path / "identity.txt").read_text(encoding="utf-8") if self.info.get("identity") else None

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def verify(self, digest: str | None) -> Bundle:
        """Every file against the manifest, and the manifest against the digest the run was planned with. On a
        node this runs before training: an upload cut short or a changed file stops the run here."""
        if digest and self.digest != digest:
            raise NanochatError(f"your data at {self.path} is not the data this run was started with (manifest "
                                f"sha256 {self.digest[:12]}..., expected {digest[:12]}...); start a new run with "
                                "--name NEW to train on changed data")
        for line in (self.path / "MANIFEST.sha256").read_text().splitlines():
            want, _, rel = line.partition("  ")
            f = self.path / rel
            if ".." in Path(rel).parts or not f.is_file() or sha256_file(f) != want:
                raise NanochatError(f"your data at {self.path}: {rel} is missing or damaged (sha256 mismatch); "
                                    "launch again to upload it afresh")
        return self

    def mixed_with(self, public: Path, share: float) -> Path:
        """A shard directory of `public` and your documents at `share` of the characters (mix_dir), said out loud."""
        mixed, got = mix_dir(public, self.docs, share)
        print(f"your documents: mixed with {public.name} at {got:.0%} of the characters (asked for {share:.0%}) "
              f"in {mixed}", flush=True)
        return mixed

    def check_with_tokenizer(self, run_dir: Path, context_len: int) -> int | None:
        """Once the run's tokenizer exists (before base training spends anything): conversations longer than the
        model's context are refused (or skipped with --skip-bad). Returns your documents' training tokens
        (None without documents)."""
        from nanochat_core.data.tokenizer import get_tokenizer   # lazy: torch, which `nanochat train` never loads
        tok = get_tokenizer(run_dir)
        fitting(self, conversations(self), tok, context_len + 1)
        if self.docs is None:
            return None
        per_shard = (pq.read_table(shard, columns=["text"]).column("text").to_pylist()
                     for shard in split_shards(self.docs, "train"))
        return sum(len(ids) for texts in per_shard for ids in tok.encode(texts, prepend=tok.get_bos_token_id()))


def _fingerprint(docs: Path | None, chat: Path | None, identity: str | None, skip_bad: bool) -> str:
    """Cheap key of the inputs (paths, sizes, mtimes, flags) so that an unchanged folder is not re-read."""
    h = hashlib.sha256(json.dumps([BUNDLE_VERSION, identity, skip_bad]).encode())
    for root in (docs, chat):
        if root is None:
            h.update(b"-")
            continue
        files = [root] if root.is_file() else list(iter_document_files(root))
        for p in files:
            st = p.stat()
            h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def build_bundle(docs: str | os.PathLike | None = None, chat: str | os.PathLike | None = None,
                 identity: str | None = None, skip_bad: bool = False, progress: bool = True,
                 out=None) -> Bundle:
    """Read, check and pack the user's data once (reused while the inputs are unchanged); prints the summary."""
    out = out or sys.stderr
    docs_p = Path(docs).expanduser().resolve() if docs else None
    chat_p = Path(chat).expanduser().resolve() if chat else None
    if docs_p is not None and not docs_p.is_dir():
        raise NanochatError(f"--data {docs}: no such folder")
    if chat_p is not None and not chat_p.is_file():
        raise NanochatError(f"--chat-data {chat}: no such file")
    key = _fingerprint(docs_p, chat_p, identity, skip_bad)
    final = data_dir() / f"yours-{key[:16]}"
    if (final / "MANIFEST.sha256").is_file():
        bundle = load_bundle(final)
        print(f"your data: already prepared in {final} ({_describe(bundle.info)})", file=out, flush=True)
        return bundle
    info: dict[str, Any] = {"version": BUNDLE_VERSION, "skip_bad": skip_bad, "docs": None, "chat": None,
                            "identity": bool(identity)}
    with atomic_dir(final) as tmp:
        if docs_p is not None:
            texts, summary, problems = read_documents(docs_p, progress=progress)
            settle(problems, f"the documents in {docs_p}", skip_bad, out)
            summary.skipped += [str(p) for p in problems]
            write_shards(texts, tmp / "docs", summary)
            info["docs"] = asdict(summary)
            (tmp / "docs" / "summary.json").write_text(json.dumps(info["docs"], indent=2, sort_keys=True) + "\n")
            print(f"your documents: {summary.line()}", file=out, flush=True)
            for s in summary.skipped[:SHOW_PROBLEMS]:
                print(f"  skipped {s}", file=out)
        if chat_p is not None:
            rows, problems = read_conversations(chat_p)
            settle(problems, f"the conversations in {chat_p}", skip_bad, out)
            if not rows:
                raise NanochatError(f"--chat-data {chat_p}: no conversation passed the checks")
            train, held = split_held_out(rows)
            (tmp / "chat.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n"
                                                    for r in rows), encoding="utf-8")
            info["chat"] = {"file": chat_p.name, "conversations": len(rows), "held_out": len(held),
                            "skipped": len(problems)}
            print(f"your conversations: {len(rows)} read, {len(problems)} skipped, {len(held)} held out for "
                  "the report", file=out, flush=True)
        if identity:
            (tmp / "identity.txt").write_text(identity, encoding="utf-8")
        (tmp / "bundle.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        write_manifest(tmp)
    return load_bundle(final)


def _describe(info: dict) -> str:
    parts = []
    if info.get("docs"):
        parts.append(f"{info['docs']['documents']:,} documents, ~{info['docs']['estimated_tokens']:,} tokens")
    if info.get("chat"):
        parts.append(f"{info['chat']['conversations']} conversations")
    if info.get("identity"):
        parts.append("an identity")
    return ", ".join(parts) or "nothing"


def write_manifest(folder: Path) -> None:
    lines = [f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}"
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "MANIFEST.sha256"]
    atomic_write_text(folder / "MANIFEST.sha256", "\n".join(lines) + "\n")


def load_bundle(path: str | os.PathLike) -> Bundle:
    path = Path(path)
    manifest = path / "MANIFEST.sha256"
    if not manifest.is_file():
        raise NanochatError(f"{path} is not a prepared data bundle (no MANIFEST.sha256)")
    info = json.loads((path / "bundle.json").read_text())
    return Bundle(path, hashlib.sha256(manifest.read_bytes()).hexdigest(), info)


def conversations(bundle: Bundle) -> list[dict]:
    if bundle.chat is None:
        return []
    return [json.loads(line) for line in bundle.chat.read_text(encoding="utf-8").splitlines() if line.strip()]


# -----------------------------------------------------------------------------
# --data: one public source, one folder of yours, or both with your share

@dataclass
class DataSpec:
    public: str | None            # a source name, URL list or shard directory for dataset.resolve_source
    docs: str | None              # a folder of your documents
    docs_share: float | None      # your documents' share of pre-training when mixed


def parse_data_spec(spec: str | None, is_public) -> DataSpec:
    """`bundled`, `./my_docs`, or `bundled,./my_docs:0.2` (your documents are 20% of what pre-training reads).
    is_public(item) says whether an item is a known public source (name or URL list) rather than a folder."""
    if not spec:
        return DataSpec(None, None, None)
    public = docs = share = None
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        path, sep, tail = item.rpartition(":")
        part_share = None
        if sep and re.fullmatch(r"\d*\.?\d+", tail):
            item, part_share = path, float(tail)
        if is_public(item):
            if public:
                raise NanochatError(f"--data {spec}: one public corpus at a time")
            if part_share is not None:
                raise NanochatError(f"--data {spec}: put the share on your folder (e.g. climbmix,./docs:0.2)")
            public = item
        else:
            if docs:
                raise NanochatError(f"--data {spec}: one folder of documents at a time (nested folders are read)")
            docs, share = item, part_share
    if share is not None and not 0 < share < 1:
        raise NanochatError(f"--data {spec}: the share of your documents must be between 0 and 1 (e.g. 0.2)")
    if share is not None and public is None:
        raise NanochatError(f"--data {spec}: a share needs a public corpus to mix with, e.g. bundled,{docs}:{share:g}")
    if docs and public and share is None:
        share = 0.5
    return DataSpec(public, docs, share)


def mix_dir(public: Path, docs: Path, share: float) -> tuple[Path, float]:
    """A shard directory that mixes a public corpus with your documents at `share` of the characters:
    symlinks, your training shards repeated as often as the share needs (whole repeats, at least one), the
    public validation shard last. Returns (dir, how many times your documents are repeated)."""
    pub_train, pub_val = split_shards(public, "train"), split_shards(public, "val")
    mine = split_shards(docs, "train")
    pub_chars, my_chars = _chars(pub_train), max(1, _chars(mine))
    repeats = max(1, round(share / (1 - share) * pub_chars / my_chars))
    key = hashlib.sha256(f"{public.resolve()}|{docs.resolve()}|{share}|{len(pub_train)}".encode()).hexdigest()[:16]
    out = data_dir() / f"mix-{key}"
    if not (out / "zz_validation.parquet").exists():
        with atomic_dir(out) as tmp:
            # interleaved, so that the first shards (what the tokenizer reads) hold both corpora
            for i, p in enumerate(_interleave(pub_train, [p for _ in range(repeats) for p in mine])):
                (tmp / f"mix_{i:06d}.parquet").symlink_to(p.resolve())
            (tmp / "zz_validation.parquet").symlink_to(pub_val[0].resolve())
    return out, repeats * my_chars / max(1, pub_chars + repeats * my_chars)


def _interleave(a: list, b: list) -> list:
    out, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        if j >= len(b) or (i < len(a) and i * len(b) <= j * len(a)):
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    return out


def _chars(shards: list[Path]) -> int:
    """Characters of text in shards, from their parquet footers (uncompressed size of the text column)."""
    total = 0
    for p in shards:
        meta = pq.ParquetFile(p).metadata
        total += sum(meta.row_group(g).column(0).total_uncompressed_size for g in range(meta.num_row_groups))
    return total
