"""`convert --to awq`: calibration, AWQ search and INT4 packing, one decoder layer in flight.

    summary = convert("MiniMax-M2", "MiniMax-M2-AWQ", target="awq",
                      calib={"awq_format": "compressed-tensors", "sources": ["chats.jsonl"], "n_samples": 128})

The output plan is known before anything is computed (names, dtypes and shapes follow from the config and the
recipe), so the writer streams as for the other targets. The first time a tensor of layer n is asked for, the
calibration stream is advanced to layer n (layers whose shards an earlier run already finished are passed through
without a search: the search of a layer depends only on the original model's hidden states, so a resumed run
writes the same bytes), layer n is searched, folded and clipped, and its tensors are quantized and packed as the
writer asks for them. Memory: one layer's weights on the device, the calibration hidden states, and the packed
tensors of the layer being written.

Layouts (quantkit.formats.awq): AutoAWQ GEMM (`qweight`/`qzeros`/`scales`, fp16 scales) or compressed-tensors
pack-quantized (`weight_packed`/`weight_scale`/`weight_zero_point`/`weight_shape`), asymmetric, group 128.
Kept: router gate (fp32, its columns carry the folded MoE scale), e_score_correction_bias, embeddings, lm_head,
norms (the folded ones rewritten), and attention when the recipe says `quantize_attention: false`.
"""

from __future__ import annotations

import json
import os
import time

import torch

from quantkit.calibrate.awq import AWQConfig, LayerResult, awq_layer, fake_quant
from quantkit.calibrate.data import calibration_tokens
from quantkit.calibrate.engine import LayerStream
from quantkit.calibrate.stats import CalibrationStats
from quantkit.checkpoint import CheckpointReader, OutTensor
from quantkit.checkpoint.safetensors_file import DTYPE_NAMES
from quantkit.errors import QuantkitError
from quantkit.formats import awq as fmt
from quantkit.formats.fp8 import relative_rms
from quantkit.recipe import Recipe

FORMATS = ("autoawq", "compressed-tensors")
AUTOAWQ_SUFFIXES = ("qweight", "qzeros", "scales")
CT_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
REPORT_NAME = "quantkit-awq-report.json"



def _on_off(value: object) -> object:
    """YAML reads a bare off/on as a boolean."""
    return {False: "off", True: "on"}.get(value, value) if isinstance(value, bool) else value

def awq_options(recipe: Recipe) -> dict:
    o = recipe.options
    out = {
        "format": o.get("format", "autoawq"),
        "group": int(o.get("group_size", 128)),
        # AutoAWQ GEMM is asymmetric; compressed-tensors defaults to its W4A16 scheme (symmetric), which is also the
        # one transformers 5.23 can dequantize for fused experts (its per-expert path drops zero points)
        "zero_point": bool(o["zero_point"] if o.get("zero_point") is not None
                           else o.get("format", "autoawq") == "autoawq"),
        "attention": bool(o.get("quantize_attention", True)),
        "sources": list(o.get("calib") or []),
        "n_samples": int(o.get("n_samples", 128)),
        "n_grid": int(o.get("n_grid", 20)),
        "clip_tokens": int(o.get("clip_tokens", 512)),
        "seq_len": int(o.get("seq_len", 512)),
        "chat": bool(o.get("chat", False)),
        "min_tokens": int(o.get("min_tokens", 16)),
        "stats": o.get("stats"),
        "qkv_scale": _on_off(o.get("qkv_scale", "off")),
        "clip": bool(o.get("clip", True)),
        "duo_scaling": bool(o.get("duo_scaling", True)),
    }
    if out["qkv_scale"] not in ("auto", "on", "off"):
        raise QuantkitError(f"recipe {recipe.name!r}: qkv_scale {out['qkv_scale']!r} is not auto, on or off")
    if out["format"] not in FORMATS:
        raise QuantkitError(f"--awq-format {out['format']!r}: choose {' or '.join(FORMATS)}")
    if not out["zero_point"] and out["format"] == "autoawq":
        raise QuantkitError(f"recipe {recipe.name!r}: the AutoAWQ GEMM layout needs zero_point: true")
    return out


