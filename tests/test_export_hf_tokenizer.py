"""Tests for flaxchat.export.hf_tokenizer: the HF export must reproduce our ids exactly.

The default tier needs only `tokenizers` and `jinja2`; the `torch` tier loads the export with
`transformers.AutoTokenizer` (skipped where transformers is not installed).
"""

from __future__ import annotations

import json
import random
import re

import jinja2
import jinja2.ext
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from flaxchat.export.hf_tokenizer import (
    CHAT_TEMPLATE, bytes_to_unicode, reconstruct_merges, write_hf_tokenizer)
from flaxchat.tokenizer import Tokenizer
from flaxchat.tokenizer_specials import SPECIAL_TOKENS

VOCAB = 768
MAX_LEN = 4096
FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]

# Several scripts, digits, code and odd whitespace, so the trained merges include multi-byte
# characters, number chunks, indentation and punctuation runs, not just English words.
_PHRASES = [
    "the quick brown fox jumps over the lazy dog", "I'm sure they'll say it's what we've done",
    "Café naïve façade résumé Ünïcödé", "你好世界，今天天气很好。我们去公园吧",
    "こんにちは世界、ありがとうございます", "Привет мир, как дела?", "مرحبا بالعالم", "🌍🚀😀👍🏽",
    "def add(a, b):\n    return a + b\n", "for (int i = 0; i < n; ++i) { x[i] *= 2; }",
    "12345 67890 3.14159 2024-06-01 1,000,000", "    indented\n\tTabbed\r\n\n\nblank lines",
]

TEXTS = [
    "", " ", "hello world", "Hello, World!", "I'm you're they'LL WE'VE it's 'S 'd",
    "Café naïve façade — 你好世界 🌍🚀 Ünïcödé! 12345 and 2024-06-01, x=3.14159\n\ttabs  spaces",
    "漢字かなカナ한국어 ไทย हिन्दी", "👨‍👩‍👧‍👦 🏳️‍🌈 family flags", "0123456789" * 5, "1 22 333 4444 55555",
    "a  b   c    d\n\n\n\te\r\n\r\nf  \n  ", "trailing spaces   ", "\n", "\u00a0\u2003\u3000nbsp em ideo\u0085nel",
    "line\u2028sep\u2029para\u000bvt\u000cff", "e\u0301 combining a\u0308", "zero\u200bwidth\ufeffbom",
    "def f(x):\n    if x > 0:\n        return x ** 2  # square\n    return -x\n",
    "print(\"hi\")\n>>> [i*i for i in range(10)]\n{'a': 1, \"b\": [2, 3]}", "!!!??? ... --- ***",
    "the the the the", "\U0010ffff\ue000 private use",
    "x'\u212a 'ſ 'S İstanbul ǅ",  # Kelvin sign and long s case-fold to k and s in (?i:...)
]


_WORDS = ("time people water little world house number sound place years thought small great large "
          "morning river mountain garden window kitchen teacher machine language return import class "
          "print range value self none true false café naïve résumé über straße "
          "мир дом вода время человек 世界 天气 公园 今天 我们 学习 中文 東京 ありがとう 日本語 한국어 "
          "مرحبا سلام 🌍 🚀 😀").split()


def _corpus(n_docs: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(20, 60))]
        docs.append(" ".join(rng.choice(_PHRASES) for _ in range(rng.randint(1, 4))) + " " + " ".join(words)
                    + f" {rng.randint(0, 99999)}")
    return docs


def _fuzz_texts(n: int, seed: int = 1) -> list[str]:
    """Random strings over ASCII, Latin, combining marks, Unicode spaces, CJK, Arabic digits, emoji."""
    rng = random.Random(seed)
    code_points = [*range(0x00, 0x250), *range(0x300, 0x370), *range(0x660, 0x66A), *range(0x2000, 0x2070),
                   *range(0x3000, 0x3040), *range(0x4E00, 0x4E40), 0x1680, 0x1F30D, 0x1F600, 0x1F3FD, 0xFEFF]
    alphabet = [chr(c) for c in code_points] + list(" \n'sdmtlvre0123456789") * 8
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(n)]


