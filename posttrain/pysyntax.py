"""The demo's verifiable preference: does a code completion keep the program valid Python?

Prompts are prefixes of standard-library functions, cut after a complete statement of the body
(so each prompt parses on its own). A completion is judged by its complete lines (a last line cut
off by the token budget is dropped): it is valid when at least one of them holds code (not blank,
not only a comment: a policy soon learns that comments always parse) and `ast.parse` accepts
prompt + those lines, or accepts them once a `pass` closes a block the last line opened (a
completion may stop right after `if x:`).
"""
from __future__ import annotations

import ast
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


def parses(source: str) -> bool:
    try:
        with warnings.catch_warnings():  # sampled code is full of SyntaxWarnings ("invalid decimal literal")
            warnings.simplefilter("ignore")
            ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def complete_lines(completion: str) -> str:
    """The completion up to and including its last newline."""
    end = completion.rfind("\n")
    return completion[: end + 1] if end >= 0 else ""


def _viable(source: str) -> bool:
    if parses(source):
        return True
    last = source.rstrip("\n").rsplit("\n", 1)[-1]
    if last.rstrip().endswith(":"):
        indent = last[: len(last) - len(last.lstrip())]
        return parses(source + indent + "    pass\n")
    return False


def code_lines(text: str) -> int:
    """Lines that are neither blank nor only a comment."""
    return sum(1 for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))


def completion_is_valid(prompt: str, completion: str) -> bool:
    """True when the completion's complete lines hold code and keep prompt + completion valid Python."""
    lines = complete_lines(completion)
    return code_lines(lines) > 0 and _viable(prompt + lines)


def valid_code_lines(prompt: str, completion: str) -> int:
    """Code lines in the longest prefix of the completion's complete lines that keeps the program valid."""
    lines = complete_lines(completion).splitlines(keepends=True)
    for n in range(len(lines), 0, -1):
        kept = "".join(lines[:n])
        if code_lines(kept) and _viable(prompt + kept):
            return code_lines(kept)
    return 0


def _continuation(lines: list[str], statement: ast.stmt, indent: int) -> str:
    """The statement's source lines with the function's own indent removed (dedent keeps the body's)."""
    text = "".join(line[indent:] if not line[:indent].strip() else line.lstrip() for line in lines[statement.lineno - 1 : statement.end_lineno])
    return text if text.endswith("\n") else text + "\n"


@dataclass(frozen=True)
class FunctionPrompt:
    source: str
    """Where it comes from: path:line."""
    prompt: str
    """The function's header and first body statements, dedented, ending with a newline."""
    continuation: str = ""
    """The function's next body statement, dedented as the prompt is, ending with a newline: an SFT response."""


def function_prompts(path: Path, max_statements: int = 2, max_chars: int = 400) -> Iterator[FunctionPrompt]:
    """One prompt per function (and method) of a file with at least two more statements left to write.

    The prompt is the function up to the end of its first 1..max_statements body statements (more
    for longer functions, fixed by position so the set is deterministic), dedented.
    """
    try:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return
    lines = text.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 3:
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        keep = 1 + (node.lineno % max_statements)
        keep = min(keep, len(node.body) - 2)
        end = node.body[keep - 1].end_lineno
        prompt = textwrap.dedent("".join(lines[start:end]))
        if not prompt.endswith("\n"):
            prompt += "\n"
        if len(prompt) <= max_chars and parses(prompt):
            yield FunctionPrompt(f"{path}:{node.lineno}", prompt, _continuation(lines, node.body[keep], node.col_offset))
