"""Read training files and convert every supported record format to one canonical sample.

Canonical sample: a list of ``{"role": "system"|"user"|"assistant", "content": str}``.
Nothing downstream of this module knows about input formats.

Supported records (files: ``.json`` holding a list, or ``.jsonl`` with one record a line):
- Qwen / ShareGPT: ``{"id", "conversations": [{"from": "user"|"human"|"assistant"|"gpt"|"system", "value"}]}``
- OpenAI: ``{"messages": [{"role", "content"}]}``
- alpaca: ``{"instruction", "input"?, "output", "system"?}``
Any record may carry a top-level ``"system"`` string; otherwise the default system message is used.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

from qlaunch.config.errors import UsageError

Message = dict[str, str]
log = logging.getLogger("qlaunch")

ROLE_NAMES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
}
MAX_REPORTED = 5  # problems listed per file before "and N more"


class _Object(dict):
    """A JSON object as parsed here: remembers the keys it held more than once (json keeps the last value
    silently, so a record with two "value"s trains on whichever came last)."""

    duplicates: tuple[str, ...] = ()


class NonFinite(float):
    """NaN / Infinity literals (not JSON, but Python's json accepts them): kept distinguishable, so a record
    holding one is reported instead of training on the text "nan"."""

    literal = "NaN"


def _constant(literal: str) -> NonFinite:
    value = NonFinite(float(literal.replace("Infinity", "inf")))
    value.literal = literal
    return value


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        obj.duplicates = tuple(dict.fromkeys(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_constant=_constant)


def _loads(text: str, where: str) -> Any:
    """json.loads that marks duplicate keys and non-finite literals (see _Object, NonFinite), and names
    `where` (file, or file:line) when the text nests deeper than the parser can recurse."""
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise UsageError(f"{where}: nested too deeply to parse; a record is a few levels deep.") from None


def _json_type(value: Any) -> str:
    return "dict" if isinstance(value, dict) else type(value).__name__


def strict_problem(record: Any, depth: int = 0) -> str | None:
    """What JSON itself let through in a record: a key given twice, NaN / Infinity, nesting deeper than a
    conversation needs."""
    if depth > MAX_DEPTH:
        return f"is nested more than {MAX_DEPTH} levels deep"
    if isinstance(record, NonFinite):
        return f"holds the literal {record.literal}, which is not JSON (write a number or a string)"
    if isinstance(record, dict):
        if getattr(record, "duplicates", ()):
            return f"has the key {record.duplicates[0]!r} more than once (JSON keeps only the last value)"
        values = record.values()
    elif isinstance(record, list):
        values = record
    else:
        return None
    return next((p for p in (strict_problem(v, depth + 1) for v in values) if p), None)


MAX_DEPTH = 20  # a conversation is 4 levels deep (list of records, record, turns, turn)


def _utf8_error(path: str, byte: int, line: int, raw: bytes) -> UsageError:
    return UsageError(f"{path}: not valid UTF-8 at byte {byte} (line {line}): {raw!r}. Save the file as UTF-8.")


def _jsonl_line_error(path: str, lineno: int, e: json.JSONDecodeError) -> UsageError:
    return UsageError(f"{path}:{lineno}:{e.colno}: not valid JSON ({e.msg}). "
                      "Each line of a .jsonl file is one JSON record.")


def _check_readable(path: str) -> None:
    from qlaunch.config.files import file_problem

    problem = file_problem(path)
    if problem:
        raise UsageError(f"data file: {problem} Pass a .json or .jsonl file.")


def read_text(path: str) -> str:
    """The file as UTF-8 text; unreadable or non-UTF-8 content is a UsageError naming the place."""
    _check_readable(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UsageError(f"data file {path!r}: cannot be read ({e.strerror}).") from None
    try:
        return raw.decode("utf-8-sig")  # a UTF-8 BOM (some Windows editors write one) is fine
    except UnicodeDecodeError as e:
        raise _utf8_error(path, e.start, raw.count(b"\n", 0, e.start) + 1, raw[e.start:e.start + 4]) from None


def read_records(path: str) -> list[Any]:
    """Load a .json list or a .jsonl file; malformed content is a UsageError naming line and column."""
    flag_hint = "Pass a .json file holding a list of records, or a .jsonl file with one record per line."
    text = read_text(path)
    if path.endswith(".jsonl"):
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(_loads(line, f"{path}:{lineno}"))
            except json.JSONDecodeError as e:
                raise _jsonl_line_error(path, lineno, e) from None
    else:
        try:
            records = _loads(text, path)
        except json.JSONDecodeError as e:
            hint = " (one record per line? name the file .jsonl)" if e.msg == "Extra data" else ""
            raise UsageError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}){hint}. {flag_hint}") from None
        if not isinstance(records, list):
            raise UsageError(f"{path}: expected a JSON list of records, got {_json_type(records)}. {flag_hint}")
    if not records:
        raise UsageError(f"{path}: no records. The file must hold at least one training sample.")
    return records


def _conversation(turns: Any, role_key: str, text_key: str) -> list[Message]:
    if not isinstance(turns, list) or not turns:
        raise ValueError("has no turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i} is not an object")
        # Be lenient about which key pair a Qwen-style file uses.
        role = turn.get(role_key, turn.get("role", turn.get("from")))
        content = turn.get(text_key, turn.get("content", turn.get("value")))
        if role not in ROLE_NAMES:
            raise ValueError(f"turn {i} has role {role!r}; expected one of {', '.join(ROLE_NAMES)}")
        if not isinstance(content, str):
            raise ValueError(f"turn {i} has no text ({text_key!r} must be a string)")
        messages.append({"role": ROLE_NAMES[role], "content": content})
    return messages


def to_messages(record: Any, default_system: str) -> list[Message]:
    """Convert one record to canonical messages; raise ValueError saying what is wrong."""
    problem = strict_problem(record)
    if problem:
        raise ValueError(problem)
    if not isinstance(record, dict):
        raise ValueError(f"is a {_json_type(record)}, not an object")
    if "conversations" in record:
        messages = _conversation(record["conversations"], "from", "value")
    elif "messages" in record:
        messages = _conversation(record["messages"], "role", "content")
    elif "instruction" in record and "output" in record:
        prompt = record["instruction"]
        if record.get("input"):
            prompt = f"{prompt}\n\n{record['input']}"
        if not isinstance(prompt, str) or not isinstance(record["output"], str):
            raise ValueError("alpaca fields instruction/input/output must be strings")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    else:
        keys = ", ".join(sorted(record)) or "none"
        raise ValueError(
            f"has keys {keys}; expected 'conversations' (Qwen), 'messages' (OpenAI) or 'instruction'+'output' (alpaca)"
        )

    if messages[0]["role"] != "system":
        system = record.get("system", default_system)
        if not isinstance(system, str):
            raise ValueError("'system' must be a string")
        if system:
            messages.insert(0, {"role": "system", "content": system})
    if any(m["role"] == "system" for m in messages[1:]):
        raise ValueError("has a system turn after the first turn; only the first turn may be a system prompt")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("has no assistant turn, so nothing to train on")
    return messages


def load_samples(path: str, default_system: str) -> list[list[Message]]:
    """Read a data file and convert every record; all bad records are reported at once."""
    records = read_records(path)
    samples, problems, empty = [], [], []
    for index, record in enumerate(records):
        try:
            samples.append(to_messages(record, default_system))
        except ValueError as e:
            problems.append(f"record {index}{_record_id(record)} {e}")
            continue
        if not has_reply(samples[-1]):
            empty.append(index)
    _raise_malformed(path, problems)
    report_empty_replies(path, empty, len(samples))
    return samples


def has_reply(messages: list[Message]) -> bool:
    """Whether any assistant turn has text: a record whose replies are all empty teaches only to stop."""
    return any(m["role"] == "assistant" and m["content"].strip() for m in messages)


def report_empty_replies(path: str, empty: list[int], total: int) -> None:
    """One warning naming the records whose every reply is empty; refused when that is every record."""
    if not empty:
        return
    shown = ", ".join(map(str, empty[:MAX_REPORTED])) + (f" and {len(empty) - MAX_REPORTED} more"
                                                         if len(empty) > MAX_REPORTED else "")
    if len(empty) == total:
        raise UsageError(f"{path}: every record's assistant replies are empty: nothing to learn but stopping; "
                         "fill in the replies (the assistant turns' text).")
    log.warning("%s: %d of %d records have only empty assistant replies (records %s); they train the model "
                "to stop at once.", path, len(empty), total, shown)


def _raise_malformed(path: str, problems: list[str]) -> None:
    if problems:
        shown = problems[:MAX_REPORTED]
        more = f" (and {len(problems) - MAX_REPORTED} more)" if len(problems) > MAX_REPORTED else ""
        raise UsageError(
            [f"{path}: {len(problems)} malformed record(s){more}; fix or remove them:"] + [f"{path}: {p}" for p in shown]
        )


class JsonlSamples:
    """A .jsonl file's samples, read from disk when asked for (--lazy_preprocess on files larger than
    memory): one streaming pass checks every record as load_samples does (every problem reported
    before training) and keeps only each record's byte offset, 8 bytes a record."""

    def __init__(self, path: str, default_system: str):
        from array import array

        _check_readable(path)
        self.path, self.default_system = path, default_system
        self.offsets = array("q")
        self._file = None  # (pid, handle): DataLoader workers fork, each reads with its own
        problems, empty, offset = [], [], 0
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                start, offset = offset, offset + len(raw)
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8-sig" if start == 0 else "utf-8")  # a BOM only at the file's start
                except UnicodeDecodeError as e:
                    raise _utf8_error(path, start + e.start, lineno, raw[e.start:e.start + 4]) from None
                try:
                    record = _loads(text, f"{path}:{lineno}")
                except json.JSONDecodeError as e:
                    raise _jsonl_line_error(path, lineno, e) from None
                try:
                    if not has_reply(to_messages(record, default_system)):
                        empty.append(len(self.offsets))
                except ValueError as e:
                    problems.append(f"record {len(self.offsets)}{_record_id(record)} {e}")
                self.offsets.append(start)
        _raise_malformed(path, problems)
        report_empty_replies(path, empty, len(self.offsets) - len(problems))
        if not self.offsets:
            raise UsageError(f"{path}: no records. The file must hold at least one training sample.")

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> list[Message]:
        if self._file is None or self._file[0] != os.getpid():
            self._file = (os.getpid(), open(self.path, "rb"))  # noqa: SIM115 - kept open for later reads
        handle = self._file[1]
        handle.seek(self.offsets[i])
        text = handle.readline().decode("utf-8-sig" if self.offsets[i] == 0 else "utf-8")
        return to_messages(_loads(text, f"{self.path} (record {i})"), self.default_system)

    def __getstate__(self):  # picklable (spawned workers): the handle is reopened where it is used
        return {**self.__dict__, "_file": None}


def _record_id(record: Any) -> str:
    return f" (id {record['id']!r})" if isinstance(record, dict) and "id" in record else ""
