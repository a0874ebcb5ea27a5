"""A plain-PyTorch restatement of the official AKI forward pass, for tests only.

Written from the description in docs/checkpoint.md and the paper, with the official state-dict
names, so a tiny checkpoint in the official layout can be saved from it and converted:

* SigLIP vision transformer (`vision_encoder.*`), features = post-LayerNorm last hidden state;
  its attention-pooling head exists (and is saved) but is never run.
* Perceiver resampler (`vision_tokenizer.*`): to_kv reads concat(media, latents), q scaled by
  head_dim^-0.5, FeedForward = LayerNorm, Linear, GELU, Linear; final LayerNorm and projection.
* Phi-3 (`lang_model.*`) with fused qkv / gate_up, default RoPE, RMSNorm, and decoupled
  embedding / head: ids < n from the original matrices, the added ids from extra rows.
* One `<image>` token per sample is replaced by the resampler's tokens (the sequence grows), and
  the dense mask follows the official window: image rows also see every token from the end of
  the image block up to and including the first `<|assistant|>` (id 32001).

Shape legend: b batch, s sequence, v image tokens, d width.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_ID, ASSISTANT_ID, EOS_ID = 32012, 32001, 32000


class RMSNorm(nn.Module):
    def __init__(self, width, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def attend(q, k, v, mask=None):
    """q (b, h, s, e), k/v (b, h, t, e), additive mask (b, 1, s, t) -> (b, s, h*e)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).flatten(2)


class SiglipAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (p(x).view(b, s, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(attend(q, k, v))


class SiglipMLP(nn.Module):
    def __init__(self, width, inner):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, inner), nn.Linear(inner, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipLayer(nn.Module):
    def __init__(self, width, inner, heads, eps):
        super().__init__()
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(width, eps=eps), nn.LayerNorm(width, eps=eps)
        self.self_attn = SiglipAttention(width, heads)
        self.mlp = SiglipMLP(width, inner)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipHead(nn.Module):
    """Attention pooling: part of the official state dict, unused by AKI."""

    def __init__(self, width, inner, heads, eps):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, width))
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.layernorm = nn.LayerNorm(width, eps=eps)
        self.mlp = SiglipMLP(width, inner)


class SiglipEmbeddings(nn.Module):
    def __init__(self, width, image_size, patch_size):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, width, patch_size, stride=patch_size)
        self.position_embedding = nn.Embedding((image_size // patch_size) ** 2, width)

    def forward(self, pixel_values):
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        return patches + self.position_embedding.weight


class SiglipEncoder(nn.Module):
    def __init__(self, width, inner, heads, depth, eps):
        super().__init__()
        self.layers = nn.ModuleList(SiglipLayer(width, inner, heads, eps) for _ in range(depth))


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        w, i, h, eps = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
        self.embeddings = SiglipEmbeddings(w, cfg["image_size"], cfg["patch_size"])
        self.encoder = SiglipEncoder(w, i, h, cfg["num_hidden_layers"], eps)
        self.post_layernorm = nn.LayerNorm(w, eps=eps)
        self.head = SiglipHead(w, i, h, eps)

    def forward(self, pixel_values):
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class PerceiverAttention(nn.Module):
    def __init__(self, width, heads, head_dim=64):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm_media, self.norm_latents = nn.LayerNorm(width), nn.LayerNorm(width)
        self.to_q = nn.Linear(width, heads * head_dim, bias=False)
        self.to_kv = nn.Linear(width, 2 * heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, width, bias=False)

    def forward(self, media, latents):
        media, latents = self.norm_media(media), self.norm_latents(latents)
        b = latents.shape[0]
        q = self.to_q(latents) * self.head_dim**-0.5
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (x.view(b, -1, self.heads, self.head_dim).transpose(1, 2) for x in (q, k, v))
        weights = (q @ k.transpose(-1, -2)).softmax(-1)
        return self.to_out((weights @ v).transpose(1, 2).flatten(2))


class PerceiverResampler(nn.Module):
    def __init__(self, width, out_width, num_latents, depth, heads, ff_mult):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, width))
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(width, heads),
                    nn.Sequential(
                        nn.LayerNorm(width),
                        nn.Linear(width, width * ff_mult, bias=False),
                        nn.GELU(),
                        nn.Linear(width * ff_mult, width, bias=False),
                    ),
                ]
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.projection = nn.Linear(width, out_width)

    def forward(self, media):
        latents = self.latents.expand(media.shape[0], -1, -1)
        for attention, feed_forward in self.layers:
            latents = attention(media, latents) + latents
            latents = feed_forward(latents) + latents
        return self.projection(self.norm(latents))


class DecoupledEmbedding(nn.Module):
    def __init__(self, rows, extra_rows, width, max_original_id):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(rows, width) * 0.5)
        self.additional_embedding = nn.Embedding(extra_rows, width)
        self.max_original_id = max_original_id

    def forward(self, ids):
        added = ids > self.max_original_id
        base = F.embedding(ids.masked_fill(added, 0), self.weight)
        extra = self.additional_embedding((ids - self.max_original_id - 1).clamp(min=0))
        return torch.where(added[..., None], extra, base)


class DecoupledLinear(nn.Module):
    def __init__(self, width, rows, extra_rows, max_original_id):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(rows, width) * 0.2)
        self.additional_fc = nn.Linear(width, extra_rows, bias=False)
        self.max_original_id = max_original_id

    def forward(self, x):
        return torch.cat([(x @ self.weight.T)[..., : self.max_original_id + 1], self.additional_fc(x)], dim=-1)


