"""Small CLIP byte-level BPE vocabularies made offline (tiny test models and the toy prior).

The real CLIP tokenizer files (49,408 tokens) cannot be downloaded here, so tiny models ship a vocabulary
built by the same rules as OpenAI's CLIP ``bpe_simple_vocab_16e6``: the 256 byte symbols (GPT-2's
``bytes_to_unicode`` alphabet), the same 256 symbols with the end-of-word marker ``</w>``, then merges,
then ``<|startoftext|>`` and ``<|endoftext|>``. Merges are added so that every word of a given list is
ONE token; any other word still tokenizes, byte by byte (every single byte symbol is in the vocabulary).
The files are standard ``vocab.json`` + ``merges.txt`` and load with ``transformers.CLIPTokenizer``.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from typing import Dict, Iterable, List, Sequence, Tuple

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"

#: Words that become single tokens in the default tiny vocabulary: prompt words used by tests and demos,
#: and the view words appended by view-dependent prompting (threestudio: front / side / back / overhead view).
DEFAULT_WORDS: Tuple[str, ...] = (
    "a", "an", "the", "of", "on", "in", "with", "and", "photo", "dslr", "3d", "render", "model",
    "red", "green", "blue", "yellow", "white", "black", "orange", "purple", "wooden", "metal", "shiny",
    "cube", "sphere", "ball", "chair", "table", "car", "dog", "cat", "corgi", "bunny", "toy", "hamburger",
    "front", "side", "back", "overhead", "view", "high", "quality", "detailed", "small", "big", "object",
    "blurry", "low", "bad", "ugly",
)

# CLIP's pre-tokenizer pattern (openai/CLIP simple_tokenizer.py), with \p{L} / \p{N} approximated by the
# standard library: letters = word characters minus digits and underscore.
_WORD_RE = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+",
                      re.IGNORECASE)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2 / CLIP map from the 256 byte values to printable unicode characters (no whitespace/control)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + list(
        range(ord("\u00ae"), ord("\u00ff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _word_symbols(word: str) -> List[str]:
    """A pre-tokenized word as its byte symbols, the last one carrying ``</w>`` (CLIP's BPE start state)."""
    b2u = bytes_to_unicode()
    symbols = [b2u[b] for b in word.encode("utf-8")]
    symbols[-1] = symbols[-1] + END_OF_WORD
    return symbols


def bpe(symbols: Sequence[str], ranks: Dict[Tuple[str, str], int]) -> List[str]:
    """Reference BPE (CLIP ``SimpleTokenizer.bpe``): repeatedly merge the adjacent pair of lowest rank."""
    word = list(symbols)
    while len(word) > 1:
        pairs = [(ranks[p], p) for p in zip(word[:-1], word[1:]) if p in ranks]
        if not pairs:
            break
        first, second = min(pairs)[1]
        out, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                out.append(first + second)
                i += 2
            else:
                out.append(word[i])
                i += 1
        word = out
    return word


def pre_tokenize(text: str) -> List[str]:
    """CLIP's normalisation (whitespace collapsed, lower case) and word split."""
    text = re.sub(r"\s+", " ", text).strip().lower()
    return _WORD_RE.findall(text)


def build_clip_bpe(words: Iterable[str] = DEFAULT_WORDS) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """Build ``(vocab, merges)`` in which each word of ``words`` (after CLIP pre-tokenization) is one token.

    Merges are appended greedily: while a word's BPE leaves more than one symbol, the merge of its first two
    symbols is appended. An appended merge ranks after all earlier ones, so it never changes how an earlier
    word is merged (BPE only reaches it once no lower-ranked pair is left, and earlier words end as one symbol).

    Returns:
        vocab: token -> id; ids 0..255 the byte symbols, 256..511 the ``</w>`` forms, then one id per merge,
            then ``<|startoftext|>``, ``<|endoftext|>`` (CLIP's order).
        merges: the merge list in rank order.
    """
    b2u = bytes_to_unicode()
    alphabet = list(b2u.values())
    vocab_list = alphabet + [s + END_OF_WORD for s in alphabet]
    merges: List[Tuple[str, str]] = []
    ranks: Dict[Tuple[str, str], int] = {}
    seen = set()
    for text in words:
        for w in pre_tokenize(text):
            if w in seen or w in (BOS, EOS):
                continue
            seen.add(w)
            while True:
                syms = bpe(_word_symbols(w), ranks)
                if len(syms) == 1:
                    break
                pair = (syms[0], syms[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                vocab_list.append(pair[0] + pair[1])
    vocab_list += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    return vocab, merges


def write_clip_tokenizer(folder: str, words: Iterable[str] = DEFAULT_WORDS, pad_token: str = EOS,
                         max_length: int = 77) -> Dict[str, int]:
    """Write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json`` to ``folder``.

    Args:
        folder: output folder (created).
        words: words that must be single tokens.
        pad_token: ``<|endoftext|>`` (SD 1.x, CLIP ViT-L) or ``"!"`` (SD 2.x / SDXL OpenCLIP tokenizers pad with 0).
        max_length: ``model_max_length`` (CLIP context length, 77).

    Returns:
        the vocabulary (token -> id).
    """
    vocab, merges = build_clip_bpe(words)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
                   "errors": "replace", **special}, f, indent=2)
    return vocab


def encode_reference(text: str, vocab: Dict[str, int], merges: Sequence[Tuple[str, str]]) -> List[int]:
    """Brute-force twin of ``CLIPTokenizer`` for our vocabularies: token ids without BOS/EOS/padding."""
    ranks = {m: i for i, m in enumerate(merges)}
    ids: List[int] = []
    for w in pre_tokenize(text):
        if w in (BOS, EOS):
            ids.append(vocab[w])
            continue
        ids += [vocab[s] for s in bpe(_word_symbols(w), ranks)]
    return ids
