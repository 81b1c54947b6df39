"""The demo's verifiable preference: which completions keep a stdlib function prefix valid Python."""
import ast
from pathlib import Path

from posttrain.demo_data import preference_pairs, validity
from posttrain.pysyntax import completion_is_valid, function_prompts, valid_code_lines
from posttrain.reward_functions import python_syntax

PROMPT = "def area(width, height):\n    if width < 0:\n        raise ValueError(width)\n"


def test_code_that_parses_is_valid_and_broken_code_is_not():
    assert completion_is_valid(PROMPT, "    return width * height\n")
    assert not completion_is_valid(PROMPT, "    return width * (height\n")
    assert not completion_is_valid(PROMPT, "    return width *\n")
    assert not completion_is_valid(PROMPT, "  x = 1\n")  # an indentation the block does not allow


def test_only_complete_lines_count_and_a_block_may_be_left_open():
    assert completion_is_valid(PROMPT, "    total = width * height\n    return tot(((")  # last line cut by the budget
    assert not completion_is_valid(PROMPT, "    return width * height")  # no complete line at all
    assert completion_is_valid(PROMPT, "    for row in range(height):\n")  # closed by a `pass`


def test_comments_and_blank_lines_alone_are_not_valid_code():
    assert not completion_is_valid(PROMPT, "    # compute the area\n\n")
    assert completion_is_valid(PROMPT, "    # compute the area\n    return width * height\n")
    assert valid_code_lines(PROMPT, "    # note\n    a = 1\n    b = 2\n    c = (\n") == 2


def test_function_prompts_are_parsable_prefixes_with_work_left(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text(
        "class A:\n"
        "    @staticmethod\n"
        "    def f(x):\n"
        '        """Doc\n        string."""\n'
        "        y = x + 1\n"
        "        z = y * 2\n"
        "        return z\n"
        "\n"
        "def short():\n"
        "    return 1\n"
    )
    prompts = list(function_prompts(source))
    assert len(prompts) == 1  # `short` has nothing left to write
    prompt = prompts[0].prompt
    assert prompt.startswith("@staticmethod\ndef f(x):\n") and prompt.endswith("\n")
    ast.parse(prompt)
    assert "return z" not in prompt and prompts[0].source == f"{source}:3"
    assert prompts[0].continuation == "    z = y * 2\n"  # the next statement, indented as the dedented body
    ast.parse(prompt + prompts[0].continuation)


def test_real_stdlib_prompts_parse():
    import json

    prompts = list(function_prompts(Path(json.__file__).parent / "decoder.py"))
    assert len(prompts) >= 3
    for p in prompts:
        ast.parse(p.prompt)
        ast.parse(p.prompt + p.continuation)


def test_pairs_prefer_valid_completions_and_the_report_counts_them():
    prompts = [PROMPT, PROMPT]
    completions = [["    return width * height\n", "    return (\n"], ["    # hi\n", "    x = )\n"]]
    pairs = preference_pairs(prompts, completions, pairs_per_prompt=2)
    assert pairs == [{"prompt": PROMPT, "chosen": "    return width * height\n", "rejected": "    return (\n"}]
    report = validity(prompts, completions)
    assert report.valid_rate == 0.25 and report.completions == 4 and report.valid_code_lines == 0.25
    assert python_syntax(prompts, [c[0] for c in completions]) == [1.0, 0.0]
