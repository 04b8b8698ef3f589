"""A small local lm-eval task (no hub access): last-token loglikelihood of a continuation after a
context (lambada-style metrics: acc = greedy match, perplexity), rows from a JSON-lines file."""

from __future__ import annotations

import json
from pathlib import Path

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_task(task_dir: Path, task: str, rows: list[dict]) -> Path:
    """task_dir/{task}.yaml and its data file of rows ({"context", "target"}); returns task_dir."""
    task_dir.mkdir(parents=True, exist_ok=True)
    data = task_dir / f"{task}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (task_dir / f"{task}.yaml").write_text(TASK_YAML.format(task=task, data=data))
    return task_dir
