"""The lm-eval adapter on a small random model: its numbers are the model's own log-probabilities
and greedy continuations; which tasks `--tasks` means; the metric names; the layouts refused."""

import json
import math
from pathlib import Path

import pytest
import torch

from bigtrain.config import load_config
from bigtrain.data.tokenizer import TextTokenizer
from bigtrain.errors import BigtrainError
from bigtrain.eval import tasks
from bigtrain.eval.generate import generate
from bigtrain.eval.harness import BigtrainLM, TaskSuite, flat_metrics
from bigtrain.model import Llama
from bigtrain.parallel.layout import check_layout
from tests.helpers import small_model_config

MAX_LEN = 24


class Request:  # what the harness hands a model: `args` of one Instance
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def lm(stdlib_data):
    torch.manual_seed(0)
    model = Llama(small_model_config(vocab_size=512, max_seq_len=MAX_LEN)).eval()
    return BigtrainLM(model, TextTokenizer.load(stdlib_data[0] / "tokenizer.json"), MAX_LEN, batch_size=3,
                      progress=False)


def by_hand(lm, context: str, continuation: str) -> float:
    """log P(continuation | context) from one forward pass over the (left-truncated) window; the
    harness moves a context's trailing whitespace to the continuation."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = lm.text.encode(context + continuation), lm.text.encode(context)
    cont = whole[len(ctx):]
    window = whole[-(MAX_LEN + 1):]
    with torch.no_grad():
        logprobs = lm.model(torch.tensor([window[:-1]]))[0].log_softmax(-1)
    return sum(logprobs[len(window) - 1 - len(cont) + j, t].item() for j, t in enumerate(cont))


def test_loglikelihood_is_the_models_log_probability(lm):
    pairs = [("def main():\n", "    return 0"), ("import os", "\nimport sys"), ("x = 1", " + 2"),
             ("class A:\n    def f(self):\n        return self.value * 2\n" * 2, "    pass"),  # left-truncated
             ("for i in range(10):", "\n    print(i)")]
    assert len(lm.text.encode(pairs[3][0] + pairs[3][1])) > MAX_LEN + 1
    got = lm.loglikelihood([Request(*p) for p in pairs])  # batches of 3: right-padded, longest first
    for (context, continuation), (logprob, _) in zip(pairs, got, strict=True):
        assert logprob == pytest.approx(by_hand(lm, context, continuation), abs=1e-5)
        assert logprob < 0
    # the greedy flag: true exactly when greedy decoding produces the continuation
    context = lm.text.encode("def main():")
    greedy = generate(lm.model, context, 3, MAX_LEN, None, temperature=0)
    (_, is_greedy), (_, not_greedy) = lm._loglikelihood_tokens([(None, context, greedy),
                                                                (None, context, greedy[:2] + [greedy[2] + 1])])
    assert is_greedy and not not_greedy


def test_rolling_loglikelihood_scores_every_token_once(lm):
    short = "import os\nprint(os.getcwd())\n"
    ids = lm.text.encode(short)
    with torch.no_grad():
        logprobs = lm.model(torch.tensor([[lm.eot_token_id] + ids[:-1]]))[0].log_softmax(-1)
    expected = sum(logprobs[i, t].item() for i, t in enumerate(ids))
    long = "def f(x):\n    return [x * i for i in range(100)]\n" * 6
    assert len(lm.text.encode(long)) > 3 * MAX_LEN
    (got, got_long) = lm.loglikelihood_rolling([Request(short), Request(long)])
    assert got == pytest.approx(expected, abs=1e-4)
    # windows of MAX_LEN tokens, each token predicted once: the sum over windows scored one by one
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
        lm.text.encode(long), lm.eot_token_id, MAX_LEN, 1)]
    assert sum(len(cont) for _, cont in windows) == len(lm.text.encode(long))
    one_by_one = sum(lm._loglikelihood_tokens([(None, ctx, cont)])[0][0] for ctx, cont in windows)
    assert got_long == pytest.approx(one_by_one, abs=1e-4)


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(lm):
    prompts = ["def f(x):\n", "def f(y):\n", "import"]  # the first two share a length: one batch
    assert len(lm.text.encode(prompts[0])) == len(lm.text.encode(prompts[1]))
    kwargs = {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}
    got = lm.generate_until([Request(p, dict(kwargs)) for p in prompts])
    for prompt, text in zip(prompts, got, strict=True):
        full = lm.tok_decode(generate(lm.model, lm.text.encode(prompt), 12, MAX_LEN, lm.eot_token_id, temperature=0))
        assert text == full.split("\n\n")[0]
    sampled = [lm.generate_until([Request("def ", {"max_gen_toks": 8, "do_sample": True, "temperature": 1.0})])[0]
               for _ in range(3)]
    assert len(set(sampled)) > 1  # sampling draws from the seeded generator, not argmax


def test_shipped_task_names_paths_and_directories(tmp_path):
    shipped = tasks.shipped_tasks()["python_next_line"]
    (config,) = tasks.resolve(["python_next_line"])
    data = config["dataset_kwargs"]["data_files"]["test"]
    assert config["task"] == "python_next_line" and data == str(shipped.parent / "python_next_line.jsonl")
    docs = [json.loads(line) for line in open(data)]
    assert len(docs) == 500 and all(len(d["contexts"]) == 4 and 0 <= d["label"] < 4 for d in docs)
    assert sorted(sum(d["label"] == k for d in docs) for k in range(4))[0] > 100  # the answer's place is random
    # a copied task directory: its YAML reads its data relative to itself, wherever it is
    copy = tmp_path / "tasks" / "mine"
    copy.mkdir(parents=True)
    (copy / "mine.jsonl").write_text((shipped.parent / "python_next_line.jsonl").read_text())
    (copy / "mine.yaml").write_text(shipped.read_text().replace("task: python_next_line", "task: mine")
                                    .replace("python_next_line.jsonl", "mine.jsonl"))
    (copy / "base.yaml").write_text("output_type: multiple_choice\n")  # no task name: a base to include, skipped
    for spec in (str(copy / "mine.yaml"), str(tmp_path / "tasks")):
        (config,) = tasks.resolve([spec])
        assert config["task"] == "mine" and config["dataset_kwargs"]["data_files"]["test"] == str(copy / "mine.jsonl")


@pytest.mark.parametrize("spec, content, message", [
    ("nope.yaml", None, "task file not found: nope.yaml"),
    ("bad.yaml", "task: [unclosed\n", "task file {path} does not parse: "),
    ("notask.yaml", "dataset_path: json\n", "{path} is not an lm-eval task file: it has no `task:` name"),
    ("empty", "", "{path} holds no lm-eval task YAML"),
])
def test_bad_task_files_are_one_line(tmp_path, spec, content, message):
    path = tmp_path / spec
    if content is not None and spec.endswith(".yaml"):
        path.write_text(content)
    elif content is not None:
        path.mkdir()
    with pytest.raises(BigtrainError) as err:
        tasks.resolve([str(path) if content is not None else spec])
    assert str(err.value).startswith(message.format(path=path)) and "\n" not in str(err.value)


def test_a_task_whose_data_is_missing_is_refused_before_evaluation(tmp_path):
    (tmp_path / "t.yaml").write_text("task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                     "    test: missing.jsonl\ntest_split: test\noutput_type: multiple_choice\n"
                                     "doc_to_text: q\ndoc_to_choice: c\ndoc_to_target: 0\n")
    with pytest.raises(BigtrainError, match=r"^task t: cannot load it: ") as err:
        TaskSuite([str(tmp_path / "t.yaml")])
    assert "\n" not in str(err.value)


def test_flat_metrics_names_each_number():
    results = {"results": {"python_next_line": {"alias": "python_next_line", "acc,none": 0.5,
                                                "acc_stderr,none": 0.1, "exact_match,strict-match": 0.25,
                                                "acc_norm_stderr,none": "N/A", "word_perplexity,none": math.nan}}}
    assert flat_metrics(results) == {"eval/python_next_line/acc": 0.5, "eval/python_next_line/acc_stderr": 0.1,
                                     "eval/python_next_line/exact_match/strict-match": 0.25}


@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.pp=2", "parallel.sp=2", "parallel.zero_stage=3"])
def test_in_loop_tasks_are_refused_for_layouts_without_a_whole_model(layout):
    with pytest.raises(BigtrainError) as err:
        check_layout(load_config(None, ["eval.tasks=[python_next_line]", "parallel.engine=deepspeed", layout]), 2)
    assert str(err.value).startswith("eval.tasks needs a whole model and whole sequences on every rank: "
                                     "parallel.tp=1, parallel.pp=1, parallel.sp=1")
    check_layout(load_config(None, [layout, "parallel.engine=deepspeed"]), 2)  # without eval.tasks: fine
    check_layout(load_config(None, ["eval.tasks=[python_next_line]", "parallel.engine=deepspeed",
                                    "parallel.zero_stage=2"]), 2)


HELLASWAG_LOCAL = """\
include: hellaswag.yaml  # the harness's own prompt, choices and metrics
task: hellaswag_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: hellaswag_val.jsonl
training_split: null
"""
ARC_EASY_LOCAL = """\
include: arc_easy.yaml
task: arc_easy_local
dataset_path: parquet
dataset_name: null
dataset_kwargs:
  data_files:
    train: ../../ai2_arc/ARC-Easy/train-*.parquet
    validation: ../../ai2_arc/ARC-Easy/validation-*.parquet
    test: ../../ai2_arc/ARC-Easy/test-*.parquet
