"""Export a trained model to the formats people serve and study models in, each checked against JAX.

- `layout`: our parameter tree <-> nanochat's state dict (names, (out, in) layouts, model config).
- `torch_pickle`: torch.save's zip format written and read without torch.
- `nanochat_format`: nanochat's checkpoint folder (model/meta/tokenizer), both directions.
- `hf_config`, `hf_modeling/`, `hf_tokenizer`: a transformers export with our own modeling file.
- `builtin_nanochat`: why transformers' built-in NanoChat class cannot run this model.
- `onnx_export`, `litert_export`: traced from the JAX forward with jax2onnx / jax2tf.
- `parity`: logits and greedy-id comparison with the JAX model; `formats`: the writers and checkers.
"""
