"""flaxchat.tasks: GSM8K tool-call conversion and grading, mixtures, slicing, user JSONL errors,
demo and spelling tasks, and that one example of every task renders with the chat tokenizer.
Offline and fast (HF loading is in test_tasks_hf.py)."""

import json
from types import SimpleNamespace

import pytest

from flaxchat.calculator import use_calculator
from flaxchat.chat_format import render_conversation, render_for_completion
from flaxchat.tasks import Task, TaskError, TaskMixture
from flaxchat.tasks.arc import ARC
from flaxchat.tasks.demo import VAL_SEED_OFFSET, DemoChat, DemoMath, val_seed
from flaxchat.tasks.gsm8k import GSM8K, extract_answer, gsm8k_conversation
from flaxchat.tasks.humaneval_task import HumanEval, extract_program
from flaxchat.tasks.mmlu import MMLU, extract_letter, render_mc
from flaxchat.tasks.smoltalk import SmolTalk
from flaxchat.tasks.spelling import COMMON_WORDS, SimpleSpelling, SpellingBee
from flaxchat.tasks.user_jsonl import IDENTITY_JSONL, UserJSONL
from flaxchat.tokenizer import Tokenizer


class Toy(Task):
    def __init__(self, n=10, tag="a", **kw):
        super().__init__(**kw)
        self.n, self.tag = n, tag

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": f"{self.tag}{index}"},
                             {"role": "assistant", "content": "ok"}], "i": index, "tag": self.tag}


# --------------------------------------------------------------------------- GSM8K

WENG = ("Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
        "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10")


def test_gsm8k_tool_parts_exact():
    conv = gsm8k_conversation("How much did Weng earn?", WENG)
    assert conv["messages"][0] == {"role": "user", "content": "How much did Weng earn?"}
    assert conv["messages"][1]["role"] == "assistant"
    assert conv["messages"][1]["content"] == [
        {"type": "text", "text": "Weng earns 12/60 = $"},
        {"type": "python", "text": "12/60"},
        {"type": "python_output", "text": "0.2"},
        {"type": "text", "text": "0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $"},
        {"type": "python", "text": "0.2*50"},
        {"type": "python_output", "text": "10"},
        {"type": "text", "text": "10.\n#### 10"},
    ]


def test_gsm8k_annotation_at_start_adjacent_and_without_equals():
    parts = gsm8k_conversation("q", "<<2+3=5>><<5*4=20>>20 total <<7>>\n#### 20")["messages"][1]["content"]
    assert parts == [
        {"type": "python", "text": "2+3"}, {"type": "python_output", "text": "5"},
        {"type": "python", "text": "5*4"}, {"type": "python_output", "text": "20"},
        {"type": "text", "text": "20 total "},
        {"type": "python", "text": "7"}, {"type": "python_output", "text": ""},
        {"type": "text", "text": "\n#### 20"},
    ]


@pytest.mark.parametrize("answer", [
    WENG,
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72",
    "He pays 1,200*3 = <<1,200*3=3,600>>3,600 dollars.\nThat leaves 3,600-5,000 = <<3600-5000=-1400>>-1400.\n#### -1,400",
])
def test_gsm8k_calculator_reproduces_annotations(answer):
    parts = gsm8k_conversation("q", answer)["messages"][1]["content"]
    calls = [(a["text"], b["text"]) for a, b in zip(parts, parts[1:]) if a["type"] == "python"]
    assert calls
    for expr, value in calls:
        assert float(use_calculator(expr)) == pytest.approx(float(value.replace(",", "")))


