"""`quantkit convert NAMESPACE/NAME[@REVISION]`: straight from a Hub repo, shard by shard, with bounded disk.

Everything runs offline against tests/hub_server.py on 127.0.0.1 (HF_ENDPOINT points at it), which serves the tiny
checkpoints in the Hub's URL layout. Each conversion is compared byte for byte with the same conversion of the local
folder; the number of source shards on disk is counted from the download folder itself each time one arrives.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_cli
from hub_server import HubServer

from quantkit.convert import convert
from quantkit.errors import QuantkitError
from quantkit.hub import source as hub_source
from quantkit.hub.source import HubSource, parse_repo_arg
from quantkit.synth import make_checkpoint

MANIFEST = "quantkit-manifest.json"
SHARD = 10**6  # source and output shards of about 1 MB: the tiny model becomes 15 of them


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> dict[str, Path]:
    """The tiny BF16 and FP8 checkpoints with ~1 MB shards: enough shards for deletion to matter."""
    root = tmp_path_factory.mktemp("hubsrc")
    out = {}
    for dtype, seed in (("bf16", 0), ("fp8", 1)):
        out[dtype] = root / f"tiny-{dtype}"
        make_checkpoint(out[dtype], preset="tiny", dtype=dtype, seed=seed, max_shard_bytes=SHARD)
    return out


@pytest.fixture(scope="module")
def hub(small_shards):
    server = HubServer().start()
    for dtype, folder in small_shards.items():
        server.add_repo(f"quantkit-test/tiny-{dtype}", folder)
    yield server
    server.stop()


@pytest.fixture
def hub_env(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the local server is the Hub here, whatever the caller's setting
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read at import
    return {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0"}


def tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


def assert_same_output(hub_out: Path, local_out: Path) -> None:
    """Every file byte-identical; the manifest identical but for the job's record of the Hub source."""
    a, b = tree(hub_out), tree(local_out)
    assert sorted(a) == sorted(b)
    for name in a:
        if name != MANIFEST:
            assert a[name] == b[name], name
    ma, mb = json.loads(a[MANIFEST]), json.loads(b[MANIFEST])
    assert ma["job"].pop("hub_source").startswith("quantkit-test/")
    assert ma == mb


@pytest.fixture
def count_shards(monkeypatch):
    """Record how many source shards sit in the download folder each time one has just arrived."""
    seen: list[int] = []
    fetch = HubSource._fetch

    def counting(self, name):
        path = fetch(self, name)
        seen.append(len(list(self.folder.glob("*.safetensors"))))
        return path

    monkeypatch.setattr(HubSource, "_fetch", counting)
    return seen


