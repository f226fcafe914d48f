"""SFT: conversations -> packed rows with the right loss mask, and the stage end to end on a tiny
pretrained model, including the inputs it must refuse (with one line, before writing anything)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from flaxchat.chat_format import render_conversation
from flaxchat.config import build_config
from flaxchat.data.conversations import conversation_encoder, write_conversation_shards
from flaxchat.data.loader import PackedLoader
from flaxchat.manifest import ManifestError, read_manifest, verify_files
from tiny_models import tiny_tokenizer

# Small enough for seconds on 2 CPU cores. sequence_len 128: the demo word problems render to
# ~85 tokens with a 400-token vocabulary, and SFT's greedy check needs room to answer them.
TINY = {
    "model": {"depth": 1, "aspect_ratio": 64, "head_dim": 64, "sequence_len": 128, "window_pattern": "L"},
    "tokenizer": {"vocab_size": 400, "max_chars": 200_000, "eval_chars": 20_000},
    "data": {"demo_documents": 300, "demo_val_documents": 30},
    "pretrain": {"num_steps": 4, "device_batch_size": 2, "total_batch_size": 256, "warmup_steps": 1,
                 "eval_every": 0, "sample_every": 0, "checkpoint_every": 0, "log_every": 1, "eval_tokens": 256},
    "tasks": {"demo_conversations": 20, "demo_problems": 20, "demo_val": 8},
    "sft": {"num_steps": 4, "device_batch_size": 2, "total_batch_size": 256, "eval_every": 0, "eval_tokens": 512,
            "log_every": 1, "checkpoint_every": 2, "sample_every": 0},
}


def tiny_overrides(base: Path, **sections) -> dict:
    cfg = json.loads(json.dumps(TINY))
    cfg["data"]["cache_dir"] = str(base / "cache")
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


# ---------------------------------------------------------------------------- packing and masks
class Examples:
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def example(self, i):
        return self.items[i]


# User turns and tool outputs are written in UPPER CASE / symbols, everything the assistant writes
# (text and python) in lower case / digits / spaces, so their token sets are disjoint by construction.
CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "HELLO_THERE"},
                  {"role": "assistant", "content": "the cat sat"}]},
    {"messages": [{"role": "user", "content": "WHAT_IS_SIX_TIMES_SEVEN"},
                  {"role": "assistant", "content": [
                      {"type": "text", "text": "let me see"},
                      {"type": "python", "text": "6*7"},
                      {"type": "python_output", "text": "@FORTY@TWO@"},
                      {"type": "text", "text": "so it is 42"}]}]},
    {"messages": [{"role": "system", "content": "BE_BRIEF"},
                  {"role": "user", "content": "HI"},
                  {"role": "assistant", "content": "hi"},
                  {"role": "user", "content": "MORE_PLEASE"},
                  {"role": "assistant", "content": "a big red dog ran to the mat"}]},
    {"messages": [{"role": "user", "content": "COUNT_IT"},
                  {"role": "assistant", "content": [
                      {"type": "python", "text": "len(range(3))"},
                      {"type": "python_output", "text": "#THREE#"},
                      {"type": "text", "text": "three"}]}]},
]
SEQ = 40


def _check_rows(inputs, targets, rendered, bos):
    """Walk each row: whole conversations one after the other (every position's target as
    render_conversation's mask says), then BOS padding with -1 targets. Returns the
    conversations seen, in order. A conversation cut at the row end would match no whole
    conversation and fail the padding check; one continued from the previous row would not
    start with BOS."""
    seen = []
    T = inputs.shape[1]
    for row_in, row_tg in zip(inputs, targets):
        pos = 0
        while pos < T and row_in[pos] == bos:
            hits = [c for c, (ids, _) in enumerate(rendered)
                    if pos + len(ids) <= T + 1 and row_in[pos:pos + len(ids)].tolist() == ids[:T - pos]]
            assert len(hits) <= 1, f"ambiguous conversation at position {pos}"
            if not hits:
                break  # padding from here on
            ids, mask = rendered[hits[0]]
            if pos > 0:
                assert row_tg[pos - 1] == -1          # nothing predicts the next conversation's BOS
            for j in range(1, len(ids)):
                if pos + j - 1 < T:
                    assert row_tg[pos + j - 1] == (ids[j] if mask[j] else -1), (hits[0], j)
            seen.append(hits[0])
            pos += len(ids)
        assert pos > 0, f"a row must start with a whole conversation: {row_in.tolist()}"
        assert (row_in[pos:] == bos).all() and (row_tg[pos - 1:] == -1).all(), \
            f"after the conversations a row holds only padding (BOS in, -1 out): {row_in.tolist()}"
    return seen


def test_sft_packing_supervises_only_what_the_assistant_writes(tmp_path):
    tok = tiny_tokenizer(with_sums=True)
    sp = tok.special_tokens
    bos = tok.bos_token_id
    rendered = [render_conversation(tok, c, max_tokens=SEQ + 1) for c in CONVERSATIONS]
    assert all(len(ids) <= SEQ + 1 for ids, _ in rendered), "the test conversations must fit a row"
    assert len({tuple(ids) for ids, _ in rendered}) == len(rendered)

    def toks(*texts):
        return {t for text in texts for t in tok.encode(text)}
    given = toks("HELLO_THERE", "WHAT_IS_SIX_TIMES_SEVEN", "BE_BRIEF\n\nHI", "MORE_PLEASE", "COUNT_IT",
                 "@FORTY@TWO@", "#THREE#") | {sp[n] for n in ("<|bos|>", "<|user_start|>", "<|user_end|>",
                                                               "<|assistant_start|>", "<|output_start|>",
                                                               "<|output_end|>")}
    written = toks("the cat sat", "let me see", "6*7", "so it is 42", "hi", "a big red dog ran to the mat",
                   "len(range(3))", "three") | {sp[n] for n in ("<|python_start|>", "<|python_end|>",
                                                                 "<|assistant_end|>")}
    assert not given & written, "test precondition: user/tool tokens and assistant tokens are disjoint"

    shards = write_conversation_shards(Examples(CONVERSATIONS), Examples(CONVERSATIONS), str(tmp_path / "data"))
    assert [Path(s).name for s in shards] == ["train_00000.parquet", "val_00000.parquet"]
    encode = conversation_encoder(tok)

    # validation: one finite pass; every conversation exactly once, whole, and every supervised
    # token of every conversation is a target exactly once
    val = PackedLoader(shards, encode, bos, 2, SEQ, split="val", mode="sft", seed=0)
    batches = list(val)
    assert batches and all(x.shape == y.shape == (2, SEQ) for x, y in batches)
    inputs = np.concatenate([x for x, _ in batches])
    targets = np.concatenate([y for _, y in batches])
    seen = _check_rows(inputs, targets, rendered, bos)
    assert sorted(seen) == list(range(len(CONVERSATIONS)))
    live = targets[targets != -1]
    assert set(live.tolist()) <= written and not set(live.tolist()) & given
    assert len(live) == sum(sum(mask[1:]) for _, mask in rendered)
    assert (inputs == bos).sum() > len(CONVERSATIONS), "expected some padding with these sizes"
    for name in ("<|python_start|>", "<|python_end|>", "<|assistant_end|>"):
        assert sp[name] in live
    full = [len(render_conversation(tok, c, max_tokens=10_000)[0]) for c in CONVERSATIONS]
    assert val.stats.pad_tokens > 0
    assert val.stats.truncated_tokens == sum(max(0, n - (SEQ + 1)) for n in full)

    # training: cycles over epochs with the same invariants
    train = PackedLoader(shards, encode, bos, 2, SEQ, split="train", mode="sft", seed=0)
    tb = [next(train) for _ in range(6)]
    seen = _check_rows(np.concatenate([x for x, _ in tb]), np.concatenate([y for _, y in tb]), rendered, bos)
    assert len(seen) >= 2 * len(CONVERSATIONS) and train.epoch >= 2


def test_sft_conversation_longer_than_a_row_is_truncated_not_split(tmp_path):
    tok = tiny_tokenizer(with_sums=True)
    long = {"messages": [{"role": "user", "content": "TELL_A_STORY"},
                         {"role": "assistant", "content": " ".join(["the cat sat on the mat"] * 12)}]}
    items = [long, CONVERSATIONS[0]]
    shards = write_conversation_shards(Examples(items), Examples(items), str(tmp_path / "data"))
    loader = PackedLoader(shards, conversation_encoder(tok), tok.bos_token_id, 1, SEQ, split="val",
                          mode="sft", seed=0)
    rows = [x[0] for x, _ in loader]
    full, _ = render_conversation(tok, long, max_tokens=10_000)
    assert len(full) > SEQ + 1      # (the encoder cuts it to a row, so the loader never sees the rest)
    assert any(r.tolist() == full[:SEQ] for r in rows)
    tail = full[SEQ + 1:SEQ + 9]
    assert not any(r[1:1 + len(tail)].tolist() == tail for r in rows), "the rest must not start a new row"


# ---------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny tokenizer + a 4-step depth-1 pretrain, built once for this module."""
    import steps.pretrain
    import steps.tokenizer
    base = tmp_path_factory.mktemp("sftpipe")
    cfg = build_config("demo", overrides=tiny_overrides(base))
    tok = steps.tokenizer.run(cfg, {}, str(base / "tok"))
    pt = steps.pretrain.run(cfg, {"tokenizer": tok}, str(base / "pt"))
    return {"base": base, "pretrain": pt}


@pytest.fixture(scope="module")
def sft_run(pretrained):
    import steps.sft
    base = pretrained["base"]
    # this run's config asks for depth 2: the model shape must still come from the pretrain manifest
    cfg = build_config("demo", overrides=tiny_overrides(base, model={"depth": 2}))
    assert cfg.model.depth == 2
    out = base / "sft"
    return out, steps.sft.run(cfg, {"pretrain": pretrained["pretrain"]}, str(out))


def test_sft_stage_end_to_end(pretrained, sft_run):
    out, manifest = sft_run
    pt = pretrained["pretrain"]
    m = manifest["metrics"]
    assert manifest["stage"] == "sft" and m["steps"] == 4 and m["resumed_from_step"] is None
    assert m["val_loss_initial"] is not None and m["val_loss"] is not None
    assert m["val_loss_initial"] > m["val_loss"], (m["val_loss_initial"], m["val_loss"])
    assert m["val_bpb_initial"] > m["val_bpb"]
    assert m["greedy_accuracy_initial"] is not None and 0.0 <= m["greedy_accuracy"] <= 1.0
    # chats + word problems x2 + multiple choice; validation: chats + word problems
    assert m["train_conversations"] == 20 + 2 * 20 + 20 and m["val_conversations"] == 2 * 8
    assert m["grad_accum_steps"] == 1 and m["total_batch_tokens"] == 256
    # shape from the upstream manifest, not from this run's depth=2
    assert manifest["config"]["model"] == pt["config"]["model"]
    assert manifest["config"]["model"]["depth"] == 1
    assert manifest["config"]["sft"]["num_steps"] == 4
    assert manifest["parent"] == {"stage": "pretrain", "uri": pt["uri"]}
    assert manifest["checkpoint"]["step"] == 4
    # the published files are all there and verify; the manifest on disk is the returned one
    assert any(k.startswith("checkpoints/4/") for k in manifest["files"])
    assert any(k.startswith("tokenizer/") for k in manifest["files"])
    verify_files(manifest)
    on_disk = read_manifest(str(out))
    assert on_disk["metrics"]["params_sha256"] == m["params_sha256"] != pt["metrics"]["params_sha256"]
    assert [Path(s).name for s in manifest["data"]["shards"]] == ["train_00000.parquet", "val_00000.parquet"]
    assert all(Path(s).exists() for s in manifest["data"]["shards"])
    assert (out / "metrics.jsonl").exists()


def test_sft_manifest_files_detect_tampering(sft_run, tmp_path):
    out, manifest = sft_run
    copy = tmp_path / "sft"
    shutil.copytree(out, copy)
    rel = next(k for k in manifest["files"] if k.startswith("tokenizer/"))
    with open(copy / rel, "ab") as fh:
        fh.write(b" ")
    with pytest.raises(ManifestError, match="checksum"):
        verify_files(manifest, str(copy))


# ---------------------------------------------------------------------------- bad inputs
def _run_cli(base: Path, out: Path, pretrain_uri: str, capsys, **sections) -> str:
    """`python -m steps.sft` in-process; returns its one stderr line after checking the exit code."""
    import steps.sft
    from steps.common import main
    cfg_file = base / f"cfg-{out.name}.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_overrides(base, **sections)))
    capsys.readouterr()
    rc = main("sft", steps.sft.run, ["--preset", "demo", "--config", str(cfg_file),
                                     "--input", f"pretrain={pretrain_uri}", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert not (out / "manifest.json").exists()
    written = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert written == [], f"a refused SFT run left files behind: {written}"
    return err


def _copy_stage(src_uri: str, dst: Path, edit_manifest=None) -> str:
    shutil.copytree(src_uri, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["uri"] = str(dst)
    manifest["checkpoint"]["dir"] = str(dst / "checkpoints")
    if edit_manifest:
        edit_manifest(manifest)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return str(dst)


def test_sft_refuses_a_tokenizer_that_does_not_match_the_checkpoint(pretrained, tmp_path, capsys):
    # the pretrain output with its tokenizer swapped for one of another vocabulary size
    swapped = _copy_stage(pretrained["pretrain"]["uri"], tmp_path / "pt-swapped")
    shutil.rmtree(Path(swapped) / "tokenizer")
    other = tiny_tokenizer(with_sums=True)
    assert other.vocab_size == 300 != pretrained["pretrain"]["config"]["model"]["vocab_size"]
    other.save(str(Path(swapped) / "tokenizer"))
    err = _run_cli(tmp_path, tmp_path / "out-swapped", swapped, capsys)
    assert "vocabulary 400" in err and "300 tokens" in err, err

    # the manifest claims a checkpoint vocabulary its tokenizer does not have
    def edit(m):
        m["config"]["model"]["vocab_size"] = 512
        m["config"]["tokenizer"]["vocab_size"] = 512
    edited = _copy_stage(pretrained["pretrain"]["uri"], tmp_path / "pt-edited", edit)
    err = _run_cli(tmp_path, tmp_path / "out-edited", edited, capsys)
    assert "vocabulary 512" in err and "400 tokens" in err, err


@pytest.mark.parametrize("tasks", [
    {"demo_conversations": 0, "demo_problems": 0},     # empty training mixture
    {"demo_val": 0},                                     # empty validation mixture
])
def test_sft_refuses_an_empty_mixture(pretrained, tmp_path, capsys, tasks):
    err = _run_cli(tmp_path, tmp_path / "out", pretrained["pretrain"]["uri"], capsys, tasks=tasks)
    assert "empty" in err and "tasks" in err, err


@pytest.mark.parametrize("lines, bad_line, words", [
    (['{"messages": [{"role": "user", "content": "HI"}, {"role": "assistant", "content": "hi"}]}',
      '{"messages": [{"role": "user", "content": "HI"}, ',
      '[{"role": "user", "content": "A"}, {"role": "assistant", "content": "b"}]'], 2, "not valid JSON"),
    (['[{"role": "user", "content": "A"}, {"role": "assistant", "content": "b"}]',
      '',
      '[{"role": "assistant", "content": "A"}, {"role": "user", "content": "b"}]'], 3, "role"),
])
def test_sft_refuses_a_malformed_user_jsonl(pretrained, tmp_path, capsys, lines, bad_line, words):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(lines) + "\n")
    err = _run_cli(tmp_path, tmp_path / "out", pretrained["pretrain"]["uri"], capsys,
                   tasks={"user_jsonl": str(path)})
    assert f"{path}:{bad_line}:" in err and words in err, err
