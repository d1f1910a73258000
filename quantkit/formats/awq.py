"""INT4 weight-only (W4A16) groups: quantize, dequantize, and the two on-disk packings engines load.

    q, scales, zeros = quantize_groups(w)           # [out, in] -> uint8 [out, in], fp32 [out, in/g], uint8 [out, in/g]
    w_hat = dequantize_groups(q, scales, zeros)     # (q - zero) * scale, fp32 [out, in]
    qweight, qzeros, s16 = pack_autoawq(q, scales, zeros)  # int32 [in, out/8], int32 [in/g, out/8], fp16 [in/g, out]
    packed, scale, zp, shape = pack_compressed_tensors(q, scales, zeros, symmetric=False)
    tensors = packed_tensors("model.layers.0.self_attn.q_proj.", q, scales, zeros, "autoawq")  # {name: tensor}
    cfg = quantization_config_autoawq(ignore)       # config.json `quantization_config`
    reader = open_awq_reader("ckpt-awq")            # AwqCheckpointReader, or None for a checkpoint that is not INT4
    qweight, qzeros, scales = reader.awq_tensors("model.layers.0.self_attn.q_proj.weight")  # the kernels' layout

One convention inside quantkit, whatever the layout: q holds unsigned 4-bit codes 0..15 and every group has an
unsigned zero point, so that w ~ (q - zero) * scale everywhere. Asymmetric groups (AutoAWQ's default) follow AutoAWQ:
scale = (max - min).clamp(1e-5) / 15, zero = clamp(-round(min / scale), 0, 15), q = clamp(round(w / scale) + zero,
0, 15). Symmetric groups (compressed-tensors' default W4A16) use scale = max|w|.clamp(1e-5) / 7, signed codes in
[-8, 7] and zero 8: the signed code plus 8 is exactly the nibble compressed-tensors stores (it offsets signed values
by +8 before packing), so both layouts carry the same 4-bit codes and only the nibble order differs.

The scale is rounded to the dtype it is stored in (fp16 for AutoAWQ, the model dtype for compressed-tensors) before
the codes are computed, so the codes are the best ones for the scale a loader will actually read.

Layouts (specs/formats.md §2a, §2b):
- AutoAWQ GEMM: packed along the output dimension, transposed ([in, out/8]); nibble i of int32 column c holds output
  channel 8c + AWQ_ORDER[i]; qzeros packed the same way; scales fp16 [in/g, out].
- compressed-tensors pack-quantized: packed along the input dimension ([out, in/8]) in natural order (value j of a
  word at bits 4j); weight_zero_point [ceil(out/8), in/g] packed along dim 0, present only when asymmetric.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quantkit.checkpoint import CheckpointReader
from quantkit.errors import QuantkitError
from quantkit.formats.fp8 import check_finite

BITS = 4
GROUP = 128
PACK = 32 // BITS  # 4-bit codes per int32
QMAX = (1 << BITS) - 1  # 15
SYM_ZERO = 1 << (BITS - 1)  # 8: the zero of every symmetric group, and compressed-tensors' signed offset
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i holds channel 8c + AWQ_ORDER[i]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # channel j sits in nibble AWQ_REVERSE_ORDER[j]
NATURAL_ORDER = tuple(range(PACK))
ROWS = 256  # output rows per step: fp32 temporaries of a few MB whatever the weight's size


def _check_shape(w: torch.Tensor, group: int, name: str) -> tuple[int, int]:
    if w.dim() != 2:
        raise QuantkitError(f"{name}: INT4 group quantization needs a 2-D weight, found shape {list(w.shape)}")
    out_f, in_f = w.shape
    if group % PACK or in_f % group:
        raise QuantkitError(f"{name}: input size {in_f} is not a multiple of the group size {group} "
                            f"(which must itself be a multiple of {PACK})")
    return out_f, in_f


def quantize_groups(w: torch.Tensor, group: int = GROUP, bits: int = BITS, zero_point: bool = True,
                    scale_dtype: torch.dtype = torch.float16, name: str = "tensor"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest INT4 per group of `group` consecutive input channels.

    Returns q uint8 [out, in] (codes 0..15), scales fp32 [out, in/g] (values representable in scale_dtype) and
    zeros uint8 [out, in/g] (8 everywhere when zero_point is False)."""
    if bits != BITS:
        raise QuantkitError(f"{name}: only 4-bit groups are supported, asked for {bits}")
    out_f, in_f = _check_shape(w, group, name)
    check_finite(w, name)
    ng = in_f // group
    q = torch.empty(out_f, in_f, dtype=torch.uint8)
    scales = torch.empty(out_f, ng, dtype=torch.float32)
    zeros = torch.empty(out_f, ng, dtype=torch.uint8)
    for lo in range(0, out_f, ROWS):
        x = w[lo:lo + ROWS].to(torch.float32).reshape(-1, ng, group)  # [r, G, g]
        if zero_point:
            mx, mn = x.amax(dim=2), x.amin(dim=2)  # [r, G]
            s = ((mx - mn).clamp(min=1e-5) / QMAX).to(scale_dtype).float()
            z = (-torch.round(mn / s)).clamp_(0, QMAX)
            codes = (torch.round(x / s[..., None]) + z[..., None]).clamp_(0, QMAX)
        else:
            s = (x.abs().amax(dim=2).clamp(min=1e-5) / (SYM_ZERO - 1)).to(scale_dtype).float()
            z = torch.full_like(s, SYM_ZERO)
            codes = torch.round(x / s[..., None]).clamp_(-SYM_ZERO, SYM_ZERO - 1) + SYM_ZERO
        if not torch.isfinite(s).all():
            raise QuantkitError(f"{name}: a group's range overflows {scale_dtype} scales; refusing to quantize it")
        n = x.shape[0]
        q[lo:lo + n] = codes.reshape(n, in_f).to(torch.uint8)
        scales[lo:lo + n] = s
        zeros[lo:lo + n] = z.to(torch.uint8)
    return q, scales, zeros


