"""
The nanochat GPT for Hugging Face `transformers` (trust_remote_code): the architecture exactly as trained,
written against nanochat_core/gpt/model.py, with the same parameter names so the checkpoint loads unchanged.
Self-contained (torch + transformers only). The test suite checks its logits against ours to 1e-5 in fp32.

- token embedding -> RMSNorm (no weights anywhere) = x0; before every layer x = resid_lambda*x + x0_lambda*x0
- attention: QK-norm then rotary (base 100k, halves rotated), grouped-query heads, a causal window per layer
  (sliding on some, full on others), value embeddings on some layers mixed into V by a gate scale*sigmoid(.)
  that looks at the first ve_gate_channels channels of the layer input
- smear (optional): each position adds lambda * sigmoid(gate(x_t)) * x_{t-1} of the normed embeddings;
  backout (optional): lambda * (the stream after layer L//2) is subtracted before the final norm
- MLP relu(x)^2, 4x wide; untied unembedding; logits = softcap * tanh(logits / softcap)
- KV cache: transformers' DynamicCache (full keys are kept; the window is applied by the mask). Batches with
  left padding work: rotary positions come from the attention mask, padded keys are masked out.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_nanochat import NanochatConfig


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def rotary(x, cos, sin):
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        d, hd = config.hidden_size, config.head_dim
        self.c_q = nn.Linear(d, self.n_head * hd, bias=False)
        self.c_k = nn.Linear(d, self.n_kv_head * hd, bias=False)
        self.c_v = nn.Linear(d, self.n_kv_head * hd, bias=False)
        self.c_proj = nn.Linear(self.n_head * hd, d, bias=False)
        self.ve_gate_channels, self.ve_gate_scale = min(config.ve_gate_channels, d), config.ve_gate_scale
        has_ve = layer_idx in config.value_embed_layers
        self.ve_gate = nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False) if has_ve else None

    def forward(self, x, ve, cos, sin, mask, cache):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if ve is not None:
            gate = self.ve_gate_scale * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            ve = ve.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
            v = v + (gate.transpose(1, 2).unsqueeze(-1) * ve).to(v.dtype)
        q, k = rotary(norm(q), cos, sin), rotary(norm(k), cos, sin)
        q, k = q.to(v.dtype), k.to(v.dtype)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        rep = self.n_head // self.n_kv_head
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, 4 * config.hidden_size, bias=False)
        self.c_proj = nn.Linear(4 * config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = Attention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, mask, cache):
        x = x + self.attn(norm(x), ve, cos, sin, mask, cache)
        return x + self.mlp(norm(x))


class NanochatForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanochatConfig
    base_model_prefix = "transformer"
    _supports_cache_class = True
    _no_split_modules = ["Block"]

    def __init__(self, config):
        super().__init__(config)
        V, d = config.padded_vocab_size, config.hidden_size
        kv_dim = config.num_key_value_heads * config.head_dim
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(V, d),
            "h": nn.ModuleList([Block(config, i) for i in range(config.num_hidden_layers)]),
        })
        self.lm_head = nn.Linear(d, V, bias=False)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in config.value_embed_layers})
        self.resid_lambdas = nn.Parameter(torch.ones(config.num_hidden_layers))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.num_hidden_layers))
        if config.smear:
            self.smear_gate = nn.Linear(config.smear_channels, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.post_init()

    def _init_weights(self, module):
        pass  # every weight comes from model.safetensors; there is nothing to initialise

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def _masks(self, T, Tk, key_valid, device):
        """{window: bool (B or 1, 1, T, Tk)}: key j is visible to query t (at index Tk-T+t) when it is not after
        it, within the window, and not padding. Index differences equal position differences because padding
        is only ever on the left."""
        qi = torch.arange(Tk - T, Tk, device=device)[:, None]
        kj = torch.arange(Tk, device=device)[None, :]
        out = {}
        for w in set(self.config.window_sizes):
            m = kj <= qi
            if w:
                m = m & (qi - kj < w)
            m = m[None, None]
            if key_valid is not None:
                # a padding query would see no key at all (NaN softmax): let it see itself; its output is unused
                m = (m & key_valid[:, None, None, :]) | (kj == qi)[None, None]
            out[w] = m
        return out

    def _smear(self, x, key_valid, cache, Tk):
        """Position t gets lambda * sigmoid(gate(x_t)) * x_{t-1}. The previous token of a decode step is the
        last one of the call before (kept on the cache object); a padding token is nobody's previous token."""
        T = x.size(1)
        before = getattr(cache, "nanochat_prev_embedding", None) if cache is not None else None
        if cache is not None:
            cache.nanochat_prev_embedding = x[:, -1:]
        prev = torch.cat([before if before is not None else torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        if key_valid is not None:
            prev_valid = F.pad(key_valid, (1, 0), value=False)[:, Tk - T:Tk]   # is position t-1 a real token?
            prev = prev * prev_valid[..., None].to(prev.dtype)
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :self.config.smear_channels]))
        return x + gate * prev

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None, labels=None,
                use_cache=None, logits_to_keep=0, position_ids=None, return_dict=None, **kwargs):
        if input_ids is None:
            raise ValueError("nanochat needs input_ids (its value embeddings are indexed by token id)")
        B, T = input_ids.shape
        device = input_ids.device
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        pos0 = past_key_values.get_seq_length() if past_key_values is not None else 0
        Tk = pos0 + T
        key_valid = None
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            key_valid = attention_mask[:, -Tk:].bool()
        if position_ids is None:
            if key_valid is not None:
                position_ids = (key_valid.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(pos0, Tk, device=device)[None]
        hd = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
        freqs = position_ids.float()[..., None] * inv_freq          # (B or 1, T, hd/2)
        cos, sin = freqs.cos()[:, None], freqs.sin()[:, None]
        masks = self._masks(T, Tk, key_valid, device)

        x = norm(self.transformer.wte(input_ids))
        if self.config.smear:
            x = self._smear(x, key_valid, past_key_values if use_cache else None, Tk)
        x0 = x
        mid = None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, masks[self.config.window_sizes[i]], past_key_values if use_cache else None)
            if self.config.backout and i == self.config.num_hidden_layers // 2:
                mid = x
        if mid is not None:
            x = x - self.backout_lambda * mid
        x = norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:, :]
        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        logits = self.config.logit_softcap * torch.tanh(logits / self.config.logit_softcap)
        loss = None
        if labels is not None:
            # transformers' convention: labels are the inputs; position t predicts label t+1; -100 is ignored
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None)
