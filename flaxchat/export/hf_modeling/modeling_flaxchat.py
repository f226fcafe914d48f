"""FlaxchatForCausalLM: flaxchat's GPT (nanochat's architecture) as Hugging Face remote code, in torch.

This file is copied into a flaxchat export directory and imported by transformers alone
(`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`), so it imports torch and
transformers only. Its state_dict keys are exactly nanochat's (`transformer.h.0.attn.c_q.weight`, ...),
so model.safetensors is nanochat's state dict; it reproduces flaxchat.model.gpt.gpt_forward's logits.

Per token (B batch, T new tokens, S = cached + new, C n_embd, H heads, Hkv kv heads, D head_dim):
  x  = rms_norm(wte[idx]);  x0 = x + smear_lambda * sigmoid(x[:24] @ smear_gate) * x[t-1]
  per layer i: x = resid_lambdas[i]*x + x0_lambdas[i]*x0
               x += attn(rms_norm(x))   (v += 3*sigmoid(h[:12] @ ve_gate) * value_embeds[idx] on ve layers;
                                         q, k = 1.2*rms_norm(rope(q, k)); window_sizes[i])
               x += relu(rms_norm(x) @ c_fc)^2 @ c_proj;   x_mid = x after layer n_layer//2
  logits = 15*tanh((rms_norm(x - backout_lambda*x_mid) @ lm_head)[:vocab_size] / 15)   fp32

Deliberate differences from transformers' built-in NanoChatForCausalLM: that class has none of value
embeddings, per-layer sliding windows, resid/x0 lambdas, smear or backout, and uses other parameter
names; this one keeps nanochat's names and flaxchat's numerics (norms, RoPE, gates, softcap in fp32;
rms_norm eps = fp32 machine eps; RoPE base 1e5 rotated by -theta with halves split; no RoPE buffers).

Generation: KV cache through transformers' DynamicCache (full, unwindowed layers; the windows are
applied by the mask). Smear needs the previous token's pre-smear embedding at decode, so the cache
carries one extra DynamicLayer (index n_layer) whose "keys" are those embeddings (B, 1, S, C): it is
reordered/cropped/expanded by generate along with the real layers. Other cache classes (static,
quantized, offloaded-static) are refused with an error. Padding: a 2-D attention_mask of left (or
right) padding is supported; positions are counted from each row's first real token, as if the row
ran alone. `position_ids` is accepted for API compatibility and ignored (positions come from the mask
and the cache). The attention implementation is always torch SDPA with an explicit boolean mask.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_flaxchat import FlaxchatConfig

SMEAR_CHANNELS = 24     # smear gate reads the first 24 channels of the embedding
VE_GATE_CHANNELS = 12   # value-embedding gate reads the first 12 channels of the block input
VE_GATE_SCALE = 3.0
QK_SCALE = 1.2
NORM_EPS = torch.finfo(torch.float32).eps
# the output dataclass names its cache field `cache` from transformers 5.2x, `past_key_values` before
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def has_ve(layer_idx, n_layer):
    """Value embeddings on alternating layers, the last one always included (nanochat)."""
    return layer_idx % 2 == (n_layer - 1) % 2


def rms_norm(x):
    """Parameter-free RMSNorm over the last axis, in fp32, returned in x's dtype."""
    return F.rms_norm(x.float(), (x.size(-1),), eps=NORM_EPS).to(x.dtype)


