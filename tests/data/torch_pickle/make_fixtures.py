"""Regenerate the torch-written fixtures for tests/test_torch_pickle.py (needs torch).

    python3 -m venv /tmp/tp-venv && /tmp/tp-venv/bin/pip install torch numpy ml_dtypes
    /tmp/tp-venv/bin/python tests/data/torch_pickle/make_fixtures.py

Writes, beside this script:
* state_dict.pt    torch.save(OrderedDict) of fp32/bf16/int64/uint16 tensors, a 0-d tensor,
                   views sharing one storage (offset, transposed, strided, 0-d), and a
                   torch.compile-style ``_orig_mod.`` key;
* plain_dict.pt    torch.save(dict) into a file object (archive name "archive");
* expected.npz     the expected contiguous values; bf16 entries are stored as uint16 bits
                   and listed in ``__bf16_keys__``.
The fixtures were generated with torch 2.13.0 (CPU).
"""

import collections
import io
import os

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    torch.manual_seed(0)
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    bf = torch.randn(3, 4).to(torch.bfloat16)
    sd = collections.OrderedDict()
    sd["fp32"] = torch.randn(2, 3)
    sd["bf16"] = bf
    sd["bf16_T"] = bf.t()  # non-contiguous bf16 view of the same storage
    sd["int64"] = torch.tensor([-3, 0, 2**40])
    sd["uint16"] = torch.tensor([1, 65535]).to(torch.uint16)  # UntypedStorage / v3 encoding
    sd["scalar"] = torch.tensor(2.5)
    sd["base"] = base
    sd["view_offset"] = base[1:3, 2:5]  # storage_offset 8, strides (6, 1)
    sd["view_T"] = base.t()  # strides (1, 6)
    sd["view_step"] = base[::2, 1::3]
    sd["view_scalar"] = base[3, 5]  # 0-d view, storage_offset 23
    sd["_orig_mod.lm_head.weight"] = torch.randn(2, 2)
    torch.save(sd, os.path.join(HERE, "state_dict.pt"))
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2, 2, dtype=torch.float16), "b": torch.tensor([True, False])}, buf)
    with open(os.path.join(HERE, "plain_dict.pt"), "wb") as f:
        f.write(buf.getvalue())
    expected, bf16_keys = {}, []
    for k, v in {**sd, "plain.w": torch.ones(2, 2, dtype=torch.float16),
                 "plain.b": torch.tensor([True, False])}.items():
        v = v.contiguous()
        if v.dtype == torch.bfloat16:
            bf16_keys.append(k)
            v = v.view(torch.int16).to(torch.int32) & 0xFFFF
            expected[k] = v.numpy().astype(np.uint16)
        elif v.dtype == torch.uint16:
            expected[k] = v.to(torch.int32).numpy().astype(np.uint16)
        else:
            expected[k] = v.numpy()
    expected["__bf16_keys__"] = np.array(bf16_keys)
    np.savez(os.path.join(HERE, "expected.npz"), **expected)


if __name__ == "__main__":
    main()