def dequantize_groups(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q - zero) * scale in fp32, cast to dtype at the end: [out, in]. The group size follows from the shapes."""
    out_f, in_f = q.shape
    ng = scales.shape[1]
    group = group or in_f // ng
    if scales.shape != (out_f, in_f // group) or zeros.shape != scales.shape:
        raise QuantkitError(f"INT4 dequantize: shapes q {list(q.shape)}, scales {list(scales.shape)}, zeros "
                            f"{list(zeros.shape)} do not agree for group {group}")
    x = q.to(torch.float32).view(out_f, ng, group) - zeros.to(torch.float32)[..., None]
    return (x * scales.to(torch.float32)[..., None]).view(out_f, in_f).to(dtype)


def _pack(v: torch.Tensor, order: tuple[int, ...], dim: int) -> torch.Tensor:
    """Codes [R, C] (values 0..15; 8 divides the packed dimension) -> int32 words, 8 codes each along `dim`:
    [R, C/8] for dim 1, [R/8, C] for dim 0. Nibble i (bits 4i..4i+3) of word c holds code 8c + order[i]."""
    r, c = v.shape
    v = v.to(torch.int32)
    parts = v.view(r, c // PACK, PACK) if dim == 1 else v.view(r // PACK, PACK, c)  # strided slices, no gather
    pick = (lambda i: parts[..., order[i]]) if dim == 1 else (lambda i: parts[:, order[i]])
    words = pick(0).clone()
    for i in range(1, PACK):
        words |= pick(i) << (BITS * i)  # int32 shifts wrap into the sign bit: the two's-complement word torch stores
    return words


def _unpack(p: torch.Tensor, order: tuple[int, ...], dim: int) -> torch.Tensor:
    """Inverse of _pack: int32 words -> codes uint8 ([R, 8C] for dim 1, [8R, C] for dim 0)."""
    r, c = p.shape
    out = torch.empty((r, c, PACK) if dim == 1 else (r, PACK, c), dtype=torch.uint8, device=p.device)
    for i in range(PACK):
        nib = ((p >> (BITS * i)) & QMAX).to(torch.uint8)  # arithmetic shift, masked: the sign bit does not leak
        if dim == 1:
            out[..., order[i]] = nib
        else:
            out[:, order[i]] = nib
    return out.view(r, c * PACK) if dim == 1 else out.view(r * PACK, c)


def _check_triplet(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> int:
    out_f, in_f = q.shape
    if scales.dim() != 2 or scales.shape[0] != out_f or in_f % scales.shape[1] or zeros.shape != scales.shape:
        raise QuantkitError(f"INT4 pack: shapes q {list(q.shape)}, scales {list(scales.shape)}, zeros "
                            f"{list(zeros.shape)} do not agree")
    group = in_f // scales.shape[1]
    if group % PACK:
        raise QuantkitError(f"INT4 pack: group size {group} is not a multiple of {PACK}")
    return group


def pack_autoawq(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoAWQ GEMM tensors: qweight int32 [in, out/8], qzeros int32 [in/g, out/8], scales fp16 [in/g, out]."""
    _check_triplet(q, scales, zeros)
    if q.shape[0] % PACK:
        raise QuantkitError(f"AutoAWQ pack: output size {q.shape[0]} is not a multiple of {PACK}")
    qweight = _pack(q, AWQ_ORDER, dim=0).t().contiguous()  # [out/8, in] -> [in, out/8]
    qzeros = _pack(zeros, AWQ_ORDER, dim=0).t().contiguous()
    return qweight, qzeros, scales.t().to(torch.float16).contiguous()


