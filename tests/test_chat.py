"""`openseek chat`: streamed replies through the chat template, /reset, context trimming, a real terminal."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import openseek
from conftest import build_tiny_folder
from openseek.chat import conversation_ids


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_folder(tmp_path_factory.mktemp("chat") / "tiny")[0]


def offline_reply(folder, messages, max_tokens):
    llm = openseek.LLM(folder, max_num_seqs=1)
    text = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    prompt = {"prompt_token_ids": llm.tokenizer.encode(text, add_special_tokens=False)}
    return llm.generate(prompt, openseek.SamplingParams(temperature=0, max_tokens=max_tokens))[0].outputs[0].text


def chat_cmd(folder, *extra):
    return [sys.executable, "-m", "openseek", "chat", "--model", str(folder), "--temperature", "0",
            "--max-tokens", "6", *extra]


def test_piped_chat_replies_like_offline_generation_and_reset_forgets(folder):
    first = offline_reply(folder, [{"role": "user", "content": "Hello there"}], 6)
    second = offline_reply(folder, [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first},
                                    {"role": "user", "content": "And again"}], 6)
    run = subprocess.run(chat_cmd(folder), input="Hello there\nAnd again\n/reset\nHello there\n", text=True,
                         capture_output=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"{first}\n{second}\n{first}\n"


def test_system_message_is_rendered_first(folder):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = offline_reply(folder, messages, 6)
    run = subprocess.run(chat_cmd(folder, "--system", "Be brief."), input="Hi\n", text=True, capture_output=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout == expected + "\n", run.stderr


def test_old_turns_are_dropped_to_fit_the_context(folder):
    llm = openseek.LLMEngine.from_pretrained(folder, openseek.EngineConfig(max_num_seqs=1, max_model_len=96))
    messages = [{"role": "system", "content": "sys"}]
    for i in range(6):
        messages += [{"role": "user", "content": f"question {i} " * 4}, {"role": "assistant", "content": "ok " * 8}]
    messages.append({"role": "user", "content": "last one"})
    ids = conversation_ids(llm, messages, reserve=32)
    assert len(ids) + 32 <= 96
    text = llm.tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith(llm.tokenizer.decode([llm.tokenizer.bos_token_id], False) + "sys\n\n")
    assert text.endswith("User: last one\n\nAssistant:") and "question 0" not in text
    kept = [m for m in messages[1:] if m["content"] in text]  # a suffix of whole turns, starting at a user turn
    assert kept == messages[len(messages) - len(kept):] and kept[0]["role"] == "user"


def test_chat_in_a_terminal_prompts_streams_and_exits_on_eof(folder):
    import pty
    import select

    expected = offline_reply(folder, [{"role": "user", "content": "Hello there"}], 6)
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin/stdout are the terminal
        os.execv(sys.executable, chat_cmd(folder))
    out = b""

    def read_until_prompt(count: int, timeout: float = 120) -> None:
        nonlocal out
        while out.count(b">>> ") < count:
            ready, _, _ = select.select([fd], [], [], timeout)
            assert ready, f"no prompt number {count} from the chat; got {out!r}"
            out += os.read(fd, 4096)

    read_until_prompt(1)
    assert b"/reset" in out  # the help line
    os.write(fd, b"Hello there\n")
    read_until_prompt(2)
    os.write(fd, b"\x04")  # Ctrl-D: end of input
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    reply = out.split(b"Hello there\r\n", 1)[1].rsplit(b">>> ", 1)[0].decode().replace("\r\n", "\n")
    assert reply == expected + "\n" and os.WEXITSTATUS(status) == 0
