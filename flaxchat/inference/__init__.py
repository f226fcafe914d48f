"""Inference: batched generation with tool use (`engine`), speculative decoding with a draft model
(`speculative`), and the shared sampling controls (`sampling`)."""
