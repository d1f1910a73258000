"""The model card of a converted checkpoint: metadata the Hub indexes, and a body saying how it was made and measured.

    facts = CardFacts.collect(folder, "me/MiniMax-M2-FP8", fmt, files, weight_files, manifest, eval_dirs=[...])
    text = render_card(facts)                        # README.md: YAML front matter + Markdown

Everything on the card is read from the output folder, never typed in: the format and scheme from config.json's
`quantization_config` (or the GGUF header), the recipe from the manifest's recipe digest (named when it is a
built-in one), the base model from the Hub source the conversion recorded, sizes from the files, calibration
statistics and the evaluation tables from the JSON files `quantkit eval` / `quantkit compare` write.

License. quantkit's spec of the MiniMax-M2 family (specs/minimax-m2.md) records no license facts. MiniMax publishes
MiniMax-M2 under an MIT license with an added attribution clause for very large commercial deployments, and its Hub
cards declare it as `license: other`, `license_name: modified-mit`, with `license_link` to the LICENSE file in
MiniMax's GitHub repository. The card copies the source card's license fields when the source card is in the folder
(a conversion from the Hub copies it), and falls back to those values otherwise.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from quantkit.errors import QuantkitError

CARD_TAG = "quantkit"  # a card quantkit wrote carries this tag; any other README.md is the source model's card
MINIMAX_LICENSE = {"license": "other", "license_name": "modified-mit"}
MINIMAX_LICENSE_LINK = "https://github.com/MiniMax-AI/{name}/blob/main/LICENSE"
GPU_CLASSES = (("80 GB (H100, A100 80GB)", 80e9), ("141 GB (H200)", 141e9), ("192 GB (B200, MI300X)", 192e9))
USABLE = 0.9  # of a GPU's memory for weights and cache: the rest is activations, CUDA graphs, the allocator


@dataclass
class Format:
    kind: str  # safetensors | gguf
    name: str  # bf16, fp8-block, fp8-channel, awq, w4a16, gguf
    scheme: str  # one line for people
    tags: list[str]
    engines: tuple[str, ...]  # which usage snippets apply


def describe_format(config: dict | None, gguf_types: dict[str, int] | None = None) -> Format:
    """What the checkpoint is, from config.json's quantization_config (or the GGUF tensor types)."""
    if gguf_types is not None:
        mix = ", ".join(f"{t} x{n}" for t, n in sorted(gguf_types.items(), key=lambda kv: -kv[1]))
        return Format("gguf", "gguf", f"GGUF for llama.cpp; tensor types: {mix}", ["gguf"], ("llama.cpp",))
    q = (config or {}).get("quantization_config") or {}
    method = q.get("quant_method")
    full = ("vllm", "sglang", "transformers")
    if not q:
        dtype = (config or {}).get("dtype") or (config or {}).get("torch_dtype") or "bfloat16"
        return Format("safetensors", "bf16", f"unquantized {dtype} (router kept as stored)", ["bf16"], full)
    if method == "fp8":
        block = q.get("weight_block_size") or [128, 128]
        return Format("safetensors", "fp8-block",
                      f"FP8 e4m3 weights with one float32 scale per {block[0]}x{block[1]} block (`weight_scale_inv`, "
                      "the official MiniMax-M2 layout); activations quantized per token and 128-group at run time",
                      ["fp8"], full)
    if method == "compressed-tensors":
        groups = list((q.get("config_groups") or {}).values())
        w = (groups[0].get("weights") if groups else None) or {}
        if w.get("type") == "float" and w.get("num_bits") == 8:
            return Format("safetensors", "fp8-channel",
                          f"FP8 e4m3 weights with one scale per output channel ({w.get('strategy')}), dynamic "
                          "per-token FP8 activations (compressed-tensors)", ["fp8", "compressed-tensors"], full)
        if w.get("type") == "int" and w.get("num_bits") == 4:
            return Format("safetensors", "w4a16",
                          f"INT4 weights in groups of {w.get('group_size')}, 16-bit activations (compressed-tensors "
                          "pack-quantized)", ["w4a16", "int4", "compressed-tensors"], ("vllm", "sglang"))
    if method == "awq":
        return Format("safetensors", "awq",
                      f"AWQ INT4 weights, group size {q.get('group_size')}, "
                      f"{'with' if q.get('zero_point') else 'without'} zero points ({q.get('version', 'gemm')} "
                      "packing), 16-bit activations", ["awq", "int4"], ("vllm", "sglang"))
    return Format("safetensors", str(method), f"quantization method {method!r}", [str(method)], full)


