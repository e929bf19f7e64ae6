"""The benchmarks' prompt files, read strictly (a bad entry is named with its line number).

- GenEval: `evaluation_metadata.jsonl` (or `_long`): one JSON object per line with a "prompt"
  string. Prompt i is line i+1; its line, as in the file, becomes `<out>/<i:05d>/metadata.jsonl`.
- DPG-Bench: the prompts JSON `{id: prompt, ...}`. Prompt i is the i-th entry in file order; its
  images go to `<out>/<id>.png`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ..errors import BitDanceError


@dataclass(frozen=True)
class EvalPrompt:
    index: int  # 0-based position in the file: the prompt index of the seed rule
    prompt: str
    name: str  # GenEval: the folder "<index:05d>"; DPG-Bench: the id (the image is "<id>.png")
    metadata: str = ""  # GenEval: the prompt's line as in the file (what metadata.jsonl holds)


def read_prompts(benchmark: str, path: str) -> list[EvalPrompt]:
    readers = {"geneval": read_geneval, "dpg": read_dpg}
    if benchmark not in readers:
        raise BitDanceError(f"benchmark '{benchmark}' unknown; choose one of {sorted(readers)}")
    return readers[benchmark](path)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:  # text mode: universal newlines, as the official scripts read it
            return f.read()
    except FileNotFoundError:
        raise BitDanceError(f"prompt file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BitDanceError(f"{path}: cannot read the prompt file as UTF-8 text ({e})") from None


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _is_geneval_line(text: str) -> bool:
    """A GenEval metadata object: a "prompt" string beside its "tag" / "include" (no DPG-Bench id file
    names its images "prompt" and "tag")."""
    try:
        entry = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(entry, dict) and isinstance(entry.get("prompt"), str) and bool({"tag", "include"} & set(entry))


def read_geneval(path: str) -> list[EvalPrompt]:
    text = _read_text(path)
    lines = text.splitlines(keepends=True)
    while lines and not lines[-1].strip():  # blank lines at the end are no prompts
        lines.pop()
    if not lines:
        raise BitDanceError(f"{path}: no prompts (GenEval's evaluation_metadata.jsonl has one JSON object per line)")
    want = 'each line must be a JSON object with a "prompt" string (GenEval\'s evaluation_metadata.jsonl)'
    out = []
    for i, line in enumerate(lines):
        where = f"{path}, line {i + 1}"
        if not line.strip():
            raise BitDanceError(f"{where} is empty: {want}; a prompt's line number is its index, so blank lines "
                                "cannot be skipped")
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            hint = (" (this file is one JSON object: DPG-Bench's prompts? use --benchmark dpg)"
                    if i == 0 and _is_json_object(text) else "")
            raise BitDanceError(f"{where}: not valid JSON ({e.msg}: column {e.pos + 1}){hint}; {want}") from None
        prompt = entry.get("prompt") if isinstance(entry, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            got = (f'"prompt" is {json.dumps(prompt)[:80]}' if isinstance(entry, dict) and "prompt" in entry
                   else "no \"prompt\" key" if isinstance(entry, dict) else f"a JSON {type(entry).__name__}")
            raise BitDanceError(f"{where}: {got}; {want}")
        out.append(EvalPrompt(i, prompt, f"{i:05d}", line))
    return out


_WS = re.compile(r"\s*")
_BAD_ID = re.compile(r"[/\\.\x00]")


def read_dpg(path: str) -> list[EvalPrompt]:
    """`{id: prompt}` in file order, read entry by entry so that each error names its line."""
    text = _read_text(path)
    dec = json.JSONDecoder()
    want = "the file must be one JSON object {id: prompt, ...} (DPG-Bench's prompts JSON)"

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def skip(pos: int) -> int:
        return _WS.match(text, pos).end()

    def value_at(pos: int):
        try:
            return dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise BitDanceError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}: column {e.colno}); {want}") from None

    def expect(pos: int, chars: str, what: str) -> int:
        if pos >= len(text) or text[pos] not in chars:
            got = repr(text[pos]) if pos < len(text) else "the end of the file"
            raise BitDanceError(f"{path}, line {line_of(pos)}: expected {what}, found {got}; {want}")
        return pos + 1

    pos = skip(0)
    if pos == len(text):
        raise BitDanceError(f"{path}: the file is empty; {want}")
    lines = text.strip().splitlines()
    if len(lines) > 1 and _is_json_object(lines[0]):  # a whole object on line 1, more after it: JSON lines
        raise BitDanceError(f"{path}: one JSON object per line (GenEval's metadata? use --benchmark geneval); {want}")
    if len(lines) == 1 and _is_geneval_line(lines[0]):
        raise BitDanceError(f"{path}: a GenEval metadata line (\"prompt\" with \"tag\"/\"include\"): use --benchmark "
                            f"geneval; {want}")
    if not text.startswith("{", pos):
        raise BitDanceError(f"{path}, line {line_of(pos)}: not a JSON object; {want}")
    pos = skip(pos + 1)
    out, first_line = [], {}
    if text.startswith("}", pos):
        pos += 1
    else:
        while True:
            key_pos = pos
            if not text.startswith('"', pos):
                expect(pos, '"', "a quoted id")
            key, pos = value_at(pos)
            line = line_of(key_pos)
            pos = skip(expect(skip(pos), ":", "':' after the id"))
            prompt, pos = value_at(pos)
            if not key or _BAD_ID.search(key):
                raise BitDanceError(f"{path}, line {line}: id {json.dumps(key)} cannot name an image file: ids become "
                                    "'<id>.png', so they must be non-empty, without '/', '\\' or '.' (DPG-Bench's "
                                    "scorer cuts a file name at its first '.')")
            if key in first_line:
                raise BitDanceError(f"{path}, line {line}: id {json.dumps(key)} appears twice (first on line "
                                    f"{first_line[key]}); each id names one image")
            if not isinstance(prompt, str) or not prompt.strip():
                raise BitDanceError(f"{path}, line {line}: the prompt of id {json.dumps(key)} is "
                                    f"{json.dumps(prompt)[:80]}; it must be a non-empty string")
            first_line[key] = line
            out.append(EvalPrompt(len(out), prompt, key))
            pos = skip(pos)
            pos = expect(pos, ",}", "',' or '}'")
            if text[pos - 1] == "}":
                break
            pos = skip(pos)
    if skip(pos) != len(text):
        raise BitDanceError(f"{path}, line {line_of(skip(pos))}: text after the closing '}}'; {want}")
    if not out:
        raise BitDanceError(f"{path}: no prompts; {want}")
    return out
