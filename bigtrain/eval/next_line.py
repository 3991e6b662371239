"""`python_next_line`: the lm-eval task bigtrain ships, built from the embedded corpus.

Each document is one line of a Python function and four contexts, each a few lines of a function:
the lines that really come before it, and those before a line of the same indentation in three
other files. The model scores the line after each context and picks the one under which it is
most likely (chance: 25 %). Choosing among four candidate *lines* after one context would mostly
measure how common each line is on its own; scoring one line under four contexts (the Winogrande
construction, lm-eval's "multiple input") cancels that, so only the use of the context counts.
The files come from the validation split with `val_fraction=0.05`, which lies inside the
validation split of every larger fraction, so no run on the embedded corpus trains on them. Rebuild with `python -m bigtrain.eval.next_line DIR` (the shipped task records the
Python version whose standard library it was built from in its YAML).
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import platform
import random
import tempfile
import tokenize
from dataclasses import dataclass
from pathlib import Path

from bigtrain.data.corpus import write_default_corpus

VAL_FRACTION = 0.05
CONTEXT_LINES = 8  # at most this many lines before the target
CONTEXT_CHARS = 360  # and at most this many characters
LINE_CHARS = (12, 80)  # a target or distractor line's length without its indentation
CHOICES = 4
DRAWS = 30  # candidates drawn for the other contexts
TASK = "python_next_line"
TASK_YAML = """\
# Which of four snippets of Python functions does this line continue? (chance: 25 %)
# Built by `python -m bigtrain.eval.next_line DIR` from the validation files of the embedded
# corpus (val_fraction {val_fraction}) of Python {python}'s standard library, seed {seed}: {size} documents.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {task}.jsonl  # bigtrain reads data_files relative to this file
test_split: test
output_type: multiple_choice
doc_to_text: label  # an index: the choices are contexts ("multiple input"), the target is the line
doc_to_choice: contexts
doc_to_target: line
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@dataclass
class Line:
    text: str  # the whole line, indentation included, no newline
    path: str
    number: int  # 1-based
    context: str  # the lines before it (ending with a newline)
    function: int  # the line of its function's `def`

    @property
    def indent(self) -> str:
        return self.text[: len(self.text) - len(self.text.lstrip())]


def single_statement_lines(source: str) -> set[int]:
    """Rows that hold one whole logical line (not a continuation, string, or comment line)."""
    rows, start, prev = set(), None, tokenize.NEWLINE
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type in (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING):
                continue
            if prev == tokenize.NEWLINE and tok.type != tokenize.NEWLINE:
                start = tok.start[0]
            if tok.type == tokenize.NEWLINE and start is not None:
                if tok.start[0] == start:
                    rows.add(start)
                start = None
            prev = tok.type if tok.type == tokenize.NEWLINE else tokenize.OP
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return set()
    return rows


def candidate_lines(path: str, source: str) -> list[Line]:
    """Lines inside functions that make good targets: one whole statement of moderate length,
    with at least two lines of the function before it."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines, whole = source.splitlines(), single_statement_lines(source)
    found, seen = [], set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.end_lineno:
            continue
        first = node.lineno  # the `def` line (decorators come before it)
        for number in range(first + 2, node.end_lineno + 1):
            text = lines[number - 1]
            body = text.strip()
            if number in seen or number not in whole or "\t" in text or not LINE_CHARS[0] <= len(body) <= LINE_CHARS[1]:
                continue
            if body.startswith(("#", '"', "'")) or not text.isascii():
                continue
            before = lines[max(first - 1, number - 1 - CONTEXT_LINES): number - 1]
            while before and sum(len(x) + 1 for x in before) > CONTEXT_CHARS:
                before = before[1:]
            if len(before) < 2 or not all(x.isascii() for x in before):
                continue
            seen.add(number)  # a nested function's line counts once
            found.append(Line(text, path, number, "".join(x + "\n" for x in before), first))
    return found


def build(val_documents: list[tuple[str, str]], size: int, seed: int = 0) -> list[dict]:
    """`size` documents from (path, source) pairs: at most one line per function; the other
    contexts come from functions of other files whose own next line has the same indentation."""
    rng = random.Random(seed)
    lines = [line for path, source in val_documents for line in candidate_lines(path, source)]
    by_indent: dict[str, list[Line]] = {}
    for line in lines:
        by_indent.setdefault(line.indent, []).append(line)
    docs, used = [], set()
    for target in rng.sample(lines, len(lines)):
        if len(docs) == size:
            break
        if (target.path, target.function) in used:
            continue
        contexts, body = [target.context], target.text.strip()
        for other in rng.sample(by_indent[target.indent], min(DRAWS, len(by_indent[target.indent]))):
            if other.path != target.path and other.context not in contexts and body not in other.context:
                contexts.append(other.context)
            if len(contexts) == CHOICES:
                break
        if len(contexts) < CHOICES:
            continue
        label = rng.randrange(CHOICES)
        contexts = contexts[1:label + 1] + [target.context] + contexts[label + 1:]
        used.add((target.path, target.function))
        docs.append({"contexts": contexts, "line": target.text, "label": label,
                     "source": f"{target.path}:{target.number}"})
    return docs


def val_documents() -> list[tuple[str, str]]:
    """(path, source) of the embedded corpus's validation files at `VAL_FRACTION`."""
    with tempfile.TemporaryDirectory() as tmp:
        _, val = write_default_corpus(Path(tmp), val_fraction=VAL_FRACTION)
        return [(r["path"], r["text"]) for r in map(json.loads, val.read_text().splitlines())]


def write_task(out_dir: Path, size: int = 500, seed: int = 0) -> Path:
    """The task directory: `python_next_line.jsonl` and the lm-eval task YAML that reads it."""
    docs = build(val_documents(), size, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{TASK}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (out_dir / f"{TASK}.yaml").write_text(TASK_YAML.format(
        task=TASK, python=platform.python_version(), val_fraction=VAL_FRACTION, seed=seed, size=len(docs)))
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="directory for the task YAML and its JSONL")
    parser.add_argument("--size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote {write_task(args.out_dir, args.size, args.seed)}")


if __name__ == "__main__":
    main()
