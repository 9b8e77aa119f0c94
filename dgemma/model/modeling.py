"""The DiffusionGemma text model, top to bottom.

One stack of Gemma 4 layers serves two passes that share every weight:

- `encode(tokens, cache)`: causal pass over new tokens (a prompt chunk or a committed canvas). It appends their
  keys/values to the `KVCache` and returns hidden states, which the LM head turns into next-token logits, so the
  encoder doubles as an ordinary causal LM (the AR baseline and the encoder loss use that). Given a static
  in-place view (graphs.py), the same pass runs on fixed shapes and leaves the commit to the caller.
- `denoise(canvas, cache, self_cond)`: bidirectional pass over a canvas that reads the cache without writing it.
  The canvas embeddings are self-conditioned on the previous step's logits. Returns canvas logits.

Parameter names follow the HF checkpoint (`layers.3.self_attn.q_proj.weight` is
`model.decoder.layers.3.self_attn.q_proj.weight` there); `checkpoint.py` holds the one mapping table.
The model knows nothing of requests, text or sampling. Its pieces: `blocks.py` (norm, fused linears, MLP),
`rope.py`, `attention.py`, `experts.py` (the mixture of experts), `cache.py` (the KV cache and its views).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dgemma.model import blocks
from dgemma.model.attention import Attention, Context, layer_context
from dgemma.model.blocks import MLP, RMSNorm, cached, fusable, gated_activation, scalar
from dgemma.model.cache import CanvasView, KVCache
from dgemma.model.config import ModelConfig, TextConfig
from dgemma.model.experts import Experts, Router
from dgemma.model.rope import rope_inv_freq, rope_table


class SelfConditioning(MLP):
    """Gated MLP over the previous step's soft embeddings, with a scaled pre-norm and an unscaled post-norm."""

    def __init__(self, text: TextConfig):
        super().__init__(text.hidden_size, text.intermediate_size, text.hidden_activation)
        self.pre_norm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        self.post_norm = RMSNorm(text.hidden_size, text.rms_norm_eps, scale=False)


