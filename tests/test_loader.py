"""PackedLoader: BOS-aligned best-fit packing, SFT padding, exact resume, multi-host, no hangs.

Shards are written here with pyarrow. Most tests use an "id encoder": the text "7 12" encodes to
twelve tokens of value 8 (doc id + 1), and BOS is 0, so every packed segment names its document.
"""

from __future__ import annotations

import json
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flaxchat.data.loader import DataError, PackedLoader, Prefetcher
from flaxchat.data.packing import BufferedDoc, DocBuffer

pytestmark = pytest.mark.timeout(60)
BOS = 0


def id_encode(texts: list[str]) -> list[list[int]]:
    out = []
    for t in texts:
        doc_id, n = map(int, t.split())
        out.append([doc_id + 1] * n)
    return out


class RecordingEncoder:
    """id_encode that remembers every document it was asked to encode (= every doc read)."""

    def __init__(self) -> None:
        self.calls = 0
        self.doc_ids: list[int] = []

    def __call__(self, texts: list[str]) -> list[list[int]]:
        self.calls += 1
        self.doc_ids += [int(t.split()[0]) for t in texts]
        return id_encode(texts)


def write_shards(tmp_path, shard_lengths: list[list[int]], rg_size: int = 16) -> tuple[list[str], dict]:
    """One parquet file per list of token lengths; doc ids are global. Returns paths, id->len."""
    paths, lengths, next_id = [], {}, 0
    for s, doc_lengths in enumerate(shard_lengths):
        texts = []
        for n in doc_lengths:
            texts.append(f"{next_id} {n}")
            lengths[next_id] = n + 1  # + BOS
            next_id += 1
        path = str(tmp_path / f"shard_{s:03d}.parquet")
        pq.write_table(pa.table({"text": texts}), path, row_group_size=rg_size)
        paths.append(path)
    return paths, lengths


def random_shards(tmp_path, n_shards=4, docs=96, max_len=40, seed=0, rg_size=16):
    rng = np.random.default_rng(seed)
    return write_shards(tmp_path, [rng.integers(0, max_len, docs).tolist() for _ in range(n_shards)],
                        rg_size)


def full_rows(inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return np.concatenate([inputs, targets[:, -1:]], axis=1)


def segments(row: np.ndarray) -> list[np.ndarray]:
    starts = np.flatnonzero(row == BOS)
    return np.split(row, starts[1:])


def take(loader, n: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[dict]]:
    batches, states = [], []
    for _ in range(n):
        batches.append(next(loader))
        states.append(json.loads(json.dumps(loader.state_dict())))  # must survive JSON
    return batches, states


def assert_same(a, b) -> None:
    assert len(a) == len(b)
    for (x1, y1), (x2, y2) in zip(a, b):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)


# --------------------------------------------------------------------------- packing invariants
def test_rows_start_with_bos_and_targets_are_shifted_inputs(tmp_path):
    shards, _ = random_shards(tmp_path)
    loader = PackedLoader(shards, id_encode, BOS, batch_size=4, seq_len=32, buffer_docs=20)
    for x, y in take(loader, 10)[0]:
        assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == np.int32
        assert (x[:, 0] == BOS).all()
        np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
        assert (y >= 0).all()  # pretraining never pads or masks


def test_no_token_is_lost_except_by_cropping(tmp_path):
    shards, lengths = random_shards(tmp_path, max_len=60)
    enc = RecordingEncoder()
    loader = PackedLoader(shards, enc, BOS, batch_size=3, seq_len=48, buffer_docs=24, shuffle=False)
    batches, states = take(loader, 12)
    assert states[-1]["epoch"] == 1  # one pass: every doc id is unique
    buffered = [d for sh, rg, docs in states[-1]["buffer"] for d in docs]
    read_ids = enc.doc_ids
    assert len(read_ids) == len(set(read_ids))
    assert enc.calls == len(read_ids) // 16 >= 2  # encode runs once per (16-doc) row group
    # buffered identities are (row group, doc index) positions; map them back to ids by re-reading
    table_ids = {}
    for s, path in enumerate(shards[:-1]):
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            for i, t in enumerate(pf.read_row_group(rg).column("text").to_pylist()):
                table_ids[(s, rg, i)] = int(t.split()[0])
    buffered_ids = {table_ids[(sh, rg, d)] for sh, rg, docs in states[-1]["buffer"] for d in docs}
    assert len(buffered_ids) == len(buffered)
    consumed = set(read_ids) - buffered_ids
    assert buffered_ids <= set(read_ids)

    seen, n_segments, packed_tokens = set(), 0, 0
    for x, y in batches:
        for row in full_rows(x, y):
            segs = segments(row)
            for j, seg in enumerate(segs):
                n_segments += 1
                packed_tokens += len(seg)
                if len(seg) == 1:
                    continue  # a document cropped to its BOS names no id
                doc_id = int(seg[1]) - 1
                assert (seg[1:] == doc_id + 1).all(), "a segment mixes two documents"
                assert doc_id in consumed and doc_id not in seen
                seen.add(doc_id)
                if len(seg) < lengths[doc_id]:
                    assert j == len(segs) - 1, "only the last document of a row is cropped"
                else:
                    assert len(seg) == lengths[doc_id]
    assert n_segments == len(consumed)  # every consumed document shows up exactly once
    doc_tokens = sum(lengths[d] for d in consumed)
    assert loader.stats.doc_tokens == doc_tokens
    assert doc_tokens - packed_tokens == loader.stats.cropped_tokens > 0
    assert 0 < loader.cropped_fraction < 1


