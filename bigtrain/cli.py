"""The `bigtrain` command: one sub-command per job. Parsing, printing and the process's exit (code,
launcher watch, teardown); the work is elsewhere."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bigtrain.errors import BigtrainError, print_error


def cmd_quickstart(args: argparse.Namespace) -> None:
    from bigtrain.quickstart import quickstart, summary

    print(summary(quickstart(Path(args.out), args.minutes, args.corpus_mb, args.steps)))


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from bigtrain.data.prepare import iter_documents
    from bigtrain.data.tokenizer import TextTokenizer

    out = Path(args.out)
    if out.exists():
        raise BigtrainError(f"{out} already exists; choose another --out")
    tokenizer = TextTokenizer.train(iter_documents(args.input, args.text_field), args.vocab_size)
    tokenizer.save(out)
    print(f"wrote {out} (vocab {tokenizer.vocab_size}, sha256 {tokenizer.sha256[:12]})")


def cmd_prepare(args: argparse.Namespace) -> None:
    from bigtrain.data.prepare import prepare

    options = {"shard_tokens": args.shard_tokens, "text_field": args.text_field,
               "workers": args.workers, "strict": args.strict}
    if args.format == "mds":
        from bigtrain.data.mds import prepare_mds  # imports torch: only when asked for

        if args.seq_len is None:
            raise BigtrainError("--format mds needs --seq-len (an MDS sample is one seq_len+1 window)")
        manifest, meta = prepare_mds(args.input, args.tokenizer, args.out, args.seq_len, args.remote,
                                     **options)
    elif args.remote:
        raise BigtrainError("--remote needs --format mds (Arrow shards are read from a directory)")
    else:
        manifest = prepare(args.input, args.tokenizer, args.out, **options)
    totals = manifest["totals"]
    for problem in manifest["problems"]:
        print(f"bigtrain: warning: {problem}", file=sys.stderr)
    arrow_dir = Path(args.out) / "arrow" if args.format == "mds" else Path(args.out)
    print(f"wrote {totals['shards']} shards, {totals['documents']:,} documents, {totals['tokens']:,} tokens → {arrow_dir}")
    print(f"skipped {totals['empty_documents_skipped']:,} empty documents and {totals['bad_records_skipped']:,} bad "
          f"records; replaced invalid UTF-8 in {totals['documents_with_invalid_utf8']:,} documents")
    if args.format == "mds":
        where = " and ".join(str(w) for w in (Path(args.out) / "mds", args.remote) if w)
        print(f"wrote {meta['windows']:,} windows of {args.seq_len + 1} tokens as MDS → {where}")


def cmd_data_verify(args: argparse.Namespace) -> None:
    from bigtrain.data.report import verify

    print("\n".join(verify(args.dir)))


def cmd_data_inspect(args: argparse.Namespace) -> None:
    from bigtrain.data.report import format_report, inspect

    print("\n\n".join(format_report(r) for r in inspect(args.dir, args.samples)))


def cmd_data_to_mds(args: argparse.Namespace) -> None:
    from bigtrain.data.mds import write_mds

    meta = write_mds(args.arrow_dir, args.out, args.seq_len, remote=args.remote)
    where = " and ".join(w for w in (args.out, args.remote) if w)
    print(f"wrote {meta['windows']:,} windows of {args.seq_len + 1} tokens as MDS → {where}")


def cmd_train(args: argparse.Namespace) -> int | None:
    from bigtrain.distributed.launcher_watch import watch_launcher
    from bigtrain.train.signals import PREEMPTED_EXIT_CODE, StopRequest

    watch_launcher()
    with StopRequest() as stop:  # before the slow imports: a preemption notice then is kept too
        from bigtrain.config import load_config
        from bigtrain.train.loop import train

        overrides = [*args.overrides, *([f"run.wait_lock={args.wait_lock}"] if args.wait_lock is not None else [])]
        result = train(load_config(args.config, overrides), stop=stop)
    if result.preempted:
        if result.is_main:
            print(f"preempted at step {result.step}: saved {result.checkpoint}; exiting with "
                  f"{PREEMPTED_EXIT_CODE} (continue with run.resume=auto)")
        return PREEMPTED_EXIT_CODE
    if not result.is_main:
        return None
    if not result.losses:
        print(f"nothing to train: {result.checkpoint} is already at train.steps={result.step}")
        return None
    val = f", val_loss {result.val.loss:.4f}" if result.val else ""
    print(f"done: step {result.step}, loss {result.losses[-1]:.4f}{val}; checkpoint {result.checkpoint}")
    return None


def cmd_eval(args: argparse.Namespace) -> None:
    from bigtrain.convert.consolidate import load_full_model
    from bigtrain.engine.device import pick_device

    suite = eval_task_suite(args) if args.tasks else None  # bad tasks are refused before any weight is read
    model, cfg, checkpoint = load_full_model(args.checkpoint, pick_device(args.device))
    if suite is not None:
        from bigtrain.eval import harness

        results = suite.run(harness.BigtrainLM(model, harness.checkpoint_tokenizer(checkpoint), cfg.model.max_seq_len,
                                               args.batch_size))
        print(harness.results_table(results))
        print(f"wrote {harness.record_results(results, checkpoint, args.output and Path(args.output))}")
    if suite is None or args.data:
        eval_perplexity(args, model, cfg, checkpoint)


def eval_task_suite(args: argparse.Namespace):
    """The lm-eval tasks `--tasks` names, checked (and the checkpoint's tokenizer found) up front."""
    from bigtrain.checkpoint.io import open_checkpoint
    from bigtrain.eval import harness

    if (args.limit is not None and args.limit < 1) or (args.num_fewshot or 0) < 0 or args.batch_size < 1:
        raise BigtrainError("--limit and --batch-size must be positive and --num-fewshot at least 0")
    harness.checkpoint_tokenizer(open_checkpoint(args.checkpoint, checksums=False))  # checksums: when loaded
    return harness.TaskSuite(args.tasks.split(","), args.num_fewshot, args.limit)


def eval_perplexity(args: argparse.Namespace, model, cfg, checkpoint: Path) -> None:
    from bigtrain.config import TrainConfig
    from bigtrain.data.build import build_val_data
    from bigtrain.engine.local import local_engine
    from bigtrain.eval.perplexity import evaluate
    from bigtrain.train.loop import document_masking

    if args.data:
        cfg.data.val_path = args.data
    data = build_val_data(cfg.data, cfg.data.seq_len)
    if data is None:
        raise BigtrainError(f"{checkpoint} was trained without validation data; pass --data DIR")
    data_dir = args.data or cfg.data.val_path or f"the held-out {cfg.data.val_fraction:g} of the training data"
    engine = local_engine(model, TrainConfig(device=args.device))
    engine.documents = document_masking(cfg.data, checkpoint / "tokenizer.json")
    max_windows = None if args.max_batches is None else args.max_batches * cfg.data.micro_batch
    result = evaluate(engine.eval_loss, data, cfg.data.micro_batch, max_windows)
    print(f"{checkpoint}: loss {result.loss:.4f}, perplexity {result.perplexity:.3f} over {result.tokens:,} tokens of {data_dir}")


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from bigtrain.convert.consolidate import load_full_model
    from bigtrain.data.tokenizer import TextTokenizer
    from bigtrain.engine.device import pick_device
    from bigtrain.eval.generate import generate

    model, cfg, checkpoint = load_full_model(args.checkpoint, pick_device(args.device))
    tokenizer = TextTokenizer.load(checkpoint / "tokenizer.json")
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(args.num_samples):
        ids = generate(model, tokenizer.encode(args.prompt), args.max_new_tokens, cfg.model.max_seq_len,
                       tokenizer.eos_id, args.temperature, args.top_k, args.top_p, generator)
        print(args.prompt + tokenizer.decode(ids))


def cmd_convert(args: argparse.Namespace) -> None:
    from bigtrain.convert import hf, reshard

    if args.action == "to-hf":
        hf.to_hf(args.checkpoint, args.out, hf.parse_size(args.max_shard_size), args.overwrite)
    elif args.action == "from-hf":
        hf.from_hf(args.hf_dir, args.out, args.overrides, args.overwrite)
    else:
        reshard.reshard(args.checkpoint, args.out, args.overrides, args.overwrite)


def cmd_info(args: argparse.Namespace) -> None:
    from bigtrain.config import load_config
    from bigtrain.info import environment_report, model_report, plan_report
    from bigtrain.parallel.layout import world_size_for

    if not args.config:
        print(environment_report())
        return
    if (args.gpus is not None and args.gpus < 1) or args.gpu_mem <= 0 or args.gpus_per_node < 1:
        raise BigtrainError("--gpus, --gpu-mem and --gpus-per-node must be positive")
    cfg = load_config(args.config, args.overrides)
    gpus = args.gpus or world_size_for(cfg)
    if (args.json or args.rank) and not args.simulate:
        raise BigtrainError("--json and --rank go with --simulate")
    if args.simulate:
        from bigtrain.simulate import simulate, simulate_report

        result = simulate(cfg, gpus, args.rank, args.gpu_mem)
        print(json.dumps({k: result[k] for k in ("planned", "built")}) if args.json else simulate_report(result))
        return
    print(model_report(cfg))
    print(plan_report(cfg, gpus, args.gpu_mem, args.gpus_per_node, args.suggest))


def cmd_scaling(args: argparse.Namespace) -> None:
    from bigtrain.scaling import commands

    getattr(commands, f"{args.command}_{args.action.replace('-', '_')}")(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bigtrain", description="Pretrain Llama-style language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("quickstart", help="embedded corpus → tokenizer → shards → train → eval → samples")
    p.add_argument("--out", default="runs/quickstart", help="directory for data and the run")
    p.add_argument("--minutes", type=float, default=5.0, help="training time budget")
    p.add_argument("--corpus-mb", type=float, default=None, help="use only this many MB of the corpus")
    p.add_argument("--steps", type=int, default=None, help="train exactly this many steps (no time budget)")
    p.set_defaults(func=cmd_quickstart)

    tok = sub.add_parser("tokenizer", help="tokenizer jobs").add_subparsers(dest="action", required=True)
    p = tok.add_parser("train", help="train a byte-level BPE tokenizer")
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--text-field", default="text")
    p.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("prepare", help="tokenize raw text into Arrow shards")
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--shard-tokens", type=int, default=2**24, help="tokens per shard (at least, but a unit's last)")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl records and column of tables")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    p.add_argument("--format", choices=["arrow", "mds"], default="arrow", help="mds: also write OUT/mds for streaming")
    p.add_argument("--seq-len", type=int, default=None, help="window length of MDS samples (with --format mds)")
    p.add_argument("--remote", help="with --format mds: also upload the MDS shards there (s3://bucket/prefix, ...)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad .jsonl record")
    p.set_defaults(func=cmd_prepare)

    data = sub.add_parser("data", help="prepared-data tools").add_subparsers(dest="action", required=True)
    p = data.add_parser("verify", help="check shard checksums and counts against the manifest")
    p.add_argument("dir")
    p.set_defaults(func=cmd_data_verify)
    p = data.add_parser("inspect", help="totals, document-length histogram and decoded samples")
    p.add_argument("dir")
    p.add_argument("--samples", type=int, default=3)
    p.set_defaults(func=cmd_data_inspect)
    p = data.add_parser("to-mds", help="write a prepared Arrow dataset's windows as MDS shards")
    p.add_argument("arrow_dir")
    p.add_argument("out", nargs="?", help="local directory for the shards (optional with --remote)")
    p.add_argument("--remote", help="upload the shards there as they are written: s3://bucket/prefix "
                   "(endpoint from S3_ENDPOINT_URL), gs://..., or a directory")
    p.add_argument("--seq-len", type=int, required=True)
    p.set_defaults(func=cmd_data_to_mds)

    p = sub.add_parser("train", help="train from a YAML config with key=value overrides")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--wait-lock", type=float, metavar="SECONDS",
                   help="wait this long for another process to release the run directory (run.wait_lock)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="validation loss and perplexity, or lm-eval tasks, of a checkpoint")
    p.add_argument("checkpoint", help="a checkpoint directory (any layout) or a run directory (its latest)")
    p.add_argument("--data", help="prepared data directory (default: the run's data.val_path)")
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--tasks", help="lm-eval tasks instead of perplexity (also with --data): names (python_next_line, "
                   "the harness's registry) and task YAMLs or directories, comma-separated")
    p.add_argument("--num-fewshot", type=int, default=None, help="examples in each prompt (default: each task's own)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N documents of each task")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    p.add_argument("--output", help="results JSON (default: lm_eval-<checkpoint>.json next to the checkpoint)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_generate)

    convert = sub.add_parser("convert", help="Hugging Face Llama/Qwen3/Qwen3-MoE export/import, changing the parallel layout")
    actions = convert.add_subparsers(dest="action", required=True)
    p = actions.add_parser("to-hf", help="a checkpoint of any layout as a Hugging Face Llama, Qwen3 or Qwen3-MoE directory")
    p.add_argument("checkpoint", help="a checkpoint directory or a run directory (its latest)")
    p.add_argument("out")
    p.add_argument("--max-shard-size", default="5GB", help="split model.safetensors above this size")
    p = actions.add_parser("from-hf", help="a Hugging Face Llama, Qwen3 or Qwen3-MoE directory as a bigtrain checkpoint (model.init_from)")
    p.add_argument("hf_dir")
    p.add_argument("out")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config for the checkpoint, e.g. model.max_seq_len=4096")
    p = actions.add_parser("reshard", help="a checkpoint rewritten for another parallel layout, optimizer state included")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("overrides", nargs="+", metavar="key=value", help="e.g. parallel.engine=local parallel.tp=1 parallel.pp=1")
    for p in actions.choices.values():
        p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
        p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="environment, or a config's parameters, FLOPs/token and memory plan")
    p.add_argument("config", nargs="?")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--gpus", type=int, default=None, help="GPUs to plan for (default: the config's own layout, "
                   "tp × pp × sp × the dp its train.global_batch implies)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU in GiB")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--suggest", action="store_true", help="rank the layouts that fit by estimated step time")
    p.add_argument("--simulate", action="store_true", help="build one rank of the layout for real on this machine "
                   "(a fake process group of --gpus ranks) and print planned vs built GiB")
    p.add_argument("--rank", type=int, default=0, help="the rank --simulate builds")
    p.add_argument("--json", action="store_true", help="with --simulate: one JSON object {planned, built}")
    p.set_defaults(func=cmd_info)

    sweep = sub.add_parser("sweep", help="isoFLOP and grid sweeps").add_subparsers(dest="action", required=True)
    for action, text in [("plan", "write one resolved config per run and the plan table"),
                         ("run", "train every unfinished run (or submit them to Slurm)"),
                         ("status", "the state of every run"), ("collect", "finished runs' results → CSV")]:
        p = sweep.add_parser(action, help=text)
        p.add_argument("sweep", metavar="SWEEP.yaml")
        p.set_defaults(func=cmd_scaling)
        if action == "run":
            p.add_argument("--slurm", action="store_true", help="submit slurm/sweep.sbatch as one job array")
            p.add_argument("--throttle", type=int, default=None, help="at most K array tasks at once")
        if action == "collect":
            p.add_argument("--out", help="results CSV (default PLAN_DIR/results.csv)")
            p.add_argument("--plot", help="grid sweeps: PNG of loss vs the first grid key (default PLAN_DIR/grid.png)")
    scaling = sub.add_parser("scaling", help="scaling-law fits, µP coordinate checks and lr transfer").add_subparsers(dest="action", required=True)
    p = scaling.add_parser("fit", help="Chinchilla fits (Approaches 2 and 3) of a results CSV")
    p.add_argument("results", metavar="RESULTS.csv")
    p.add_argument("--plots", help="directory for the PNG plots")
    p.add_argument("--budget", type=float, help="compute budget (FLOPs) for the compute-optimal N and D")
    p.add_argument("--loss", help="loss column (default val_loss when every row has one, else loss)")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for the intervals")
    p.add_argument("--exclude-highest", type=int, default=0, help="leave out the K highest-loss points")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_scaling)
    p = scaling.add_parser("coord-check", help="µP coordinate check: activation RMS vs width, standard and µP")
    p.add_argument("config", metavar="CONFIG")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512], help="d_model values to train")
    p.add_argument("--steps", type=int, default=5, help="Adam steps per width (RMS is measured at steps 0..T)")
    p.add_argument("--plot", default="runs/coord-check.png", help="PNG of RMS vs width per step")
    p.add_argument("--json", action="store_true", help="print one JSON object: parametrization → width → RMS at step T")
    p.set_defaults(func=cmd_scaling)
    p = scaling.add_parser("transfer", help="learning-rate transfer: each width's best lr, per parametrization")
    p.add_argument("results", metavar="RESULTS.csv")
    p.add_argument("--plot", help="PNG of loss vs learning rate per width")
    p.add_argument("--loss", help="loss column (default val_loss when every row has one, else loss)")
    p.add_argument("--lr-column", default="train.lr")
    p.add_argument("--width-column", default="width")
    p.add_argument("--by", default="model.parametrization", help="column that splits the panels")
    p.set_defaults(func=cmd_scaling)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides += extra  # key=value overrides may also follow the options
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code = args.func(args)  # None means success; `train` returns its exit code
    except BigtrainError as e:
        print_error(str(e))
        return 1
    except KeyboardInterrupt:
        print("bigtrain: interrupted", file=sys.stderr)
        return 130
    return code or 0
