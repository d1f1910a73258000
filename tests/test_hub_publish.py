"""`quantkit publish`: the model card, the upload plan, refusals, and the upload itself against a local Hub.

The card is parsed with huggingface_hub's ModelCard; its evaluation table is checked against a real `quantkit eval`
of the tiny FP8 conversion. Uploads go to tests/hub_server.py (preupload, LFS batch and PUT, ndjson commits) with
hf_xet switched off, which is the protocol huggingface_hub falls back to and the one a test server can speak.
"""

from __future__ import annotations

import fcntl
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from hub_server import HubServer
from safetensors.torch import save_file

from quantkit.checkpoint.writer import LOCK_NAME
from quantkit.convert import convert
from quantkit.errors import QuantkitError
from quantkit.hub.card import read_card_metadata
from quantkit.hub.publish import Layout, plan_commits, publish

FAKE_TOKEN = "hf_quantkitTestTokenThatMustNeverAppear0123"
BASE = "MiniMaxAI/MiniMax-M2"


@pytest.fixture(scope="module")
def fp8_out(tiny_bf16, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pub") / "tiny-fp8-block"
    convert(tiny_bf16, out, target="fp8", max_shard_bytes=2 * 10**6, progress=False)
    return out


@pytest.fixture(scope="module")
def eval_dir(fp8_out, tiny_bf16, tmp_path_factory) -> Path:
    from quantkit.evals.report import run_eval

    out = tmp_path_factory.mktemp("pub") / "eval"
    run_eval(fp8_out, tiny_bf16, out, window=64, max_windows=2)
    rows = [{"format": "bf16 (reference)", "path": "ref", "bytes": 15_000_000, "bits_per_weight": 16.0,
             "kld_mean": 0.0, "kld_p99": 0.0, "top1": 1.0, "perplexity": 2321.27, "needle": 0.5,
             "needle_cases": 6, "tokens_per_s": 40.0},
            {"format": "fp8-block", "path": "q", "bytes": 8_100_000, "bits_per_weight": 8.03, "kld_mean": 0.00031,
             "kld_p99": 0.0009, "top1": 0.857, "perplexity": 2317.42, "needle": 0.5, "needle_cases": 6,
             "tokens_per_s": 38.5}]
    (out / "comparison.json").write_text(json.dumps({"device": "cpu", "rows": rows}))
    # Calibration statistics as quantkit.calibrate saves them: routed-token counts per layer, options beside them.
    counts = {"model.layers.0.routed.count": torch.tensor([40, 0, 12, 8]),
              "model.layers.1.routed.count": torch.tensor([20, 20, 15, 5])}
    save_file(counts, str(out / "stats.safetensors"), metadata={"quantkit": "calibration-stats"})
    (out / "stats.json").write_text(json.dumps({"samples": 4, "seq_len": 32, "tokens": 128, "experts": "routed",
                                                "min_tokens": 4, "format": 1, "fallback": {"0.w13": [1]}}))
    return out


@pytest.fixture
def out(fp8_out, tmp_path) -> Path:
    """A private copy: publishing writes README.md into the folder."""
    dest = tmp_path / "tiny-fp8-block"
    shutil.copytree(fp8_out, dest)
    return dest


@pytest.fixture(scope="module")
def hub():
    server = HubServer().start()
    yield server
    server.stop()


@pytest.fixture
def hub_env(hub, monkeypatch, tmp_path):
    from huggingface_hub import constants

    env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": FAKE_TOKEN,
           "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "0"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # read at import: the flag itself
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return env


def test_dry_run_writes_a_valid_card_with_the_eval_table(out, eval_dir):
    from huggingface_hub import ModelCard

    lines: list[str] = []
    commits = publish(out, "me/tiny-fp8", dry_run=True, eval_dirs=[eval_dir], base_model=BASE, echo=lines.append)
    text = (out / "README.md").read_text()
    card = ModelCard(text)
    meta = card.data.to_dict()
    assert meta["base_model"] == BASE and meta["base_model_relation"] == "quantized"
    assert meta["license"] == "other" and meta["license_name"] == "modified-mit"
    assert meta["license_link"] == "https://github.com/MiniMax-AI/MiniMax-M2/blob/main/LICENSE"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"fp8", "quantkit", "minimax_m2"} <= set(meta["tags"])

    res = json.loads((eval_dir / "results.json").read_text())["fidelity"]
    for value in (f"{res['kld_mean']:.5f}", f"{res['kld_p99']:.5f}", f"{res['top1_agreement']:.4f}",
                  f"{res['ppl_quant']:.3f}", f"{res['ppl_reference']:.3f}"):
        assert value in card.text, value
    assert "| fp8-block | 8.10 | 8.03 | 0.00031 |" in card.text  # the comparison row
    assert "`fp8-block` (built in)" in card.text  # the recipe, found from the manifest's digest
    assert "128x128 block" in card.text and "vllm serve me/tiny-fp8" in card.text
    assert "sglang.launch_server" in card.text and "AutoModelForCausalLM" in card.text
    assert "llama-server" not in card.text  # no GGUF here
    assert "Quantization error (relative RMS" in card.text
    assert "samples 4; seq len 32; tokens 128" in card.text
    assert "2 layers x 4 experts" in card.text and "min 0, median 15, max 40; 1 of the 8 (layer, expert)" in card.text

    plan = "\n".join(lines)
    assert "dry run" in plan and f"card: {out / 'README.md'}" in plan
    for p in out.iterdir():
        if p.is_file() and not p.name.startswith("."):
            assert p.name in plan, p.name  # every file listed, with its size
    assert commits[-1].files[-1][0] == "README.md"  # the card comes last
    assert f"in {len(commits)} commits" in plan


