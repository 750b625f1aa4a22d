"""Every new grammar compiles first in a child process (engine.grammar_sandbox): a native crash in
llguidance ends the child, the request gets a GrammarError (a 400), and the next grammar gets a
fresh child. The crash here is real: a chain of rule references deeper than the child's stack (the
issue's 3,000-rule Lark grammar segfaults on an 8 MiB stack; the child is given 1 MiB)."""
from __future__ import annotations

import pytest

from loramux.engine.grammar_compile import GrammarError, GrammarSpec, tokenizer_json
from loramux.engine.grammar_sandbox import GrammarSandbox
from loramux.engine.structured import GrammarCompiler


def _chain(n: int) -> str:
    return "start: r0\n" + "".join(f'r{i}: r{i + 1} | "t{i}"\n' for i in range(n)) + f'r{n}: "end"\n'


@pytest.fixture(scope="module")
def small_stack_sandbox(tokenizer):
    sandbox = GrammarSandbox(tokenizer_json(tokenizer), len(tokenizer), tokenizer.eos_token_id, stack_bytes=1 << 20)
    yield sandbox
    sandbox.close()


def test_a_crash_in_the_compiler_is_a_grammar_error_and_the_next_grammar_gets_a_fresh_child(small_stack_sandbox):
    small_stack_sandbox.check(GrammarSpec("grammar", _chain(10)))
    first = small_stack_sandbox._proc
    with pytest.raises(GrammarError, match="crashed the grammar compiler .*SIGSEGV"):
        small_stack_sandbox.check(GrammarSpec("grammar", _chain(3000)))
    assert first.returncode is not None and first.returncode < 0, "the child itself must have died"
    small_stack_sandbox.check(GrammarSpec("regex", "[a-z]{3}"))
    assert small_stack_sandbox._proc is not first


def test_the_childs_refusal_is_llguidances_own_message(small_stack_sandbox):
    with pytest.raises(GrammarError, match="(?i)regex|parse|unclosed|missing"):
        small_stack_sandbox.check(GrammarSpec("regex", "[a-z"))
    small_stack_sandbox.check(GrammarSpec("choice", '["yes", "no"]'))


def test_the_server_compiler_refuses_what_the_child_refuses_and_serves_the_rest(tokenizer):
    compiler = GrammarCompiler(tokenizer, len(tokenizer))
    try:
        with pytest.raises(GrammarError) as refused:
            compiler.compile(GrammarSpec("json_schema", '{"type": "object", "properties": {"a": {"type": "nope"}}}'))
        assert "nope" in str(refused.value)
        grammar = compiler.compile(GrammarSpec("grammar", _chain(500)))    # a deep chain within the bounds
        assert not grammar.matcher().is_error()
        assert compiler._sandbox._proc.poll() is None
    finally:
        compiler.close()
