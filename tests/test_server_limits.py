"""One client cannot cost another (issue 13): the engine loop survives a failure outside a step."""

from __future__ import annotations

import asyncio

import pytest

from conftest import build_tiny_folder
from openseek import LLMEngine, SamplingParams
from openseek.engine import StepOutput
from openseek.server.async_engine import AsyncEngine


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_folder(tmp_path_factory.mktemp("limits") / "tiny")[0]


# ---- item 6: the engine loop survives what it can, and stops cleanly when it cannot ---------------------------------
def run_engine(llm: LLMEngine, work):
    """Run work(engine) on a started AsyncEngine; a handler nobody answers fails it within 10 s."""
    engine = AsyncEngine(llm)
    engine.start()
    try:
        return asyncio.run(asyncio.wait_for(work(engine), 10))
    finally:
        engine.shutdown()


async def generate(engine: AsyncEngine, rid: str, max_tokens: int = 3) -> list:
    q = await engine.add([(rid, {"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                                ignore_eos=True))])
    outs = [await q.get()]
    while isinstance(outs[-1], StepOutput) and outs[-1].output is None:
        outs.append(await q.get())
    return outs


def fail_once(obj, name: str, after: int):
    """Make obj.name raise RuntimeError on its call number `after` + 1, once."""
    real, calls = getattr(obj, name), []

    def flaky(*args):
        calls.append(1)
        if len(calls) == after + 1:
            raise RuntimeError(f"{name} broke")
        return real(*args)

    setattr(obj, name, flaky)


@pytest.mark.parametrize("name", ["stats", "abort"])
def test_a_failure_outside_a_step_leaves_the_loop_serving(folder, name):
    llm = LLMEngine.from_pretrained(folder)
    fail_once(llm, name, after=1)

    async def work(engine):
        first = await generate(engine, "a")
        engine.abort(["gone", "gone-too"])  # the second abort is the one that breaks, if it is abort
        second, third = await asyncio.gather(generate(engine, "b", 5), generate(engine, "c", 4))
        return engine.alive, first, second, third

    alive, *runs = run_engine(llm, work)
    assert alive
    assert [(len(r), r[-1].finish_reason) for r in runs] == [(3, "length"), (5, "length"), (4, "length")]
    assert llm.pool.num_free == llm.pool.num_blocks