def test_best_fit_takes_largest_fitting_document_then_crops_the_shortest(tmp_path):
    # with BOS the train docs are A=3, B=5, C=7, D=4, E=12, F=2 tokens; rows hold 10
    shards, _ = write_shards(tmp_path, [[2, 4, 6, 3, 11, 1], [5]])
    # buffer_docs=1: the one row group is read once and not topped up until the buffer is empty
    loader = PackedLoader(shards, id_encode, BOS, batch_size=3, seq_len=9, buffer_docs=1,
                          shuffle=False)
    x, y = next(loader)
    A, B, C, D, E, F = ([BOS] + [i + 1] * (n - 1) for i, n in enumerate([3, 5, 7, 4, 12, 2]))
    expected = np.array([
        C + A,             # 7 fits best, then 3 fills the row exactly
        B + D + F[:1],     # 5, then 4, then nothing fits 1 slot: the shortest (F) is cropped
        E[:10],            # only E (12 > 10) is left: it is cropped to the row
    ])
    np.testing.assert_array_equal(full_rows(x, y), expected)
    assert loader.stats.cropped_tokens == (2 - 1) + (12 - 10)
    assert loader.epoch == 1 and loader.state_dict()["buffer"] == []


def test_cropped_fraction_counts_what_cropping_drops(tmp_path):
    # every doc is 6 tokens and rows hold 10: each row is one whole doc + 4 tokens of another,
    # so exactly 2 of every 12 tokens are cropped
    shards, _ = write_shards(tmp_path, [[5] * 64, [5] * 8])
    loader = PackedLoader(shards, id_encode, BOS, batch_size=4, seq_len=9, buffer_docs=10)
    take(loader, 20)
    assert loader.stats.docs == 2 * 4 * 20
    assert loader.cropped_fraction == pytest.approx(2 / 12)


def test_doc_buffer_breaks_ties_by_arrival():
    buf = DocBuffer()
    for ident, n in [((0, 0, 0), 4), ((0, 0, 1), 4), ((0, 0, 2), 2), ((0, 0, 3), 2)]:
        buf.add(BufferedDoc(np.zeros(n, np.int32), None, ident))
    assert buf.pop_largest_fitting(5).ident == (0, 0, 0)
    assert buf.pop_largest_fitting(1) is None
    assert buf.pop_shortest().ident == (0, 0, 2)
    assert buf.identities() == [(0, 0, 1), (0, 0, 3)]


def test_documents_longer_than_a_row_are_cropped_not_stuck(tmp_path):
    shards, _ = write_shards(tmp_path, [[100] * 20, [100] * 4])
    loader = PackedLoader(shards, id_encode, BOS, batch_size=2, seq_len=15, buffer_docs=8)
    for x, y in take(loader, 5)[0]:
        rows = full_rows(x, y)
        assert (rows[:, 0] == BOS).all() and (rows[:, 1:] != BOS).all()  # one cropped doc per row
    assert loader.stats.cropped_tokens == 10 * (101 - 16)


# ------------------------------------------------------------------------------------------ SFT
def sft_encode(texts: list[str]) -> list[tuple[list[int], list[int]]]:
    """Like render_conversation: BOS first, mask 1 on every other token after it."""
    out = []
    for ids in id_encode(texts):
        out.append(([BOS] + ids, [0] + [k % 2 for k in range(len(ids))]))
    return out