"""


def test_the_documented_recipes_for_local_hellaswag_and_arc_copies(lm, tmp_path):
    """docs/evaluation.md: copy the harness's task folder, add a YAML that includes its task and
    reads local files. Checked here on a few records of each dataset's schema."""
    import shutil

    import lm_eval
    import pyarrow as pa
    import pyarrow.parquet as pq

    harness_tasks = Path(lm_eval.__file__).parent / "tasks"
    for name in ("hellaswag", "arc"):
        shutil.copytree(harness_tasks / name, tmp_path / "my_tasks" / name, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "my_tasks" / "hellaswag" / "hellaswag_local.yaml").write_text(HELLASWAG_LOCAL)
    (tmp_path / "my_tasks" / "arc" / "arc_easy_local.yaml").write_text(ARC_EASY_LOCAL)
    swag = [{"ind": i, "activity_label": "Cooking", "ctx_a": "A man cracks an egg.", "ctx_b": "he", "ctx": "",
             "endings": ["fries it.", "sings.", "flies away.", "reads."], "source_id": "x", "split": "val",
             "split_type": "indomain", "label": str(i % 4)} for i in range(3)]
    (tmp_path / "my_tasks" / "hellaswag" / "hellaswag_val.jsonl").write_text("".join(json.dumps(d) + "\n" for d in swag))
    arc = pa.table({"id": ["q1", "q2"], "question": ["Which is a liquid?", "What do plants need?"],
                    "choices": [{"text": ["ice", "water", "rock"], "label": ["A", "B", "C"]},
                                {"text": ["light", "sand", "iron", "glass"], "label": ["1", "2", "3", "4"]}],
                    "answerKey": ["B", "1"]})
    (tmp_path / "ai2_arc" / "ARC-Easy").mkdir(parents=True)
    for split in ("train", "validation", "test"):
        pq.write_table(arc, tmp_path / "ai2_arc" / "ARC-Easy" / f"{split}-00000-of-00001.parquet")

    suite = TaskSuite([str(tmp_path / "my_tasks" / "hellaswag" / "hellaswag_local.yaml"),
                       str(tmp_path / "my_tasks" / "arc" / "arc_easy_local.yaml")], num_fewshot=1, progress=False)
    loaded = suite.load()["tasks"]
    doc = next(iter(loaded["hellaswag_local"].validation_docs()))
    assert doc["query"] == "Cooking: A man cracks an egg. He" and doc["gold"] == 0  # the harness's process_docs ran
    assert loaded["arc_easy_local"].doc_to_target(next(iter(loaded["arc_easy_local"].test_docs()))) == 1
    results = suite.run(lm)
    assert results["n-samples"]["hellaswag_local"]["effective"] == 3 and results["n-shot"]["arc_easy_local"] == 1
    assert set(flat_metrics(results)) >= {"eval/hellaswag_local/acc_norm", "eval/arc_easy_local/acc"}


