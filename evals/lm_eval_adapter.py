"""lm-eval on quantkit's runtime: a `quantkit` model for lm-evaluation-harness, and offline task files.

    results = run_lm_eval("MiniMax-M2-FP8", ["quantkit_mc", "quantkit_gen", "quantkit_ppl"], limit=None)
    # or: lm_eval --model quantkit --model_args pretrained=PATH,backend=fp8 --tasks hellaswag   (data available)

Importing this module registers the model under the name `quantkit`. Loglikelihoods come from the same forward
pass that `quantkit eval` uses; generation is greedy (or sampled when a task asks) with the checkpoint's chat
template when lm-eval applies one. The three tasks shipped in evals/tasks/ (multiple choice, generation,
perplexity) run with no network: their data is jsonl beside the YAML.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from quantkit import tokenizer as tok
from quantkit.errors import QuantkitError
from quantkit.runtime import Sampling, generate, load_model

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LOCAL_TASKS = ("quantkit_mc", "quantkit_gen", "quantkit_ppl", "quantkit_passkey")


def _tokenizer(path: str):
    """The checkpoint folder's tokenizer, or the vocabulary stored in a GGUF file."""
    from quantkit.runtime.gguf import find_gguf, tokenizer_from_gguf

    return tokenizer_from_gguf(path) if find_gguf(path) is not None else tok.load_tokenizer(path)


@register_model("quantkit")
class QuantkitLM(TemplateLM):
    def __init__(self, pretrained: str, backend: str = "auto", device: str | None = None, dtype: str = "float32",
                 batch_size: int | str = 1, max_length: int | None = None, max_gen_toks: int = 256, **kwargs):
        super().__init__()
        self.path = str(pretrained)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(self.path, dtype=getattr(torch, dtype), device=device, backend=backend)
        self.tok = _tokenizer(self.path)
        cfg = self.model.cfg
        eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
        self._eot = int(eos)
        self._bos = int(cfg.bos_token_id) if cfg.bos_token_id is not None else self._eot
        self._max_length = int(max_length or cfg.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)

    # ---- what lm-eval asks of a model ----------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._bos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.path

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string, add_special_tokens=False).ids  # the chat template writes BOS itself

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return tok.apply_chat_template(self.path, chat_history, add_generation_prompt=add_generation_prompt)

    # ---- scoring -------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def continuation_logprob(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Sum of log p(continuation | context) and whether every continuation token is the argmax."""
        full = (context + continuation)[-(self.max_length + 1):]
        n = len(continuation)
        inp = torch.tensor([full[:-1]], dtype=torch.long, device=self.model.device)
        logits = self.model(inp, self.model.new_cache(1, inp.shape[1]))[0, -n:].float()  # [n, V]
        logp = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(full[-n:], device=logp.device)
        total = float(logp.gather(-1, target[:, None]).double().sum())
        return total, bool((logp.argmax(-1) == target).all())

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return [self.continuation_logprob(ctx, cont) for _, ctx, cont in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            windows = get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1)
            total = 0.0
            for ctx, cont in map(make_disjoint_window, windows):
                total += self.continuation_logprob(list(ctx), list(cont))[0]
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            ids = self.tok_encode(context)[-(self.max_length - max_new):]
            new = generate(self.model, [ids], max_new, Sampling(temperature=temperature),
                           stop_ids=(self.eot_token_id,))[0]
            text = self.tok.decode([t for t in new if t != self.eot_token_id], skip_special_tokens=False)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
        return out


def _resolved_tasks(dest: Path) -> Path:
    """Copy the shipped task YAML into dest with their jsonl paths made absolute (lm-eval reads them from CWD)."""
    for src in TASKS_DIR.glob("*.yaml"):
        (dest / src.name).write_text(src.read_text().replace("{TASKS_DIR}", str(TASKS_DIR)))
    return dest


def run_lm_eval(model_path: str | Path, tasks: list[str], backend: str = "auto", device: str | None = None,
                limit: int | None = None, apply_chat_template: bool = False) -> dict:
    """Evaluate with lm-eval; the shipped tasks need no network, standard ones need their data cached."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise QuantkitError("--tasks: name at least one task")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    tmp = Path(tempfile.mkdtemp(prefix="quantkit-tasks-"))
    try:
        manager = TaskManager(include_path=str(_resolved_tasks(tmp)))
        missing = [t for t in tasks if t not in manager.all_tasks]
        if missing:
            raise QuantkitError(f"--tasks: unknown lm-eval tasks {missing}")
        lm = QuantkitLM(str(model_path), backend=backend, device=device)
        results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                  apply_chat_template=apply_chat_template, log_samples=False,
                                  bootstrap_iters=0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"results": results["results"], "n-samples": results.get("n-samples", {}),
            "versions": results.get("versions", {})}