def test_sft_pads_instead_of_cropping_and_applies_the_loss_mask(tmp_path):
    # conversations of 6, 6, 3 tokens (BOS included); rows hold 11
    shards, _ = write_shards(tmp_path, [[5, 5, 2], [3]])
    loader = PackedLoader(shards, sft_encode, BOS, batch_size=2, seq_len=10, mode="sft",
                          buffer_docs=3, shuffle=False)
    x, y = next(loader)
    # row 0: conv0 (6) best fits 11, then conv2 (3) fits the 5 left, then 2 pads (BOS inputs)
    np.testing.assert_array_equal(x[0], [0, 1, 1, 1, 1, 1, 0, 3, 3, 0])
    # targets: -1 where the target token's mask is 0 (BOS, odd positions) and on padding
    np.testing.assert_array_equal(y[0], [-1, 1, -1, 1, -1, -1, -1, 3, -1, -1])
    # row 1: conv1, then the epoch-2 copy of conv2 (the buffer was topped up), then padding
    np.testing.assert_array_equal(x[1], [0, 2, 2, 2, 2, 2, 0, 3, 3, 0])
    np.testing.assert_array_equal(y[1], [-1, 2, -1, 2, -1, -1, -1, 3, -1, -1])
    assert loader.stats.cropped_tokens == 0 and loader.stats.pad_tokens == 4


def test_sft_truncates_a_conversation_longer_than_a_row(tmp_path):
    shards, _ = write_shards(tmp_path, [[50, 3], [3]])
    loader = PackedLoader(shards, sft_encode, BOS, batch_size=1, seq_len=9, mode="sft",
                          buffer_docs=1, shuffle=False)
    (x1, y1), (x2, _y2) = next(loader), next(loader)
    assert x1[0].tolist() == [BOS] + [1] * 8                     # cut to exactly one row
    assert y1[0].tolist() == [-1, 1, -1, 1, -1, 1, -1, 1, -1]
    assert x2[0].tolist() == [BOS, 2, 2, 2, BOS, 2, 2, 2, BOS]   # whole short ones, then a pad
    # the long one was read twice (epochs 1 and 2, to refill the buffer) and cut each time
    assert loader.stats.truncated_tokens == 2 * (51 - 10) and loader.stats.cropped_tokens == 0


# ---------------------------------------------------------------------- determinism and resume
def test_same_seed_same_batches_and_seed_changes_order(tmp_path):
    shards, _ = random_shards(tmp_path, n_shards=5)
    kw = dict(batch_size=4, seq_len=32, buffer_docs=16)
    a = take(PackedLoader(shards, id_encode, BOS, seed=3, **kw), 8)[0]
    b = take(PackedLoader(shards, id_encode, BOS, seed=3, **kw), 8)[0]
    c = take(PackedLoader(shards, id_encode, BOS, seed=4, **kw), 8)[0]
    assert_same(a, b)
    assert any((x1 != x2).any() for (x1, _), (x2, _) in zip(a, c))


@pytest.mark.parametrize("mode,process_index,process_count", [
    ("pretrain", 0, 1), ("pretrain", 1, 2), ("sft", 0, 1)])
def test_exact_resume_across_shard_and_epoch_boundaries(tmp_path, mode, process_index, process_count):
    shards, _ = random_shards(tmp_path, n_shards=4, docs=40, rg_size=8)
    encode = id_encode if mode == "pretrain" else sft_encode
    kw = dict(batch_size=4, seq_len=24, buffer_docs=12, mode=mode, seed=7,
              process_index=process_index, process_count=process_count)
    n = 45
    reference, states = take(PackedLoader(shards, encode, BOS, **kw), n)
    epoch_starts = [k for k in range(1, n) if states[k]["epoch"] != states[k - 1]["epoch"]]
    shard_moves = [k for k in range(1, n) if states[k]["shard_pos"] != states[k - 1]["shard_pos"]]
    assert epoch_starts and shard_moves, "the data must wrap within the test"
    ks = {0, 5, n - 2} | {k - 1 for k in epoch_starts[:2]} | set(epoch_starts[:2]) | set(shard_moves[:2])
    for k in sorted(ks):
        resumed = PackedLoader(shards, encode, BOS, state=states[k], **kw)
        assert resumed.batches_yielded == k + 1
        assert_same(take(resumed, n - k - 1)[0], reference[k + 1:])
        assert resumed.state_dict() == states[-1]


def test_val_split_is_one_ordered_pass_and_resumes(tmp_path):
    shards, _ = random_shards(tmp_path, n_shards=3, docs=64)
    kw = dict(split="val", batch_size=2, seq_len=16, buffer_docs=8)
    full = list(PackedLoader(shards, id_encode, BOS, seed=1, **kw))
    assert 4 <= len(full) < 1000
    assert_same(full, list(PackedLoader(shards, id_encode, BOS, seed=2, **kw)))  # never shuffled
    loader = PackedLoader(shards, id_encode, BOS, seed=1, **kw)
    _, states = take(loader, 3)
    resumed = PackedLoader(shards, id_encode, BOS, seed=1, state=states[2], **kw)
    assert_same(list(resumed), full[3:])
    with pytest.raises(StopIteration):
        next(resumed)


