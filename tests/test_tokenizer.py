"""Tests for flaxchat.tokenizer and flaxchat.chat_format on small generated corpora."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest

from flaxchat.tokenizer import (
    META_FILE, RANK_FILE, Tokenizer, TokenizerFormatError)
from flaxchat.tokenizer_specials import SPECIAL_TOKENS, SPLIT_PATTERN

VOCAB = 512
WORDS = ("the of and to in is was for that with as on by at from his her they have this not are "
         "but had were which one all she there been their more when will would who out so up said "
         "time people about could some into than them other only very after most also made over "
         "water little world house number sound place years again thought small great old large "
         "morning river mountain garden window kitchen teacher machine language").split()
UNICODE_TEXT = "Café naïve façade — 你好世界 🌍🚀 Ünïcödé! 12345 and 2024-06-01, x=3.14159\n\ttabs  spaces"


def english_docs(n_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(3, 8)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(5, 14))]
            words[0] = words[0].capitalize()
            sentences.append(" ".join(words) + rng.choice([".", ".", "!", "?"]))
        # numbers with 3+ digits, so a {1,3} digit pattern would learn 3-digit tokens
        sentences.append(f"In {rng.choice(['123', '456', '789'])} there were {rng.randint(100, 99999)} "
                         f"people, café 🌍 你好.")
        docs.append(" ".join(sentences))
    return docs


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return english_docs(400, seed=0)


@pytest.fixture(scope="module")
def tok(corpus) -> Tokenizer:
    return Tokenizer.train(corpus, VOCAB)


@pytest.fixture()
def saved(tok, tmp_path) -> Path:
    tok.save(tmp_path)
    return tmp_path


# ----------------------------------------------------------------- training / encoding
def test_vocab_layout_and_special_ids(tok):
    assert tok.vocab_size == VOCAB
    assert len(tok.mergeable_ranks) == VOCAB - len(SPECIAL_TOKENS)
    expected = {name: VOCAB - len(SPECIAL_TOKENS) + i for i, name in enumerate(SPECIAL_TOKENS)}
    assert tok.special_tokens == expected
    assert list(tok.special_tokens) == list(SPECIAL_TOKENS)
    assert tok.bos_token_id == VOCAB - 9
    assert tok.encode_special("<|output_end|>") == VOCAB - 1
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode_special("<|nope|>")


def test_learns_merges_that_compress(tok):
    # a trained tokenizer must merge common words; bytes-only encoding would be 1 token per byte
    ids = tok.encode(" the water")
    assert len(ids) < len(" the water".encode())


@pytest.mark.parametrize("text", [UNICODE_TEXT, "", " ", "🌍", "0123456789" * 5, "<|bos|> literal",
                                  "line one\n\nline two\r\n", "\u200b zero width"])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(np.asarray(ids, dtype=np.int64)) == text
    # special-token strings inside ordinary text must stay ordinary text
    assert all(i < tok.bos_token_id for i in ids)


def test_batch_encode_matches_single_and_prepend_append(tok, corpus):
    texts = [UNICODE_TEXT, *corpus[:20], ""]
    batch = tok.encode(texts, num_threads=2)
    assert batch == [tok.encode(t) for t in texts]
    bos, end = tok.bos_token_id, tok.encode_special("<|assistant_end|>")
    wrapped = tok.encode(texts, prepend="<|bos|>", append=end)
    assert wrapped == [[bos, *row, end] for row in batch]
    assert tok.encode("hi", prepend=bos) == [bos, *tok.encode("hi")]
    with pytest.raises(TypeError):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.encode("hi", prepend=VOCAB)


def test_parallel_batch_encode_keeps_order(tok, monkeypatch):
    import flaxchat.tokenizer as tokenizer_module
    monkeypatch.setattr(tokenizer_module, "_usable_cpus", lambda: 4)  # force the threaded path
    texts = english_docs(300, seed=5) + ["", "🌍"] + english_docs(5, seed=6)
    assert sum(map(len, texts)) > tokenizer_module._MIN_PARALLEL_CHARS
    assert tok.encode(texts, num_threads=3) == [tok.encode(t) for t in texts]
    assert tok.encode(texts, num_threads=3) == tok._enc.encode_ordinary_batch(texts)


def test_digits_are_split_in_groups_of_at_most_two(tok):
    # the corpus is full of 3-digit numbers, so with \p{N}{1,3} 3-digit tokens would be learnt
    assert tok.pattern == SPLIT_PATTERN
    for token in tok.mergeable_ranks:
        text = token.decode("utf-8", errors="ignore")
        assert not any(text[i:i + 3].isdigit() and len(text[i:i + 3]) == 3 for i in range(len(text))), token
    pieces = [tok.decode([i]) for i in tok.encode("123456789")]
    assert "".join(pieces) == "123456789"
    assert all(1 <= len(p) <= 2 for p in pieces)
    # "123" is frequent in the corpus: {1,3} makes it one token (checked), {1,2} forces "12" + "3"
    assert [tok.decode([i]) for i in tok.encode("123")] == ["12", "3"]


def test_vocab_too_small_names_the_minimum(corpus):
    with pytest.raises(ValueError, match="minimum is 265"):
        Tokenizer.train(corpus, 264)
    # the minimum itself (no merges) is fine: every byte is its own token
    bytes_only = Tokenizer.train(corpus[:5], 265)
    assert bytes_only.vocab_size == 265 and len(bytes_only.encode("abc")) == 3


def test_too_little_text_for_the_vocab_is_an_error():
    with pytest.raises(ValueError, match="more text or lower vocab_size"):
        Tokenizer.train(["ab ab ab"] * 3, 1000)


def test_doc_cap_crops_training_documents():
    # one long document of repeated novel words: uncropped it teaches "zyx" merges, cropped not
    doc = "qq " * 10 + "zyxw " * 2000
    capped = Tokenizer.train([doc], 265 + 1, doc_cap=30)
    full = Tokenizer.train([doc], 265 + 1, doc_cap=100_000)
    assert b"qq" in capped.mergeable_ranks
    assert b"qq" not in full.mergeable_ranks


def test_token_bytes(tok):
    lengths = tok.token_bytes()
    assert lengths.dtype == np.int32 and lengths.shape == (VOCAB,)
    specials = set(tok.special_tokens.values())
    for token_id in range(VOCAB):
        expected = 0 if token_id in specials else len(tok.decode_token_bytes(token_id))
        assert lengths[token_id] == expected
    assert lengths[:256].tolist() == [1] * 256
    assert lengths.max() > 1
    # bits-per-byte relies on this: summed token bytes == encoded text's byte length
    ids = tok.encode(UNICODE_TEXT)
    assert lengths[ids].sum() == len(UNICODE_TEXT.encode("utf-8"))


def test_bytes_per_token(tok):
    held_out = english_docs(50, seed=123)
    assert tok.bytes_per_token(held_out) > 2.0
    bytes_only = Tokenizer({bytes([b]): b for b in range(256)})
    assert bytes_only.bytes_per_token(["plain ascii text"]) == 1.0
    with pytest.raises(ValueError):
        tok.bytes_per_token([""])


# ------------------------------------------------------------------------- save / load
def test_save_load_bit_identical(tok, saved, corpus):
    loaded = Tokenizer.load(saved)
    assert loaded.mergeable_ranks == tok.mergeable_ranks
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.pattern == tok.pattern and loaded.vocab_size == tok.vocab_size
    texts = [UNICODE_TEXT, *english_docs(20, seed=7)]
    assert loaded.encode(texts) == tok.encode(texts)
    assert np.array_equal(loaded.token_bytes(), tok.token_bytes())


def test_save_returns_sha256_map_and_is_deterministic(tok, tmp_path):
    digests = tok.save(tmp_path)
    assert set(digests) == {RANK_FILE, META_FILE}
    for name, digest in digests.items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == digest
    assert json.loads((tmp_path / META_FILE).read_text())["rank_file_sha256"] == digests[RANK_FILE]
    assert tok.save(tmp_path) == digests
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(digests)  # no temp files left


def test_rank_file_is_tiktoken_format(tok, saved):
    from tiktoken.load import load_tiktoken_bpe
    assert load_tiktoken_bpe(str(saved / RANK_FILE)) == tok.mergeable_ranks


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def _edit_meta(saved: Path, **changes) -> None:
    meta = json.loads((saved / META_FILE).read_text())
    meta.update(changes)
    (saved / META_FILE).write_text(json.dumps(meta))


CORRUPTIONS = {
    "flipped_rank_byte": (lambda d: _flip_byte(d / RANK_FILE), RANK_FILE, "sha256"),
    "truncated_rank_file": (lambda d: _truncate(d / RANK_FILE), RANK_FILE, "sha256"),
    "missing_rank_file": (lambda d: (d / RANK_FILE).unlink(), RANK_FILE, "missing"),
    "missing_meta": (lambda d: (d / META_FILE).unlink(), META_FILE, "missing"),
    "truncated_meta": (lambda d: _truncate(d / META_FILE), META_FILE, "JSON"),
    "wrong_vocab_size": (lambda d: _edit_meta(d, vocab_size=VOCAB + 1), META_FILE, "vocab_size"),
    "wrong_version": (lambda d: _edit_meta(d, format_version=99), META_FILE, "format_version"),
    "wrong_specials": (lambda d: _edit_meta(d, special_tokens={
        name: VOCAB - 1 - i for i, name in enumerate(SPECIAL_TOKENS)}), META_FILE, "special tokens"),
    "missing_field": (lambda d: _edit_meta(d, pattern=None), META_FILE, "pattern"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_load_refuses_corrupted_files(saved, corruption):
    corrupt, bad_file, reason = CORRUPTIONS[corruption]
    corrupt(saved)
    with pytest.raises(TokenizerFormatError, match=reason) as info:
        Tokenizer.load(saved)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in message
    assert str(saved / bad_file) in message
    assert "Tokenizer.train" in message  # the fix


def test_load_refuses_bad_rank_lines_even_with_matching_checksum(saved):
    # a forged file whose checksum was updated must still be validated line by line
    rank_path = saved / RANK_FILE
    lines = rank_path.read_bytes().splitlines(keepends=True)
    lines[300] = base64.b64encode(b"dup") + b" 7\n"
    forged = b"".join(lines)
    rank_path.write_bytes(forged)
    _edit_meta(saved, rank_file_sha256=hashlib.sha256(forged).hexdigest())
    with pytest.raises(TokenizerFormatError, match="line 301") as info:
        Tokenizer.load(saved)
    assert str(rank_path) in str(info.value)


# ---------------------------------------------------------------------------- chat
def _specials(tok):
    return {name.strip("<|>"): tok.encode_special(name) for name in SPECIAL_TOKENS}


def test_render_simple_conversation(tok):
    s = _specials(tok)
    conv = {"messages": [{"role": "user", "content": "Hi there"},
                         {"role": "assistant", "content": "Hello world"},
                         {"role": "user", "content": "More?"},
                         {"role": "assistant", "content": "Yes."}]}
    ids, mask = tok.render_conversation(conv)
    u1, a1, u2, a2 = (tok.encode(m["content"]) for m in conv["messages"])
    expected = ([s["bos"], s["user_start"], *u1, s["user_end"], s["assistant_start"], *a1, s["assistant_end"],
                 s["user_start"], *u2, s["user_end"], s["assistant_start"], *a2, s["assistant_end"]])
    assert ids == expected
    expected_mask = ([0] * (3 + len(u1)) + [0] + [1] * len(a1) + [1]
                     + [0] * (2 + len(u2)) + [0] + [1] * len(a2) + [1])
    assert mask == expected_mask


def test_system_message_is_merged_into_first_user_turn(tok):
    system = {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Ok"}]}
    original = copy.deepcopy(system)
    merged = {"messages": [{"role": "user", "content": "Be brief.\n\nHi"},
                           {"role": "assistant", "content": "Ok"}]}
    assert tok.render_conversation(system) == tok.render_conversation(merged)
    assert system == original  # input not mutated


def test_tool_parts_mask(tok):
    s = _specials(tok)
    parts = [{"type": "text", "text": "Let me compute."},
             {"type": "python", "text": "12*3"},
             {"type": "python_output", "text": "36"},
             {"type": "text", "text": "It is 36."}]
    ids, mask = tok.render_conversation({"messages": [{"role": "user", "content": "12*3?"},
                                                      {"role": "assistant", "content": parts}]})
    start = ids.index(s["assistant_start"])
    assert mask[: start + 1] == [0] * (start + 1)
    t1, code, out, t2 = (tok.encode(p["text"]) for p in parts)
    body = ids[start + 1:]
    assert body == [*t1, s["python_start"], *code, s["python_end"], s["output_start"], *out, s["output_end"],
                    *t2, s["assistant_end"]]
    assert mask[start + 1:] == ([1] * len(t1) + [1] * (len(code) + 2) + [0] * (len(out) + 2)
                                + [1] * len(t2) + [1])


def test_truncation(tok):
    conv = {"messages": [{"role": "user", "content": "the water " * 20},
                         {"role": "assistant", "content": "the river " * 20}]}
    full_ids, full_mask = tok.render_conversation(conv)
    ids, mask = tok.render_conversation(conv, max_tokens=17)
    assert len(full_ids) > 17
    assert (ids, mask) == (full_ids[:17], full_mask[:17])


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "must be 'assistant'"),
    ([{"role": "assistant", "content": "a"}], "must be 'user'"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "followed by a user"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
     "unknown part type"),
    ([{"role": "user", "content": ["a"]}], "user content must be a string"),
    ([], "non-empty"),
])
def test_bad_conversations(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.render_conversation({"messages": messages})


def test_render_for_completion(tok):
    conv = {"messages": [{"role": "system", "content": "Sys"},
                         {"role": "user", "content": "What is 2+2?"},
                         {"role": "assistant", "content": [{"type": "text", "text": "4"}]}]}
    ids = tok.render_for_completion(conv)
    prompt_ids, _ = tok.render_conversation({"messages": conv["messages"][:2]})
    assert ids == [*prompt_ids, tok.encode_special("<|assistant_start|>")]
    assert tok.encode_special("<|assistant_end|>") not in ids
    assert len(conv["messages"]) == 3  # input not mutated
    with pytest.raises(ValueError, match="last message"):
        tok.render_for_completion({"messages": conv["messages"][:2]})
