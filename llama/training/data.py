"""Training data for soft-prompt tuning: records tokenized with response-only targets, notes on
what was skipped, truncated or dropped, and a token cache keyed by content.
Every rank rebuilds the same batches from the same seed: `load_dataset` then `BatchLoader`
(llama/training/batches.py).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llama.errors import BadInput
from llama.formats.files import atomic_write, sha256_of, underlying_os_error
from llama.training.records import (N_NAMED, PASSED_OVER, format_prompt, load_records,
                                    passed_over_note, read_bytes, records_from_bytes,
                                    template_pair)

IGNORE_INDEX = -100  # the target value cross-entropy skips
CACHE_FORMAT_VERSION = 2  # 2: the first records skipped, truncated and dropped are kept, with why

# The token trained after the end of each text: the model's stop token, which generation stops
# at. "auto" is resolved with the model itself (model_stop_token below) before tokenising.
END_TARGETS = ("auto", "eos", "bos", "none")


def end_target_ids(tokenizer, end_target: str) -> list:
    """[the token trained after each text], or [] for none."""
    if end_target not in END_TARGETS:
        raise BadInput(f"--eos_target {end_target!r} must be one of {', '.join(END_TARGETS)}")
    if end_target == "auto":
        raise ValueError("resolve end_target 'auto' with the model first (model_stop_token)")
    return {"eos": [tokenizer.eos_id], "bos": [tokenizer.bos_id], "none": []}[end_target]


def tokenize_record(record, tokenizer, template: str, train_on_prompt: bool,
                    end_target: str = "eos"):
    """(ids, first_target): ids = [bos] prompt output [end]; ids[first_target:] are trained.

    end: the model's stop token (end_target "eos" or "bos"), or nothing ("none").
    """
    end = end_target_ids(tokenizer, end_target)
    if "text" in record:
        return [tokenizer.bos_id] + tokenizer.encode(record["text"], bos=False, eos=False) + end, 1
    prompt_ids = tokenizer.encode(format_prompt(record, template), bos=False, eos=False)
    output_ids = tokenizer.encode(record["output"], bos=False, eos=False)
    ids = [tokenizer.bos_id] + prompt_ids + output_ids + end
    # Position 0 (BOS) is never predicted, so the earliest possible target is index 1.
    return ids, 1 if train_on_prompt else 1 + len(prompt_ids)


STOP_PROBE_ROWS = 8  # rows of the data that model_stop_token asks the model about


def model_stop_token(path, tokenizer, template: str, train_on_prompt: bool, max_len: int,
                     micro_batch_size: int, mean_loss, log=print) -> str:
    """"eos" or "bos": of the two tokens generation stops at, the one this model predicts more
    after the end of the first rows of the data. LLaMA ends a text with EOS; llama2.c's story
    models (stories260K) were trained on stories separated by BOS alone, never emit EOS, and
    end a story with the BOS of the next one. mean_loss(micro_batches) runs the model (every
    rank of a pipeline takes part) and returns the loss per target token."""
    records, _ = load_records(path, strict=False, log=lambda line: None)
    rows = []
    for record in records[:STOP_PROBE_ROWS]:
        ids, _ = tokenize_record(record, tokenizer, template, train_on_prompt, "none")
        if len(ids) < max_len:
            rows.append(ids)
    if not rows:
        return "eos"  # every row is cut at max_len, so none is trained with an end target
    losses = {}
    for name in ("eos", "bos"):
        # the end token is the only target of each row: its mean -log p after the text
        examples = [(ids + end_target_ids(tokenizer, name), len(ids)) for ids in rows]
        losses[name] = mean_loss([make_micro_batch(examples[i:i + micro_batch_size], tokenizer.pad_id)
                                  for i in range(0, len(examples), micro_batch_size)])
    chosen = min(losses, key=losses.get)
    log(f"end-of-text target: {chosen.upper()} (the model's stop token: after {len(rows)} rows "
        f"of the data its -log p is {losses['eos']:.2f} for EOS, {losses['bos']:.2f} for BOS); "
        "--eos_target eos, bos or none overrides")
    return chosen


class TokenizedDataset:
    """Tokenised examples in flat arrays: example i is token_ids[offsets[i]:offsets[i + 1]].

    Stats describe the source file: n_skipped (unusable records), n_truncated (cut to max_len,
    kept), n_dropped (cut so far that no target token was left); named holds, for each of
    those, the first N_NAMED records as passed_over_note takes them.
    """

    def __init__(self, token_ids, offsets, first_targets, n_skipped=0, n_truncated=0,
                 n_dropped=0, named=None):
        self.token_ids = np.asarray(token_ids, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.first_targets = np.asarray(first_targets, dtype=np.int32)
        self.n_skipped, self.n_truncated, self.n_dropped = n_skipped, n_truncated, n_dropped
        self.named = named or {kind: [] for kind in PASSED_OVER}
        self.cache_path = None

    def __len__(self) -> int:
        return len(self.first_targets)

    def __getitem__(self, index: int):
        """(ids: int32 array, first_target: int)."""
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.token_ids[start:end], int(self.first_targets[index])

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def notes(self, max_len: int, max_len_said: str) -> list:
        """A line for each kind of record passed over, naming the first few and why."""
        counts = {"skipped": self.n_skipped, "truncated": self.n_truncated,
                  "dropped": self.n_dropped}
        return [passed_over_note(kind, counts[kind], self.named[kind], max_len, max_len_said)
                for kind in PASSED_OVER if counts[kind]]

    def select(self, indices) -> "TokenizedDataset":
        """A new dataset of the given examples, in that order (stats carried over)."""
        indices = np.asarray(indices, dtype=np.int64)
        examples = [self[i][0] for i in indices]
        lengths = np.array([len(ids) for ids in examples], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        token_ids = np.concatenate(examples) if examples else np.zeros(0, np.int32)
        subset = TokenizedDataset(token_ids, offsets, self.first_targets[indices],
                                  self.n_skipped, self.n_truncated, self.n_dropped, self.named)
        subset.cache_path = self.cache_path
        return subset


def _tokenize_records(records, tokenizer, template, max_len, train_on_prompt, skipped,
                      end_target):
    """records: [(where, record)]; skipped: [(where, why)] of the records that were unusable."""
    token_ids, offsets, first_targets = [], [0], []
    truncated, dropped = [], []
    for where, record in records:
        ids, first_target = tokenize_record(record, tokenizer, template, train_on_prompt,
                                            end_target)
        if len(ids) > max_len:
            if first_target >= max_len:
                dropped.append([where, len(ids), first_target])
                continue
            truncated.append([where, len(ids)])
            ids = ids[:max_len]
        token_ids.extend(ids)
        offsets.append(len(token_ids))
        first_targets.append(first_target)
    named = {"skipped": [list(entry) for entry in skipped[:N_NAMED]],
             "truncated": truncated[:N_NAMED], "dropped": dropped[:N_NAMED]}
    return TokenizedDataset(token_ids, offsets, first_targets, len(skipped), len(truncated),
                            len(dropped), named)


# ----------------------------------------------------------------------------------------------
# Token cache


def cache_key(data_sha256: str, tokenizer_sha256: str, template: str, max_len: int,
              train_on_prompt: bool, end_target: str = "eos") -> str:
    """A digest of everything the cached tokens depend on: any change gives a new key."""
    settings = {"data": data_sha256, "tokenizer": tokenizer_sha256, "template": template,
                "template_text": list(template_pair(template)), "max_len": max_len,
                "train_on_prompt": train_on_prompt, "format": CACHE_FORMAT_VERSION}
    if end_target != "eos":  # only when not the default, so caches written before stay valid
        settings["end_target"] = end_target
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _save_cache(cache_path: Path, dataset: TokenizedDataset):
    """Written atomically, so ranks building the same cache at once never see half a file."""
    stats = np.array([dataset.n_skipped, dataset.n_truncated, dataset.n_dropped], dtype=np.int64)
    atomic_write(cache_path, lambda file: np.savez(
        file, token_ids=dataset.token_ids, offsets=dataset.offsets,
        first_targets=dataset.first_targets, stats=stats,
        named=np.array(json.dumps(dataset.named)),
        format=np.array(CACHE_FORMAT_VERSION, dtype=np.int64)))


def _try_save_cache(cache_path: Path, dataset: TokenizedDataset, log):
    """cache_path once written, None when it cannot be (read-only, full disk, no permission):
    the cache only saves time, so training goes on without it."""
    try:
        _save_cache(cache_path, dataset)
        return cache_path
    except (BadInput, OSError) as error:
        os_error = underlying_os_error(error)  # atomic_write's BadInput wraps the OSError
        reason = (os_error.strerror or os_error) if os_error is not None else error
        log(f"note: could not write the token cache {cache_path} ({reason}); training goes on "
            "without it: pass --cache_dir a writable folder, or --cache_dir none")
        return None


def _load_cache(cache_path: Path, vocab_size: int) -> TokenizedDataset:
    """Read a cache file; ValueError (or an I/O error) when it is damaged in any way."""
    # Open the file here: np.load leaks its own handle when the zip is damaged.
    with open(cache_path, "rb") as file, np.load(file, allow_pickle=False) as arrays:
        if int(arrays["format"]) != CACHE_FORMAT_VERSION:
            raise ValueError(f"format {int(arrays['format'])}, expected {CACHE_FORMAT_VERSION}")
        token_ids, offsets = arrays["token_ids"], arrays["offsets"]
        first_targets, stats = arrays["first_targets"], arrays["stats"]
        named = json.loads(str(arrays["named"]))
    lengths = np.diff(offsets)
    consistent = (token_ids.ndim == 1 and offsets.ndim == 1 and len(offsets) >= 2
                  and stats.shape == (3,) and len(first_targets) == len(offsets) - 1
                  and offsets[0] == 0 and offsets[-1] == len(token_ids)
                  and (first_targets >= 1).all() and (first_targets < lengths).all()
                  and (token_ids.size == 0 or (0 <= token_ids.min() and token_ids.max()
                                               < vocab_size)))
    if not consistent:
        raise ValueError("arrays do not fit together")
    if not (isinstance(named, dict) and set(named) == set(PASSED_OVER)
            and all(isinstance(entries, list) and len(entries) <= min(count, N_NAMED)
                    for entries, count in zip((named[kind] for kind in PASSED_OVER), stats))):
        raise ValueError("the named records do not fit the counts")
    return TokenizedDataset(token_ids, offsets, first_targets, *(int(s) for s in stats), named)


CACHE_OFF = ("none", "off")


def token_cache_folder(cache_dir=None):
    """Where token caches go, or None when caching is off: cache_dir (--cache_dir), else
    $LLAMA_TOKEN_CACHE, else the user's cache folder ($XDG_CACHE_HOME or ~/.cache) under
    llama-pp-prompt/tokens. Never beside the data: that folder may be shared or read-only."""
    chosen = cache_dir if cache_dir not in (None, "") else os.environ.get("LLAMA_TOKEN_CACHE")
    if chosen not in (None, ""):
        return None if str(chosen).lower() in CACHE_OFF else Path(chosen).expanduser()
    user_cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(user_cache) / "llama-pp-prompt" / "tokens"


def load_dataset(path, tokenizer, template: str = "alpaca", max_len: int = 512,
                 train_on_prompt: bool = False, strict: bool = False, cache_dir=None,
                 log=print, end_target: str = "eos", max_len_said: str = "") -> TokenizedDataset:
    """Tokenised examples of a data file, from the cache when nothing they depend on changed.

    max_len counts BOS and the end target (pass max_seq_len minus the virtual tokens);
    max_len_said: how the notes on records longer than that name it (default "max_len N").
    end_target: eos, bos or none, the token trained after each text. The cache lies in
    token_cache_folder(cache_dir) as <data name>.<key>.npz; "none" or "off" turns it off.
    """
    template_pair(template)
    end_target_ids(tokenizer, end_target)  # refuse an unknown one before any work
    if max_len < 2:
        raise BadInput(f"max_len {max_len} leaves no room for a target token: it must be at "
                       "least 2 (max_seq_len minus the virtual tokens)")
    path = Path(path)
    raw = read_bytes(path)
    key = cache_key(hashlib.sha256(raw).hexdigest(), sha256_of(tokenizer.path), template,
                    max_len, train_on_prompt, end_target)
    cache_folder = token_cache_folder(cache_dir)
    cache_path = cache_folder / f"{path.stem}.{key[:20]}.npz" if cache_folder else None

    dataset = None
    if cache_path is not None and cache_path.is_file():
        try:
            dataset = _load_cache(cache_path, tokenizer.n_words)
            log(f"{path}: tokens from cache {cache_path}")
        except Exception as error:  # any damage (zip, header, arrays) means: build it again
            log(f"token cache {cache_path} is unreadable ({type(error).__name__}: {error}); "
                "rebuilding it")
    if dataset is not None and strict and dataset.n_skipped:
        records_from_bytes(path, raw, strict=True)  # raises, naming the bad record
    if dataset is None:
        records, skipped = records_from_bytes(path, raw, strict)
        dataset = _tokenize_records(records, tokenizer, template, max_len, train_on_prompt,
                                    skipped, end_target)
        if len(dataset) == 0:
            raise BadInput(f"every example of {path} is longer than max_len {max_len} before its "
                           "response starts: raise max_seq_len or use fewer virtual tokens")
        if cache_path is not None:
            cache_path = _try_save_cache(cache_path, dataset, log)
    dataset.cache_path = cache_path
    log(f"{path}: {len(dataset)} examples, {dataset.n_tokens} tokens")
    for note in dataset.notes(max_len, max_len_said or f"max_len {max_len}"):
        log("note: " + note)
    return dataset


@dataclass
class MicroBatch:
    tokens: torch.Tensor   # (B, T) input ids, right-padded with pad_id
    targets: torch.Tensor  # (B, T) next token where it is trained, else IGNORE_INDEX
    n_targets: int         # entries of targets that are not IGNORE_INDEX


def make_micro_batch(examples, pad_id: int) -> MicroBatch:
    """Pad [(ids, first_target)] to the longest one and shift targets by one position."""
    seq_len = max(len(ids) for ids, _ in examples)
    tokens = torch.full((len(examples), seq_len), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), seq_len), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, first_target) in enumerate(examples):
        ids = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        tokens[row, :len(ids)] = ids
        # position t predicts ids[t + 1]; the first trained token is predicted from t = first - 1
        targets[row, first_target - 1:len(ids) - 1] = ids[first_target:]
    return MicroBatch(tokens, targets, int((targets != IGNORE_INDEX).sum()))