def _encode_with_specials(tok: Tokenizer, text: str) -> list[int]:
    """Our ids for text in which special-token strings count as specials (as HF treats them)."""
    pattern = "(" + "|".join(re.escape(name) for name in SPECIAL_TOKENS) + ")"
    ids: list[int] = []
    for piece in re.split(pattern, text):
        ids.extend([tok.encode_special(piece)] if piece in SPECIAL_TOKENS else tok.encode(piece))
    return ids


def _render_template(messages: list[dict], add_generation_prompt: bool) -> str:
    """Render CHAT_TEMPLATE the way transformers does (sandbox, trim/lstrip blocks, raise_exception)."""
    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=add_generation_prompt)


CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi, how can I help?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Café 你好 🌍\n\n  spaced  "}, {"role": "assistant", "content": " ok\n"},
     {"role": "user", "content": "and 12345?"}, {"role": "assistant", "content": "12345 it is."}],
    [{"role": "system", "content": "Use python."}, {"role": "user", "content": "What is 7*191?"},
     {"role": "assistant", "content": [
         {"type": "text", "text": "Let me compute. "},
         {"type": "python", "text": "print(7 * 191)"},
         {"type": "python_output", "text": "1337\n"},
         {"type": "text", "text": "It is 1337."}]},
     {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "You're welcome!"}],
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(_corpus(), VOCAB)


