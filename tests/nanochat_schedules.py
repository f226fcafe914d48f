"""nanochat's schedule formulas as plain Python (scripts/base_train.py), the reference our
jit-safe schedules are tested against. Shared by the schedule and optimizer-reference tests."""


def nanochat_lrm(it, n, warmup=40, ratio=0.65, final=0.05):
    warmdown = round(ratio * n)
    if it < warmup:
        return (it + 1) / warmup
    if it <= n - warmdown:
        return 1.0
    progress = (n - it) / warmdown
    return progress + (1 - progress) * final


def nanochat_momentum(it, n, ratio=0.65):
    warmdown = round(ratio * n)
    start = n - warmdown
    if it < 400:
        return (1 - it / 400) * 0.85 + it / 400 * 0.97
    if it >= start:
        p = (it - start) / warmdown
        return 0.97 * (1 - p) + 0.90 * p
    return 0.97
