"""`quantkit publish`: write the model card, then upload a finished output folder to the Hugging Face Hub.

    quantkit publish M2-FP8 --repo me/MiniMax-M2-FP8 --dry-run        # README.md written, the upload plan printed
    quantkit publish M2-FP8 --repo me/MiniMax-M2-FP8 --eval eval-fp8  # card with the eval table, then upload

Only a finished folder is published: a quantkit safetensors output needs its manifest marked complete with every
shard present at its recorded size (and the small files at their recorded sha256); a GGUF output needs its manifest,
when it has one, to say the same, and otherwise a full set of llama.cpp splits (`NAME-00001-of-0000N.gguf`), each
starting with the GGUF magic.

The upload is a few commits rather than one: weight files in batches of at most `commit_bytes` (default 50 GB) and
`commit_files`, then every small file with the card last, so that a repo that has a card is complete. Each commit
goes through `HfApi.upload_folder` restricted to its files, which in huggingface_hub 2.x is the resumable uploader
(with hf_xet: chunked, deduplicated, itself split into commits; without it: one LFS commit). Re-running an
interrupted publish skips every file the Hub already holds with the same content, so it resumes where it stopped.
(huggingface_hub 2.x has no separate `upload_large_folder`: `upload_folder` took over its resumable pipeline.)

The token is whatever huggingface_hub finds (HF_TOKEN, or `hf auth login`); quantkit never reads it except to keep
it out of error messages, and never prints, logs or writes it.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.checkpoint.writer import INDEX_NAME, LOCK_NAME, MANIFEST_NAME
from quantkit.errors import QuantkitError
from quantkit.hub.card import CardFacts, Format, describe_format, render_card
from quantkit.hub.source import endpoint, hub_error

COMMIT_BYTES = 50 * 10**9
COMMIT_FILES = 100
GGUF_SPLIT = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<n>\d{5})\.gguf$")  # llama.cpp gguf-split naming
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


@dataclass
class Commit:
    message: str
    files: list[tuple[str, int]]  # (path in the folder and the repo, bytes)

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.files)


@dataclass
class Layout:
    fmt: Format
    manifest: dict
    weights: list[str]  # weight files (safetensors shards or GGUF splits), in order
    files: dict[str, int] = field(default_factory=dict)  # everything uploaded: path -> bytes


def _size(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e7 else f"{n / 1e3:.1f} kB"


def _files(folder: Path) -> dict[str, int]:
    """Every regular file to upload: hidden files and folders (lock, caches) and partial writes left out."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) and not p.name.endswith(".partial"):
            out[rel.as_posix()] = p.stat().st_size
    return out


