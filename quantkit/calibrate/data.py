"""Calibration samples: text from local files, a Hub dataset, or the built-in set, tokenized into equal windows.

    ids = calibration_tokens("MiniMax-M2", None, n_samples=128, seq_len=512)          # built-in set, offline
    ids = calibration_tokens("MiniMax-M2", ["chats.jsonl", "code.txt"], 64, 1024, chat=True)
    ids = calibration_tokens("MiniMax-M2", ["allenai/c4"], 128, 512)                   # Hub dataset (online)

Sources: `.txt`/`.md` (one sample per blank-line-separated paragraph block), source code such as `.py` (one sample
per file), `.jsonl` (a "text" field, or chat "messages"), `.parquet` (a "text" or "messages" column), a folder of
such files, or a Hub dataset name. Chat samples ("messages") are
always rendered with the checkpoint's own chat template; `chat=True` also wraps plain text as a conversation, since
MiniMax-M2 is an agent model and sees most of its tokens inside that template. The samples are tokenized with the
checkpoint's tokenizer, joined with the end-of-sequence token between them and cut into `n_samples` windows of
`seq_len` tokens: no padding, so every calibration token is a real one.

The built-in set (`builtin_samples`) is quantkit's own: prose, code and data lines from the tokenizer's training
corpus generator, plus chat and tool-call conversations rendered with the template. It needs no network.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from quantkit import tokenizer as tok
from quantkit.errors import QuantkitError

TEXT_SUFFIXES = (".txt", ".md")  # one sample per paragraph
SOURCE_SUFFIXES = (".py", ".c", ".h", ".cc", ".cpp", ".rs", ".go", ".js", ".ts", ".java", ".sh")  # one per file

_QUESTIONS = (
    "Summarise this for me in two sentences.",
    "Can you explain what this does?",
    "Rewrite this more clearly.",
    "What is wrong here, if anything?",
    "Turn this into a short checklist.",
)
_TOOLS = (
    ("get_weather", "Current weather for a city.", {"city": "string", "unit": "string"}),
    ("search_web", "Search the web and return the top results.", {"query": "string", "limit": "integer"}),
    ("read_file", "Read a file from the workspace.", {"path": "string"}),
    ("run_python", "Run a Python snippet and return stdout.", {"code": "string"}),
)


def _tool_schema(name: str, desc: str, params: dict) -> dict:
    props = {k: {"type": v} for k, v in params.items()}
    return {"type": "function", "function": {"name": name, "description": desc,
                                             "parameters": {"type": "object", "properties": props,
                                                            "required": list(params)}}}


def _chat_sample(i: int, text: str, other: str) -> tuple[list[dict], list[dict] | None]:
    """A conversation built around corpus text: plain Q&A, or a tool-call round trip with reasoning."""
    question = _QUESTIONS[i % len(_QUESTIONS)]
    if i % 2 == 0:
        return [{"role": "user", "content": f"{question}\n\n{text.strip()}"},
                {"role": "assistant", "content": other.strip()}], None
    name, desc, params = _TOOLS[i % len(_TOOLS)]
    args = {k: (str(len(text) % 50) if v == "integer" else text.split()[0] if text.split() else "x")
            for k, v in params.items()}
    messages = [
        {"role": "user", "content": f"Use a tool if you need one. {question}\n\n{text.strip()[:400]}"},
        {"role": "assistant", "reasoning_content": f"The user wants {question.lower()} I will call {name} first.",
         "content": "", "tool_calls": [{"type": "function", "function": {"name": name, "arguments": args}}]},
        {"role": "tool", "content": json.dumps({"ok": True, "result": other.strip()[:300]})},
        {"role": "assistant", "content": other.strip()},
    ]
    return messages, [_tool_schema(name, desc, params)]


def builtin_samples(ckpt: str | Path, chat: bool = False) -> Iterator[str]:
    """quantkit's own calibration text: corpus chunks and template-rendered chat/tool conversations, interleaved
    (with chat=True every sample is a rendered conversation)."""
    chunks = [c for c in tok.build_corpus(seed=7, n_chunks=1200, n_nonsense=0) if len(c) > 40]
    for i, text in enumerate(chunks):
        if chat or i % 3 == 2:
            messages, tools = _chat_sample(i, text, chunks[(i * 7 + 3) % len(chunks)])
            yield tok.apply_chat_template(ckpt, messages, add_generation_prompt=False, tools=tools)
        else:
            yield text


def _as_text(record: object, ckpt: str | Path, chat: bool, where: str) -> str | None:
    if isinstance(record, str):
        text = record
    elif isinstance(record, dict) and isinstance(record.get("messages"), list):
        return tok.apply_chat_template(ckpt, record["messages"], add_generation_prompt=False,
                                       tools=record.get("tools"))
    elif isinstance(record, dict) and isinstance(record.get("text"), str):
        text = record["text"]
    else:
        raise QuantkitError(f"{where}: a sample needs a string 'text' field or a 'messages' list")
    if not text.strip():
        return None
    if chat:
        return tok.apply_chat_template(ckpt, [{"role": "user", "content": text}], add_generation_prompt=True)
    return text


def _file_records(path: Path) -> Iterator[tuple[object, str]]:
    suffix = path.suffix.lower()
    if path.is_dir():  # every calibration file inside, in name order
        for p in sorted(path.rglob("*")):
            if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + SOURCE_SUFFIXES + (".jsonl", ".parquet"):
                yield from _file_records(p)
        return
    if suffix in SOURCE_SUFFIXES:
        try:
            yield path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as e:
            raise QuantkitError(f"{path}: cannot read UTF-8 text ({e})") from None
    elif suffix in TEXT_SUFFIXES:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise QuantkitError(f"{path}: cannot read UTF-8 text ({e})") from None
        for n, block in enumerate(text.split("\n\n")):
            yield block, f"{path} paragraph {n + 1}"
    elif suffix == ".jsonl":
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise QuantkitError(f"{path}: cannot read UTF-8 text ({e})") from None
        for n, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                yield json.loads(line), f"{path} line {n + 1}"
            except json.JSONDecodeError as e:
                raise QuantkitError(f"{path} line {n + 1}: not JSON ({e.msg})") from None
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise QuantkitError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises its own error types
            raise QuantkitError(f"{path}: cannot read parquet ({e})") from None
        cols = [c for c in ("messages", "text") if c in table.column_names]
        if not cols:
            raise QuantkitError(f"{path}: parquet needs a 'text' or 'messages' column (has {table.column_names})")
        for n, value in enumerate(table.column(cols[0]).to_pylist()):
            yield {cols[0]: value}, f"{path} row {n + 1}"
    else:
        raise QuantkitError(f"{path}: calibration files must be .txt, .md, .jsonl, .parquet or source code "
                            f"({', '.join(SOURCE_SUFFIXES)})")


def _hub_records(name: str) -> Iterator[tuple[object, str]]:
    """A Hub dataset, NAME or NAME:SPLIT (default split train), streamed."""
    try:
        import datasets
    except ImportError:
        raise QuantkitError(f"--calib {name}: not a local file, and loading Hub datasets needs the "
                            "`datasets` package (pip install datasets)") from None
    ds_name, _, split = name.partition(":")
    try:
        ds = datasets.load_dataset(ds_name, split=split or "train", streaming=True)
        for n, row in enumerate(ds):
            yield row, f"{name} row {n + 1}"
    except QuantkitError:
        raise
    except Exception as e:  # offline, unknown dataset, gated: one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QuantkitError(f"--calib {name}: not a local file, and the Hub dataset cannot be loaded ({first})") \
            from None


def sample_texts(ckpt: str | Path, sources: list[str] | None, chat: bool = False) -> Iterator[str]:
    """Every calibration text of the sources in order (the built-in set when there are none)."""
    if not sources:
        yield from builtin_samples(ckpt, chat)
        return
    for src in sources:
        path = Path(src)
        records = _file_records(path) if path.exists() else _hub_records(src)
        for record, where in records:
            text = _as_text(record, ckpt, chat, where)
            if text is not None:
                yield text


def calibration_tokens(ckpt: str | Path, sources: list[str] | None = None, n_samples: int = 128,
                       seq_len: int = 512, chat: bool = False) -> torch.Tensor:
    """Token ids [n_samples, seq_len] (int64): the sources' texts tokenized, joined by EOS and cut in windows."""
    if n_samples < 1 or seq_len < 2:
        raise QuantkitError(f"--n-samples {n_samples} --seq-len {seq_len}: need at least 1 sample of 2 tokens")
    tokenizer = tok.load_tokenizer(ckpt)
    eos = _eos_id(ckpt, tokenizer)
    need = n_samples * seq_len
    stream: list[int] = []
    for text in sample_texts(ckpt, sources, chat):
        stream += tokenizer.encode(text, add_special_tokens=False).ids
        stream.append(eos)
        if len(stream) >= need:
            break
    if len(stream) < need:
        have = len(stream) // seq_len
        if have == 0:
            raise QuantkitError(f"--calib: {len(stream)} tokens in all, fewer than one window of --seq-len {seq_len}")
        raise QuantkitError(f"--calib: {len(stream)} tokens give {have} windows of {seq_len}, fewer than "
                            f"--n-samples {n_samples}; add text or lower --n-samples/--seq-len")
    return torch.tensor(stream[:need], dtype=torch.long).view(n_samples, seq_len)


def _eos_id(ckpt: str | Path, tokenizer) -> int:
    path = Path(ckpt) / "generation_config.json"
    for p in (path, Path(ckpt) / "config.json"):
        if p.is_file():
            try:
                eos = json.loads(p.read_text()).get("eos_token_id")
            except (OSError, ValueError):
                continue
            if isinstance(eos, list) and eos:
                return int(eos[0])
            if isinstance(eos, int):
                return eos
    return tokenizer.get_vocab_size() - 1