class Phi3Attention(nn.Module):
    def __init__(self, width, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, width // heads
        self.qkv_proj = nn.Linear(width, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, width, bias=False)

    def forward(self, x, cos, sin, mask):
        b, s, _ = x.shape
        q, k, v = self.qkv_proj(x).split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1
        )
        q = q.view(b, s, self.heads, -1).transpose(1, 2)
        k, v = (t.view(b, s, self.kv_heads, -1).transpose(1, 2) for t in (k, v))
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        return self.o_proj(attend(q, k, v, mask))


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Phi3MLP(nn.Module):
    def __init__(self, width, inner):
        super().__init__()
        self.gate_up_proj = nn.Linear(width, 2 * inner, bias=False)
        self.down_proj = nn.Linear(inner, width, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class Phi3Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        w = cfg["hidden_size"]
        self.input_layernorm = RMSNorm(w, cfg["rms_norm_eps"])
        self.self_attn = Phi3Attention(w, cfg["num_attention_heads"], cfg["num_key_value_heads"])
        self.post_attention_layernorm = RMSNorm(w, cfg["rms_norm_eps"])
        self.mlp = Phi3MLP(w, cfg["intermediate_size"])

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Phi3Model(nn.Module):
    def __init__(self, cfg, initial_tokenizer_len, extra_rows):
        super().__init__()
        self.embed_tokens = DecoupledEmbedding(
            cfg["vocab_size"], extra_rows, cfg["hidden_size"], initial_tokenizer_len - 1
        )
        self.layers = nn.ModuleList(Phi3Layer(cfg) for _ in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])


class Phi3ForCausalLM(nn.Module):
    def __init__(self, cfg, initial_tokenizer_len, extra_rows=2):
        super().__init__()
        self.cfg = cfg
        self.model = Phi3Model(cfg, initial_tokenizer_len, extra_rows)
        self.lm_head = DecoupledLinear(cfg["hidden_size"], cfg["vocab_size"], extra_rows, initial_tokenizer_len - 1)

    def forward(self, embeds, mask):
        s, head_dim = embeds.shape[1], self.cfg["hidden_size"] // self.cfg["num_attention_heads"]
        inv_freq = 1.0 / (self.cfg["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(s).float(), inv_freq)
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        x = embeds
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.model.norm(x))


class OfficialAKI(nn.Module):
    """The official model's forward, one image per sample, right padding."""

    def __init__(self, official_config, vision_cfg, text_cfg, perceiver):
        super().__init__()
        self.num_vision_tokens = official_config["num_vision_tokens"]
        self.vision_encoder = SiglipVisionTransformer(vision_cfg)
        self.vision_tokenizer = PerceiverResampler(
            vision_cfg["hidden_size"], text_cfg["hidden_size"], self.num_vision_tokens, **perceiver
        )
        self.lang_model = Phi3ForCausalLM(text_cfg, official_config["initial_tokenizer_len"])

    def expand(self, input_ids, pixel_values, attention_mask, num_prompt_tokens):
        """Replace the prompt's `<image>` tokens by the resampler's tokens; returns embeds, mask, window."""
        vision = self.vision_tokenizer(self.vision_encoder(pixel_values))
        embeds, masks, windows, image = [], [], [], 0
        for row in range(input_ids.shape[0]):
            ids = input_ids[row]
            tokens = self.lang_model.model.embed_tokens(ids)
            valid = attention_mask[row].bool()
            image_positions = [p for p in (ids[:num_prompt_tokens] == IMAGE_ID).nonzero().flatten().tolist()]
            if image_positions:
                (p,) = image_positions  # the official code handles one image per sample
                tokens = torch.cat([tokens[:p], vision[image], tokens[p + 1 :]])
                valid = torch.cat([valid[:p], torch.ones(self.num_vision_tokens, dtype=torch.bool), valid[p + 1 :]])
                image += 1
                # Official window: from the end of the image block to the first <|assistant|>, inclusive.
                marker = (ids == ASSISTANT_ID).nonzero().flatten()
                end = int(marker[0]) + self.num_vision_tokens if len(marker) else p + self.num_vision_tokens
                windows.append((p, p + self.num_vision_tokens, end))
            else:
                windows.append(None)
            embeds.append(tokens)
            masks.append(valid)
        return torch.stack(embeds), torch.stack(masks), windows

    def forward(self, input_ids, pixel_values, attention_mask=None, num_prompt_tokens=None):
        """Logits (b, s + v - 1, 32014) for ids with one `<image>` each."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        num_prompt_tokens = num_prompt_tokens or input_ids.shape[1]
        embeds, valid, windows = self.expand(input_ids, pixel_values, attention_mask, num_prompt_tokens)
        b, s, _ = embeds.shape
        allowed = torch.ones(s, s).tril().bool().repeat(b, 1, 1)
        for row, window in enumerate(windows):
            if window is not None:
                image_start, text_start, text_end = window
                allowed[row, image_start:text_start, text_start:text_end] = True
        allowed &= valid[:, None, :]
        mask = torch.zeros(b, 1, s, s).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        return self.lang_model(embeds, mask)

    @torch.no_grad()
    def greedy(self, input_ids, pixel_values, max_new_tokens):
        """Step-by-step greedy decoding that recomputes the whole sequence each step."""
        prompt_length, ids = input_ids.shape[1], input_ids
        for _ in range(max_new_tokens):
            next_id = self(ids, pixel_values, num_prompt_tokens=prompt_length)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=-1)
            if int(next_id) == EOS_ID:
                break
        return ids[:, prompt_length:]