@pytest.mark.parametrize("text,expected", [
    ("so #### 1,234", "1234"), ("#### -7", "-7"), ("#### 3.5\n", "3.5"), ("#### 10 dollars", "10"),
    ("the answer is 42", None), ("####42", None), ("#### 1,000,000", "1000000"), ("a\n#### 0", "0"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_gsm8k_evaluate_and_reward():
    task = GSM8K("test", rows=[{"question": "q", "answer": "x <<1+1=2>>2\n#### 1,000"}], shuffle_seed=None)
    conv = task.example(0)
    assert task.evaluate(conv, "blah #### 1000") == 1.0
    assert task.evaluate(conv, "blah #### 1,000") == 1.0
    assert task.evaluate(conv, "blah #### 1000.0") == 0.0  # string equality, as nanochat grades
    assert task.evaluate(conv, "no final line") == 0.0
    assert task.reward(conv, "#### 1000") == 1.0 and isinstance(task.reward(conv, "#### 9"), float)


def test_gsm8k_from_jsonl(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"question": "Q1", "answer": "<<1+2=3>>3\n#### 3"}) + "\n\n"
                    + json.dumps({"question": "Q2", "answer": "#### 4"}) + "\n")
    task = GSM8K.from_jsonl(str(path))
    assert len(task) == 2 and task.example(0)["messages"][0]["content"] == "Q1"
    path.write_text(json.dumps({"question": "Q1"}) + "\n")
    with pytest.raises(TaskError, match=r"g\.jsonl:1: .*'answer'"):
        GSM8K.from_jsonl(str(path))


# --------------------------------------------------------------------------- Task / TaskMixture

def test_slicing():
    assert len(Toy(10)) == 10
    t = Toy(10, start=2, stop=9, step=3)  # 2, 5, 8
    assert len(t) == 3 and [t.example(i)["i"] for i in range(3)] == [2, 5, 8]
    assert len(Toy(5, stop=420)) == 5  # stop past the end is clamped
    with pytest.raises(IndexError):
        t.example(3)
    with pytest.raises(IndexError):
        t.example(-1)
    with pytest.raises(TaskError):
        Toy(5, step=0)
    with pytest.raises(TaskError):
        Toy(5, start=4, stop=2)


def test_mixture_determinism_and_oversampling():
    def keys(m):
        return [(m.example(i)["tag"], m.example(i)["i"]) for i in range(len(m))]

    a = TaskMixture([(Toy(5, "a"), 1), (Toy(4, "b"), 3)], seed=7)
    assert len(a) == 5 + 12
    ka = keys(a)
    assert ka == keys(TaskMixture([(Toy(5, "a"), 1), (Toy(4, "b"), 3)], seed=7))
    assert ka != keys(TaskMixture([(Toy(5, "a"), 1), (Toy(4, "b"), 3)], seed=8))
    assert sorted(ka) == sorted([("a", i) for i in range(5)] + [("b", i) for i in range(4)] * 3)
    assert [t for t, _ in ka] != sorted(t for t, _ in ka)  # interleaved, not concatenated
    tags = [a.task_of(i).tag for i in range(len(a))]
    assert tags == [t for t, _ in ka] and a.source(0)[0] in (0, 1)
    assert len(TaskMixture([Toy(3), Toy(3)], seed=0)) == 6  # bare tasks count once each
    assert len(TaskMixture([(Toy(10), 1)], seed=0, stop=4)) == 4  # mixtures slice too


def test_mixture_errors():
    with pytest.raises(TaskError, match="the task mixture is empty"):
        TaskMixture([], seed=0)
    with pytest.raises(TaskError, match="the task mixture is empty"):
        TaskMixture([(Toy(0), 2)], seed=0)
    with pytest.raises(TaskError, match="epochs"):
        TaskMixture([(Toy(3), 0)], seed=0)


# --------------------------------------------------------------------------- user JSONL

def test_user_jsonl_shapes_and_identity(tmp_path):
    path = tmp_path / "u.jsonl"
    lines = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
             [{"role": "system", "content": "s"}, {"role": "user", "content": "c"},
              {"role": "assistant", "content": [{"type": "text", "text": "d"}]}]]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    task = UserJSONL(str(path))
    assert len(task) == 2 and task.example(1)["messages"][0]["role"] == "system"
    identity = UserJSONL(IDENTITY_JSONL)
    assert len(identity) >= 12
    assert any("flaxchat" in json.dumps(c) for c in identity)


@pytest.mark.parametrize("bad,fragment", [
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}', "message 1 has role 'user'"),
    ("not json", "not valid JSON"),
    ('[{"role": "user", "content": "a"}]', "at least a user and an assistant"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}', "user content must be a string"),
    ('[{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "code", "text": "x"}]}]', "each part"),
    ('[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]', "last message"),
    ('42', "expected a list of messages"),
])
def test_user_jsonl_malformed_line_names_file_and_line(tmp_path, bad, fragment):
    good = json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    path = tmp_path / "mine.jsonl"
    path.write_text(f"{good}\n\n{good}\n{bad}\n{good}\n")
    with pytest.raises(TaskError) as info:
        UserJSONL(str(path))
    message = str(info.value)
    assert f"{path}:4:" in message and fragment in message and "\n" not in message


def test_user_jsonl_missing_file(tmp_path):
    with pytest.raises(TaskError, match="does not exist"):
        UserJSONL(str(tmp_path / "nope.jsonl"))


# --------------------------------------------------------------------------- demo tasks

def test_demo_train_val_disjoint_and_deterministic():
    train, val = DemoMath(3, 3000), DemoMath(3, 300, split="val", train_n=3000)
    assert len(val) == 300 and val_seed(3) == 3 + VAL_SEED_OFFSET
    train_q = {train.example(i)["messages"][0]["content"] for i in range(len(train))}
    assert not train_q & {val.example(i)["messages"][0]["content"] for i in range(len(val))}
    chat_train, chat_val = DemoChat(3, 3000), DemoChat(3, 300, split="val", train_n=3000)
    seen = {json.dumps(c, sort_keys=True) for c in chat_train}
    assert not any(json.dumps(c, sort_keys=True) in seen for c in chat_val)
    assert [c for c in DemoMath(3, 20)] == [c for c in DemoMath(3, 20)]
    assert [c for c in DemoMath(3, 20)] != [c for c in DemoMath(4, 20)]


