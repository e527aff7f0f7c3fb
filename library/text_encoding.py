"""Captions -> CLIP token ids -> text encoder hidden states, with `--max_token_length` and `--clip_skip`
(specs/training.md section 2.3).

CLIP sees 77 tokens at a time (BOS, 75 content tokens, EOS or padding). Longer captions (150 or 225 content
tokens) are tokenised in one piece, cut into windows of 75 that each get their own BOS and end token, encoded
window by window, and stitched back into one sequence of 75n + 2 states, as sd-scripts does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import CLIPTokenizer

from library.errors import UserError

WINDOW = 77
CONTENT = WINDOW - 2
TOKEN_LENGTHS = {None: 77, 75: 77, 150: 152, 225: 227}


def token_length(max_token_length: int | None) -> int:
    """`--max_token_length` (content tokens) -> total ids per caption, BOS and end token included."""
    if max_token_length not in TOKEN_LENGTHS:
        raise UserError(f"--max_token_length is {max_token_length}; use 75, 150 or 225, or leave it unset.")
    return TOKEN_LENGTHS[max_token_length]


def tokenize(tokenizer: CLIPTokenizer, captions: Sequence[str], max_token_length: int | None) -> torch.LongTensor:
    """Token ids of shape (B, n, 77), n = 1, 2 or 3 windows; overlong captions are cut silently."""
    total = token_length(max_token_length)
    ids = tokenizer(
        list(captions), padding="max_length", truncation=True, max_length=total, return_tensors="pt"
    ).input_ids
    return split_windows(ids, tokenizer)


def split_windows(ids: torch.Tensor, tokenizer: CLIPTokenizer | None = None) -> torch.Tensor:
    """A caption's T values (B, T) -> windows (B, n, 77): window k is the first value, values 1 + 75k to 75 + 75k, and
    the last value. With a tokenizer the values are token ids and each window ends properly (see below); without
    one they are per-token values such as caption weights."""
    if ids.shape[1] == WINDOW:
        return ids.unsqueeze(1)
    bos, last = ids[:, :1], ids[:, -1:]
    contents = ids[:, 1:-1].split(CONTENT, dim=1)
    windows = torch.stack([torch.cat([bos, content, last], dim=1) for content in contents], dim=1)
    if tokenizer is None:
        return windows
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad != eos:
        # SD2 pads with "!": a window cut inside the text must still end with EOS, and an empty window
        # (BOS followed by padding) gets an EOS right after its BOS.
        cut_inside_text = (windows[..., -2] != eos) & (windows[..., -2] != pad)
        windows[..., -1] = torch.where(cut_inside_text, eos, windows[..., -1])
        windows[..., 1] = torch.where(windows[..., 1] == pad, eos, windows[..., 1])
    return windows


def encode_tokens(text_encoder: torch.nn.Module, input_ids: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
    """Hidden states (B, 75n + 2, D) for token ids (B, n, 77); `clip_skip` k takes the k-th layer from the end."""

    def states(flat_ids: torch.Tensor) -> torch.Tensor:
        if clip_skip is None:
            return text_encoder(flat_ids)[0]
        hidden_states = text_encoder(flat_ids, output_hidden_states=True).hidden_states
        return _final_layer_norm(text_encoder)(hidden_states[-clip_skip])

    return encode_windows(states, input_ids.to(text_encoder.device))


def encode_windows(states: Callable[[torch.Tensor], torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
    """`states` (flat ids (B * n, 77) -> (B * n, 77, D)) applied to token ids (B, n, 77) window by window, and the
    windows stitched into one sequence (B, 75n + 2, D)."""
    batch, windows, _ = input_ids.shape
    encoded = states(input_ids.reshape(batch * windows, WINDOW))
    return stitch_windows(encoded.reshape(batch, windows, WINDOW, encoded.shape[-1]))


def stitch_windows(windows: torch.Tensor) -> torch.Tensor:
    """(B, n, 77, ...) -> (B, 75n + 2, ...): the first window's first value, the 75 content values of every window,
    and the last window's last value."""
    if windows.shape[1] == 1:
        return windows[:, 0]
    content = windows[:, :, 1 : 1 + CONTENT].flatten(1, 2)
    return torch.cat([windows[:, 0, :1], content, windows[:, -1, -1:]], dim=1)


def _final_layer_norm(text_encoder: torch.nn.Module) -> torch.nn.Module:
    # transformers 5 may build CLIPTextModel without the `.text_model` wrapper
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


class CaptionStates:
    """Text-encoder outputs memoised by token ids, for text encoders that do not train and captions that do not
    change from one use to the next: each caption is encoded once, at its first use. An output is a tuple of
    per-sample tensors (SD: the hidden states; SDXL: the hidden states and the pooled vector)."""

    def __init__(self):
        self.outputs: dict[bytes, tuple[torch.Tensor, ...]] = {}

    def encode(
        self, encode: Callable[[list[torch.Tensor]], tuple[torch.Tensor, ...]], input_ids: list[torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        """`encode` (token ids of each tokenizer -> batched outputs) for the captions not seen yet, and every
        caption's outputs stacked in batch order."""
        keys = [self._key(input_ids, row) for row in range(len(input_ids[0]))]
        missing = list({key: index for index, key in enumerate(keys) if key not in self.outputs}.values())
        if missing:
            with torch.no_grad():
                encoded = encode([ids[missing] for ids in input_ids])
            self.outputs.update(
                (keys[index], tuple(output[row] for output in encoded)) for row, index in enumerate(missing)
            )
        return tuple(
            torch.stack([self.outputs[key][part] for key in keys]) for part in range(len(self.outputs[keys[0]]))
        )

    def put(self, input_ids: list[torch.Tensor], outputs: tuple[torch.Tensor, ...]) -> None:
        """Store one caption's outputs (computed ahead, or read from a cache file) under its token ids (1, n, 77)."""
        self.outputs[self._key(input_ids, 0)] = outputs

    @staticmethod
    def _key(input_ids: list[torch.Tensor], row: int) -> bytes:
        return b"".join(ids[row].cpu().numpy().tobytes() for ids in input_ids)