def unpack_autoawq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of pack_autoawq: q uint8 [out, in], scales fp32 [out, in/g], zeros uint8 [out, in/g]."""
    in_f, w = qweight.shape
    out_f = w * PACK
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise QuantkitError(f"AutoAWQ unpack: qweight and qzeros must be int32, found {qweight.dtype}, {qzeros.dtype}")
    if scales.dim() != 2 or scales.shape[1] != out_f or qzeros.shape != (scales.shape[0], w) \
            or in_f % scales.shape[0]:
        raise QuantkitError(f"AutoAWQ unpack: shapes qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)}, "
                            f"scales {list(scales.shape)} do not agree")
    q = _unpack(qweight.t().contiguous(), AWQ_ORDER, dim=0)  # [in, out/8] -> [out/8, in] -> [out, in]
    zeros = _unpack(qzeros.t().contiguous(), AWQ_ORDER, dim=0)
    return q, scales.t().float().contiguous(), zeros


def pack_compressed_tensors(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, symmetric: bool,
                            scale_dtype: torch.dtype = torch.bfloat16
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """compressed-tensors pack-quantized tensors: weight_packed int32 [out, in/8], weight_scale [out, in/g]
    (scale_dtype, the model's dtype), weight_zero_point int32 [ceil(out/8), in/g] (None when symmetric) and
    weight_shape [2] (int64, as compressed-tensors' own compressor writes it)."""
    _check_triplet(q, scales, zeros)
    out_f, in_f = q.shape
    if symmetric and not bool((zeros == SYM_ZERO).all()):
        raise QuantkitError("compressed-tensors pack: symmetric groups must all have zero point 8")
    packed = _pack(q, NATURAL_ORDER, dim=1)
    zp = None
    if not symmetric:
        pad = -out_f % PACK  # compressed-tensors pads the packed dimension with zero codes
        zp = _pack(torch.nn.functional.pad(zeros, (0, 0, 0, pad)), NATURAL_ORDER, dim=0)  # [ceil(out/8), in/g]
    return packed, scales.to(scale_dtype), zp, torch.tensor([out_f, in_f], dtype=torch.int64)


def unpack_compressed_tensors(weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                              weight_zero_point: torch.Tensor | None, weight_shape: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of pack_compressed_tensors: q uint8 [out, in], scales fp32 [out, in/g], zeros uint8 [out, in/g]
    (8 everywhere for a symmetric checkpoint)."""
    if weight_packed.dtype != torch.int32:
        raise QuantkitError(f"compressed-tensors unpack: weight_packed must be int32, found {weight_packed.dtype}")
    out_f, in_f = weight_packed.shape[0], weight_packed.shape[1] * PACK
    if weight_shape is not None and [int(x) for x in weight_shape] != [out_f, in_f]:
        raise QuantkitError(f"compressed-tensors unpack: weight_shape {[int(x) for x in weight_shape]} does not match "
                            f"weight_packed {list(weight_packed.shape)} (inputs not a multiple of 8 are unsupported)")
    if weight_scale.dim() != 2 or weight_scale.shape[0] != out_f or in_f % weight_scale.shape[1]:
        raise QuantkitError(f"compressed-tensors unpack: weight_scale {list(weight_scale.shape)} does not fit "
                            f"weight [{out_f}, {in_f}]")
    q = _unpack(weight_packed, NATURAL_ORDER, dim=1)
    ng = weight_scale.shape[1]
    if weight_zero_point is None:
        zeros = torch.full((out_f, ng), SYM_ZERO, dtype=torch.uint8, device=weight_packed.device)
    else:
        if weight_zero_point.shape != (-(-out_f // PACK), ng):
            raise QuantkitError(f"compressed-tensors unpack: weight_zero_point {list(weight_zero_point.shape)} does "
                                f"not fit weight [{out_f}, {in_f}] with {ng} groups")
        zeros = _unpack(weight_zero_point, NATURAL_ORDER, dim=0)[:out_f].contiguous()
    return q, weight_scale.float(), zeros


LAYOUTS = ("autoawq", "compressed-tensors")


def packed_tensors(base: str, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, layout: str,
                   symmetric: bool = False, scale_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The tensors one quantized linear writes in place of `base + "weight"`, named as engines load them.

    base is the module prefix with its dot ("model.layers.0.self_attn.q_proj."). autoawq: qweight, qzeros, scales
    (fp16); compressed-tensors: weight_packed, weight_scale (scale_dtype, the model's dtype), weight_shape, and
    weight_zero_point when asymmetric."""
    if layout == "autoawq":
        return dict(zip((base + "qweight", base + "qzeros", base + "scales"), pack_autoawq(q, scales, zeros)))
    if layout != "compressed-tensors":
        raise QuantkitError(f"INT4 layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    packed, scale, zp, shape = pack_compressed_tensors(q, scales, zeros, symmetric, scale_dtype)
    out = {base + "weight_packed": packed, base + "weight_scale": scale, base + "weight_shape": shape}
    if zp is not None:
        out[base + "weight_zero_point"] = zp
    return out


def quantization_config_autoawq(ignore: list[str], group: int = GROUP, zero_point: bool = True) -> dict:
    """config.json `quantization_config` of an AutoAWQ GEMM checkpoint (what transformers and vLLM read)."""
    return {
        "quant_method": "awq",
        "bits": BITS,
        "group_size": group,
        "zero_point": zero_point,
        "version": "gemm",
        "modules_to_not_convert": list(ignore),
    }


# compressed-tensors targets: experts are named both as on disk (w1/w2/w3) and as engines rename them
# (gate_proj/up_proj/down_proj), since vLLM resolves MoE schemes by the renamed projections (specs/formats.md §2b).
ATTENTION_TARGETS = ["re:.*self_attn\\.(q|k|v|o)_proj$"]
EXPERT_TARGETS = [
    "re:.*block_sparse_moe\\.experts\\.\\d+\\.(w1|w2|w3)$",
    "re:.*experts.*(gate_up|gate|up|down)_proj$",
]


def quantization_config_compressed_tensors(ignore: list[str], group: int = GROUP, symmetric: bool = True,
                                           attention: bool = True) -> dict:
    """compressed-tensors `pack-quantized` W4A16 config (W4A16 when symmetric, W4A16_ASYM otherwise). attention=False
    leaves q/k/v/o out of the targets (kept in higher precision by the recipe)."""
    targets = (ATTENTION_TARGETS if attention else []) + EXPERT_TARGETS
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": targets,
                "weights": {
                    "num_bits": BITS, "type": "int", "symmetric": symmetric, "strategy": "group",
                    "group_size": group, "dynamic": False, "block_structure": None, "actorder": None,
                    "observer": "minmax", "observer_kwargs": {},
                },
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": list(ignore),
        "kv_cache_scheme": None,
    }


# --------------------------------------------------------------------------------------------------------------------
# reading AWQ checkpoints


def awq_layout(quantization_config: dict | None) -> tuple[str, int, bool] | None:
    """(layout, group size, symmetric) of an INT4 checkpoint's `quantization_config`, or None for anything else.
    layout is "autoawq" (quant_method awq, GEMM version) or "compressed-tensors" (pack-quantized, 4-bit int groups)."""
    q = quantization_config or {}
    if q.get("quant_method") == "awq":
        if q.get("bits", BITS) != BITS or str(q.get("version", "gemm")).lower() != "gemm":
            raise QuantkitError(f"quantization_config: AWQ with bits={q.get('bits')} version={q.get('version')} is "
                                f"not supported (4-bit GEMM only)")
        if not q.get("zero_point", True):
            raise QuantkitError("quantization_config: AutoAWQ GEMM without zero points is not supported")
        return "autoawq", int(q.get("group_size", GROUP)), False
    if q.get("quant_method") == "compressed-tensors" and q.get("format") == "pack-quantized":
        for group in (q.get("config_groups") or {}).values():
            w = group.get("weights") or {}
            if w.get("num_bits") == BITS and w.get("type", "int") == "int" and w.get("strategy") == "group":
                return "compressed-tensors", int(w.get("group_size") or GROUP), bool(w.get("symmetric", True))
        raise QuantkitError("quantization_config: compressed-tensors pack-quantized without a 4-bit int group scheme")
    return None


class AwqCheckpointReader(CheckpointReader):
    """CheckpointReader for AutoAWQ GEMM and compressed-tensors pack-quantized checkpoints.

    A quantized linear `X.weight` is stored as X.qweight/X.qzeros/X.scales or X.weight_packed/X.weight_scale
    (/X.weight_zero_point/X.weight_shape); linears stored dense (a recipe may keep attention in BF16) are read
    as usual. `weight(name)` dequantizes packed linears, so the dense backend runs these checkpoints too;
    `awq_tensors(name)` gives the AutoAWQ-layout tensors the kernels read, repacking compressed-tensors ones."""

    def _check_tensors(self) -> None:
        self.awq = awq_layout(self.config.quantization_config)
        layout, group, symmetric = self.awq
        for spec in self.config.expected_tensors().values():
            base = spec.name[: -len("weight")]
            packed = base + ("qweight" if layout == "autoawq" else "weight_packed")
            if spec.is_linear and packed in self.entries:
                self._check_packed(spec.name, spec.shape, layout, group, symmetric)
                continue
            entry = self.entries.get(spec.name)
            if entry is None:
                raise QuantkitError(f"{self.folder}: tensor {spec.name!r} (or its packed form {packed!r}) is "
                                    f"missing from the checkpoint")
            if entry.shape != spec.shape:
                raise QuantkitError(f"{entry.file}: tensor {spec.name!r} has shape {list(entry.shape)}, "
                                    f"config.json implies {list(spec.shape)}")
            if entry.dtype.startswith("F8"):
                raise QuantkitError(f"{entry.file}: tensor {spec.name!r} is FP8 in an INT4 checkpoint")

    def _check_packed(self, name: str, shape: tuple[int, ...], layout: str, group: int, symmetric: bool) -> None:
        out_f, in_f = shape
        base = name[: -len("weight")]
        if in_f % group or out_f % PACK or group % PACK:
            raise QuantkitError(f"{self.folder}: {name!r} [{out_f}, {in_f}] does not split into groups of {group} "
                                f"and words of {PACK}")
        ng = in_f // group
        if layout == "autoawq":
            want = {"qweight": ((in_f, out_f // PACK), "I32"), "qzeros": ((ng, out_f // PACK), "I32"),
                    "scales": ((ng, out_f), None)}
        else:
            want = {"weight_packed": ((out_f, in_f // PACK), "I32"), "weight_scale": ((out_f, ng), None)}
            if not symmetric:
                want["weight_zero_point"] = ((-(-out_f // PACK), ng), "I32")
        for suffix, (wshape, wdtype) in want.items():
            entry = self.entries.get(base + suffix)
            if entry is None:
                raise QuantkitError(f"{self.folder}: tensor {base + suffix!r} is missing from the checkpoint")
            if entry.shape != wshape:
                raise QuantkitError(f"{entry.file}: tensor {entry.name!r} has shape {list(entry.shape)}, "
                                    f"expected {list(wshape)} for {layout} group {group}")
            ok = entry.dtype == wdtype if wdtype else entry.dtype in ("F16", "BF16", "F32")
            if not ok:
                raise QuantkitError(f"{entry.file}: tensor {entry.name!r} is {entry.dtype}, expected "
                                    f"{wdtype or 'F16, BF16 or F32'}")

    def is_packed(self, name: str) -> bool:
        base = name[: -len("weight")]
        return base + "qweight" in self.entries or base + "weight_packed" in self.entries

    def codes(self, name: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q uint8 [out, in], scales fp32 [out, in/g], zeros uint8 [out, in/g] of a packed linear, on device."""
        base = name[: -len("weight")]
        if self.awq[0] == "autoawq":
            return unpack_autoawq(*(self.tensor(base + s).to(device) for s in ("qweight", "qzeros", "scales")))
        zp = base + "weight_zero_point"
        return unpack_compressed_tensors(self.tensor(base + "weight_packed").to(device),
                                         self.tensor(base + "weight_scale").to(device),
                                         self.tensor(zp).to(device) if zp in self.entries else None)

    def awq_tensors(self, name: str, device: torch.device | str = "cpu"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(qweight int32 [in, out/8], qzeros int32 [in/g, out/8], scales [in/g, out]) of a packed linear on device:
        as stored for AutoAWQ; repacked (on device: a GPU does it in milliseconds) from compressed-tensors, the
        scales kept in their stored dtype (no rounding)."""
        base = name[: -len("weight")]
        if self.awq[0] == "autoawq":
            return tuple(self.tensor(base + s).to(device) for s in ("qweight", "qzeros", "scales"))  # type: ignore
        q, s, z = self.codes(name, device)
        qweight, qzeros, _ = pack_autoawq(q, s, z)
        return qweight, qzeros, self.tensor(base + "weight_scale").to(device).t().contiguous()

    def weight(self, name: str, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        if name.endswith(".weight") and name not in self.entries and self.is_packed(name):
            return dequantize_groups(*self.codes(name), dtype=dtype)
        return super().weight(name, dtype)


def open_awq_reader(folder: str | Path) -> AwqCheckpointReader | None:
    """An AwqCheckpointReader when folder's config.json declares an INT4 layout quantkit reads, else None."""
    try:
        raw = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None  # the ordinary reader reports a missing or corrupt config
    if not isinstance(raw, dict) or awq_layout(raw.get("quantization_config")) is None:
        return None
    return AwqCheckpointReader(folder)