def packed_shapes(name: str, shape: tuple[int, int], fmt_name: str, group: int, zero_point: bool
                  ) -> list[tuple[str, str, tuple[int, ...]]]:
    """(output name, safetensors dtype, shape) of one quantized linear weight `X.weight` [out, in]."""
    out_f, in_f = shape
    base = name.removesuffix(".weight")
    if in_f % group or out_f % 8:
        raise QuantkitError(f"{name}: shape {list(shape)} does not split into groups of {group} (and 8 outputs)")
    if fmt_name == "autoawq":
        return [(base + ".qweight", "I32", (in_f, out_f // 8)), (base + ".qzeros", "I32", (in_f // group, out_f // 8)),
                (base + ".scales", "F16", (in_f // group, out_f))]
    out = [(base + ".weight_packed", "I32", (out_f, in_f // 8)),
           (base + ".weight_scale", "BF16", (out_f, in_f // group))]
    if zero_point:
        out.append((base + ".weight_zero_point", "I32", (-(-out_f // 8), in_f // group)))
    out.append((base + ".weight_shape", "I64", (2,)))
    return out


class AWQProducer:
    """Produces the output tensors in plan order, searching each layer when its first tensor is asked for."""

    def __init__(self, reader: CheckpointReader, opts: dict, device: str | None = None):
        self.reader, self.opts = reader, opts
        self.cfg = AWQConfig(group=opts["group"], zero_point=opts["zero_point"],
                             scale_dtype=torch.float16 if opts["format"] == "autoawq" else torch.bfloat16,
                             attention=opts["attention"], qkv_scale=opts["qkv_scale"], clip=opts["clip"],
                             duo_scaling=opts["duo_scaling"], min_tokens=opts["min_tokens"], n_grid=opts["n_grid"],
                             clip_tokens=opts["clip_tokens"])
        self.device = device
        if torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type == "cuda":
            # A resumed run recomputes earlier layers' hidden states: the bytes match only if every kernel is
            # deterministic (index_add_ otherwise accumulates with atomics; cuBLAS needs a fixed workspace)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.stream: LayerStream | None = None
        self.current: LayerResult | None = None
        self.pending: dict[str, torch.Tensor] = {}
        self.report: dict[int, dict] = {}
        self.errors: dict[str, float] = {}
        self.stats = None
        if opts["stats"]:
            self.stats = CalibrationStats.load(opts["stats"])
            self.stats.check_matches(reader.config, f"--stats {opts['stats']}")

    def _stream(self) -> LayerStream:
        if self.stream is None:
            o = self.opts
            tokens = calibration_tokens(self.reader.folder, o["sources"] or None, o["n_samples"], o["seq_len"],
                                        o["chat"])
            self.stream = LayerStream(self.reader, tokens, self.device)
        return self.stream

    def layer(self, n: int) -> LayerResult:
        if self.current is None or self.current.report["layer"] != n:
            self.current = None
            self.pending.clear()
            t0 = time.perf_counter()
            x_means = self.stats.layers[n] if self.stats is not None else None
            res = awq_layer(self._stream(), n, self.cfg, x_means)
            res.report["seconds"] = round(time.perf_counter() - t0, 3)
            self.report[n] = res.report
            self.current = res
        return self.current

    def quantized(self, layer: int, weight_name: str) -> dict[str, torch.Tensor]:
        w = self.layer(layer).weights[weight_name]
        q, scales, zeros = fmt.quantize_groups(w, self.cfg.group, zero_point=self.cfg.zero_point,
                                               scale_dtype=self.cfg.scale_dtype, name=weight_name)
        base = weight_name.removesuffix(".weight")
        first = base + (".qweight" if self.opts["format"] == "autoawq" else ".weight_packed")
        # fake_quant is quantize-then-dequantize to the bit (tests/test_awq.py): the error on the weight's device
        self.errors[first] = relative_rms(w, fake_quant(w, self.cfg.group, self.cfg.zero_point, self.cfg.scale_dtype))
        if self.opts["format"] == "autoawq":
            qw, qz, sc = fmt.pack_autoawq(q, scales, zeros)
            return {base + ".qweight": qw, base + ".qzeros": qz, base + ".scales": sc}
        packed, scale, zp, shape = fmt.pack_compressed_tensors(q, scales, zeros, symmetric=not self.cfg.zero_point)
        out = {base + ".weight_packed": packed, base + ".weight_scale": scale, base + ".weight_shape": shape}
        if zp is not None:
            out[base + ".weight_zero_point"] = zp
        return out


def plan_awq(reader: CheckpointReader, recipe: Recipe):
    from quantkit.convert import Plan

    opts = awq_options(recipe)
    cfg = reader.config
    if cfg.intermediate_size % opts["group"] or cfg.hidden_size % opts["group"] or cfg.q_width % opts["group"]:
        raise QuantkitError(f"recipe {recipe.name!r}: group size {opts['group']} must divide hidden_size, "
                            f"intermediate_size and the attention width")
    prod = AWQProducer(reader, opts, recipe.options.get("device"))
    quant_kinds = {"expert"} | ({"attn"} if opts["attention"] else set())
    tensors: list[OutTensor] = []
    role: dict[str, tuple[str, str, int | None]] = {}  # output name -> (role, source weight, layer)
    for unit in cfg.units():
        for spec in unit.tensors:
            if spec.kind in quant_kinds:
                for name, dt, shape in packed_shapes(spec.name, spec.shape, opts["format"], opts["group"],
                                                     opts["zero_point"]):
                    role[name] = ("packed", spec.name, unit.layer)
                    tensors.append(OutTensor(name, dt, shape, unit.name))
            else:
                if spec.kind in ("router", "router_bias"):
                    dt = "F32"  # the gate carries the folded MoE scale: kept fp32, as engines compute it
                else:
                    dt = DTYPE_NAMES[getattr(torch, recipe.dtype)]
                role[spec.name] = ("layer" if unit.layer is not None else "source", spec.name, unit.layer)
                tensors.append(OutTensor(spec.name, dt, spec.shape, unit.name))
    dtypes = {t.name: {v: k for k, v in DTYPE_NAMES.items()}[t.dtype] for t in tensors}

    def produce(t: OutTensor) -> torch.Tensor:
        r, src, layer = role[t.name]
        if r == "source":
            return reader.weight(src, dtypes[t.name])
        if r == "layer":
            return prod.layer(layer).weights[src].to("cpu", dtypes[t.name])
        if t.name not in prod.pending:
            prod.pending.update(prod.quantized(layer, src))
        return prod.pending.pop(t.name).cpu().contiguous()

    config = dict(cfg.raw)
    config["torch_dtype" if "dtype" not in config else "dtype"] = recipe.dtype
    if opts["format"] == "autoawq":
        ignore = ["gate", "e_score_correction_bias", "lm_head"] + ([] if opts["attention"] else ["self_attn"])
        config["quantization_config"] = fmt.quantization_config_autoawq(ignore, opts["group"], opts["zero_point"])
    else:
        ignore = ["lm_head", "re:.*block_sparse_moe\\.gate$"]
        config["quantization_config"] = fmt.quantization_config_compressed_tensors(
            ignore, opts["group"], symmetric=not opts["zero_point"], attention=opts["attention"])

    def read_bytes(t: OutTensor) -> int:
        r, src, _ = role[t.name]
        return reader.entry(src).nbytes if r != "packed" or t.name.endswith((".qweight", ".weight_packed")) else 0

    def extra_files() -> dict[str, bytes]:
        rep = {"options": {k: v for k, v in opts.items()}, "layers": {str(k): v for k, v in prod.report.items()}}
        return {REPORT_NAME: (json.dumps(rep, indent=1) + "\n").encode()}

    return Plan(tensors, produce, config, read_bytes, prod.errors, extra_files)