def test_shipped_task_is_built_from_validation_files_only(tmp_path):
    import platform
    import re

    from bigtrain.data.corpus import write_default_corpus
    from bigtrain.eval import next_line

    folder = tasks.shipped_tasks()["python_next_line"].parent
    shipped = [json.loads(line) for line in (folder / "python_next_line.jsonl").read_text().splitlines()]
    train_jsonl, _ = write_default_corpus(tmp_path, val_fraction=next_line.VAL_FRACTION)
    trained_on = {json.loads(line)["path"] for line in train_jsonl.read_text().splitlines()}
    sources = {d["source"].rsplit(":", 1)[0] for d in shipped}
    assert len(sources) > 40 and not sources & trained_on
    built_with = re.search(r"of Python (\S+)'s standard library", (folder / "python_next_line.yaml").read_text())[1]
    if platform.python_version() != built_with:
        pytest.skip(f"the shipped task was built from Python {built_with}'s standard library")
    assert next_line.build(next_line.val_documents(), len(shipped), seed=0) == shipped  # reproducible


def test_the_console_prints_a_task_record_on_one_line():
    from bigtrain.train.sinks.console import format_record

    record = {"step": 200, "tokens": 409600, "eval/python_next_line/acc": 0.375, "eval/x/exact_match/strict": 0.5,
              "eval_tasks_s": 3.42}
    assert format_record(record) == "step    200 | python_next_line/acc 0.3750 | x/exact_match/strict 0.5000 | 3.4 s"
