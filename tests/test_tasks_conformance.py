"""Conformance of the task conversions on the real data in ../shared (skipped when it is absent).

* All 1,319 GSM8K test problems become conversations whose calculator calls reproduce the
  annotated values, and `extract_answer` reads the `#### N` line of every reference solution.
  The calculator and the annotations agree in value but not always in spelling, so values are
  compared as numbers (relative tolerance 1e-9). The differences found in the test split:
    - integers printed as floats by true division: "2/2" -> calculator "1.0", annotation "1"
      (978 of 4,282 calls);
    - trailing zeros or float noise: "4*4" annotated "16.00", "11/18*162" -> "99.00000000000001"
      annotated "99" (163 calls);
    - one annotation holds a fraction rather than a decimal: "<<3/4=3/4>>" (compared as 0.75).
* All 164 HumanEval canonical solutions pass through HumanEval.evaluate in the sandbox (about
  0.05 s each here, so all of them run in the default tier, four at a time).
"""

import json
import math
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import pytest

from flaxchat.calculator import use_calculator
from flaxchat.tasks.gsm8k import GSM8K, extract_answer
from flaxchat.tasks.humaneval_task import HumanEval

SHARED = Path(__file__).resolve().parents[2] / "shared"
GSM8K_TEST = SHARED / "data" / "gsm8k" / "test.jsonl"
HUMANEVAL = SHARED / "data" / "humaneval" / "HumanEval.jsonl.gz"

pytestmark = pytest.mark.conformance


def _need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is absent: the conformance tier needs the ../shared reference data")


def _number(text: str) -> float:
    text = text.replace(",", "").strip()
    return float(Fraction(text)) if "/" in text else float(text)


def test_gsm8k_test_split_tool_calls_and_answers():
    _need(GSM8K_TEST)
    task = GSM8K.from_jsonl(str(GSM8K_TEST))
    references = [json.loads(line)["answer"] for line in GSM8K_TEST.read_text().splitlines() if line.strip()]
    assert len(task) == len(references) == 1319
    calls = 0
    for i in range(len(task)):
        conv = task.example(i)
        parts = conv["messages"][1]["content"]
        assert parts[-1]["type"] == "text" and "#### " in parts[-1]["text"], i  # final line stays text
        for call, output in zip(parts, parts[1:]):
            if call["type"] != "python":
                continue
            calls += 1
            assert output["type"] == "python_output", (i, call)
            value = use_calculator(call["text"])
            assert value is not None, (i, call["text"])
            assert math.isclose(_number(value), _number(output["text"]), rel_tol=1e-9, abs_tol=1e-9), \
                (i, call["text"], output["text"], value)
        final_line = references[i].strip().splitlines()[-1]
        assert final_line.startswith("#### ")
        expected = final_line[len("#### "):].strip().replace(",", "")
        assert extract_answer(references[i]) == expected
        assert task.evaluate(conv, f"The answer is\n#### {expected}") == 1.0
        # the reference solution itself, as the assistant's rendered reply would read, scores 1
        # through the eval's own grading
        reply = "".join(p["text"] for p in parts)
        assert task.evaluate(conv, references[i]) == 1.0 and task.evaluate(conv, reply) == 1.0
    assert calls == 4282


def test_humaneval_canonical_solutions_pass():
    _need(HUMANEVAL)
    task = HumanEval(str(HUMANEVAL))
    assert len(task) == 164 and task.example(0)["task_id"] == "HumanEval/0"

    def score(i: int) -> float:
        conv = task.example(i)
        return task.evaluate(conv, conv["messages"][1]["content"])

    with ThreadPoolExecutor(max_workers=4) as pool:
        scores = list(pool.map(score, range(len(task))))
    failed = [task.example(i)["task_id"] for i, s in enumerate(scores) if s != 1.0]
    assert not failed
    # and the grader can fail: a wrong body scores 0
    conv = task.example(0)
    assert task.evaluate(conv, conv["messages"][0]["content"] + "    return None\n") == 0.0
