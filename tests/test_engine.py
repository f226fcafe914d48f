"""flaxchat.inference.engine: batched generation, sampling controls, stop tokens, one compile per bucket, tool use.

Models are tiny random GPTs (depth 2, n_embd 64) with weights scaled up so logits are far from ties
and every cached-path feature (smear, backout, value embeddings) is live; the vocabulary is a tiny
BPE tokenizer trained in a fixture.
"""

import pytest

from flaxchat.inference.engine import Engine, run_tool
from tiny_models import MAX_LEN, TinyModel, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(with_sums=True)


@pytest.fixture(scope="module")
def engine(tok):
    return Engine(TinyModel(tok.vocab_size), tok, max_len=MAX_LEN)


def special(tok, name):
    return tok.encode_special(name)


def prompts_of(tok):
    bos = tok.bos_token_id
    return [[bos] + tok.encode("the cat sat on the mat"), [bos] + tok.encode("a dog"), [bos]]


def test_greedy_batch_equals_each_prompt_alone(engine, tok):
    prompts = prompts_of(tok)
    batch = engine.generate(prompts, num_samples=2, max_tokens=12, temperature=0.0, stop_tokens=[])
    for prompt, rows in zip(prompts, batch):
        alone = engine.generate([prompt], max_tokens=12, temperature=0.0, stop_tokens=[])[0][0]
        assert len(alone.tokens) == 12 and alone.forced == [0] * 12 and not alone.finished
        assert rows[0].tokens == alone.tokens and rows[1].tokens == alone.tokens
    assert batch[0][0].tokens != batch[1][0].tokens        # the prompts really lead to different text
    assert batch[0][0].text == tok.decode(batch[0][0].tokens)


def test_seeds_top_k_and_top_p(engine, tok):
    prompt = prompts_of(tok)[:1]
    kw = dict(num_samples=4, max_tokens=10, temperature=1.0, stop_tokens=[])
    a = [c.tokens for c in engine.generate(prompt, seed=1, **kw)[0]]
    b = [c.tokens for c in engine.generate(prompt, seed=1, **kw)[0]]
    c = [c.tokens for c in engine.generate(prompt, seed=2, **kw)[0]]
    assert a == b and a != c
    assert len({tuple(t) for t in a}) > 1                       # samples of one prompt differ
    greedy = engine.generate(prompt, max_tokens=10, temperature=0.0, stop_tokens=[])[0][0].tokens
    top1 = engine.generate(prompt, max_tokens=10, temperature=1.0, top_k=1, seed=3, stop_tokens=[])[0][0].tokens
    tiny_p = engine.generate(prompt, max_tokens=10, temperature=1.0, top_p=1e-6, seed=4, stop_tokens=[])[0][0].tokens
    assert top1 == greedy and tiny_p == greedy


def test_stop_tokens_end_rows_independently(engine, tok):
    prompts = prompts_of(tok)
    free = [r[0].tokens for r in engine.generate(prompts, max_tokens=16, temperature=0.0, stop_tokens=[])]
    stop = free[0][3]
    got = [r[0] for r in engine.generate(prompts, max_tokens=16, temperature=0.0, stop_tokens=[stop])]
    for want, c in zip(free, got):
        cut = want.index(stop) + 1 if stop in want else len(want)
        assert c.tokens == want[:cut]
        assert c.finished == (stop in want)
        assert c.text == tok.decode(want[:cut - 1] if c.finished else want)
    assert len(got[0].tokens) == 4 and any(len(c.tokens) != 4 for c in got)


def test_one_compile_per_bucket(tok):
    eng = Engine(TinyModel(tok.vocab_size), tok, max_len=MAX_LEN)
    prompts = prompts_of(tok)
    eng.generate(prompts, max_tokens=5, temperature=0.0)
    counts = dict(eng.compile_counts)
    assert eng.compile_count == 1
    eng.generate(prompts[::-1], max_tokens=9, temperature=0.7, top_k=5, top_p=0.9, seed=5)
    eng.generate(prompts[:2] + [prompts[0]], max_tokens=3, temperature=1.0, seed=6, stop_tokens=[7])
    assert dict(eng.compile_counts) == counts and eng.compile_count == 1
    list(eng.stream(prompts[0], max_tokens=4, temperature=0.0))
    list(eng.stream(prompts[1], max_tokens=6, temperature=1.0, seed=2))
    assert eng.compile_counts["step"] == 1


