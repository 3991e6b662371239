"""lm-evaluation-harness tasks on a bigtrain model: a small `LM` adapter and the suite that runs them.

The adapter answers the harness's three request types with the model's own forward pass:
`loglikelihood` (batched, right-padded, left-truncated to the model's context exactly as the
harness's `hf` model does, so the two agree to float tolerance on the same weights),
`loglikelihood_rolling` (the harness's disjoint rolling windows) and `generate_until` (greedy or
sampled, stopping at EOS or a stop string). It takes a built model, so it serves a checkpoint
(`bigtrain eval --tasks`) and the model being trained (`eval.tasks`) alike; data-parallel ranks
share a task's documents through the harness's own rank/world split.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from torch import nn

from bigtrain.checkpoint.format import TOKENIZER
from bigtrain.config import EvalConfig
from bigtrain.data.tokenizer import TextTokenizer
from bigtrain.distributed.communicator import Communicator
from bigtrain.engine.contract import Engine
from bigtrain.errors import BigtrainError
from bigtrain.eval.generate import filter_logits
from bigtrain.eval.tasks import manager_for, offline_by_default, resolve

Request = tuple[tuple[str, str] | None, list[int], list[int]]  # (strings, context ids, continuation ids)


class BigtrainLM(TemplateLM):
    """The harness's `LM` interface over a bigtrain model (tokens → logits) and its tokenizer."""

    def __init__(self, model: nn.Module, tokenizer: TextTokenizer, max_length: int, batch_size: int = 32,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 rank: int = 0, world_size: int = 1, seed: int = 1234, progress: bool = True):
        super().__init__()
        self.model, self.text, self._max_length = model, tokenizer, max_length
        self.batch_size, self.autocast, self.progress = batch_size, autocast, progress
        self._rank, self._world_size = rank, world_size
        self._device = next(model.parameters()).device
        self.generator = torch.Generator().manual_seed(seed)

    # --- what the harness asks of a model ---

    @property
    def eot_token_id(self) -> int:
        return self.text.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def tokenizer_name(self) -> str:
        return f"bigtrain-{self.text.sha256[:12]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.text.encode(string)  # byte-level BPE without BOS: nothing special to add

    def tok_decode(self, ids: list[int]) -> str:
        return self.text.decode(ids)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    @torch.no_grad()
    def _logits(self, tokens: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model(tokens.to(self._device))

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding gives the continuation) per
        request; longest first, so a batch pads little and the memory peak comes first."""
        from tqdm import tqdm

        longest = max((len(r[2]) for r in requests), default=0)
        if longest > self.max_length:
            raise BigtrainError(f"a continuation of {longest} tokens does not fit the model's {self.max_length}")
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm or not self.progress or self.rank)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            # the harness's window: context + continuation, cut from the left to max_length + 1,
            # minus the last token (nothing follows it to predict)
            windows = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):][:-1] for i in rows]
            batch = torch.full((len(rows), max(map(len, windows))), self.eot_token_id, dtype=torch.long)
            for row, window in enumerate(windows):
                batch[row, : len(window)] = torch.tensor(window)
            logits = self._logits(batch)
            for row, i in enumerate(rows):
                strings, _, continuation = requests[i]
                end = len(windows[row])
                logprobs = logits[row, end - len(continuation) : end].float().log_softmax(-1)
                target = torch.tensor(continuation, device=logprobs.device)
                answer = (float(logprobs.gather(-1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all()))
                results[i] = answer
                if strings is not None:
                    self.cache_hook.add_partial("loglikelihood", strings, answer)
            bar.update(len(rows))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in the harness's disjoint windows of `max_length` tokens."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows: list[Request] = []
        owner = []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[index] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, with `do_sample`, sampled) continuations, each stopped at EOS, at one of
        its `until` strings or after `max_gen_toks` tokens; requests whose contexts have the same
        length and generation settings run as one batch."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        eos = self.tok_decode([self.eot_token_id])
        groups: dict[tuple[int, str], list[tuple[int, list[int], dict[str, Any]]]] = {}
        for index, req in enumerate(requests):
            context, gen_kwargs = req.args
            kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
            kwargs["until"] = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            room = self.max_length - kwargs["max_gen_toks"]
            if room <= 0:
                raise BigtrainError(f"the task asks for {kwargs['max_gen_toks']} new tokens, but the model "
                                    f"sees only {self.max_length}; lower its max_gen_toks")
            ids = self.tok_encode(context)[-room:] or [self.prefix_token_id]
            key = (len(ids), json.dumps(kwargs, sort_keys=True, default=str))
            groups.setdefault(key, []).append((index, ids, kwargs))
        out: list[str] = [""] * len(requests)
        for items in groups.values():
            for start in range(0, len(items), self.batch_size):
                chunk = items[start : start + self.batch_size]
                texts = self._generate([ids for _, ids, _ in chunk], chunk[0][2])
                for (index, _, _), text in zip(chunk, texts, strict=True):
                    out[index] = text
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
        return out

    def _generate(self, rows: list[list[int]], kwargs: dict[str, Any]) -> list[str]:
        from lm_eval.models.utils import postprocess_generated_text

        until, sample = kwargs["until"], kwargs.get("do_sample") and kwargs.get("temperature", 0) > 0
        tokens = torch.tensor(rows, dtype=torch.long)
        new: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        for _ in range(kwargs["max_gen_toks"]):
            logits = self._logits(tokens)[:, -1].float()
            if sample:
                probs = filter_logits(logits / kwargs["temperature"], kwargs.get("top_k"), kwargs.get("top_p")).softmax(-1)
                chosen = torch.multinomial(probs.cpu(), 1, generator=self.generator)[:, 0]
            else:
                chosen = logits.argmax(-1).cpu()
            for row, token in enumerate(chosen.tolist()):
                if done[row]:
                    continue
                if token == self.eot_token_id:
                    done[row] = True
                    continue
                new[row].append(token)
                done[row] = any(stop and stop in self.tok_decode(new[row]) for stop in until)
            if all(done):
                break
            tokens = torch.cat([tokens, chosen[:, None]], dim=1)
        return [postprocess_generated_text(self.tok_decode(ids), until, None) for ids in new]

    # --- data-parallel ranks share the documents (the harness splits them by rank) ---

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, gathered, dst=dst)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


class TaskSuite:
    """The tasks of `--tasks` / `eval.tasks`, resolved and loaded once (an unknown name, a file
    that does not parse or data that cannot be read is refused before any model work)."""

    def __init__(self, specs: list[str], num_fewshot: int | None = None, limit: int | None = None,
                 fewshot_seed: int = 1234, bootstrap_iters: int = 1000, progress: bool = True):
        offline_by_default()
        if not progress:
            import datasets

            datasets.disable_progress_bars()
        self.specs, self.progress = specs, progress
        self.resolved = resolve(specs)
        self.num_fewshot, self.limit = num_fewshot, limit
        self.fewshot_seed, self.bootstrap_iters = fewshot_seed, bootstrap_iters
        self._manager = None
        self.names = list(self.load()["tasks"])

    def load(self) -> dict[str, Any]:
        """Fresh task objects (the harness keeps per-run state in them), as `evaluate` takes them."""
        if self._manager is None:
            self._manager = manager_for(self.resolved)
        loaded: dict[str, dict] = {"tasks": {}, "groups": {}, "group_map": {}}
        for spec, shown in zip(self.resolved, self._shown(), strict=True):
            try:
                one = self._manager.load([spec])
            except BigtrainError:
                raise
            except Exception as e:  # the harness raises many types: bad config, missing data, no network
                raise BigtrainError(f"task {shown}: cannot load it: {_load_problem(e)}") from None
            for key in loaded:
                loaded[key].update(one.get(key, {}))
        for task in loaded["tasks"].values():  # as the harness's simple_evaluate sets them
            if self.num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=self.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=self.fewshot_seed)
        return loaded

    def _shown(self) -> list[str]:
        return [s if isinstance(s, str) else s["task"] for s in self.resolved]

    def run(self, lm: BigtrainLM) -> dict[str, Any] | None:
        """The harness's results (on rank 0; None on other ranks), with the model left as it was."""
        from lm_eval.evaluator import evaluate

        was_training = lm.model.training
        lm.model.eval()
        started = time.perf_counter()
        # quiet: the harness's own progress bars and notes would interleave with the training log
        quiet = contextlib.redirect_stderr(io.StringIO()) if not self.progress else contextlib.nullcontext()
        try:
            with quiet:
                results = evaluate(lm=lm, task_dict=self.load(), limit=self.limit,
                                   bootstrap_iters=self.bootstrap_iters, log_samples=False)
        finally:
            lm.model.train(was_training)
        if results is not None:
            results["bigtrain"] = {"num_fewshot": self.num_fewshot, "limit": self.limit,
                                   "seconds": time.perf_counter() - started}
        return results


