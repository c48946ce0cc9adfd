"""Instruction and chat data for causal LMs: rows rendered into (prompt, response) text with a
template, then tokenized so that only the response is learned.

Pure functions over rows, a :class:`~fedlora.config.DataConfig` and a tokenizer:

- :func:`render_prompt`: one row as (prompt text, response text), in ``data.format``
  (``instruction`` or ``chat``) with ``data.template`` (``alpaca``, ``vicuna`` or ``chat``, the
  tokenizer's own chat template).
- :func:`encode_pairs`: (prompt, response) pairs as an :class:`~fedlora.data.batching.Encoded`
  whose ``prompt_lengths`` say how many leading tokens of each row are prompt, which
  :func:`~fedlora.data.batching.collate` then leaves out of the loss.
- :func:`encode_rows`: both over a ``datasets.Dataset`` (raw text goes to
  :func:`~fedlora.data.batching.encode` unchanged), the one call training and evaluation use.

The prompt and the response are tokenized separately and concatenated, so the boundary between
them is exact in tokens (tokenizing the joined text could merge the last prompt character with
the first response character into one token).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from fedlora.config import DataConfig
from fedlora.data.batching import Encoded, encode
from fedlora.errors import ConfigError, DataError

__all__ = [
    "ALPACA_NO_INPUT",
    "ALPACA_WITH_INPUT",
    "VICUNA_SYSTEM",
    "check_messages",
    "check_template",
    "encode_pairs",
    "encode_rows",
    "render_prompt",
]

#: Stanford Alpaca's prompts (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT), verbatim.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
#: Vicuna v1.1's system prompt (FastChat ``vicuna_v1.1``: roles USER/ASSISTANT, separators " " and EOS).
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES = ("system", "user", "assistant")


def _cell(row: Mapping[str, Any], column: str) -> str:
    """A text cell, with a missing column, None or NaN (pandas' empty csv cell) read as ''."""
    value = row.get(column) if column else None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def check_messages(value: Any) -> str | None:
    """Why ``value`` is not a conversation (a list of ``{"role", "content"}`` turns with roles
    system/user/assistant and at least one assistant turn), or None when it is one."""
    if not isinstance(value, (list, tuple)) or not value:
        return f"is {type(value).__name__ if value is not None else 'missing'}, not a list of turns"
    for k, turn in enumerate(value):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("role"), str):
            return f"turn {k + 1} is not a {{'role', 'content'}} table"
        if turn["role"] not in ROLES:
            return f"turn {k + 1} has role {turn['role']!r} (roles: {', '.join(ROLES)})"
        if not isinstance(turn.get("content"), str):
            return f"turn {k + 1} has no text 'content'"
    if not any(turn["role"] == "assistant" for turn in value):
        return "has no assistant turn to learn"
    return None


def check_template(data: DataConfig, tokenizer: Any) -> None:
    """ConfigError (naming ``data.template``) when the template needs what the tokenizer lacks."""
    if data.format != "text" and data.template == "chat" and not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ConfigError(
            f"config key 'data.template' = 'chat' needs a tokenizer with a chat template; {name} has none "
            "(use 'alpaca' or 'vicuna')"
        )


def _chat_prompt(turns: list[Mapping[str, Any]], tokenizer: Any) -> str:
    return tokenizer.apply_chat_template(
        [{"role": t["role"], "content": t["content"]} for t in turns], tokenize=False, add_generation_prompt=True
    )


def _vicuna_prompt(turns: list[Mapping[str, Any]], tokenizer: Any) -> str:
    """FastChat's vicuna_v1.1 layout up to ``ASSISTANT:``: earlier assistant turns end with EOS."""
    system = VICUNA_SYSTEM
    if turns and turns[0]["role"] == "system":
        system, turns = turns[0]["content"], turns[1:]
    eos = getattr(tokenizer, "eos_token", None) or ""
    out = system
    for turn in turns:
        if turn["role"] == "user":
            out += f" USER: {turn['content']}"
        elif turn["role"] == "assistant":
            out += f" ASSISTANT: {turn['content']}{eos}"
    return out + " ASSISTANT:"