def test_plan_batches_a_large_output():
    """MiniMax-M2 in FP8: 130 shards of 1.8 GB go up in 50 GB commits, then the small files and the card."""
    files = {f"model-{i:05d}-of-00130.safetensors": 1_800_000_000 for i in range(1, 131)}
    files.update({"config.json": 2_000, "tokenizer.json": 9_000_000, "model.safetensors.index.json": 9_000_000})
    layout = Layout(fmt=None, manifest={}, weights=sorted(n for n in files if n.endswith(".safetensors")),
                    files=files)
    commits = plan_commits(layout, "fp8")
    assert len(commits) == 6  # 27 + 27 + 27 + 27 + 22 shards, then the rest
    assert all(c.nbytes <= 50 * 10**9 for c in commits[:-1])
    assert [n for n, _ in commits[-1].files][-1] == "README.md"
    assert sum(len(c.files) for c in commits) == len(files) + 1
    assert commits[0].message.endswith("(part 1 of 6)")


def test_source_card_license_is_kept(out):
    (out / "README.md").write_text("---\nlicense: other\nlicense_name: minimax-model-license\nlicense_link: "
                                   "https://example.org/LICENSE\n---\n# source card\n")
    publish(out, "me/x", dry_run=True, base_model="MiniMaxAI/MiniMax-M2.5", echo=lambda s: None)
    meta = read_card_metadata(out / "README.md")
    assert (meta["license_name"], meta["license_link"]) == ("minimax-model-license", "https://example.org/LICENSE")
    publish(out, "me/x", dry_run=True, base_model="MiniMaxAI/MiniMax-M2.5", echo=lambda s: None)  # again: kept
    assert read_card_metadata(out / "README.md")["license_name"] == "minimax-model-license"


def test_incomplete_or_busy_folders_are_refused(out, tmp_path):
    manifest = json.loads((out / "quantkit-manifest.json").read_text())
    unfinished = dict(manifest, complete=False)
    (out / "quantkit-manifest.json").write_text(json.dumps(unfinished))
    proc = run_cli("publish", out, "--repo", "me/x", "--dry-run")
    assert_one_line_error(proc, "quantkit-manifest.json", "unfinished")
    assert not (out / "README.md").exists() or "quantkit" not in (out / "README.md").read_text()

    (out / "quantkit-manifest.json").write_text(json.dumps(manifest))
    shard = sorted(out.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(QuantkitError, match=rf"{shard.name}: missing"):
        publish(out, "me/x", dry_run=True, echo=lambda s: None)

    with pytest.raises(QuantkitError, match="no quantkit-manifest.json"):
        publish(tmp_path, "me/x", dry_run=True, echo=lambda s: None)
    with pytest.raises(QuantkitError, match="expected NAMESPACE/NAME"):
        publish(out, "not a repo", dry_run=True, echo=lambda s: None)


def test_folder_being_converted_is_refused(out):
    with open(out / LOCK_NAME, "w") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        with pytest.raises(QuantkitError, match="still writing"):
            publish(out, "me/x", dry_run=True, echo=lambda s: None)
    (out / LOCK_NAME).unlink()


def _gguf(path: Path, n_tensors: int) -> None:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "minimax-m2")
    for i in range(n_tensors):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_folder(tmp_path):
    folder = tmp_path / "gguf"
    folder.mkdir()
    for i in (1, 2):
        _gguf(folder / f"MiniMax-M2-Q4_K_M-{i:05d}-of-00003.gguf", 2)
    with pytest.raises(QuantkitError, match="MiniMax-M2-Q4_K_M-00003-of-00003.gguf is missing"):
        publish(folder, "me/m2-gguf", dry_run=True, echo=lambda s: None)
    _gguf(folder / "MiniMax-M2-Q4_K_M-00003-of-00003.gguf", 1)
    (folder / "quantkit-manifest.json").write_text(json.dumps({"complete": False}))
    with pytest.raises(QuantkitError, match="unfinished"):
        publish(folder, "me/m2-gguf", dry_run=True, echo=lambda s: None)
    (folder / "quantkit-manifest.json").write_text(json.dumps({"complete": True, "job": {"quantkit": "0.1.0"}}))
    publish(folder, "me/m2-gguf", dry_run=True, base_model=BASE, echo=lambda s: None)
    from huggingface_hub import ModelCard

    card = ModelCard((folder / "README.md").read_text())
    assert card.data.library_name == "gguf" and "gguf" in card.data.tags
    assert "llama-server -hf me/m2-gguf:Q4_K_M" in card.text and "ollama run hf.co/me/m2-gguf:Q4_K_M" in card.text
    assert "vllm serve" not in card.text and "F32 x5" in card.text