def _check_unlocked(folder: Path) -> None:
    lock = folder / LOCK_NAME
    if not lock.exists():
        return
    with open(lock, "rb") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise QuantkitError(f"{folder}: a quantkit conversion is still writing into this folder") from None
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _manifest(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise QuantkitError(f"{path}: unreadable manifest; the output is not a finished quantkit run") from None
    if not isinstance(data, dict):
        raise QuantkitError(f"{path}: not a quantkit manifest")
    return data


def check_safetensors(folder: Path, files: dict[str, int]) -> Layout:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise QuantkitError(f"{folder}: no {MANIFEST_NAME}; only a finished quantkit output is published")
    m = _manifest(path)
    if m.get("complete") is not True or not isinstance(m.get("shards"), dict):
        raise QuantkitError(f"{path}: the conversion is unfinished; complete it with quantkit convert --resume")
    for name, rec in sorted(m["shards"].items()):
        if files.get(name) != (rec.get("bytes") if isinstance(rec, dict) else None):
            got = "missing" if name not in files else f"{files[name]} bytes"
            raise QuantkitError(f"{folder / name}: {got}, the manifest records {rec.get('bytes')} bytes; reconvert "
                                "with --resume")
    for name, digest in sorted((m.get("files") or {}).items()):
        if name == "README.md":
            continue  # the card replaces the source model's card
        p = folder / name
        if not p.is_file() or hashlib.sha256(p.read_bytes()).hexdigest() != digest:
            raise QuantkitError(f"{p}: missing or changed since the conversion (sha256 differs from the manifest)")
    if not (folder / INDEX_NAME).is_file() and len(m["shards"]) > 1:
        raise QuantkitError(f"{folder}: no {INDEX_NAME}; the conversion did not finish")
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else None
    return Layout(describe_format(config), m, sorted(m["shards"]), files)


def check_gguf(folder: Path, files: dict[str, int]) -> Layout:
    ggufs = sorted(n for n in files if n.endswith(".gguf") and "/" not in n)
    manifests = [folder / MANIFEST_NAME] + sorted(folder.glob("*manifest*.json"))
    path = next((p for p in manifests if p.is_file()), None)
    m = _manifest(path) if path else {}
    if path is not None:
        if m.get("complete") is not True:
            raise QuantkitError(f"{path}: the GGUF conversion is unfinished; complete it with --resume")
        listed = m.get("shards") or m.get("files") or m.get("splits") or {}  # quantkit.gguf_convert: "shards"
        items = listed.items() if isinstance(listed, dict) else ((e.get("name"), e) for e in listed)
        for name, rec in items:
            size = rec.get("bytes", rec.get("size")) if isinstance(rec, dict) else None
            if name not in files or (size is not None and files[name] != size):
                raise QuantkitError(f"{folder / str(name)}: missing or not the size the manifest records")
    groups: dict[str, set[int]] = {}
    totals: dict[str, int] = {}
    for name in ggufs:
        if mt := GGUF_SPLIT.match(name):
            groups.setdefault(mt["prefix"], set()).add(int(mt["no"]))
            totals[mt["prefix"]] = int(mt["n"])
    for prefix, nos in groups.items():
        missing = sorted(set(range(1, totals[prefix] + 1)) - nos)
        if missing:
            raise QuantkitError(f"{folder}: GGUF split {prefix}-{missing[0]:05d}-of-{totals[prefix]:05d}.gguf is "
                                "missing")
    types: dict[str, int] = {}
    for name in ggufs:
        with open(folder / name, "rb") as f:
            if f.read(4) != b"GGUF":
                raise QuantkitError(f"{folder / name}: not a GGUF file (no GGUF magic)")
    try:
        from gguf import GGUFReader

        for name in ggufs:
            for t in GGUFReader(str(folder / name)).tensors:
                types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    except Exception as e:  # gguf-py raises plain ValueError and friends on a damaged file
        raise QuantkitError(f"{folder}: a GGUF file cannot be read ({e})") from None
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else None
    layout = Layout(describe_format(config, types), m, ggufs, files)
    return layout


def check_complete(folder: str | Path) -> Layout:
    """The folder's layout, or a one-line refusal when it is not a finished output."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QuantkitError(f"{folder}: no such output folder")
    _check_unlocked(folder)
    files = _files(folder)
    if any(n.endswith(".gguf") for n in files):
        return check_gguf(folder, files)
    return check_safetensors(folder, files)


def plan_commits(layout: Layout, what: str, commit_bytes: int = COMMIT_BYTES,
                 commit_files: int = COMMIT_FILES) -> list[Commit]:
    """Weight files in batches, then every other file (the card among them) in the last commit."""
    weights = [(n, layout.files[n]) for n in layout.weights]
    rest = [(n, s) for n, s in layout.files.items() if n not in set(layout.weights)]
    if "README.md" not in layout.files:
        rest.append(("README.md", 0))  # written before the upload
    batches: list[list[tuple[str, int]]] = []
    for name, size in weights:
        if not batches or len(batches[-1]) >= commit_files or (
                batches[-1] and sum(s for _, s in batches[-1]) + size > commit_bytes):
            batches.append([])
        batches[-1].append((name, size))
    batches.append(sorted(rest, key=lambda f: (f[0] == "README.md", f[0])))
    n = len(batches)
    return [Commit(f"Upload {what}" + (f" (part {i + 1} of {n})" if n > 1 else ""), b) for i, b in enumerate(batches)]


def format_plan(folder: Path, repo_id: str, private: bool, revision: str | None, commits: list[Commit],
                card_path: Path, dry_run: bool) -> str:
    vis = "private" if private else "public"
    lines = [f"publish {folder} -> {repo_id} ({vis}, branch {revision or 'main'}){', dry run' if dry_run else ''}",
             f"card: {card_path} ({card_path.stat().st_size} bytes)"]
    for i, c in enumerate(commits):
        lines.append(f"commit {i + 1}/{len(commits)}: {len(c.files)} files, {_size(c.nbytes)}: {c.message}")
        lines += [f"  {name}  {_size(size)}" for name, size in c.files]
    total = sum(c.nbytes for c in commits)
    lines.append(f"total: {sum(len(c.files) for c in commits)} files, {_size(total)} in {len(commits)} commits")
    return "\n".join(lines)


def _scrub(e: Exception) -> Exception:
    """Make sure no error message carries the token, whatever the server echoed back."""
    from huggingface_hub import get_token

    token = get_token()
    if token and token in str(e):
        return QuantkitError(str(e).replace(token, "<token>"))
    return e


def publish(folder: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
            dry_run: bool = False, eval_dirs: list[str | Path] | None = None, base_model: str | None = None,
            commit_bytes: int = COMMIT_BYTES, commit_files: int = COMMIT_FILES, echo=print) -> list[Commit]:
    folder = Path(folder)
    if not REPO_ID.match(repo_id):
        raise QuantkitError(f"--repo {repo_id!r}: expected NAMESPACE/NAME")
    for d in eval_dirs or []:
        if not Path(d).is_dir():
            raise QuantkitError(f"--eval {d}: no such folder")
    layout = check_complete(folder)
    facts = CardFacts.collect(folder, repo_id, layout.fmt, layout.files, layout.weights, layout.manifest,
                              [Path(d) for d in eval_dirs or []], base_model)
    card = folder / "README.md"
    tmp = folder / ".README.md.partial"
    tmp.write_text(render_card(facts), encoding="utf-8")
    tmp.replace(card)
    layout.files["README.md"] = card.stat().st_size
    what = f"{layout.fmt.name} quantization of {facts.base_model or 'MiniMax-M2'} (quantkit)"
    commits = plan_commits(layout, what, commit_bytes, commit_files)
    echo(format_plan(folder, repo_id, private, revision, commits, card, dry_run))
    if facts.base_model is None:
        echo("note: no base model known (the source was a local folder): pass --base-model to name it on the card")
    if dry_run:
        return commits
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint())
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        for i, c in enumerate(commits):
            info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                     allow_patterns=[glob.escape(name) for name, _ in c.files],
                                     commit_message=c.message)
            echo(f"commit {i + 1}/{len(commits)} done: {getattr(info, 'oid', None) or 'nothing new'}")
    except QuantkitError:
        raise
    except Exception as e:
        raise hub_error(f"{repo_id}", _scrub(e)) from None
    echo(f"published {endpoint()}/{repo_id}" + (f"/tree/{revision}" if revision else ""))
    return commits
