"""Reward programs of the shipped tasks (tasks.py): rule-based, stdlib only, run by reward_worker.py in a sandboxed
subprocess, never imported by openseek itself. A program is a function (completion, answer) -> {part: float}."""

import re

ANSWER = re.compile(r"The answer is (-?\d+)\.")
NUMBER = re.compile(r"-?\d+")


def arithmetic(completion: str, answer: str) -> dict:
    """correct: the completion's last integer is the answer; format: the whole completion is 'The answer is N.'"""
    numbers = NUMBER.findall(completion)
    return {"correct": float(bool(numbers) and numbers[-1] == answer),
            "format": float(ANSWER.fullmatch(completion.strip()) is not None)}