def builtin_recipe_name(digest: str | None) -> str | None:
    """The built-in recipe whose digest this is (the manifest records only the digest)."""
    from quantkit.recipe import Recipe

    if not digest:
        return None
    for res in (resources.files("quantkit.recipes") / "minimax-m2").iterdir():
        if res.name.endswith(".yaml"):
            try:
                if Recipe.load(res.name[:-5]).digest() == digest:
                    return res.name[:-5]
            except QuantkitError:
                continue
    return None


def read_card_metadata(path: Path) -> dict:
    """The YAML front matter of a README.md, or {} (no card, or no metadata block)."""
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8", errors="replace")
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return {}
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def license_fields(base_model: str | None, source_card: dict) -> dict:
    """The base model's license: the source card's own fields when present, else MiniMax's modified MIT."""
    if source_card.get("license"):
        return {k: source_card[k] for k in ("license", "license_name", "license_link") if source_card.get(k)}
    name = "MiniMax-M2"
    if base_model and base_model.lower().startswith("minimaxai/"):
        name = base_model.split("/", 1)[1]
    return {**MINIMAX_LICENSE, "license_link": MINIMAX_LICENSE_LINK.format(name=name)}


def find_json(dirs: list[Path], name: str) -> list[Path]:
    """`name` in each folder or one level below it (an eval folder kept inside the output, say)."""
    out: list[Path] = []
    for d in dirs:
        for p in [d / name, *sorted(d.glob(f"*/{name}"))]:
            if p.is_file() and p not in out:
                out.append(p)
    return out


def load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise QuantkitError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise QuantkitError(f"{path}: expected a JSON object")
    return data


def find_calibration(dirs: list[Path]) -> dict | None:
    """The calibration statistics quantkit.calibrate saved (stats.safetensors + its .json) in one of the folders or
    one level below: the options and token totals, the experts that fell back, and the tokens routed to each expert."""
    from safetensors import safe_open

    for d in dirs:
        for meta_path in [*sorted(d.glob("*.json")), *sorted(d.glob("*/*.json"))]:
            tensors = meta_path.with_suffix(".safetensors")
            if not tensors.is_file():
                continue
            try:
                with safe_open(str(tensors), framework="pt") as f:
                    if (f.metadata() or {}).get("quantkit") != "calibration-stats":
                        continue
                    keys = sorted((k for k in f.keys() if k.endswith(".routed.count")),
                                  key=lambda k: int(k.split(".")[2]))
                    counts = [f.get_tensor(k).tolist() for k in keys]
            except Exception:  # not a safetensors file after all: not calibration statistics
                continue
            meta = load_json(meta_path)
            meta["expert_tokens"] = counts
            meta["file"] = tensors.name
            return meta
    return None


@dataclass
class CardFacts:
    repo_id: str
    fmt: Format
    base_model: str | None
    license: dict
    files: dict[str, int]  # name -> bytes, everything that is uploaded
    weight_bytes: int
    config: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    recipe: str | None = None
    results: list[tuple[Path, dict]] = field(default_factory=list)  # results.json of `quantkit eval`
    comparisons: list[tuple[Path, dict]] = field(default_factory=list)  # comparison.json of `quantkit compare`
    calibration: dict | None = None
    gguf_files: list[str] = field(default_factory=list)

    @classmethod
    def collect(cls, folder: Path, repo_id: str, fmt: Format, files: dict[str, int], weight_files: list[str],
                manifest: dict, eval_dirs: list[Path] | None = None, base_model: str | None = None) -> CardFacts:
        config = {}
        if (folder / "config.json").is_file():
            config = load_json(folder / "config.json")
        job = manifest.get("job") if isinstance(manifest.get("job"), dict) else {}
        if base_model is None and isinstance(job.get("hub_source"), str):
            base_model = job["hub_source"].split("@", 1)[0]
        if base_model is None:
            name = config.get("_name_or_path")
            base_model = name if isinstance(name, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) else None
        source_card = read_card_metadata(folder / "README.md")
        if CARD_TAG in (source_card.get("tags") or []):
            # Our own card from an earlier publish: its license fields came from the source card; keep them.
            source_card = {k: v for k, v in source_card.items() if k.startswith("license")}
        dirs = [folder, *(eval_dirs or [])]
        return cls(
            repo_id=repo_id, fmt=fmt, base_model=base_model, license=license_fields(base_model, source_card),
            files=files, weight_bytes=sum(files[n] for n in weight_files), config=config, manifest=manifest,
            recipe=builtin_recipe_name(job.get("recipe")),
            results=[(p, load_json(p)) for p in find_json(dirs, "results.json")],
            comparisons=[(p, load_json(p)) for p in find_json(dirs, "comparison.json")],
            calibration=find_calibration(dirs), gguf_files=[n for n in weight_files if n.endswith(".gguf")],
        )

    def metadata(self) -> dict:
        meta: dict = {}
        if self.base_model:
            meta["base_model"] = self.base_model
            meta["base_model_relation"] = "quantized"
        meta.update(self.license)
        meta["library_name"] = "gguf" if self.fmt.kind == "gguf" else "transformers"
        meta["pipeline_tag"] = "text-generation"
        meta["tags"] = list(dict.fromkeys(["minimax_m2", "moe", "quantized", *self.fmt.tags, CARD_TAG]))
        return meta