class TrainingTasks:
    """`eval.tasks` during training: the suite, resolved when training starts, run on the model
    the engine holds (whole on every rank: the layout check, `layout.layout_problem`, refuses other layouts); each
    data-parallel rank scores its share of the documents and rank 0 gets the metrics."""

    def __init__(self, cfg: EvalConfig, max_length: int, engine: Engine, comm: Communicator, tokenizer: Path):
        self.suite = TaskSuite(cfg.tasks, cfg.num_fewshot, cfg.limit, bootstrap_iters=0, progress=False)
        self.lm = BigtrainLM(engine.model, TextTokenizer.load(tokenizer), max_length, cfg.batch_size,
                             autocast=getattr(engine, "autocast", contextlib.nullcontext),
                             rank=comm.dp_rank, world_size=comm.dp_size, progress=False)

    def run(self) -> dict[str, float] | None:
        """`eval/<task>/<metric>` values and the seconds it took (`eval_tasks_s`) on rank 0, None
        on the other ranks."""
        results = self.suite.run(self.lm)
        return None if results is None else {**flat_metrics(results), "eval_tasks_s": results["bigtrain"]["seconds"]}


def _load_problem(e: BaseException) -> str:
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" and any(
            word in line.lower() for word in ("offline", "couldn't reach", "connection", "not found on the hub")):
        line += (" (the Hugging Face hub is offline here: point a task YAML at a local copy of the data, "
                 "see docs/evaluation.md, or set HF_DATASETS_OFFLINE=0 where the hub is reachable)")
    return line


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """`eval/<task>/<metric>` → value for every number in the harness's results (a filter other
    than `none` is appended as `/<filter>`), ready for the metric sinks."""
    flat = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and math.isnan(value):
                continue
            suffix = "" if filter_name == "none" else f"/{filter_name}"
            flat[f"eval/{task}/{metric}{suffix}"] = float(value)
    return flat


