"""The decoding loop shared by the graph backends (ONNX Runtime, TensorRT): they only run the three graphs
(embed, vision, decoder) that `gmaivl-rt export` writes; this class does everything around them as `GMAIVL.generate`
does (left-padded prompts, image features over the image tokens, a KV cache kept between steps)."""
from __future__ import annotations

import torch

from gmaivl_rt.errors import InputError
from gmaivl_rt.model.sampling import generate_tokens
from gmaivl_rt.model.vision_sizes import check_image_size
from gmaivl_rt.runtime.base import Backend


class GraphBackend(Backend):
    """The generation loop over exported graphs. Subclasses implement:
    `_vision(pixel_values (N, 3, H, W) float32 torch) -> (N, T, hidden) torch`,
    `_embed(ids (B, S) int64 torch) -> (B, S, hidden) torch`,
    `_decode(embeds, attention_mask (B, P+S), position_ids (B, S), logits_indices (B, K) int64, past)
    -> (logits (B, K, V) fp32 torch at those positions of the S new ones, past)`,
    `_empty_past(batch)`; `past` is whatever the backend keeps its cache in (arrays, device buffers).
    Generation asks only for each row's last real token (`last_token_indices`), so a prefill computes one row of
    logits per sequence, not S."""

    name = "graphs"

    def _init_from_deploy(self, deploy: dict):
        from gmaivl_rt.model.config import GMAIVLConfig

        self.deploy = deploy
        self.config = GMAIVLConfig.from_hf_config(deploy["config"])
        self.image_token_index = int(deploy["image"]["image_token_index"])

    # ------------------------------------------------------------------ inputs
    def _check_pixels(self, pixel_values) -> list[torch.Tensor]:
        """-> a list of (n, 3, H, W) float32 batches, each of one image size, in image order."""
        vision = self.config.vision
        if isinstance(pixel_values, (list, tuple)):
            images = [torch.as_tensor(p) for p in pixel_values]
            for i, img in enumerate(images):
                if img.dim() != 3:
                    raise InputError(f"pixel_values[{i}] has shape {tuple(img.shape)}; expected (3, H, W)")
            batches = [img[None] for img in images]
        else:
            pixel_values = torch.as_tensor(pixel_values)
            if pixel_values.dim() != 4:
                raise InputError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected (num_images, 3, H, W)")
            batches = [pixel_values]
        for b in batches:
            if not b.is_floating_point():
                raise InputError(f"pixel_values must be floating point (CLIP-normalised), got {b.dtype}")
            n, c, h, w = b.shape
            if c != 3:
                raise InputError(f"pixel_values has {c} channels; expected 3")
            check_image_size(vision, h, w)
        if vision.dynamic_resolution and len(batches) > 1:  # group consecutive equal sizes into one run
            grouped = [batches[0]]
            for b in batches[1:]:
                if b.shape[2:] == grouped[-1].shape[2:]:
                    grouped[-1] = torch.cat([grouped[-1], b])
                else:
                    grouped.append(b)
            batches = grouped
        return [b.to(torch.float32) for b in batches]

    def encode_images(self, pixel_values) -> torch.Tensor:
        """(N, 3, H, W) or a list of (3, H_i, W_i) -> projected features (total_image_tokens, hidden) fp32."""
        feats = [self._vision(batch) for batch in self._check_pixels(pixel_values)]
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in feats]).float()

    def _prompt_embeds(self, input_ids, pixel_values):
        embeds = self._embed(input_ids)
        is_image = input_ids == self.image_token_index
        n_tokens = int(is_image.sum())
        if pixel_values is None:
            if n_tokens:
                raise InputError(f"input_ids hold {n_tokens} image tokens but no pixel_values were given")
            return embeds
        features = self.encode_images(pixel_values)
        if features.shape[0] != n_tokens:
            raise InputError(f"input_ids hold {n_tokens} image tokens but pixel_values give {features.shape[0]} "
                             "image features (expand <image> to the image token count)")
        embeds = embeds.clone()
        embeds[is_image.to(embeds.device)] = features.to(embeds.device, embeds.dtype)
        return embeds

    @staticmethod
    def _check_ids(input_ids, attention_mask):
        input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise InputError(f"input_ids must be a (batch, seq) integer tensor, got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        mask = torch.ones_like(input_ids) if attention_mask is None else torch.as_tensor(attention_mask)
        if mask.shape != input_ids.shape:
            raise InputError(f"attention_mask {tuple(mask.shape)} must match input_ids {tuple(input_ids.shape)}")
        mask = mask.to(torch.int64)
        if bool((mask.sum(1) == 0).any()):
            raise InputError("a prompt is empty (its attention_mask is all zeros)")
        if bool((mask[:, -1] == 0).any()):
            raise InputError("attention_mask has padding at the end of a row: pad prompts on the left")
        return input_ids.to(torch.int64), mask

    @staticmethod
    def last_token_indices(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
        """attention_mask (B, P+S) -> (B, 1) int64: per row, the index among the last `seq_len` positions of its
        last real (mask 1) token, whatever the padding side (S - 1 under left padding)."""
        window = attention_mask[:, -seq_len:].to(torch.int64)
        ranks = window * torch.arange(1, seq_len + 1, device=window.device)
        return ranks.argmax(dim=1, keepdim=True)

    # ------------------------------------------------------------------ generation
    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor, pixel_values=None) -> tuple[torch.Tensor, dict]:
        """Run a left-padded prompt batch through the graphs.
        input_ids, mask (B, S) int64 -> (logits (B, V) fp32 at each row's last real token, step state). The state
        (mask, next positions, the graphs' cache) is what `advance` takes; `generate` and the engine's
        `GraphRunner` (gmaivl_rt/engine/graph_runner.py) both go through these two, so their mask/position
        bookkeeping is one piece."""
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits, past = self._decode(self._prompt_embeds(input_ids, pixel_values), mask, positions,
                                    self.last_token_indices(mask, mask.shape[1]), self._empty_past(mask.shape[0]))
        return logits[:, 0], {"mask": mask, "position": positions[:, -1:] + 1, "past": past}

    def advance(self, state: dict, next_tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row: next_tokens (B,) int64 -> logits (B, V) fp32; `state` (from `prefill`) advances
        in place."""
        state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], dim=1)
        logits, state["past"] = self._decode(self._embed(next_tokens[:, None]), state["mask"], state["position"],
                                             self.last_token_indices(state["mask"], 1), state["past"])
        state["position"] = state["position"] + 1
        return logits[:, 0]

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0, min_p: float = 0.0,
                 eos_token_id=None, pad_token_id=None, generator: torch.Generator | None = None, constraint=None,
                 logprobs: bool = False, top_logprobs: int = 0, trace=None) -> torch.Tensor:
        """As `GMAIVL.generate`: input_ids (B, S) left-padded -> (B, S + new) int64 on the CPU."""
        input_ids, mask = self._check_ids(input_ids, attention_mask)
        state = {}

        def prefill():
            logits, prefilled = self.prefill(input_ids, mask, pixel_values)
            state.update(prefilled)
            return logits

        return generate_tokens(prefill, lambda next_tokens: self.advance(state, next_tokens), input_ids,
                               self.config.text, max_new_tokens=max_new_tokens,
                               do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
                               repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                               min_p=min_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id, generator=generator,
                               constraint=constraint, logprobs=logprobs, top_logprobs=top_logprobs, trace=trace)

    # ------------------------------------------------------------------ for subclasses
    def _vision(self, pixel_values):
        raise NotImplementedError

    def _embed(self, ids):
        raise NotImplementedError

    def _decode(self, embeds, attention_mask, position_ids, logits_indices, past):
        raise NotImplementedError

    def _empty_past(self, batch):
        raise NotImplementedError
