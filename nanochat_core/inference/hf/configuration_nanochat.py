"""
The nanochat GPT's shape for Hugging Face `transformers` (trust_remote_code). Written into every folder that
`nanochat export` makes; self-contained on purpose: loading an exported model needs transformers and torch,
not the nanochat package. Everything the architecture needs is spelled out as data here (window per layer,
which layers carry value embeddings, softcap, rotary base), so the modeling file never re-derives it.
"""
from transformers import PretrainedConfig


class NanochatConfig(PretrainedConfig):
    # Our own name: transformers 5 ships a different NanoChat under "nanochat", which it would load in
    # place of this one (weights unused, output noise) when trust_remote_code is not given.
    model_type = "nanochat_gpt"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=32768, padded_vocab_size=32768, hidden_size=768, num_hidden_layers=12,
                 num_attention_heads=6, num_key_value_heads=6, sequence_len=2048, max_position_embeddings=20480,
                 window_sizes=None, value_embed_layers=None, ve_gate_channels=32, logit_softcap=15.0,
                 rope_theta=100000.0, use_cache=True, ve_gate_scale=2.0, smear=False,
                 smear_channels=24, backout=False, **kwargs):
        self.vocab_size = vocab_size                    # real tokens; the embedding tables are padded to:
        self.padded_vocab_size = padded_vocab_size      # a multiple of 64 (friendlier matmul shapes)
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads
        self.sequence_len = sequence_len                # the context it was trained on
        self.max_position_embeddings = max_position_embeddings
        # per layer: 0 = full causal attention, W > 0 = the query sees itself and the W-1 keys before it
        self.window_sizes = list(window_sizes) if window_sizes is not None else [0] * num_hidden_layers
        self.value_embed_layers = list(value_embed_layers) if value_embed_layers is not None else []
        self.ve_gate_channels = ve_gate_channels
        self.ve_gate_scale = ve_gate_scale              # gate = scale * sigmoid(.)
        self.smear = smear                              # previous token's embedding mixed in (gated)
        self.smear_channels = smear_channels
        self.backout = backout                          # a share of the mid-depth stream subtracted at the end
        self.logit_softcap = logit_softcap
        self.rope_theta = rope_theta
        self.use_cache = use_cache
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
