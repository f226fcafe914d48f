"""The generated demo corpus: deterministic, varied, well-formed, and arithmetically right."""

import os
import re

import pyarrow.parquet as pq
import pytest

from flaxchat.data.demo_corpus import (
    generate_conversations, generate_documents, generate_math_problems, write_demo_shards)

ANNOTATION = re.compile(r"<<([^=<>]+)=([^<>]+)>>")


def _eval(expr: str):
    assert re.fullmatch(r"[0-9+\-*/(). ]+", expr), f"unexpected calculator expression {expr!r}"
    return eval(expr, {"__builtins__": {}})


def test_documents_are_deterministic_and_seed_dependent():
    a = generate_documents(7, 300)
    assert a == generate_documents(7, 300)
    assert generate_documents(7, 120) == a[:120]  # a longer request extends a shorter one
    b = generate_documents(8, 300)
    assert sum(x != y for x, y in zip(a, b)) > 250


def test_documents_are_varied_and_cover_every_kind():
    docs = generate_documents(0, 3000)
    assert all(isinstance(d, str) and len(d) > 20 for d in docs)
    assert len(set(docs)) > 0.97 * len(docs)
    words = set(re.findall(r"[a-z]+", " ".join(docs).lower()))
    assert len(words) >= 300, f"vocabulary too small: {len(words)} words"
    stories = [d for d in docs if "####" not in d and not d.startswith("User:")]
    math = [d for d in docs if "####" in d]
    dialogues = [d for d in docs if d.startswith("User:")]
    for kind, n in (("stories", len(stories)), ("math", len(math)), ("dialogues", len(dialogues))):
        assert n > 0.08 * len(docs), f"too few {kind}: {n}"
    # stories are not all one template: many distinct openings
    assert len({s.split(".")[0].split(",")[0] for s in stories}) > 200


def test_math_problems_are_correct():
    probs = generate_math_problems(3, 500)
    assert probs == generate_math_problems(3, 500)
    assert len({p["question"] for p in probs}) > 450
    for p in probs:
        assert set(p) == {"question", "answer_text", "answer"}
        assert p["question"].endswith("?")
        notes = ANNOTATION.findall(p["answer_text"])
        assert notes, p["answer_text"]
        for expr, value in notes:
            assert _eval(expr) == float(value), (expr, value)
        final = p["answer_text"].rsplit("\n", 1)[-1]
        assert final == f"#### {p['answer']}"
        assert isinstance(p["answer"], int) and float(notes[-1][1]) == p["answer"]


def test_conversations_are_valid_nanochat_format():
    convos = generate_conversations(5, 400)
    assert convos == generate_conversations(5, 400)
    assert convos != generate_conversations(6, 400)
    with_tools = 0
    for conv in convos:
        assert set(conv) == {"messages"}
        msgs = conv["messages"]
        assert len(msgs) >= 2 and len(msgs) % 2 == 0
        for i, m in enumerate(msgs):
            assert m["role"] == ("user" if i % 2 == 0 else "assistant")
            if m["role"] == "user":
                assert isinstance(m["content"], str) and m["content"]
                continue
            content = m["content"]
            if isinstance(content, str):
                assert content
                continue
            with_tools += 1
            types = [p["type"] for p in content]
            assert set(types) <= {"text", "python", "python_output"}
            assert types[-1] == "text"
            for j, part in enumerate(content):
                assert set(part) == {"type", "text"} and isinstance(part["text"], str)
                if part["type"] == "python":
                    out = content[j + 1]
                    assert out["type"] == "python_output"
                    assert _eval(part["text"]) == float(out["text"])
    assert with_tools > 0.2 * len(convos)


def test_write_demo_shards(tmp_path):
    out = str(tmp_path / "demo")
    paths = write_demo_shards(out, seed=1, n_docs=2500, n_val_docs=100, docs_per_row_group=256,
                              row_groups_per_shard=4)
    assert [os.path.basename(p) for p in paths] == [f"shard_{i:05d}.parquet" for i in range(4)]
    assert sorted(os.listdir(out)) == [os.path.basename(p) for p in paths]
    assert os.listdir(tmp_path) == ["demo"]  # the temp build dir was renamed, nothing left over
    expected = generate_documents(1, 2600)
    texts = []
    for p in paths:
        pf = pq.ParquetFile(p)
        assert pf.schema_arrow.names == ["text"]
        assert all(pf.metadata.row_group(i).num_rows <= 256 for i in range(pf.num_row_groups))
        texts.append(pf.read().column("text").to_pylist())
    assert [len(t) for t in texts] == [1024, 1024, 452, 100]
    assert sum(texts[:-1], []) == expected[:2500] and texts[-1] == expected[2500:]
    # rewriting (e.g. over a partial copy) gives the same files
    assert write_demo_shards(out, 1, 2500, 100, 256, 4) == paths
    with pytest.raises(ValueError):
        write_demo_shards(str(tmp_path / "bad"), 1, 10, 0)