def test_demo_math_rendered_like_gsm8k_and_graded():
    task = DemoMath(0, 5)
    conv = task.example(0)
    problem = task.items[0]
    assert {k: v for k, v in conv.items() if k != "answer"} == gsm8k_conversation(problem["question"], problem["answer_text"])
    parts = conv["messages"][1]["content"]
    assert any(p["type"] == "python" for p in parts)
    for a, b in zip(parts, parts[1:]):
        if a["type"] == "python":
            assert float(use_calculator(a["text"])) == float(b["text"])
    answer = conv["answer"]
    assert task.evaluate(conv, f"work...\n#### {answer}") == 1.0
    assert task.evaluate(conv, f"#### {answer + 1}") == 0.0
    assert task.reward(conv, "I don't know") == 0.0
    with pytest.raises(TaskError, match="no automatic grader"):
        DemoChat(0, 2).evaluate(DemoChat(0, 2).example(0), "x")


# --------------------------------------------------------------------------- spelling

def test_spelling_bee():
    task = SpellingBee(size=50, split="train", seed=1)
    assert len(COMMON_WORDS) >= 300
    for i in range(50):
        conv = task.example(i)
        parts = conv["messages"][1]["content"]
        call = [p for p in parts if p["type"] == "python"][0]["text"]
        output = [p for p in parts if p["type"] == "python_output"][0]["text"]
        assert call == f"'{conv['word']}'.count('{conv['letter']}')"
        assert use_calculator(call) == output == str(conv["word"].count(conv["letter"]))
        assert extract_answer(parts[-1]["text"]) == output
        assert f"{conv['word']}:{','.join(conv['word'])}" in parts[0]["text"]
        assert task.evaluate(conv, f"#### {output}") == 1.0
        assert task.evaluate(conv, f"#### {int(output) + 1}") == 0.0
    assert task.example(7) == SpellingBee(size=50, seed=1).example(7)
    test = SpellingBee(size=50, split="test", seed=1)
    assert [task.example(i) for i in range(20)] != [test.example(i) for i in range(20)]


def test_simple_spelling_and_word_file(tmp_path):
    words = tmp_path / "w.txt"
    words.write_text("Zebra\nnot-a-word\nkiwi\n")
    task = SimpleSpelling(size=10, words_path=str(words))
    conv = task.example(0)
    word = conv["word"]
    assert word in ("zebra", "kiwi")
    assert conv["messages"] == [{"role": "user", "content": f"Spell the word: {word}"},
                                {"role": "assistant", "content": f"{word}:{','.join(word)}"}]
    assert task.evaluate(conv, f" {word}:{','.join(word)}\n") == 1.0
    assert task.evaluate(conv, f"{word}:x") == 0.0
    (tmp_path / "empty.txt").write_text("123\n")
    with pytest.raises(TaskError, match="no usable words"):
        SimpleSpelling(words_path=str(tmp_path / "empty.txt"))


# --------------------------------------------------------------------------- multiple choice / humaneval

MMLU_ROW = {"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": 1, "subject": "math"}
ARC_ROW = {"question": "Sky?", "choices": {"text": ["red", "blue", "green"], "label": ["1", "2", "3"]}, "answerKey": "2"}


def test_multiple_choice_rendering_and_grading():
    conv = MMLU("test", rows=[MMLU_ROW]).example(0)
    assert conv["messages"][0]["content"] == render_mc("2+2?", "ABCD", ["3", "4", "5", "6"])
    assert "- 4=B\n" in conv["messages"][0]["content"]
    assert conv["messages"][1]["content"] == "B" and conv["letters"] == ["A", "B", "C", "D"]
    task = MMLU("test", rows=[MMLU_ROW])
    assert task.eval_type == "categorical"
    assert [task.evaluate(conv, x) for x in ("B", " B", "B. 4", "A", "b", "Bee", "")] == [1, 1, 1, 0, 0, 0, 0]
    assert extract_letter("C) because", "ABCD") == "C"
    arc = ARC("ARC-Easy", "test", rows=[ARC_ROW])
    c = arc.example(0)
    assert c["letters"] == ["1", "2", "3"] and c["messages"][1]["content"] == "2"
    assert "- blue=2\n" in c["messages"][0]["content"] and arc.evaluate(c, "2") == 1.0
    with pytest.raises(TaskError):
        MMLU("train")
    with pytest.raises(TaskError):
        ARC("ARC-Medium")