# ---- body --------------------------------------------------------------------------------------------------------


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def kv_bytes_per_token(config: dict) -> int:
    """BF16 K and V for every layer: 2 x layers x kv_heads x head_dim x 2 bytes."""
    layers = int(config.get("num_hidden_layers") or 0)
    kv = int(config.get("num_key_value_heads") or 0)
    head = int(config.get("head_dim") or (config.get("hidden_size", 0) // max(1, config.get("num_attention_heads", 1))))
    return 2 * layers * kv * head * 2


def hardware_section(f: CardFacts) -> str:
    kv, seq = kv_bytes_per_token(f.config), _seq(f)
    ctx = int(f.config.get("max_position_embeddings") or 0)
    lines = ["## Hardware", "", f"Weights: **{_gb(f.weight_bytes)}**."]
    if kv:
        lines.append(f"KV cache (BF16): {kv / 1e6:.3f} MB per token, so {_gb(kv * seq)} for one {seq:,}-token "
                     f"sequence" + (f" and {_gb(kv * ctx)} for one at the full {ctx:,}-token context."
                                    if ctx > seq else "."))
    lines += ["", f"Smallest power-of-two GPU count that holds the weights plus one {seq:,}-token sequence, using "
              f"{USABLE:.0%} of each GPU's memory (estimates; serving many sequences needs more):", "",
              "| GPU memory | GPUs |", "|---|---:|"]
    need = f.weight_bytes + kv * seq
    for label, mem in GPU_CLASSES:
        n = next((n for n in (1, 2, 4, 8, 16) if n * mem * USABLE >= need), None)
        lines.append(f"| {label} | {n if n else 'more than 16'} |")
    if f.fmt.kind == "gguf":
        lines += ["", f"llama.cpp can also keep the expert tensors in system RAM (`--n-cpu-moe`, `-ot exps=CPU`): "
                  f"then about {_gb(f.weight_bytes)} of RAM plus the attention weights and cache on the GPU."]
    return "\n".join(lines) + "\n"


def _seq(f: CardFacts) -> int:
    """The sequence length the hardware estimate budgets for: 32K tokens, or the whole context when shorter."""
    ctx = int(f.config.get("max_position_embeddings") or 0)
    return min(32768, ctx) if ctx else 32768


def _tp(f: CardFacts) -> int:
    need = f.weight_bytes + kv_bytes_per_token(f.config) * _seq(f)
    return next((n for n in (1, 2, 4, 8) if n * 80e9 * USABLE >= need), 8)


def gguf_tag(files: list[str]) -> str | None:
    """The quantization name in the GGUF file names (what `-hf repo:TAG` and Ollama select by)."""
    for name in files:
        m = re.search(r"(IQ\d_\w+?|Q\d_K_[SML]|Q\d_K|Q\d_[01]|BF16|F16|F32)(?=[-.])", name, re.I)
        if m:
            return m.group(1).upper()
    return None


def usage_section(f: CardFacts) -> str:
    repo, tp = f.repo_id, _tp(f)
    out = ["## Usage", ""]
    if "vllm" in f.fmt.engines:
        out += ["**vLLM** (MiniMax-M2 is supported natively; the parsers handle its thinking and tool calls):", "",
                "```bash", f"vllm serve {repo} --tensor-parallel-size {tp} \\",
                "  --enable-auto-tool-choice --tool-call-parser minimax_m2 --reasoning-parser minimax_m2_append_think",
                "```", ""]
    if "sglang" in f.fmt.engines:
        out += ["**SGLang**:", "", "```bash", f"python -m sglang.launch_server --model-path {repo} --tp-size {tp}",
                "```", ""]
    if "transformers" in f.fmt.engines:
        note = " FP8 weights need a CUDA GPU." if "fp8" in f.fmt.tags else ""
        rope = f.config.get("rope_parameters") or {}
        if f.config.get("rotary_dim") and "partial_rotary_factor" not in f.config and \
                "partial_rotary_factor" not in rope:
            # transformers' native MiniMax-M2 reads only partial_rotary_factor, and would rotate every dimension
            head = int(f.config.get("head_dim") or 128)
            note += (f" config.json gives the rotary width as `rotary_dim` only, which transformers' MiniMax-M2 "
                     f"ignores: add `\"partial_rotary_factor\": {f.config['rotary_dim'] / head:g}` to it first.")
        out += [f"**transformers** (5.0 or newer, which has MiniMax-M2 built in).{note}", "", "```python",
                "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
                f'model = AutoModelForCausalLM.from_pretrained("{repo}", device_map="auto")',
                'messages = [{"role": "user", "content": "Write a haiku about sparse experts."}]',
                "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\")",
                "out = model.generate(ids.to(model.device), max_new_tokens=256)",
                "print(tokenizer.decode(out[0][ids.shape[1]:]))", "```", ""]
    if "llama.cpp" in f.fmt.engines:
        tag = gguf_tag(f.gguf_files)
        sel = f"{repo}:{tag}" if tag else repo
        first = sorted(f.gguf_files)[0] if f.gguf_files else "MODEL.gguf"
        out += ["**llama.cpp** (loads every split from the first):", "", "```bash",
                f"llama-server -hf {sel} --jinja -c 32768", f"# or, downloaded: llama-server -m {first} --jinja",
                "```", "", "**Ollama**:", "", "```bash", f"ollama run hf.co/{sel}", "```", ""]
    if f.fmt.kind == "safetensors":
        local = repo.split("/")[-1]
        out += ["**quantkit** (its own runtime, for checks):", "", "```bash", f"hf download {repo} --local-dir {local}",
                f'quantkit generate {local} --chat --prompt "Hello"', "```", ""]
    out += ["Recommended sampling (MiniMax): temperature 1.0, top_p 0.95, top_k 40. Keep the model's `<think>` "
            "blocks in the chat history."]
    return "\n".join(out) + "\n"


def eval_section(f: CardFacts) -> str:
    if not (f.results or f.comparisons):
        return ""
    out = ["## Evaluation", ""]
    for path, r in f.results:
        ref = r.get("reference", "the reference")
        out += [f"`quantkit eval` against `{Path(str(ref)).name}` on {r.get('device', '?')} "
                f"(backend {r.get('backend', '?')}, text: {r.get('text', '?')}; from `{path.name}`).", ""]
        fid = r.get("fidelity")
        if isinstance(fid, dict):
            out += ["| positions | mean KLD | p99 KLD | top-1 agreement | perplexity | reference perplexity |",
                    "|---:|---:|---:|---:|---:|---:|",
                    f"| {fid.get('tokens', '')} | {fid.get('kld_mean', float('nan')):.5f} | "
                    f"{fid.get('kld_p99', float('nan')):.5f} | {fid.get('top1_agreement', float('nan')):.4f} | "
                    f"{fid.get('ppl_quant', float('nan')):.3f} | {fid.get('ppl_reference', float('nan')):.3f} |", ""]
        needle = r.get("needle")
        if isinstance(needle, dict):
            out += [f"Needle in a haystack (passkey retrieval): {needle.get('score', 0):.1%} exact match over "
                    f"{needle.get('cases', '?')} cases.", ""]
        tasks = (r.get("lm_eval") or {}).get("results") or {}
        if tasks:
            out += ["| lm-eval task | metric | value |", "|---|---|---:|"]
            for task, metrics in sorted(tasks.items()):
                for key, value in metrics.items():
                    if isinstance(value, float) and "stderr" not in key:
                        out.append(f"| {task} | {key.split(',')[0]} | {value:.4f} |")
            out.append("")
    for path, c in f.comparisons:
        rows = c.get("rows") or []
        out += [f"`quantkit compare` on {c.get('device', '?')} (from `{path.name}`):", "",
                "| format | size MB | bits/weight | mean KLD | p99 KLD | top-1 | perplexity | needle | tokens/s |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in rows:
            out.append(f"| {row.get('format')} | {row.get('bytes', 0) / 1e6:.2f} | {row.get('bits_per_weight', 0):.2f} "
                       f"| {row.get('kld_mean', 0):.5f} | {row.get('kld_p99', 0):.5f} | {row.get('top1', 0):.4f} "
                       f"| {row.get('perplexity', 0):.2f} | {row.get('needle', 0):.0%} "
                       f"| {row.get('tokens_per_s', 0):.1f} |")
        out.append("")
    return "\n".join(out)


def calibration_section(f: CardFacts) -> str:
    c = f.calibration
    if not c:
        return ""
    out = ["## Calibration", ""]
    desc = {k: c[k] for k in ("samples", "seq_len", "tokens", "experts", "min_tokens") if k in c}
    if desc:
        out.append(f"Statistics in `{c.get('file', 'stats.safetensors')}`: "
                   + "; ".join(f"{k.replace('_', ' ')} {v}" for k, v in desc.items()) + ".")
    fallback = c.get("fallback") or {}
    if isinstance(fallback, dict) and fallback:
        n = sum(len(v) for v in fallback.values() if isinstance(v, list))
        out += ["", f"{n} expert inputs had too few calibration tokens and used their layer's pooled statistics "
                f"(in {len(fallback)} layer/point pairs)."]
    counts = c.get("expert_tokens")  # [layers][experts] routed calibration tokens
    if isinstance(counts, list) and counts and all(isinstance(row, list) for row in counts):
        flat = sorted(int(v) for row in counts for v in row)
        zero = sum(1 for v in flat if v == 0)
        out += ["", f"Per-expert coverage, {len(counts)} layers x {len(counts[0])} experts: tokens routed to an expert "
                f"min {flat[0]}, median {flat[len(flat) // 2]}, max {flat[-1]}; {zero} of the {len(flat)} "
                "(layer, expert) pairs saw no calibration token" + (" and used pooled statistics." if zero else ".")]
    return "\n".join(out) + "\n"


def render_card(f: CardFacts) -> str:
    meta = yaml.safe_dump(f.metadata(), sort_keys=False, allow_unicode=True).strip()
    job = f.manifest.get("job") if isinstance(f.manifest.get("job"), dict) else {}
    name = f.repo_id.split("/")[-1]
    base = f"[{f.base_model}](https://huggingface.co/{f.base_model})" if f.base_model else "a MiniMax-M2 model"
    lic = f.license
    lic_text = lic.get("license_name") or lic.get("license")
    if lic.get("license_link"):
        lic_text = f"[{lic_text}]({lic['license_link']})"
    body = [
        f"# {name}", "",
        f"{base} quantized with quantkit {job.get('quantkit', '')}".rstrip() + ".", "",
        "## Format", "",
        f"- Scheme: {f.fmt.scheme}.",
        f"- Recipe: `{f.recipe}` (built in)." if f.recipe else
        f"- Recipe: custom (sha256 `{str(job.get('recipe', ''))[:16]}…` in `quantkit-manifest.json`).",
        f"- Files: {sum(1 for n in f.files if n.endswith(('.safetensors', '.gguf')))} weight files, "
        f"{_gb(f.weight_bytes)}.",
    ]
    q = f.config.get("quantization_config") or {}
    ignore = q.get("modules_to_not_convert") or q.get("ignore")
    if ignore:
        body.append(f"- Kept in higher precision: {', '.join(f'`{m}`' for m in ignore)}.")
    if f.manifest.get("shards"):
        body.append("- Every shard's tensors are listed with CRC-32 checksums in `quantkit-manifest.json`.")
    if "fp8" in f.fmt.tags and (f.manifest.get("shards") or {}):
        errs = [e for rec in f.manifest["shards"].values() for e in (rec.get("rel_rms") or {}).values()]
        if errs:
            body.append(f"- Quantization error (relative RMS of the weights): mean {sum(errs) / len(errs):.4f}, "
                        f"max {max(errs):.4f} over {len(errs)} tensors.")
    body += ["", calibration_section(f), eval_section(f), hardware_section(f), usage_section(f),
             "## License", "", f"The license of the base model applies: {lic_text}."]
    text = "---\n" + meta + "\n---\n\n" + "\n".join(b for b in body if b is not None)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"