class Layer(nn.Module):
    """A Gemma 4 layer: attention, then a dense GeGLU MLP and an MoE branch in parallel, a per-layer scalar."""

    def __init__(self, text: TextConfig, layer: int):
        super().__init__()
        h, eps = text.hidden_size, text.rms_norm_eps
        self.self_attn = Attention(text, layer)
        self.mlp = MLP(h, text.intermediate_size, text.hidden_activation)
        self.router = Router(text)
        self.experts = Experts(text)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm_1 = RMSNorm(h, eps)
        self.pre_feedforward_layernorm_2 = RMSNorm(h, eps)
        self.post_feedforward_layernorm_2 = RMSNorm(h, eps)
        # The checkpoint stores the scalar separately for the decoder and the encoder (buffers are not tied).
        self.register_buffer("layer_scalar", torch.ones(1))
        self.register_buffer("encoder_layer_scalar", torch.ones(1))

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        context: Context,
        mask: torch.Tensor | str | None,
        encoder: bool,
    ) -> torch.Tensor:
        """x (B, T, hidden) -> (B, T, hidden). `context(k, v)` returns the keys/values to attend to (the cache's
        and the new ones); the encoder and the decoder differ only in it, the mask and the layer scalar."""
        attn = self.self_attn
        q, k, v = attn.project(self.input_layernorm(x), *rope)
        k, v = context(k, v)
        x = x + self.post_attention_layernorm(attn.attend(q, k, v, mask))
        return self.feed_forward(x) * (self.encoder_layer_scalar if encoder else self.layer_scalar)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x is the post-attention residual (B, T, hidden); returns the residual after the FFN block."""
        # Three norms read the residual (the dense MLP's, the router's, the experts'): one RMS serves them all.
        unit = self.pre_feedforward_layernorm.unit(x)
        flat = unit.reshape(-1, x.shape[-1])
        both = self._fused_branches(flat)
        if both is None:
            pre = self.pre_feedforward_layernorm
            dense = self.post_feedforward_layernorm_1(self.mlp(pre.scale_unit(unit, x.dtype)))
            w, idx = self.router(self.router.norm.scale_unit(flat, x.dtype))
            moe = self.experts(self.pre_feedforward_layernorm_2.scale_unit(flat, x.dtype), w, idx).reshape(x.shape)
            both = dense + self.post_feedforward_layernorm_2(moe)
        return x + self.post_feedforward_layernorm(both.view(x.shape))

    def _fused_branches(self, flat: torch.Tensor) -> torch.Tensor | None:
        """Both FFN branches from the shared RMS `flat` (N, hidden), each post-normed, summed: (N, hidden). For small
        float32 models on the CPU (where `dense_mixture` runs): the pre-norm weights and the router's scale are folded
        into one matmul over the dense MLP's, every expert's and the router's input weights, the routing weights
        scale the expert activations, and two matmuls project down, one per branch: 3 matmuls and one post-norm over
        both branches instead of 7 matmuls, 4 norms and the dense mixture's gathers. None where that does not apply.
        """
        mlp, ex, r = self.mlp, self.experts, self.router
        if (
            type(ex) is not Experts  # (FP8 experts)
            or ex.kernel(flat.shape[0], r.top_k) != "dense"
            or torch.is_autocast_enabled(flat.device.type)  # (matmuls would not return float32)
            or not fusable((mlp.gate_proj, mlp.up_proj, mlp.down_proj, r.proj))
            or 2 * ex.gate_up_proj.numel() * ex.gate_up_proj.element_size() > blocks.FUSE_MAX_BYTES
        ):
            return None
        E, two_i, h = ex.gate_up_proj.shape
        inter, n_dense = two_i // 2, mlp.gate_proj.out_features
        G = n_dense + E * inter  # gate (and up) width: the dense MLP's, then expert after expert
        w_in = cached(self, "_ffn_in", self._ffn_in_parts(), self._ffn_in_weight)  # (2G + E, hidden)
        w_down = cached(self, "_ffn_down", (ex.down_proj,), lambda: ex.down_proj.transpose(1, 2).reshape(E * inter, h))
        a = F.linear(flat, w_in)  # (N, 2G + E): gates, ups, router scores
        w, idx = r.select(a[:, 2 * G :])
        route = torch.zeros(flat.shape[0], E, dtype=w.dtype, device=w.device).scatter_(1, idx, w)  # (N, E)
        mid = gated_activation(mlp.act_name, a[:, :G], a[:, G : 2 * G])  # (N, G)
        mid[:, n_dense:].view(-1, E, inter).mul_(route[:, :, None])
        out = flat.new_empty(2, flat.shape[0], h)  # (branch, N, hidden)
        torch.mm(mid[:, :n_dense], mlp.down_proj.weight.t(), out=out[0])
        torch.mm(mid[:, n_dense:], w_down, out=out[1])
        post = (self.post_feedforward_layernorm_1.weight, self.post_feedforward_layernorm_2.weight)
        scale = cached(self, "_ffn_post", post, lambda: torch.stack(post)[:, None])  # (2, 1, hidden)
        normed = self.post_feedforward_layernorm_1.unit(out) * scale
        return normed[0] + normed[1]

    def _ffn_in_parts(self) -> tuple[torch.Tensor, ...]:
        mlp, r = self.mlp, self.router
        pre = (self.pre_feedforward_layernorm.weight, self.pre_feedforward_layernorm_2.weight)
        return (mlp.gate_proj.weight, mlp.up_proj.weight, self.experts.gate_up_proj, r.proj.weight, r.scale, *pre)

    def _ffn_in_weight(self) -> torch.Tensor:
        """(2G + E, hidden): [dense gate; expert gates; dense up; expert ups; router], each scaled by its pre-norm."""
        gate, up, gate_up, router, r_scale, w_dense, w_moe = self._ffn_in_parts()
        E, two_i, h = gate_up.shape
        g_ex, u_ex = gate_up[:, : two_i // 2].reshape(-1, h), gate_up[:, two_i // 2 :].reshape(-1, h)
        rows = (gate * w_dense, g_ex * w_moe, up * w_dense, u_ex * w_moe, router * (r_scale * self.router.root))
        return torch.cat(rows)


class DiffusionGemma(nn.Module):
    """The DiffusionGemma text model (HF `DiffusionGemmaForBlockDiffusion`, text only)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        text = self.text = config.text
        self.embed_tokens = nn.Embedding(text.vocab_size, text.hidden_size)
        self.layers = nn.ModuleList(Layer(text, i) for i in range(text.num_hidden_layers))
        self.norm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        # Self-conditioning: gated MLP over soft embeddings, pre-norm with scale, post-norm without.
        self.self_conditioning = SelfConditioning(text)
        self.register_buffer("inv_freq_sliding", rope_inv_freq(text, True), persistent=False)
        self.register_buffer("inv_freq_full", rope_inv_freq(text, False), persistent=False)
        self._rope: dict[bool, tuple[torch.Tensor, torch.Tensor]] | None = None  # cos/sin tables, by layer kind
        self._set_constants()
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        # RoPE frequencies stay float32 whatever dtype the weights are cast to (as the loader builds them).
        super()._apply(fn, recurse)
        if self.device.type != "meta":
            self._set_constants()
        return self

    def _set_constants(self) -> None:
        self.inv_freq_sliding = rope_inv_freq(self.text, True).to(self.device)
        self.inv_freq_full = rope_inv_freq(self.text, False).to(self.device)
        self._rope = None  # rebuilt on the next pass, in the new dtype and on the new device
        # sqrt(hidden) rounded to the weight dtype, as the reference scales embeddings; made once, not per pass
        # (a host-to-device copy inside a step would break CUDA-graph capture)
        self._embed_scale = torch.tensor(self.text.hidden_size**0.5, dtype=self.dtype).to(self.device)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute the non-weight buffers (after building on the meta device and `to_empty`)."""
        self._set_constants()
        for layer in self.layers:
            layer.layer_scalar.fill_(1.0)
            layer.encoder_layer_scalar.fill_(1.0)

    # -- weights ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, std: float | None = None) -> None:
        """Random init as transformers does it: normal(0, initializer_range) linears/embeddings, ones for every norm
        (`post_feedforward_layernorm_1` too: a zero there would silence its branch, and the expert branch, between
        two zero norms, could never learn), the router's scales and the layer scalars; zeros for biases."""
        std = self.text.initializer_range if std is None else std
        ones = {id(m.weight) for m in self.modules() if isinstance(m, RMSNorm) and m.weight is not None}
        for name, p in self.named_parameters():
            if id(p) in ones or name.endswith("router.scale") or name.endswith("per_expert_scale"):
                p.fill_(1.0)
            elif p.ndim >= 2:
                p.normal_(0.0, std)
            else:
                p.zero_()

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def new_cache(self, batch_size: int, max_len: int, slack: int = 0) -> KVCache:
        """A preallocated cache for `batch_size` rows of up to `max_len` tokens each, in the model's dtype."""
        return KVCache(self.text, batch_size, max_len, dtype=self.dtype, device=self.device, slack=slack)

    # -- pieces -----------------------------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        # Scale by sqrt(hidden) rounded to the weight dtype, as the reference does.
        return self.embed_tokens(tokens) * self._embed_scale

    def rope(self, positions: torch.Tensor, limit: int) -> dict[bool, tuple[torch.Tensor, torch.Tensor]]:
        """positions (B, T), all below `limit` -> per layer kind, cos and signed sin (B, T, 1, D) in the model dtype,
        looked up in tables (the same values as computing them per call; no host synchronisation)."""
        need = limit
        if self._rope is None or self._rope[True][0].shape[0] < need:
            n = max(need, 2 * self._rope[True][0].shape[0] if self._rope else 256)
            at = torch.arange(n, device=self.device)
            self._rope = {
                s: rope_table(self.inv_freq_sliding if s else self.inv_freq_full, at, self.dtype) for s in (True, False)
            }
        return {s: (cos[positions][:, :, None], sin[positions][:, :, None]) for s, (cos, sin) in self._rope.items()}

    def soft_embedding(self, probs: torch.Tensor) -> torch.Tensor:
        """Self-conditioning input: probabilities (..., V) -> their expected embedding (..., hidden) * sqrt(hidden),
        in the model dtype. 170x smaller than the probabilities at the real vocabulary, so the engine keeps this."""
        return (probs.to(self.dtype) @ self.embed_tokens.weight) * self._embed_scale

    def logits(
        self, hidden: torch.Tensor, out: torch.Tensor | None = None, scratch: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Tied LM head and soft-capping; float32 logits (..., V).

        `out` (float32) and, for a low-precision model, `scratch` (model dtype) are reusable buffers of the logits'
        shape: (B, C, V) tensors are large, and allocating them afresh every step costs page faults. With them (the
        engine's path), a float32 model's soft-cap 1/cap scales the (B, C, hidden) input instead of the (B, C, V)
        output (one pass over the logits fewer; within an ulp or so). A low-precision model's input is not scaled:
        that would round it once more.
        """
        cap = self.text.final_logit_softcapping
        if out is None:
            x = F.linear(hidden, self.embed_tokens.weight).float()
            return torch.tanh(x / cap) * cap if cap is not None else x
        fold = cap is not None and self.dtype == torch.float32
        if fold:
            hidden = hidden * scalar(1.0 / cap, hidden)
        if self.dtype == torch.float32:
            torch.matmul(hidden, self.embed_tokens.weight.t(), out=out)
        else:
            out.copy_(torch.matmul(hidden, self.embed_tokens.weight.t(), out=scratch))
        if cap is None:
            return out
        return (out if fold else out.div_(cap)).tanh_().mul_(cap)

    # -- passes -----------------------------------------------------------------------------------------------
    def encode(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        n_new: torch.Tensor | None = None,
        visible: torch.Tensor | None = None,
        last_only: bool = False,
        rows: torch.Tensor | None = None,
        view: CanvasView | None = None,
    ) -> torch.Tensor:
        """Causal pass over `tokens` (B, T) appended to each row of `cache`; returns normed hidden states (B, T,
        hidden).

        `n_new` (B,): how many of the T tokens each row really appends (right padding beyond; default all T).
        `visible` (B, T): tokens that occupy a slot but are never attended to (left padding), default all.
        With `last_only`, only the last appended position's hidden state is normed and returned (B, 1, hidden).
        `rows` (B,): which cache rows the B token rows extend (default: all rows, in order).
        `view`: a static in-place view, `cache.causal_view(T, rows, ...)` (graphs.py): every token's keys/values go
        into its slot and attention reads the buffer in place; nothing is checked or synchronised with the host, and
        the cache's bookkeeping is left to the caller, who commits the slots to keep (`KVCache.commit`).
        """
        T = tokens.shape[1]
        positions = cache.rows_of(cache.lengths, rows)[:, None] + torch.arange(T, device=tokens.device)[None, :]
        plan = None
        if view is None:
            n_new, visible = self._appended(tokens, cache, n_new, visible, rows)
            view = cache.view(T, rows, causal=True, visible=visible)
            plan = cache.write_plan(positions, n_new, rows)
        elif view.slots is None or n_new is not None or visible is not None or last_only:
            raise ValueError("a static encode takes an in-place `causal_view` and no n_new, visible or last_only")
        x = self._layers(self.embed(tokens), positions, cache, view, rows, plan, encoder=True)
        if plan is not None:
            cache.commit(plan, positions, visible, n_new, rows)
        if last_only:
            x = x.gather(1, (n_new - 1).clamp(min=0)[:, None, None].expand(-1, 1, x.shape[-1]))
        return self.norm(x)

    @staticmethod
    def _appended(
        tokens: torch.Tensor,
        cache: KVCache,
        n_new: torch.Tensor | None,
        visible: torch.Tensor | None,
        rows: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The checked `n_new` (B,) of an encode, and which of its tokens are visible (B, T): the `visible` ones among
        the appended. ValueError when the batch does not match the cache rows or the cache would overflow."""
        (B, T), dev = tokens.shape, tokens.device
        expected = cache.batch_size if rows is None else rows.shape[0]
        if B != expected:
            raise ValueError(f"tokens have batch {B} but {expected} cache rows were given")
        if n_new is None:
            n_new = torch.full((B,), T, dtype=torch.long, device=dev)
        end = int((cache.rows_of(cache.lengths, rows) + n_new).max())
        if end > cache.max_len:
            raise ValueError(f"cache overflow: {end} tokens > max_len {cache.max_len}")
        appended = torch.arange(T, device=dev)[None, :] < n_new[:, None]
        return n_new, appended if visible is None else visible & appended

    def denoise(
        self,
        canvas: torch.Tensor,
        cache: KVCache,
        self_cond: torch.Tensor | None = None,
        self_cond_mask: torch.Tensor | None = None,
        masks: CanvasView | None = None,
        rows: torch.Tensor | None = None,
        soft: torch.Tensor | None = None,
        hidden_only: bool = False,
    ) -> torch.Tensor:
        """Bidirectional pass over `canvas` (B, C) after each row's cached context; returns logits (B, C, V), or with
        `hidden_only` the normed hidden states (B, C, hidden) for the caller's own (tiled) LM head.

        Self-conditioning: `self_cond`, the previous step's (processed) logits (B, C, V), or `soft`, their
        `soft_embedding` (B, C, hidden); neither on the first step (zero signal). `self_cond_mask` (B,): rows whose
        signal is zeroed (training). `masks`: from `cache.decoder_masks`, to build them once per canvas instead of
        once per step (default: in place where the cache has room). `rows`: which cache rows the canvases extend.
        The cache's contents are only read; an in-place view writes the canvas's keys/values into the entries of
        its future slots, which stay invisible to every other pass until a commit overwrites them.
        """
        C = canvas.shape[1]
        positions = cache.rows_of(cache.lengths, rows)[:, None] + torch.arange(C, device=canvas.device)[None, :]
        if masks is None:
            masks = cache.decoder_masks(C, rows, in_place=True)
        x = self.embed(canvas)
        sc = self.self_conditioning
        if self_cond is not None:
            soft = self.soft_embedding(self_cond.softmax(dim=-1, dtype=torch.float32))
        if soft is not None:
            if self_cond_mask is not None:
                soft = soft * self_cond_mask.to(soft.dtype)[:, None, None]
            x = x + sc(sc.pre_norm(soft))
        # With no signal the MLP sees zeros and outputs zeros, so only the post-norm remains.
        x = sc.post_norm(x)
        x = self.norm(self._layers(x, positions, cache, masks, rows, None, encoder=False))
        return x if hidden_only else self.logits(x)

    def _layers(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        view: CanvasView,
        rows: torch.Tensor | None,
        plan: dict[bool, torch.Tensor] | None,
        encoder: bool,
    ) -> torch.Tensor:
        """The one layer loop: x (B, T, hidden) at `positions` (B, T) through every layer, reading the cache as
        `view` says (and storing the new keys/values by `plan`, see `layer_context`)."""
        rope = self.rope(positions, cache.max_len + positions.shape[1])  # cached lengths never exceed max_len
        for i, layer in enumerate(self.layers):
            sliding = cache.layers[i].sliding
            x = layer(x, rope[sliding], layer_context(cache, view, rows, plan, i), view.masks[sliding], encoder)
        return x