@pytest.fixture(scope="module")
def export_dir(tok, tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    assert write_hf_tokenizer(tok, str(directory), model_max_length=MAX_LEN) == FILES
    return directory


@pytest.fixture(scope="module")
def hf(export_dir) -> HFTokenizer:
    return HFTokenizer.from_file(str(export_dir / "tokenizer.json"))


# ------------------------------------------------------------------------------- files
def test_files_and_config(tok, export_dir):
    assert sorted(p.name for p in export_dir.iterdir()) == sorted(FILES)
    config = json.loads((export_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"]) == ("<|bos|>", "<|assistant_end|>")
    assert config["model_max_length"] == MAX_LEN and config["clean_up_tokenization_spaces"] is False
    assert config["chat_template"] == CHAT_TEMPLATE
    assert {int(i): t["content"] for i, t in config["added_tokens_decoder"].items()} == {
        i: name for name, i in tok.special_tokens.items()}
    special_map = json.loads((export_dir / "special_tokens_map.json").read_text())
    assert set(special_map["additional_special_tokens"]) | {"<|bos|>", "<|assistant_end|>"} == set(SPECIAL_TOKENS)
    spec = json.loads((export_dir / "tokenizer.json").read_text())
    assert spec["normalizer"] is None and spec["post_processor"] is None
    assert spec["model"]["type"] == "BPE" and len(spec["model"]["merges"]) == VOCAB - len(SPECIAL_TOKENS) - 256
    assert [(t["id"], t["content"], t["special"]) for t in spec["added_tokens"]] == [
        (i, name, True) for name, i in tok.special_tokens.items()]


# ------------------------------------------------------------------------- encode/decode
@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match(tok, hf, text):
    ids = tok.encode(text)
    assert hf.encode(text, add_special_tokens=False).ids == ids
    assert hf.encode(text).ids == ids  # no post-processor: HF never adds a BOS of its own
    assert hf.decode(ids, skip_special_tokens=False) == text


def test_encode_matches_on_corpus_and_fuzz(tok, hf):
    texts = _corpus(100, seed=7) + _fuzz_texts(2000)
    ours = [tok.encode(t) for t in texts]
    theirs = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    mismatches = [(t, a, b) for t, a, b in zip(texts, ours, theirs) if a != b]
    assert not mismatches, mismatches[:3]
    assert all(hf.decode(ids, skip_special_tokens=False) == t for t, ids in zip(texts, ours))


def test_merges_matter(tok, hf):
    # the comparison above is only meaningful if the merges compress: < 1/2 token per byte here
    text = " ".join(_PHRASES)
    assert hf.encode(text).ids == tok.encode(text)
    assert len(tok.encode(text)) < len(text.encode()) // 2


def test_special_tokens_encode_to_our_ids(tok, hf):
    text = "<|bos|>doc<|user_start|>hi 你好<|user_end|><|assistant_start|>x<|python_start|>1+1" \
           "<|python_end|><|output_start|>2<|output_end|><|assistant_end|>"
    ids = hf.encode(text).ids
    assert ids == _encode_with_specials(tok, text)
    for name, token_id in tok.special_tokens.items():
        assert hf.encode(name).ids == [token_id] and hf.token_to_id(name) == token_id
    assert hf.decode(ids, skip_special_tokens=False) == text
    assert hf.decode(ids, skip_special_tokens=True) == "dochi 你好x1+12"


def test_reconstructed_merges_reproduce_every_token(tok, export_dir):
    """Each non-special token's bytes come back as that token from the merges alone.

    `ignore_merges` is switched off so HF cannot take the whole-word vocab shortcut: the merge list
    by itself must rebuild every token.
    """
    byte_char = bytes_to_unicode()
    assert sorted(byte_char) == list(range(256)) and len(set(byte_char.values())) == 256
    merges = reconstruct_merges(tok.mergeable_ranks)
    spec = json.loads((export_dir / "tokenizer.json").read_text())
    assert spec["model"]["ignore_merges"] is True
    spec["model"]["ignore_merges"] = False
    merges_only = HFTokenizer.from_str(json.dumps(spec))
    for token, rank in tok.mergeable_ranks.items():
        word = "".join(byte_char[b] for b in token)
        assert [t.id for t in merges_only.model.tokenize(word)] == [rank], (rank, token)
        if rank >= 256:
            assert merges[rank - 256][0] + merges[rank - 256][1] == token
    # and on running text the merges alone already agree with tiktoken (the shortcut is redundant)
    texts = _corpus(50, seed=9) + _fuzz_texts(500, seed=4)
    assert [e.ids for e in merges_only.encode_batch(texts)] == [tok.encode(t) for t in texts]


def test_reconstruct_merges_rejects_non_bpe_ranks():
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"abc"] = 256  # no 'ab' or 'bc' below it: no pair of tokens merges into it
    with pytest.raises(ValueError, match="not the merge of two"):
        reconstruct_merges(ranks)


# -------------------------------------------------------------------------- chat template
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_render(tok, hf, messages):
    prompt = _render_template(messages[:-1], add_generation_prompt=True)
    assert hf.encode(prompt, add_special_tokens=False).ids == tok.render_for_completion({"messages": messages})
    full = _render_template(messages, add_generation_prompt=False)
    ids, _ = tok.render_conversation({"messages": messages}, max_tokens=1 << 30)
    assert hf.encode(full, add_special_tokens=False).ids == ids


@pytest.mark.parametrize("messages, match", [
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "followed by a user"),
    ([{"role": "user", "content": "u"}, {"role": "user", "content": "u"}], "alternate"),
    ([{"role": "assistant", "content": "a"}], "alternate"),
    ([{"role": "user", "content": "u"}, {"role": "assistant", "content": [{"type": "img", "text": ""}]}],
     "unknown part type"),
])
def test_chat_template_rejects_what_render_rejects(tok, messages, match):
    with pytest.raises(jinja2.exceptions.TemplateError, match=match):
        _render_template(messages, add_generation_prompt=False)
    with pytest.raises(ValueError):
        tok.render_conversation({"messages": messages})


# ------------------------------------------------------------------------- transformers
@pytest.mark.torch
def test_transformers_autotokenizer(tok, export_dir):
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(str(export_dir))
    # transformers 5 names the class TokenizersBackend and keeps PreTrainedTokenizerFast as an alias
    assert isinstance(auto, transformers.PreTrainedTokenizerFast) and auto.model_max_length == MAX_LEN
    assert (auto.bos_token_id, auto.eos_token_id) == (tok.bos_token_id, tok.encode_special("<|assistant_end|>"))
    for text in TEXTS + _fuzz_texts(200, seed=3):
        ids = tok.encode(text)
        assert auto.encode(text, add_special_tokens=False) == ids
        assert auto.encode(text) == ids  # no BOS added
        assert auto.decode(ids) == text
    for messages in CONVERSATIONS:
        ids = auto.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                       return_dict=False)
        assert list(ids) == tok.render_for_completion({"messages": messages})