def render_prompt(row: Mapping[str, Any], data: DataConfig, tokenizer: Any) -> tuple[str, str]:
    """One row as (prompt text, response text).

    Parameters
    ----------
    row : mapping
        One example, with the columns the config names (as read from the file: the instruction
        and messages columns keep their names when loaded).
    data : DataConfig
        ``format``, ``template`` and the column names.
    tokenizer
        The model's tokenizer (its chat template for ``template = "chat"``, its EOS for the
        earlier assistant turns of a Vicuna conversation).

    Returns
    -------
    tuple of str
        ``format = "text"``: ``("", text)``. ``instruction``: the template's prompt around the
        instruction and optional input, and the response (after a space for Vicuna, whose prompt
        ends with ``ASSISTANT:``). ``chat``: every turn before the last assistant turn rendered
        as the prompt (ending with the assistant's cue), and that turn's content.
    """
    if data.format == "text":
        return "", _cell(row, data.text_column) or _cell(row, "text")
    if data.format == "instruction":
        instruction = _cell(row, data.prompt_column)
        extra = _cell(row, data.input_column)
        extra = extra if extra.strip() else ""  # a blank input is no input; a real one is kept verbatim
        response = _cell(row, data.response_column)
        if data.template == "alpaca":
            if extra:
                return ALPACA_WITH_INPUT.format(instruction=instruction, input=extra), response
            return ALPACA_NO_INPUT.format(instruction=instruction), response
        user = f"{instruction}\n\n{extra}" if extra else instruction
        if data.template == "vicuna":
            return f"{VICUNA_SYSTEM} USER: {user} ASSISTANT:", f" {response}"
        if data.template == "chat":
            return _chat_prompt([{"role": "user", "content": user}], tokenizer), response
        raise ConfigError(f"config key 'data.template' = {data.template!r} is not a template")
    if data.format == "chat":
        turns = row.get(data.messages_column)
        problem = check_messages(turns)
        if problem:
            raise DataError(f"a row's {data.messages_column!r} {problem} (config key 'data.messages_column')")
        last = max(k for k, t in enumerate(turns) if t["role"] == "assistant")
        response = turns[last]["content"]
        if data.template == "chat":
            return _chat_prompt(turns[:last], tokenizer), response
        if data.template == "vicuna":
            return _vicuna_prompt(turns[:last], tokenizer), f" {response}"
        raise ConfigError(f"config key 'data.template' = {data.template!r} cannot render data.format = 'chat'")
    raise ConfigError(f"config key 'data.format' = {data.format!r} is not a format")


def _bos_id(tokenizer: Any) -> int | None:
    """The BOS id the tokenizer itself adds in front of a text (Llama does, GPT-2 and Qwen do not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if with_special and with_special[0] == bos and (not plain or plain[0] != bos):
        return bos
    return None


def encode_pairs(pairs: Sequence[tuple[str, str]], tokenizer: Any, max_length: int) -> Encoded:
    """Tokenize (prompt, response) pairs into rows ``[BOS] + prompt + response + [EOS]``.

    Parameters
    ----------
    pairs : sequence of (str, str)
        Prompt and response texts (:func:`render_prompt`).
    tokenizer
        The model's tokenizer. The BOS is added when the tokenizer adds one itself (and the
        prompt does not already start with it, as a chat template's may); EOS ends every
        response, so the model learns to stop.
    max_length : int
        Tokens per row at most. A longer row loses its prompt's leading tokens first (the BOS
        stays): the instruction's end and the response are what the loss needs. Only when the
        response alone does not fit is its tail cut, EOS included (the text did not end there).

    Returns
    -------
    Encoded
        ``input_ids`` and ``prompt_lengths`` (BOS plus the prompt tokens kept), no labels.

    Raises
    ------
    DataError
        When a row would have no token to learn (an empty response and a tokenizer without EOS).
    """
    if max_length < 2:
        raise ConfigError(f"config key 'model.max_length' must be >= 2, got {max_length}")
    bos = _bos_id(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    # verbose=False: long rows are cut below, not by the tokenizer; its length warning would mislead.
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False, verbose=False)["input_ids"] if pairs else []
    responses = tokenizer([r for _, r in pairs], add_special_tokens=False, verbose=False)["input_ids"] if pairs else []
    input_ids: list[list[int]] = []
    prompt_lengths: list[int] = []
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        prompt, response = list(prompt), list(response)
        if prompt and bos is not None and prompt[0] == bos:  # the chat template wrote the BOS itself
            lead, prompt = [bos], prompt[1:]
        else:
            lead = [bos] if bos is not None else []
        answer = response + ([eos] if eos is not None else [])
        if not answer:
            raise DataError(f"row {row + 1}: empty response and the tokenizer has no EOS: nothing to learn")
        room = max_length - len(lead)
        if len(answer) >= room:  # no prompt token fits: the response's tail goes (the EOS with it)
            prompt, answer = [], answer[:room]
        elif len(prompt) + len(answer) > room:
            prompt = prompt[len(prompt) + len(answer) - room :]
        input_ids.append(lead + prompt + answer)
        prompt_lengths.append(len(lead) + len(prompt))
    return Encoded(input_ids=input_ids, labels=None, prompt_lengths=prompt_lengths)


def encode_rows(ds: Any, data: DataConfig, tokenizer: Any, max_length: int) -> Encoded:
    """A ``datasets.Dataset`` tokenized for a causal LM (or classifier) in ``data.format``.

    Raw text (``format = "text"``) goes through :func:`~fedlora.data.batching.encode` unchanged
    (every token scored); instruction and chat rows are rendered (:func:`render_prompt`) and
    encoded with their prompts masked (:func:`encode_pairs`). Task ids are kept.
    """
    if data.format == "text":
        return encode(ds, tokenizer, max_length)
    check_template(data, tokenizer)
    enc = encode_pairs([render_prompt(row, data, tokenizer) for row in ds], tokenizer, max_length)
    enc.task_ids = list(ds["task_id"]) if "task_id" in ds.column_names else None
    return enc