def results_table(results: dict[str, Any]) -> str:
    """The harness's own Markdown table of the results."""
    from lm_eval.utils import make_table

    return make_table(results)


def checkpoint_tokenizer(checkpoint: Path) -> TextTokenizer:
    path = checkpoint / TOKENIZER
    if not path.is_file():
        raise BigtrainError(f"{checkpoint} has no {TOKENIZER}: tasks are text, so the tokenizer the model was "
                            f"trained with is needed; copy it into the checkpoint as {TOKENIZER}")
    return TextTokenizer.load(path)


def results_file(checkpoint: Path) -> Path:
    """Where `bigtrain eval --tasks` records results: next to the checkpoint (one file per checkpoint)."""
    return checkpoint.parent / f"lm_eval-{checkpoint.name}.json"


def record_results(results: dict[str, Any], checkpoint: Path, out: Path | None = None) -> Path:
    """Append this evaluation to the checkpoint's results file (earlier ones are kept)."""
    out = out or results_file(checkpoint)
    history = json.loads(out.read_text()) if out.is_file() else {"checkpoint": str(checkpoint), "evaluations": []}
    keep = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better",
            "n-samples", "bigtrain")
    entry = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), **{k: results[k] for k in keep if k in results}}
    history["evaluations"].append(json.loads(json.dumps(entry, default=str)))
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(history, indent=2) + "\n")
    os.replace(tmp, out)
    return out
