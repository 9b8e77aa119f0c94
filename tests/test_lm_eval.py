"""lm-evaluation-harness 0.4.13 `local-completions`, with its default settings, against `dgemma serve` on the bundled
Sudoku model (slow; `pip install 'dgemma[lm_eval]'`).

By default the harness tokenizes prompts itself with transformers' `AutoTokenizer` from the model folder (without
special tokens) and sends token ids. The bundled tokenizer files tokenize as dgemma does, and the checkpoint's
`add_bos_token` makes the server put BOS before such a prompt, so the generation score with token-id prompts equals
the score with text prompts (`tokenized_requests=False`), and both solve easy puzzles.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from dgemma.model.checkpoint import BUNDLED_MODELS
from dgemma.tasks import sudoku as S

pytestmark = pytest.mark.slow
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("fastapi")

PUZZLES = 12
TASK = """task: sudoku_easy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 100
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore: [" "]
metadata:
  version: 1.0
"""


def _task(d: Path) -> Path:
    rng = random.Random(0)
    rows = []
    for _ in range(PUZZLES):
        puzzle, solution = S.generate(45, rng)
        rows.append({"prompt": S.prompt_text(puzzle), "target": S.target_text(solution)})
    (d / "easy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "sudoku_easy.yaml").write_text(TASK.format(data=d / "easy.jsonl"))
    return d


def _score(url: str, include: Path, **model_args: str) -> float:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    args = {"model": str(BUNDLED_MODELS["sudoku"]), "base_url": url + "/v1/completions", **model_args}
    out = simple_evaluate(
        model="local-completions",
        model_args=",".join(f"{k}={v}" for k, v in args.items()),
        tasks=["sudoku_easy"],
        task_manager=TaskManager(include_path=str(include)),
    )
    return out["results"]["sudoku_easy"]["exact_match,none"]


def test_local_completions_defaults_match_text_prompts(tmp_path):
    from test_server import _start, _stop

    include = _task(tmp_path)
    name = str(BUNDLED_MODELS["sudoku"])  # the harness loads its tokenizer from the model name
    proc, url = _start("sudoku", "--served-model-name", name, "--max-model-len", "512")
    try:
        by_ids = _score(url, include)  # the defaults: AutoTokenizer, token-id prompts
        by_text = _score(url, include, tokenized_requests="False")
    finally:
        assert _stop(proc) == 0
    print(f"sudoku_easy exact match: token ids {by_ids:.3f}, text {by_text:.3f}")
    assert by_ids == by_text and by_ids >= 0.5
