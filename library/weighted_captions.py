"""--weighted_captions (specs/training.md 2.4): AUTOMATIC1111's emphasis syntax in captions, and the token weights it
gives. `(text)` multiplies the weight of `text` by 1.1, `[text]` divides it by 1.1, `(text:1.5)` multiplies it by
1.5; brackets nest (their factors multiply), a bracket left open closes at the end, and a backslash before a bracket
or a backslash makes it the character itself. After the text encoder, each content token's hidden state is
multiplied by its weight, without renormalising the mean, as sd-scripts does; the start and end tokens, the padding
and SDXL's pooled vector keep weight 1."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from transformers import CLIPTokenizer

from library.errors import UserError
from library.text_encoding import split_windows, token_length

ROUND, SQUARE = 1.1, 1 / 1.1
_NUMBER_LIKE_WEIGHT = re.compile(r"\(([^()]*):\s*([+-]?[\d.,]*\d[\d.,]*)\s*\)")
_TOKEN = re.compile(r"\\[()\[\]\\]|\(|\[|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|\)|\]|[^\\()\[\]:]+|:|\\")


def parse_weights(caption: str) -> list[tuple[str, float]]:
    """The caption as (text, weight) runs, brackets removed; neighbouring runs of one weight are joined."""
    runs: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _TOKEN.finditer(caption):
        token, weight = match.group(0), match.group(1)
        if token == "(":
            open_round.append(len(runs))
        elif token == "[":
            open_square.append(len(runs))
        elif weight is not None and open_round:
            multiply(open_round.pop(), float(weight))
        elif token == ")" and open_round:
            multiply(open_round.pop(), ROUND)
        elif token == "]" and open_square:
            multiply(open_square.pop(), SQUARE)
        elif token.startswith("\\") and len(token) == 2:
            runs.append([token[1], 1.0])
        else:
            runs.append([token, 1.0])
    for start in open_round:
        multiply(start, ROUND)
    for start in open_square:
        multiply(start, SQUARE)
    merged: list[list] = []
    for text, weight in runs:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged] or [("", 1.0)]


def tokenize_weighted(
    tokenizer: CLIPTokenizer, captions: Sequence[str], max_token_length: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, n, 77) of the captions without their brackets, and each token's weight, in the same windows as
    library.text_encoding.tokenize; captions too long are cut, as there."""
    parsed = [weighted_tokens(tokenizer, caption) for caption in captions]
    return padded_windows(tokenizer, parsed, token_length(max_token_length) - 2)


def weighted_tokens(tokenizer: CLIPTokenizer, caption: str) -> tuple[list[int], list[float]]:
    """The caption's content token ids (no start or end token, no length limit) and each one's weight."""
    ids, weights = [], []
    for text, weight in parse_weights(caption):
        pieces = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
        ids += pieces
        weights += [weight] * len(pieces)
    return ids, weights


def padded_windows(
    tokenizer: CLIPTokenizer, captions: Sequence[tuple[list[int], list[float]]], content_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`weighted_tokens` of each caption cut or padded to `content_tokens` (a multiple of 75), with start and end
    tokens, as windows (B, n, 77) of ids and of weights."""
    total = content_tokens + 2
    all_ids, all_weights = [], []
    for ids, weights in captions:
        ids, weights = ids[: total - 2], weights[: total - 2]
        padding = total - 2 - len(ids)
        all_ids.append([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id, *[tokenizer.pad_token_id] * padding])
        all_weights.append([1.0, *weights, 1.0, *[1.0] * padding])
    ids, weights = torch.tensor(all_ids), torch.tensor(all_weights)
    return split_windows(ids, tokenizer), split_windows(weights)


def check_weighted_caption(caption: str, where: str) -> None:
    """A weight that is not a positive finite number cannot weigh anything; say which caption has it."""
    for _, weight in parse_weights(caption):
        if not 0 < weight < float("inf"):
            raise UserError(f"{where}: the caption weight in '{caption}' comes to {weight:g}; use weights above 0.")


def check_prompt_weights(text: str, where: str) -> None:
    """A weight that looks like a number but is none, such as (cat:1,5) or (cat:1.2.5), would silently become text;
    say where it is."""
    for match in _NUMBER_LIKE_WEIGHT.finditer(text):
        try:
            float(match.group(2))
        except ValueError:
            raise UserError(
                f"{where}: the weight '{match.group(2)}' in '{match.group(0)}' is not a number; write it with a"
                f" decimal point, such as ({match.group(1)}:1.2)."
            ) from None