def rope_cos_sin(pos, head_dim, base):
    """Integer positions (B, T) -> cos, sin (B, T, 1, D/2) in fp32, computed on the fly."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=pos.device) / head_dim))
    freqs = pos.float()[..., None] * inv_freq
    return freqs.cos()[:, :, None, :], freqs.sin()[:, :, None, :]


def apply_rotary(x, cos, sin):
    """Rotate (B, T, H, D) by -theta with the halves split (nanochat's convention); fp32 out."""
    d = x.shape[-1] // 2
    x1, x2 = x.float()[..., :d], x.float()[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def gate_linear(x, weight):
    """Small gate matmul: operands in the compute dtype, result in fp32 (as flaxchat)."""
    return F.linear(x.float(), weight.to(x.dtype).float())


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        C, HD, KV = config.n_embd, config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        self.c_q = nn.Linear(C, HD, bias=False)
        self.c_k = nn.Linear(C, KV, bias=False)
        self.c_v = nn.Linear(C, KV, bias=False)
        self.c_proj = nn.Linear(HD, C, bias=False)
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, config.n_kv_head, bias=False) if has_ve(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos, sin, mask, cache):
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q = self.c_q(x).view(B, T, H, D)
        k = self.c_k(x).view(B, T, Hkv, D)
        v = self.c_v(x).view(B, T, Hkv, D)
        if ve is not None:   # value residual: v += gate * value_embeds[idx], gate (B, T, Hkv) in (0, 3)
            gate = VE_GATE_SCALE * torch.sigmoid(gate_linear(x[..., :VE_GATE_CHANNELS], self.ve_gate.weight))
            v = (v.float() + gate[..., None] * ve.view(B, T, Hkv, D).float()).to(x.dtype)
        q = (QK_SCALE * rms_norm(apply_rotary(q, cos, sin))).to(x.dtype)   # RoPE, then QK norm
        k = (QK_SCALE * rms_norm(apply_rotary(k, cos, sin))).to(x.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # (B, heads, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)                       # (B, Hkv, S, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != Hkv)   # (B, H, T, D)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, mask, cache):
        x = x + self.attn(rms_norm(x), ve, cos, sin, mask, cache)
        return x + self.mlp(rms_norm(x))


class FlaxchatPreTrainedModel(PreTrainedModel):
    config_class = FlaxchatConfig
    base_model_prefix = "flaxchat"    # no such submodule: the whole model is the base model
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = False


class FlaxchatForCausalLM(FlaxchatPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        L, C, Vp = config.n_layer, config.n_embd, config.padded_vocab_size
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(Vp, C),
            "h": nn.ModuleList([Block(config, i) for i in range(L)]),
        })
        self.lm_head = nn.Linear(C, Vp, bias=False)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(Vp, config.n_kv_head * config.head_dim)
                                           for i in range(L) if has_ve(i, L)})
        # placeholder values: every tensor comes from the checkpoint
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.full((1,), 0.2))
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def _masks(self, attention_mask, B, past, T, device):
        """Query positions (B, T) and one boolean SDPA mask (B, 1, T, S) per distinct window."""
        S = past + T
        if attention_mask is None:
            key_valid = torch.ones(B, S, dtype=torch.bool, device=device)
            k_pos = torch.arange(S, device=device).expand(B, S)
        else:
            if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (B, S):
                raise ValueError(f"attention_mask must be 2-D (batch, cached + new tokens) = ({B}, {S}), got "
                                 f"{tuple(attention_mask.shape)}; 4-D masks are not supported")
            key_valid = attention_mask.bool()
            k_pos = attention_mask.long().cumsum(-1) - 1       # position within the row's real tokens
        q_pos = k_pos[:, past:]                                 # (B, T)
        delta = q_pos[:, :, None] - k_pos[:, None, :]           # (B, T, S)
        # every query sees itself: keeps padding rows finite (their outputs are never used)
        diag = torch.arange(past, S, device=device)[:, None] == torch.arange(S, device=device)[None]
        masks = {w: ((key_valid[:, None] & (delta >= 0) & (delta <= w)) | diag)[:, None]
                 for w in set(self.config.window_sizes)}
        return q_pos, masks

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=None, labels=None,
                position_ids=None, cache=None, logits_to_keep=0, **kwargs):
        cfg = self.config
        L = cfg.n_layer
        cache = cache if cache is not None else past_key_values
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache(config=cfg)
        if cache is not None and (not isinstance(cache, DynamicCache)
                                  or any(type(layer) is not DynamicLayer for layer in cache.layers)):
            raise TypeError(f"FlaxchatForCausalLM supports a DynamicCache of full layers only, got {cache!r}; "
                            f"use generate's default cache (cache_implementation=None) or use_cache=False")
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        q_pos, masks = self._masks(attention_mask, B, past, T, input_ids.device)
        cos, sin = rope_cos_sin(q_pos, cfg.head_dim, cfg.rope_base)

        # embedding + smear: add the previous token's normed embedding, gated (not at a row's position 0)
        x = rms_norm(self.transformer.wte(input_ids))                        # (B, T, C)
        smear_cache = cache.layers[L] if cache is not None and len(cache.layers) > L else None
        if smear_cache is not None and smear_cache.get_seq_length() > 0:
            first_prev = smear_cache.keys[:, 0, -1].to(x.dtype)              # (B, C)
        else:
            first_prev = torch.zeros_like(x[:, 0])
        prev = torch.cat([first_prev[:, None], x[:, :-1]], dim=1)
        gate = self.smear_lambda.float() * torch.sigmoid(gate_linear(x[..., :SMEAR_CHANNELS], self.smear_gate.weight))
        gate = torch.where((q_pos > 0)[..., None], gate, torch.zeros_like(gate))   # (B, T, 1)
        x0 = h = (x.float() + gate * prev.float()).to(x.dtype)

        x_mid = None
        for i, block in enumerate(self.transformer.h):
            h = (self.resid_lambdas[i].float() * h.float() + self.x0_lambdas[i].float() * x0.float()).to(x.dtype)
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            h = block(h, ve, cos, sin, masks[cfg.window_sizes[i]], cache)
            if i == L // 2:
                x_mid = h                                                    # backout capture
        if cache is not None:   # remember the pre-smear embeddings for the next call's smear
            if len(cache.layers) == L:
                cache.layers.append(DynamicLayer())
            cache.layers[L].update(x[:, None], x[:, None, :, :0])           # keys (B, 1, T, C), empty values

        h = (h.float() - self.backout_lambda.float() * x_mid.float()).to(x.dtype)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(rms_norm(h)[:, keep])[..., :cfg.vocab_size].float()
        logits = cfg.softcap * torch.tanh(logits / cfg.softcap)               # (B, T', vocab) fp32

        loss = None
        if labels is not None:   # HF convention: labels aligned with input_ids, shifted here, -100 ignored
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