def test_humaneval_task_offline(tmp_path):
    import gzip
    problem = {"task_id": "T/0", "prompt": "import math\n\ndef f(x):\n    \"\"\"double\"\"\"\n",
               "canonical_solution": "    return 2 * x\n", "entry_point": "f",
               "test": "def check(c):\n    assert c(2) == 4\n    assert math.floor(1.5) == 1\n"}
    path = tmp_path / "he.jsonl.gz"
    path.write_bytes(gzip.compress((json.dumps(problem) + "\n").encode()))
    task = HumanEval(str(path))
    conv = task.example(0)
    assert conv["messages"][0]["content"] == problem["prompt"]
    assert task.evaluate(conv, conv["messages"][1]["content"]) == 1.0
    assert task.evaluate(conv, "Sure:\n```python\ndef f(x):\n    return x + x\n```\nDone.") == 1.0
    assert task.evaluate(conv, "def f(x):\n    return 3 * x\n") == 0.0
    assert extract_program("no fences") == "no fences"


# --------------------------------------------------------------------------- rendering

def test_every_task_renders_with_the_tokenizer(tmp_path):
    tok = Tokenizer({bytes([b]): b for b in range(256)})  # byte-level: no training needed
    he = tmp_path / "he.jsonl"
    he.write_text(json.dumps({"prompt": "def f():\n", "canonical_solution": "    return 1\n",
                              "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}) + "\n")
    smol = {"messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}]}
    tasks = [GSM8K("test", rows=[{"question": "q", "answer": WENG}]), MMLU("test", rows=[MMLU_ROW]),
             ARC(rows=[ARC_ROW]), SmolTalk("test", rows=[smol]), HumanEval(str(he)),
             SpellingBee(size=2), SimpleSpelling(size=2), UserJSONL(IDENTITY_JSONL), DemoChat(0, 3), DemoMath(0, 3)]
    python_start = tok.encode_special("<|python_start|>")
    for task in tasks:
        conv = task.example(0)
        ids, mask = render_conversation(tok, conv, max_tokens=100_000)
        assert len(ids) == len(mask) > 3 and sum(mask) > 0, task.name
        assert tok.decode([i for i, m in zip(ids, mask) if m]).strip(), task.name
        prompt = render_for_completion(tok, conv)
        assert prompt[-1] == tok.encode_special("<|assistant_start|>")
        if task.name.startswith(("GSM8K", "SpellingBee", "DemoMath")):
            assert python_start in ids, task.name


def test_mixtures_from_config(tmp_path):
    from flaxchat.tasks import mixtures
    identity = tmp_path / "id.jsonl"
    identity.write_text(open(IDENTITY_JSONL).read())
    tasks = SimpleNamespace(source="demo", user_jsonl=str(identity), user_epochs=2, demo_conversations=40,
                            demo_problems=30, demo_val=10, cache_dir=str(tmp_path / "never"))
    cfg = SimpleNamespace(seed=5, tasks=tasks)
    train = mixtures.sft_train_mixture(cfg)
    n_user = len(UserJSONL(str(identity)))
    assert len(train) == 40 + 2 * 30 + 30 + 2 * n_user
    assert [train.example(i) for i in range(10)] == [mixtures.sft_train_mixture(cfg).example(i) for i in range(10)]
    val = mixtures.sft_val_mixture(cfg)
    assert len(val) == 20
    assert len(mixtures.rl_train_task(cfg)) == 30 and len(mixtures.rl_eval_task(cfg)) == 10
    assert not (tmp_path / "never").exists()  # the demo source downloads nothing
    tasks.source = "auto"
    with pytest.raises(TaskError, match="tasks.source"):
        mixtures.sft_train_mixture(cfg)


def test_mixtures_with_a_resolved_demo_config(tmp_path):
    from flaxchat.config import build_config
    from flaxchat.tasks import mixtures
    user = tmp_path / "user.jsonl"
    user.write_text(open(IDENTITY_JSONL).read())
    cfg = build_config("demo", dotted=["tasks.demo_conversations=50", "tasks.demo_problems=20", "tasks.demo_val=8",
                                       f"tasks.user_jsonl={user}", "tasks.user_epochs=3"])
    assert cfg.tasks.source == "demo"  # resolved from data.source=demo
    n_user = len(UserJSONL(str(user)))
    train = mixtures.sft_train_mixture(cfg)
    assert len(train) == 50 + 2 * 20 + 20 + 3 * n_user   # chats, word problems x2, multiple choice, user x3
    assert sum(isinstance(train.task_of(i), UserJSONL) for i in range(len(train))) == 3 * n_user
    assert len(mixtures.sft_val_mixture(cfg)) == 16
    assert len(mixtures.rl_train_task(cfg)) == 20 and len(mixtures.rl_eval_task(cfg)) == 8
