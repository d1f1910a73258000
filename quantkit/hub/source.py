"""Convert straight from a Hub repo: shards fetched on demand, checksummed, and deleted once consumed.

    quantkit convert MiniMaxAI/MiniMax-M2@main --to fp8 -o M2-FP8          # free disk: the output + a few shards

    src = HubSource.open("MiniMaxAI/MiniMax-M2@main", Path("M2-FP8.hub-download"))
    reader = CheckpointReader(src.folder, remote=src)   # every shard header by an HTTP Range request
    src.plan_release(reader, out_shards)
    ...  reader.tensor(name) downloads the shard holding it the first time; src.shard_done(i, reader) after
         output shard i deletes the source shards that no later output shard needs

Design. The conversion already streams one tensor at a time in a plan fixed up front (output shards in order, each
tensor tagged with its unit: a layer, the embeddings, the head). So the source needs only two things: (1) every shard
header before anything is converted, which a Range request for the first 8 bytes plus the header length gives
without downloading the data (the plan, the job fingerprint and all input validation work unchanged), and (2) a
shard's bytes the first time a tensor in it is read. A source shard is released once no later output shard needs a
tensor it stores: an output tensor needs the source tensor of the same name and its scale, or, for a format that
renames or stacks tensors, every tensor of its unit (a layer), the one thing every planner's output and reads have in
common. Releasing only at output-shard boundaries means a killed run, resumed, never needs a deleted
shard again: everything read from it is in finished output shards, which `--resume` keeps.

Downloads go through `huggingface_hub.hf_hub_download` into a download folder beside the output (pinned to the
commit the revision resolved to, so a moving branch cannot mix two versions), which resumes an interrupted transfer
with a Range request. Each file is then checked against the Hub's own record: the sha256 of LFS files, the git blob
sha1 of small ones; a mismatch is fetched once more, then refused. `.quantkit-hub.json` in the download folder lists
the files already verified, so a resumed run trusts them and drops anything else it finds there.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from quantkit.checkpoint.reader import CHANNEL_SCALE_SUFFIX, PICKLE_SUFFIXES, SCALE_SUFFIX
from quantkit.checkpoint.safetensors_file import MAX_HEADER, TensorEntry, parse_header, read_header
from quantkit.errors import QuantkitError

STATE_NAME = ".quantkit-hub.json"
LOCK_NAME = ".quantkit-hub.lock"
AUX_LIMIT = 64 << 20  # small files (config, tokenizer, index) fetched up front, as convert copies them
HASH_CHUNK = 16 << 20
# Hub repo ids: namespace/name of letters, digits, '-', '_', '.'; an optional @revision (branch, tag or commit)
REPO_ARG = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}(?:@[\w./-]+)?$")


def parse_repo_arg(text: str) -> tuple[str, str | None] | None:
    """(repo_id, revision) when `text` names a Hub repo rather than a local folder, else None."""
    if Path(text).exists() or not REPO_ARG.match(text) or ".." in text:
        return None
    repo, _, rev = text.partition("@")
    return repo, rev or None


def default_download_dir(output: Path) -> Path:
    return output.parent / f"{output.name}.hub-download"


def endpoint() -> str:
    """The Hub endpoint, read when used (HF_ENDPOINT), not when huggingface_hub was imported."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_error(where: str, e: Exception) -> QuantkitError:
    """One line for a failed Hub request: what was asked and why it failed, never the request headers."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(e, GatedRepoError):
        return QuantkitError(f"{where}: gated repository; accept its terms on the Hub and log in (hf auth login)")
    if isinstance(e, RevisionNotFoundError):
        return QuantkitError(f"{where}: no such revision on the Hub")
    if isinstance(e, RepositoryNotFoundError):
        return QuantkitError(f"{where}: no such Hub repository (or it is private and no token with access is set)")
    first = (str(e).strip().splitlines() or [""])[0]
    return QuantkitError(f"{where}: Hub request failed ({type(e).__name__}: {first})")


def file_digest(path: Path, algo: str) -> str:
    """sha256 of the content, or the git blob sha1 ("blob SIZE\\0" + content) that the Hub lists for small files."""
    h = hashlib.new(algo)
    if algo == "sha1":
        h.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str | None  # LFS files: the content's sha256, as the Hub records it
    blob_id: str  # git blob sha1 (of the LFS pointer, for LFS files)

    @property
    def digest(self) -> tuple[str, str]:
        return ("sha256", self.sha256) if self.sha256 else ("sha1", self.blob_id)


class _QuietBar(tqdm):
    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


class HubSource:
    """A Hub repo at one commit, mirrored into `folder` on demand."""

    def __init__(self, repo_id: str, commit: str, folder: Path, files: dict[str, RemoteFile], keep: bool,
                 progress: bool):
        self.repo_id, self.commit, self.folder, self.files = repo_id, commit, folder, files
        self.keep, self.progress = keep, progress
        self.verified: dict[str, str] = {}  # file name -> digest, for files on disk and checked
        self.present: set[str] = set()  # weight shards on disk now
        self.peak_shards = 0
        self.peak_bytes = 0
        self.downloaded_bytes = 0
        self.downloads = 0
        self._needed_after: list[set[str]] = []
        self._lock_fd: int | None = None

    @property
    def spec(self) -> str:
        return f"{self.repo_id}@{self.commit}"

    # ---- opening --------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, repo_id: str, revision: str | None, folder: str | Path, keep: bool = False,
             progress: bool = True) -> HubSource:
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile

        where = f"{repo_id}@{revision}" if revision else repo_id
        api = HfApi(endpoint=endpoint())
        try:
            commit = api.model_info(repo_id, revision=revision).sha
            listing = [f for f in api.list_repo_tree(repo_id, recursive=True, revision=commit)
                       if isinstance(f, RepoFile) and "/" not in f.path]
        except Exception as e:  # huggingface_hub and httpx raise many types; every one becomes one line
            raise hub_error(where, e) from None
        if not commit:
            raise QuantkitError(f"{where}: the Hub did not say which commit this revision is")
        files = {f.path: RemoteFile(f.path, int(f.size), f.lfs.sha256 if f.lfs else None, f.blob_id) for f in listing}
        weights = [n for n in files if n.endswith(".safetensors")]
        if not weights:
            pickled = sorted(n for n in files if Path(n).suffix in PICKLE_SUFFIXES)
            if pickled:
                raise QuantkitError(f"{repo_id}/{pickled[0]}: pickled weights are refused (unpickling runs arbitrary "
                                    "code); convert them to safetensors first")
            raise QuantkitError(f"{where}: no safetensors weights in the repository")
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise QuantkitError(f"{folder}: cannot create the download folder ({e.strerror})") from None
        src = cls(repo_id, commit, folder, files, keep, progress)
        src._lock()
        src._load_state()
        for name, f in sorted(files.items()):
            small = f.size <= AUX_LIMIT and not name.startswith(".")  # .gitattributes is not the model's
            if small and not name.endswith(".safetensors") and Path(name).suffix not in PICKLE_SUFFIXES:
                src._fetch(name)  # config, generation config, tokenizer, chat template, index: before any weights
        return src

    def _lock(self) -> None:
        """One process per download folder: a second one would delete the first one's partial downloads."""
        fd = os.open(self.folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise QuantkitError(f"{self.folder}: another quantkit process is downloading into this folder") from None
        self._lock_fd = fd  # held until finish() or the process ends

    def _load_state(self) -> None:
        """Trust the files a previous run of this same commit verified; check any other file of the repo's names
        found here (kept when it matches the Hub's checksum, deleted otherwise)."""
        path = self.folder / STATE_NAME
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            state = {}
        if not isinstance(state, dict) or state.get("repo") != self.repo_id or state.get("commit") != self.commit:
            state = {}
        verified = state.get("verified") if isinstance(state.get("verified"), dict) else {}
        for name, remote in self.files.items():
            p = self.folder / name
            if not p.is_file():
                continue
            trusted = verified.get(name) == remote.digest[1]
            if p.stat().st_size == remote.size and (trusted or file_digest(p, remote.digest[0]) == remote.digest[1]):
                self.verified[name] = remote.digest[1]
                if name.endswith(".safetensors"):
                    self.present.add(name)
            else:  # a leftover of another revision, or a damaged file: fetched again when needed
                self._forget(name)
        # A killed download leaves its temporary file behind (huggingface_hub names it per process): remove it.
        cache = self.folder / ".cache" / "huggingface" / "download"
        if cache.is_dir():
            for p in cache.glob("*.incomplete"):
                p.unlink(missing_ok=True)
        self._save_state()
        self._count()

    def _save_state(self) -> None:
        state = {"repo": self.repo_id, "commit": self.commit, "verified": dict(sorted(self.verified.items()))}
        tmp = self.folder / f".{STATE_NAME}.partial"
        tmp.write_text(json.dumps(state, indent=1) + "\n")
        os.replace(tmp, self.folder / STATE_NAME)

    def _count(self) -> None:
        self.peak_shards = max(self.peak_shards, len(self.present))
        self.peak_bytes = max(self.peak_bytes, sum(self.files[n].size for n in self.present))

    # ---- downloading ----------------------------------------------------------------------------------------

    def _fetch(self, name: str) -> Path:
        """Download one file (resuming an interrupted transfer), check it against the Hub's checksum, record it."""
        from huggingface_hub import hf_hub_download

        path = self.folder / name
        if name in self.verified:
            return path
        remote = self.files[name]
        algo, want = remote.digest
        for _attempt in range(2):
            try:
                hf_hub_download(self.repo_id, name, revision=self.commit, local_dir=self.folder,
                                endpoint=endpoint(), tqdm_class=None if self.progress else _QuietBar)
            except Exception as e:
                raise hub_error(f"{self.repo_id}/{name}", e) from None
            got = file_digest(path, algo)
            if got == want:
                break
            self._forget(name)
        else:
            raise QuantkitError(f"{self.repo_id}/{name}: {algo} of the download is {got}, the Hub lists {want}; "
                                "downloaded twice, refused")
        self.verified[name] = want
        self.downloads += 1
        self.downloaded_bytes += remote.size
        if name.endswith(".safetensors"):
            self.present.add(name)
            self._count()
        self._save_state()
        return path

    def _forget(self, name: str) -> None:
        """Delete a file and huggingface_hub's record of it (else it would be trusted as already downloaded)."""
        (self.folder / name).unlink(missing_ok=True)
        (self.folder / ".cache" / "huggingface" / "download" / f"{name}.metadata").unlink(missing_ok=True)
        self.verified.pop(name, None)
        self.present.discard(name)

    def _range(self, name: str, start: int, length: int) -> bytes:
        """Bytes [start, start + length) of a file on the Hub, by an HTTP Range request."""
        from huggingface_hub import constants
        from huggingface_hub.file_download import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

        url = hf_hub_url(self.repo_id, name, revision=self.commit, endpoint=endpoint())
        headers = build_hf_headers()  # the token from HF_TOKEN or the login; httpx drops it on a cross-host redirect
        headers.update({"Range": f"bytes={start}-{start + length - 1}", "Accept-Encoding": "identity"})
        data = bytearray()
        try:
            with http_stream_backoff("GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as r:
                hf_raise_for_status(r)
                skip = start if r.status_code == 200 else 0  # a server that ignores Range sends the whole file
                for chunk in r.iter_bytes():
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                    data += chunk
                    if len(data) >= length:
                        break
        except Exception as e:
            raise hub_error(f"{self.repo_id}/{name}", e) from None
        if len(data) < length:
            raise QuantkitError(f"{self.repo_id}/{name}: the Hub sent {len(data)} of {length} header bytes")
        return bytes(data[:length])

    # ---- the reader's interface (CheckpointReader(remote=...)) ------------------------------------------------

    def shard_names(self) -> list[str]:
        return sorted(n for n in self.files if n.endswith(".safetensors"))

    def has(self, name: str) -> bool:
        return name in self.files

    def header(self, path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
        """A shard's validated header: from the file when it is already here, else from its first bytes on the Hub."""
        name = path.name
        if name in self.verified:
            return read_header(path)
        if name not in self.files:
            raise QuantkitError(f"{self.repo_id}/{name}: missing shard (listed in the index, not in the repository)")
        size = self.files[name].size
        if size < 8:
            raise QuantkitError(f"{self.repo_id}/{name}: corrupt safetensors file (shorter than its 8-byte header "
                                "length)")
        (n,) = struct.unpack("<Q", self._range(name, 0, 8))
        if n > MAX_HEADER or 8 + n > size:
            raise QuantkitError(f"{self.repo_id}/{name}: corrupt safetensors header (header length {n} exceeds the "
                                "file)")
        return parse_header(path, self._range(name, 8, n), size)

    def ensure(self, path: Path) -> None:
        if path.name not in self.verified:
            self._fetch(path.name)

    # ---- releasing consumed shards -----------------------------------------------------------------------------

    def plan_release(self, reader, out_shards: list) -> None:
        """From the output shards, in write order, work out which source shards are still needed after each one.

        An output tensor reads the source tensor of its own name and that tensor's scale (a scale output reads its
        weight too); a tensor named otherwise (a format that renames or stacks) reads every tensor of its unit."""
        unit_of = {spec.name: unit.name for unit in reader.config.units() for spec in unit.tensors}
        files_of_unit: dict[str, set[str]] = {}
        for name, entry in reader.entries.items():
            base = name.removesuffix(SCALE_SUFFIX).removesuffix(CHANNEL_SCALE_SUFFIX)
            unit = unit_of.get(name) or unit_of.get(base)
            if unit is not None:
                files_of_unit.setdefault(unit, set()).add(entry.file.name)

        def sources(t) -> set[str]:
            base = t.name.removesuffix(SCALE_SUFFIX).removesuffix(CHANNEL_SCALE_SUFFIX)
            names = {t.name, base, base + SCALE_SUFFIX, base + CHANNEL_SCALE_SUFFIX}
            found = {reader.entries[n].file.name for n in names if n in reader.entries}
            return found or files_of_unit.get(t.unit, set())

        needed: set[str] = set()
        after: list[set[str]] = []
        for shard in reversed(out_shards):
            after.append(set(needed))
            for t in shard.tensors:
                needed |= sources(t)
        self._needed_after = after[::-1]

    def shard_done(self, index: int, reader) -> None:
        """Output shard `index` is written (or verified): delete the source shards no later one needs."""
        if self.keep:
            return
        needed = self._needed_after[index] if index < len(self._needed_after) else set()
        done = sorted(n for n in self.present if n not in needed)
        if done:
            reader.close()  # no mapping of a deleted file stays open
            for name in done:
                self._forget(name)
            self._save_state()

    def finish(self) -> None:
        """After a complete conversion: what was downloaded goes, unless --keep-source. Only files of the repo and
        quantkit's own bookkeeping are deleted, then the folder if that left it empty: --download-dir may name a
        folder that holds other things."""
        if not self.keep:
            for name in list(self.verified):
                self._forget(name)
            shutil.rmtree(self.folder / ".cache" / "huggingface", ignore_errors=True)
            for p in (self.folder / ".cache", self.folder):
                try:
                    if p == self.folder:
                        (p / STATE_NAME).unlink(missing_ok=True)
                        (p / LOCK_NAME).unlink(missing_ok=True)
                    p.rmdir()
                except OSError:
                    pass  # not empty: someone else's files stay
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def lines(self) -> list[str]:
        where = f"kept in {self.folder}" if self.keep else "deleted as consumed"
        return [f"source {self.spec}: {self.downloads} files, {self.downloaded_bytes / 1e9:.3f} GB downloaded; "
                f"at most {self.peak_shards} shards ({self.peak_bytes / 1e9:.3f} GB) on disk at once, {where}"]

