"""Verifiable tasks for GRPO: problems generated offline and deterministically, a held-out split, a demonstration
per problem (for a short SFT on the format), and a reward program (reward_programs.py) run sandboxed (rewards.py).

Stdlib only: the train config checks task names against this registry.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

SPLITS = ("train", "heldout")
PROGRAMS = Path(__file__).with_name("reward_programs.py")


@dataclass(frozen=True, slots=True)
class Problem:
    prompt: str  # the user turn
    answer: str  # what the reward program checks a completion against
    solution: str  # a correct completion in the task's format (SFT demonstrations)


@dataclass(frozen=True)
class Task:
    name: str
    generate: Callable[[], list[Problem]]  # every problem of the task, in a fixed order
    program: Path  # the reward program's file ...
    function: str  # ... and its function: (completion, answer) -> {part: value}
    weights: dict[str, float] = field(default_factory=lambda: {"correct": 1.0})  # reward = sum of weight * part
    heldout_per_mille: int = 100  # the share of problems held out, chosen by a hash of the prompt

    def problems(self, split: str) -> list[Problem]:
        """The split's problems: held out when the SHA-256 of the prompt says so, whatever the order or the seed."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: allowed: {', '.join(SPLITS)}")
        held = split == "heldout"
        return [p for p in self.generate() if _held_out(p.prompt, self.heldout_per_mille) == held]


def _held_out(prompt: str, per_mille: int) -> bool:
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % 1000 < per_mille


def arithmetic_problems(max_operand: int = 99, seed: int = 0) -> list[Problem]:
    """Every 'What is a + b?' and 'What is a - b?' for 0 <= a, b <= max_operand, in a seeded order."""
    problems = []
    for a in range(max_operand + 1):
        for b in range(max_operand + 1):
            for op, value in (("+", a + b), ("-", a - b)):
                problems.append(Problem(f"What is {a} {op} {b}?", str(value), f"The answer is {value}."))
    random.Random(seed).shuffle(problems)
    return problems


def largest_problems(count: int = 20_000, max_value: int = 99, seed: int = 0) -> list[Problem]:
    """'Which is largest: a, b or c?' for `count` distinct triples of distinct numbers in [0, max_value], seeded."""
    rng, seen, problems = random.Random(seed), set(), []
    while len(problems) < count:
        triple = tuple(rng.sample(range(max_value + 1), 3))
        if triple in seen:
            continue
        seen.add(triple)
        a, b, c = triple
        problems.append(Problem(f"Which is largest: {a}, {b} or {c}?", str(max(triple)),
                                f"The answer is {max(triple)}."))
    return problems


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add a task to the registry (a name already taken is replaced)."""
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: allowed: {', '.join(sorted(TASKS))}")
    return TASKS[name]


# two-digit addition and subtraction: 20,000 problems, 10% held out; correct answer 1, the exact format 0.1
register(Task("arithmetic", arithmetic_problems, PROGRAMS, "arithmetic", {"correct": 1.0, "format": 0.1}))
# the largest of three two-digit numbers: the answer is a copy, the choice a comparison; scored as arithmetic's
register(Task("largest", largest_problems, PROGRAMS, "arithmetic", {"correct": 1.0, "format": 0.1}))