def test_tool_output_after_prompt_python_block(engine, tok):
    bos, ps, pe = tok.bos_token_id, special(tok, "<|python_start|>"), special(tok, "<|python_end|>")
    os_, oe = special(tok, "<|output_start|>"), special(tok, "<|output_end|>")
    prompt = [bos] + tok.encode("the sum") + [ps] + tok.encode("1+2") + [pe]
    c = engine.generate([prompt], max_tokens=8, temperature=0.0, stop_tokens=[])[0][0]
    forced_part = [os_] + tok.encode("3") + [oe]
    assert c.tokens[:len(forced_part)] == forced_part
    assert c.forced == [1] * len(forced_part) + [0] * (8 - len(forced_part))
    # tools off: nothing is forced
    off = engine.generate([prompt], max_tokens=8, temperature=0.0, stop_tokens=[], use_tools=False)[0][0]
    assert off.forced == [0] * 8 and off.tokens[:len(forced_part)] != forced_part


def test_tool_call_mid_generation_rows_independent(engine, tok):
    ps, pe = special(tok, "<|python_start|>"), special(tok, "<|python_end|>")
    os_, oe = special(tok, "<|output_start|>"), special(tok, "<|output_end|>")
    prompts = prompts_of(tok)[:2]
    plain = [r[0].tokens for r in engine.generate(prompts, max_tokens=14, temperature=0.0, stop_tokens=[])]
    steer = [plain[0][:2] + [ps] + tok.encode("6*7") + [pe], []]
    got = [r[0] for r in engine.generate(prompts, max_tokens=14, temperature=0.0, stop_tokens=[], _steer=steer)]
    n = len(steer[0])
    forced_part = [os_] + tok.encode("42") + [oe]
    assert got[0].tokens[:n] == steer[0] and got[0].forced[:n] == [0] * n
    assert got[0].tokens[n:n + len(forced_part)] == forced_part
    assert got[0].forced[n:] == [1] * len(forced_part) + [0] * (14 - n - len(forced_part))
    assert got[1].tokens == plain[1] and got[1].forced == [0] * 14   # the other row never paused its stream
    # stream gives the same tokens, tool output included
    prompt = prompts[0] + steer[0]
    streamed = list(engine.stream(prompt[:-1], max_tokens=6, temperature=0.0, stop_tokens=[]))
    whole = engine.generate([prompt[:-1]], max_tokens=6, temperature=0.0, stop_tokens=[])[0][0].tokens
    assert streamed == whole


def test_stream_tool_output_forced(engine, tok):
    ps, pe = special(tok, "<|python_start|>"), special(tok, "<|python_end|>")
    prompt = [tok.bos_token_id, ps] + tok.encode("2+2") + [pe]
    streamed = list(engine.stream(prompt, max_tokens=5, temperature=0.0, stop_tokens=[]))
    assert streamed[:3] == [special(tok, "<|output_start|>")] + tok.encode("4") + [special(tok, "<|output_end|>")]
    assert streamed == engine.generate([prompt], max_tokens=5, temperature=0.0, stop_tokens=[])[0][0].tokens


def test_open_python_block_in_prompt_is_completed_by_generation(engine, tok):
    ps, pe = special(tok, "<|python_start|>"), special(tok, "<|python_end|>")
    prompt = [tok.bos_token_id, ps] + tok.encode("10+")
    steer = [tok.encode("5") + [pe]]
    c = engine.generate([prompt], max_tokens=6, temperature=0.0, stop_tokens=[], _steer=steer)[0][0]
    forced_part = [special(tok, "<|output_start|>")] + tok.encode("15") + [special(tok, "<|output_end|>")]
    assert c.tokens[2:2 + len(forced_part)] == forced_part and c.forced[:2] == [0, 0]


def test_run_tool_calculator_then_sandbox():
    assert run_tool("1+2") == "3"
    assert run_tool('"strawberry".count("r")') == "3"
    assert run_tool("print(sum(range(5)))") == "10"
    assert run_tool("sum(range(5))") == "10"                # a bare expression's value is shown
    assert run_tool("x = 4") == ""
    err = run_tool("1/0 + undefined_name")
    assert "NameError" in err or "ZeroDivisionError" in err


def test_bad_requests_are_clear_errors(engine, tok):
    with pytest.raises(ValueError, match="max_len"):
        engine.generate([[1] * MAX_LEN], max_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        engine.generate([[1]], temperature=-1.0)
    with pytest.raises(ValueError, match="num_samples"):
        next(engine.stream([1], num_samples=2))