def test_upload_to_local_hub_in_commits_and_resume(out, hub, hub_env, eval_dir):
    repo = "me/tiny-fp8-upload"
    hub.fail_commits = 1  # the first commit request fails: an interrupted publish
    with pytest.raises(QuantkitError, match=f"{repo}: Hub request failed"):
        publish(out, repo, private=True, eval_dirs=[eval_dir], base_model=BASE, commit_bytes=3 * 10**6,
                echo=lambda s: None)
    lines: list[str] = []
    commits = publish(out, repo, private=True, eval_dirs=[eval_dir], base_model=BASE, commit_bytes=3 * 10**6,
                      echo=lines.append)
    assert len(commits) >= 3
    remote = hub.files(repo)
    local = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == local
    history = hub.repos[repo].history
    assert [h["summary"] for h in history] == [c.message for c in commits]
    assert "README.md" in history[-1]["paths"] and all("README.md" not in h["paths"] for h in history[:-1])
    assert all(p.endswith(".safetensors") for h in history[:-1] for p in h["paths"])  # weights before the card
    assert hub.repos[repo].private
    assert f"Bearer {FAKE_TOKEN}" in hub.auth_seen  # the token was used ...
    assert FAKE_TOKEN not in "\n".join(lines)  # ... and never shown

    # Publishing again uploads nothing: every file is already there with the same content.
    before = len(history)
    publish(out, repo, base_model=BASE, eval_dirs=[eval_dir], commit_bytes=3 * 10**6, echo=lambda s: None)
    assert len(hub.repos[repo].history) == before


def test_cli_publish_to_a_branch_never_shows_the_token(out, hub, hub_env, tmp_path):
    repo = "me/tiny-fp8-cli"
    proc = run_cli("publish", out, "--repo", repo, "--revision", "quantkit-fp8", "--base-model", BASE,
                   env=hub_env, check=True)
    assert "published" in proc.stdout
    assert set(hub.files(repo, "quantkit-fp8")) >= {"README.md", "config.json", "quantkit-manifest.json"}
    assert "README.md" not in hub.files(repo, "main")  # the branch got the upload, main did not
    bad = run_cli("publish", out, "--repo", "me/x", "--revision", "b", "--commit-size", "lots", env=hub_env)
    assert_one_line_error(bad, "--commit-size")
    texts = [proc.stdout, proc.stderr, bad.stdout, bad.stderr]
    for root in (out, tmp_path / "hf-home"):
        texts += [p.read_bytes().decode("latin-1") for p in Path(root).rglob("*") if p.is_file()]
    assert not any(FAKE_TOKEN in t for t in texts)


def test_upload_calls_at_the_hfapi_boundary(out, monkeypatch):
    """What publish asks of huggingface_hub, whichever transfer it then uses (hf_xet's pipeline or LFS): the repo,
    the branch, then one upload_folder per planned commit restricted to exactly that commit's files."""
    from huggingface_hub import HfApi

    calls: list[tuple] = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("repo", repo_id, kw)))
    monkeypatch.setattr(HfApi, "create_branch", lambda self, repo_id, **kw: calls.append(("branch", repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)))
    commits = publish(out, "me/big", private=True, revision="v1", base_model=BASE, commit_bytes=2_500_000,
                      echo=lambda s: None)
    assert calls[0] == ("repo", "me/big", {"private": True, "exist_ok": True})
    assert calls[1] == ("branch", "me/big", {"branch": "v1", "exist_ok": True})
    uploads = [kw for kind, *rest in calls[2:] for kw in rest if kind == "upload"]
    assert len(uploads) == len(commits) >= 4
    for kw, c in zip(uploads, commits):
        assert kw["repo_id"] == "me/big" and kw["revision"] == "v1" and Path(kw["folder_path"]) == out
        assert kw["allow_patterns"] == [name for name, _ in c.files] and kw["commit_message"] == c.message
    assert "README.md" in uploads[-1]["allow_patterns"]