# --------------------------------------------------------------------------------- multi-host
def test_hosts_read_disjoint_row_groups_that_cover_the_split(tmp_path):
    shards, _ = random_shards(tmp_path, n_shards=4, docs=72, rg_size=16)  # 5 row groups a shard
    kw = dict(batch_size=4, seq_len=32, buffer_docs=16, seed=5)
    plans = [PackedLoader(shards, id_encode, BOS, process_index=p, process_count=2, **kw)
             .row_group_plan(epoch=1) for p in range(2)]
    single = PackedLoader(shards, id_encode, BOS, **kw).row_group_plan(epoch=1)
    assert not set(plans[0]) & set(plans[1])
    assert sorted(plans[0] + plans[1]) == sorted(single) and len(single) == 15
    assert abs(len(plans[0]) - len(plans[1])) <= 1  # numbered across shards, so balanced

    docs = []
    for p in range(2):
        loader = PackedLoader(shards, id_encode, BOS, process_index=p, process_count=2, **kw)
        batches, states = take(loader, 6)
        assert states[-1]["epoch"] == 1 and batches[0][0].shape == (2, 32)
        ids = {int(v) - 1 for x, y in batches for v in np.unique(full_rows(x, y)) if v != BOS}
        assert ids
        docs.append(ids)
    assert not docs[0] & docs[1]


def test_prefetcher_matches_the_loader_and_resumes_exactly(tmp_path):
    shards, _ = random_shards(tmp_path, n_shards=3, docs=48)
    kw = dict(batch_size=2, seq_len=16, buffer_docs=8)
    reference = take(PackedLoader(shards, id_encode, BOS, **kw), 12)[0]
    pre = Prefetcher(PackedLoader(shards, id_encode, BOS, **kw), depth=3)
    first, states = take(pre, 5)
    assert_same(first, reference[:5])
    assert states[-1]["batches"] == 5  # the state of the last batch handed out, not built
    pre.close()
    resumed = Prefetcher(PackedLoader(shards, id_encode, BOS, state=states[-1], **kw))
    assert_same(take(resumed, 7)[0], reference[5:])
    resumed.close()
    val = Prefetcher(PackedLoader(shards, id_encode, BOS, split="val", **kw))
    assert_same(list(val), list(PackedLoader(shards, id_encode, BOS, split="val", **kw)))
    with pytest.raises(StopIteration):
        next(val)
    broken = Prefetcher(PackedLoader(shards, lambda texts: [], BOS, **kw))
    with pytest.raises(DataError, match="encode returned 0"):
        next(broken)


# ------------------------------------------------------------------------------ errors, no hangs
@pytest.mark.timeout(20)
def test_bad_inputs_raise_data_error_quickly(tmp_path):
    shards, _ = random_shards(tmp_path, n_shards=2, docs=16, rg_size=16)  # one row group each
    kw = dict(batch_size=2, seq_len=16)

    def fails(match, *args, **kwargs):
        with pytest.raises(DataError, match=match):
            loader = PackedLoader(*args, **{**kw, **kwargs})
            next(loader)

    fails("no parquet shards", [], id_encode, BOS)
    fails("train split is empty", shards[:1], id_encode, BOS)
    fails("batch_size 0", shards, id_encode, BOS, batch_size=0)
    fails("multiple of process_count", shards, id_encode, BOS, batch_size=3, process_count=2)
    fails("process_index 2", shards, id_encode, BOS, process_index=2, process_count=2)
    fails("mode must be", shards, id_encode, BOS, mode="rl")
    # one train row group, two processes: process 1 has nothing to read
    fails("process 1 of 2 got no documents", shards, id_encode, BOS,
          process_index=1, process_count=2)
    fails("encode returned 0", shards, lambda texts: [], BOS)
    fails("no column 'content'", shards, id_encode, BOS, text_column="content")

    zero = str(tmp_path / "zero_row_groups.parquet")
    pq.ParquetWriter(zero, pa.schema([("text", pa.string())])).close()
    fails("has no row groups", [zero, shards[1]], id_encode, BOS)
    empty_rows = str(tmp_path / "empty_rows.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty_rows)  # 1 group, 0 rows
    fails("got no documents", [empty_rows, shards[1]], id_encode, BOS)
    fails("got no documents", [shards[0], empty_rows], id_encode, BOS, split="val")

    state = PackedLoader(shards, id_encode, BOS, **kw).state_dict()
    fails("seq_len=16", shards, id_encode, BOS, seq_len=8, state=state)