def test_parse_repo_arg(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_repo_arg("MiniMaxAI/MiniMax-M2") == ("MiniMaxAI/MiniMax-M2", None)
    assert parse_repo_arg("MiniMaxAI/MiniMax-M2@refs/pr/52") == ("MiniMaxAI/MiniMax-M2", "refs/pr/52")
    assert parse_repo_arg("some/../path") is None
    assert parse_repo_arg("/abs/folder") is None and parse_repo_arg("plain") is None
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert parse_repo_arg("org/local") is None  # an existing folder always wins


@pytest.mark.parametrize("dtype,target", [("bf16", "fp8"), ("fp8", "bf16")])
def test_convert_from_hub_is_identical_and_bounded(hub, hub_env, small_shards, count_shards, tmp_path, dtype,
                                                   target):
    repo = f"quantkit-test/tiny-{dtype}"
    src = small_shards[dtype]
    n_source = len(list(src.glob("*.safetensors")))
    victim = sorted(p.name for p in src.glob("*.safetensors"))[n_source // 2]
    hub.drop_once.add(victim)  # the connection breaks half way through this shard, once
    summary = convert(repo, tmp_path / "hub", target=target, max_shard_bytes=SHARD, progress=False)
    convert(src, tmp_path / "local", target=target, max_shard_bytes=SHARD, progress=False)
    assert_same_output(tmp_path / "hub", tmp_path / "local")

    assert victim in hub.dropped
    resumed = [r for r in hub.served_bytes(victim) if r and not r.startswith("bytes=0-")]
    assert resumed, "the interrupted download was not resumed with a Range request"
    assert len(count_shards) >= n_source >= 9
    print(f"{dtype}: {n_source} source shards, at most {max(count_shards)} on disk at once")
    assert max(count_shards) <= 3, count_shards  # a few shards at a time, never the model
    assert not (tmp_path / "hub.hub-download").exists()  # consumed and removed
    assert any("at most" in line and "deleted as consumed" in line for line in summary.lines())


def test_keep_source_keeps_a_verified_copy(hub_env, small_shards, tmp_path):
    convert("quantkit-test/tiny-bf16", tmp_path / "out", target="bf16", max_shard_bytes=SHARD, progress=False,
            keep_source=True, download_dir=tmp_path / "dl")
    kept = {p.name: p.read_bytes() for p in (tmp_path / "dl").glob("*.safetensors")}
    assert kept == {p.name: p.read_bytes() for p in small_shards["bf16"].glob("*.safetensors")}


def test_killed_run_resumes_without_downloading_consumed_shards(hub, hub_env, small_shards, tmp_path):
    repo = "quantkit-test/tiny-fp8"
    out, dl = tmp_path / "out", tmp_path / "out.hub-download"
    args = ("convert", repo, "--to", "bf16", "-o", out, "--max-shard-size", "1MB", "--no-progress")
    start = len(hub.log)
    killed = run_cli(*args, env={**hub_env, "QUANTKIT_CRASH_AFTER_SHARDS": "4"})
    assert killed.returncode == 137, killed.stderr
    state = json.loads((dl / hub_source.STATE_NAME).read_text())
    on_disk = {p.name for p in dl.glob("*.safetensors")}
    assert on_disk and on_disk == {n for n in state["verified"] if n.endswith(".safetensors")}
    assert len(on_disk) < len(list(small_shards["fp8"].glob("*.safetensors")))  # some already consumed, deleted

    done = run_cli(*args, "--resume", env=hub_env, check=True)
    assert "4 reused from an earlier run" in done.stdout
    convert(small_shards["fp8"], tmp_path / "local", target="bf16", max_shard_bytes=SHARD, progress=False)
    assert_same_output(out, tmp_path / "local")
    # Every shard was downloaded once over both runs: the consumed ones were not needed again, and the ones on
    # disk at the kill were trusted from the state file.
    whole = [p for method, p, rng in hub.log[start:] if method == "GET" and "/resolve/" in p and rng is None]
    shards = [p.rsplit("/", 1)[1] for p in whole if p.endswith(".safetensors")]
    assert sorted(shards) == sorted({p.name for p in small_shards["fp8"].glob("*.safetensors")})
    assert not dl.exists()


def test_corrupt_download_is_refused(hub, hub_env, tmp_path):
    name = sorted(n for n in hub.files("quantkit-test/tiny-bf16") if n.endswith(".safetensors"))[0]
    hub.corrupt.add(name)
    try:
        with pytest.raises(QuantkitError, match=rf"tiny-bf16/{name}: sha256 of the download is .* refused"):
            convert("quantkit-test/tiny-bf16", tmp_path / "out", max_shard_bytes=SHARD, progress=False)
    finally:
        hub.corrupt.discard(name)
    assert not (tmp_path / "out.hub-download" / name).exists()  # never left where a resumed run would trust it


def test_missing_repo_revision_and_pickles(hub, hub_env, tmp_path):
    hub.add_repo("quantkit-test/pickled", files={"config.json": b"{}", "pytorch_model.bin": b"\x80\x04" * 10})
    with pytest.raises(QuantkitError, match="no such Hub repository"):
        convert("quantkit-test/absent", tmp_path / "a", progress=False)
    with pytest.raises(QuantkitError, match="no such revision"):
        convert("quantkit-test/tiny-bf16@no-such-branch", tmp_path / "b", progress=False)
    with pytest.raises(QuantkitError, match="pickled weights are refused"):
        convert("quantkit-test/pickled", tmp_path / "c", progress=False)
    proc = run_cli("convert", "quantkit-test/absent", "--to", "bf16", "-o", tmp_path / "d", env=hub_env)
    assert_one_line_error(proc, "quantkit-test/absent", "no such Hub repository")


def test_single_file_repo_and_a_shared_download_dir(hub, hub_env, tmp_path):
    """A repo with one model.safetensors and no index; --download-dir naming a folder that holds other things."""
    src = tmp_path / "single"
    make_checkpoint(src, preset="tiny", layers=1, dtype="bf16", seed=3, max_shard_bytes=10**9)
    (src / "model.safetensors.index.json").unlink()
    (src / "model-00001-of-00001.safetensors").rename(src / "model.safetensors")
    (src / "quantkit-manifest.json").unlink()
    hub.add_repo("quantkit-test/single", src)
    dl = tmp_path / "downloads"
    dl.mkdir()
    (dl / "notes.txt").write_text("not quantkit's")
    convert("quantkit-test/single", tmp_path / "hub", target="bf16", max_shard_bytes=SHARD, progress=False,
            download_dir=dl)
    convert(src, tmp_path / "local", target="bf16", max_shard_bytes=SHARD, progress=False)
    assert_same_output(tmp_path / "hub", tmp_path / "local")
    assert sorted(p.name for p in dl.iterdir()) == ["notes.txt"]  # only what was downloaded went
    with pytest.raises(QuantkitError, match="--download-dir"):
        convert("quantkit-test/single", tmp_path / "o2", progress=False, download_dir=tmp_path / "o2" / "dl")


def test_one_process_per_download_folder(hub_env, tmp_path):
    first = HubSource.open("quantkit-test/tiny-bf16", None, tmp_path / "dl", progress=False)
    with pytest.raises(QuantkitError, match="another quantkit process is downloading into this folder"):
        HubSource.open("quantkit-test/tiny-bf16", None, tmp_path / "dl", progress=False)
    assert re.fullmatch(r"[0-9a-f]{40}", first.commit)  # "main" was pinned to the commit it pointed at
    first.finish()
    assert not (tmp_path / "dl").exists()


def test_gguf_from_hub_is_identical_bounded_and_resumes(hub, hub_env, small_shards, count_shards, tmp_path):
    """--to gguf from the Hub: the same bytes as from the local folder, a few source shards at a time (each GGUF
    tensor releases what no later one reads: stacked experts hold a layer's shards, FP8 scales their weights'),
    and a killed run resumes without fetching the shards its finished splits consumed."""
    repo, src = "quantkit-test/tiny-fp8", small_shards["fp8"]  # FP8: scales are sources too
    gguf = {"qtype": "q8_0", "split_max_bytes": 2 * SHARD}
    n_source = len(list(src.glob("*.safetensors")))
    summary = convert(repo, tmp_path / "hub", target="gguf", progress=False, gguf=gguf)
    convert(src, tmp_path / "local", target="gguf", progress=False, gguf=gguf)
    assert summary.shards >= 3  # several splits: the per-split resume path below has something to skip
    assert_same_output(tmp_path / "hub", tmp_path / "local")
    assert len(count_shards) >= n_source >= 9
    print(f"gguf: {n_source} source shards, at most {max(count_shards)} on disk at once")
    # A stacked-experts tensor reads all of its layer's experts, which span 4 of these 1 MB shards; the final norm,
    # read near the start, sits in the last layer's shard, which stays until that layer is written.
    assert max(count_shards) <= 5 < n_source, count_shards
    assert not (tmp_path / "hub.hub-download").exists()
    assert any("deleted as consumed" in line for line in summary.lines())

    out, dl = tmp_path / "out", tmp_path / "out.hub-download"
    args = ("convert", repo, "--to", "gguf", "--type", "q8_0", "-o", out, "--split-max-size", "2MB", "--no-progress")
    start = len(hub.log)
    killed = run_cli(*args, env={**hub_env, "QUANTKIT_CRASH_AFTER_SHARDS": "2"})
    assert killed.returncode == 137, killed.stderr
    on_disk = {p.name for p in dl.glob("*.safetensors")}
    assert len(on_disk) < n_source  # the finished splits' shards are gone
    done = run_cli(*args, "--resume", env=hub_env, check=True)
    assert "2 reused from an earlier run" in done.stdout
    assert_same_output(out, tmp_path / "local")
    whole = [p for method, p, rng in hub.log[start:] if method == "GET" and "/resolve/" in p and rng is None]
    shards = [p.rsplit("/", 1)[1] for p in whole if p.endswith(".safetensors")]
    assert sorted(shards) == sorted(p.name for p in src.glob("*.safetensors"))  # each fetched once over both runs
    assert not dl.exists()
