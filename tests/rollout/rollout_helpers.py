"""Test helpers: three chat templates (and Qwen3's, which rewrites history), a scripted engine written only to the protocol, an engine wrapper that records its calls, an engine wrapper
that ignores ``stop_condition`` (an engine without the feature), and a logits bias that forces
a policy's next tokens (a degenerate policy on a real model)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from alp_agents.rollout.engines import Sample, SamplingParams

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) "
    "or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen3's template, text part (no tool schemas or tool_calls), as published with Qwen3-8B: the
# reasoning of an assistant turn ("<think>...</think>" in its content) is rendered only for the
# turns after the last real user message, and a final assistant turn without reasoning gets an
# empty think block. So appending a user message rewrites the turns before it.
QWEN3_TEMPLATE = """
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith(
        '<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n')
                    .split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n')
                    + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"""

TEMPLATES = ("smollm2", "llama3", "qwen")
"""The templates every rollout invariant is tested on. ``qwen3`` (`make_template_tokenizer`)
is tested apart (tests/rollout/test_thinking_templates.py): it rewrites history by design."""
# Templates that render tools= (written for these tests after the Qwen2.5 and Qwen3-Coder ones):
# the schemas and the call instructions go into the system turn, an assistant message's
# ``tool_calls`` are written in the template's call format, ``tool`` messages are grouped
# into one user turn of ``<tool_response>`` blocks.
_CHATML_TURNS = (
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + message.content }}"
    "{%- for call in message.tool_calls or [] %}{{- CALL(call.function) }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_SYSTEM_OPENING = (
    "{%- if messages[0].role == 'system' %}{%- set opening = messages[0].content %}"
    "{%- else %}{%- set opening = 'You are a helpful assistant.' %}{%- endif %}"
    "{{- '<|im_start|>system\\n' + opening }}"
)
QWEN_TOOLS_TEMPLATE = (
    "{%- macro CALL(f) %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' + f.name + \'", "arguments": \' + f.arguments | tojson'
    " + '}\\n</tool_call>' }}"
    "{%- endmacro %}" + _SYSTEM_OPENING + "{%- if tools %}"
    "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query."
    "\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": '
    '<function-name>, "arguments": <args-json-object>}\\n</tool_call>\' }}'
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}" + _CHATML_TURNS
)
QWEN3_CODER_TEMPLATE = (
    "{%- macro CALL(f) %}"
    "{{- '\\n<tool_call>\\n<function=' + f.name + '>\\n' }}"
    "{%- for key, value in f.arguments.items() %}"
    "{{- '<parameter=' + key + '>\\n' }}"
    "{%- if value is mapping or (value is iterable and value is not string) %}"
    "{{- value | tojson }}{%- else %}{{- value | string }}{%- endif %}"
    "{{- '\\n</parameter>\\n' }}"
    "{%- endfor %}"
    "{{- '</function>\\n</tool_call>' }}"
    "{%- endmacro %}" + _SYSTEM_OPENING + "{%- if tools %}"
    "{{- '\\n\\n# Tools\\n\\nYou have access to the following functions:\\n\\n<tools>' }}"
    "{%- for tool in tools %}"
    "{{- '\\n<function>\\n<name>' + tool.function.name + '</name>\\n<description>' "
    "+ tool.function.description + '</description>\\n<parameters>' }}"
    "{%- for name, spec in tool.function.parameters.properties.items() %}"
    "{{- '\\n<parameter>\\n<name>' + name + '</name>\\n<type>' + spec.type | default('any') "
    "+ '</type>\\n</parameter>' }}"
    "{%- endfor %}"
    "{{- '\\n</parameters>\\n</function>' }}"
    "{%- endfor %}"
    "{{- '\\n</tools>\\n\\nIf you choose to call a function ONLY reply in the following format "
    "with NO suffix:\\n\\n<tool_call>\\n<function=example_function_name>\\n"
    "<parameter=example_parameter_1>\\nvalue_1\\n</parameter>\\n</function>\\n</tool_call>' }}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}" + _CHATML_TURNS
)

#: Templates that render ``tools=``, and the ``envs.ToolEnv(tool_format=...)`` each asks for.
TOOL_TEMPLATES = {"qwen_tools": "hermes", "qwen3_coder": "qwen3_coder"}


def make_template_tokenizer(base, name: str):
    """A private copy of the SmolLM2 tokenizer carrying template ``name``."""
    tok = copy.deepcopy(base)
    if name == "llama3":
        tok.add_special_tokens(
            {
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|eot_id|>",
                "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"],
            }
        )
        tok.chat_template = LLAMA3_TEMPLATE
    elif name == "qwen":
        tok.chat_template = QWEN_TEMPLATE
    elif name == "qwen3":  # <think> and </think> are added, non-special tokens, as in Qwen3
        tok.add_tokens(["<think>", "</think>"])
        tok.chat_template = QWEN3_TEMPLATE
    elif name == "qwen_tools":
        tok.chat_template = QWEN_TOOLS_TEMPLATE
    elif name == "qwen3_coder":
        tok.chat_template = QWEN3_CODER_TEMPLATE
    elif name != "smollm2":
        raise ValueError(name)
    return tok


@dataclass
class RecordingEngine:
    """Delegates to a real engine and keeps every (prompt, sample) pair, in call order."""

    engine: Any
    calls: list[tuple[list[int], Any]] = field(default_factory=list)
    rounds: int = 0

    def generate(
        self, prompts: list[list[int]], sampling: Sequence[SamplingParams]
    ) -> list[Sample]:
        self.rounds += 1
        samples = self.engine.generate(prompts, sampling)
        for prompt, sample in zip(prompts, samples, strict=True):
            self.calls.append((list(prompt), sample))
        return samples

    def update_weights(self, model_or_state_dict):
        self.engine.update_weights(model_or_state_dict)


def check_token_in_token_out(trajectories, calls) -> None:
    """Invariants 1-3 (engine side) for a recorded run.

    Every engine call's prompt is exactly ``prompt_ids + response_ids[:start]`` of a trajectory,
    the ids sampled in that call follow verbatim at ``start`` with loss mask 1 and exactly the
    engine's log-probs, and every mask-1 token of every trajectory comes from one such call.
    """
    claimed: list[set[int]] = [set() for _ in trajectories]  # sampled positions per trajectory
    for c, (prompt, sample) in enumerate(calls):
        n = len(sample.token_ids)
        owner = None
        for t_i, traj in enumerate(trajectories):
            start = len(prompt) - len(traj.prompt_ids)
            if (
                start >= 0
                and start not in claimed[t_i]
                and traj.input_ids[: len(prompt)] == prompt
                and traj.response_ids[start : start + n] == sample.token_ids
            ):
                owner = (t_i, start)
                break
        assert owner is not None, (
            f"engine call {c}: its prompt followed by its sample is not in any trajectory "
            "(context re-tokenised or sample altered)"
        )
        t_i, start = owner
        traj = trajectories[t_i]
        assert traj.loss_mask[start : start + n] == [1] * n, f"call {c}: sampled ids not mask 1"
        assert traj.infer_logprobs[start : start + n] == [float(x) for x in sample.logprobs]
        claimed[t_i].update(range(start, start + n))
    for t_i, traj in enumerate(trajectories):
        sampled = {k for k, m in enumerate(traj.loss_mask) if m == 1}
        assert sampled == claimed[t_i], f"trajectory {t_i}: mask-1 tokens the engine did not sample"


@dataclass
class IgnoresStopCondition:
    """A real engine as an engine WITHOUT ``stop_condition`` support: the predicate is dropped,
    so every stop string ends a sample (the engine behaviour before conditional stops)."""

    engine: Any

    def generate(
        self, prompts: list[list[int]], sampling: Sequence[SamplingParams]
    ) -> list[Sample]:
        return self.engine.generate(prompts, [p.replace(stop_condition=None) for p in sampling])

    def update_weights(self, model_or_state_dict):
        self.engine.update_weights(model_or_state_dict)


def force_next_tokens(model, choose, bias: float = 40.0):
    """Add ``bias`` to one logit per row in every forward of ``model`` (a transformers causal LM,
    e.g. an engine's copy): ``choose(last_ids, positions)`` gets the last input id and its
    position id per row (``(B,)`` tensors) and returns the id to force per row (-1: none).

    A +40 logit makes the forced token all but certain (the rest of a 49k vocabulary keeps
    ~e-40 of the mass) while log-probs stay finite. Returns the hook handle (``.remove()``).
    """
    import torch

    def hook(module, args, kwargs, output):
        ids = kwargs["input_ids"]
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(ids.shape[1]).expand_as(ids)
        target = choose(ids[:, -1], positions[:, -1])
        rows = (target >= 0).nonzero().squeeze(-1)
        output.logits[rows, -1, target[rows]] += bias
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


def fence_forever(fence_id: int, newline_id: int):
    """``choose`` for `force_next_tokens`: after ``fence_id`` a newline, else the fence, so the
    policy writes ``"```\\n```\\n```\\n..."`` whatever the prompt (the degenerate turn of the issue)."""
    import torch

    def choose(last, positions):
        return torch.where(last == fence_id, newline_id, fence_id)

    return choose


def scripted(script: list[int], start: int):
    """``choose`` for `force_next_tokens`: the token at position ``start + k`` is ``script[k]``
    (``start`` = the prompt length: every row of the batch must share it)."""
    import torch

    table = torch.tensor(script, dtype=torch.long)

    def choose(last, positions):
        k = positions + 1 - start
        inside = (k >= 0) & (k < len(script))
        return torch.where(inside, table[k.clamp(0, len(script) - 1)], -1)

    return choose


# A scripted policy for PythonToolEnv: known tool failures, a void turn, a graded answer.
FAILING_CODE = "Let me compute.\n```python\nprint(1 / 0)\n```\n"
WORKING_CODE = "```python\nprint(2 + 2)\n```\n"
ANSWER = "The answer is \\boxed{4}."
VOID = "I am not sure what to do."

SCRIPTS = [
    [FAILING_CODE, WORKING_CODE, ANSWER],  # episode 0: one failing and one working call, answer
    [VOID],  # episode 1: a void turn ends it
]


class ProtocolEngine:
    """Replays ``scripts[i]`` turn by turn for the i-th episode of the first call.

    Only what the protocol documents is used: ``sampling`` is a sequence with one entry per
    prompt (``sampling[i]``); a single `SamplingParams` would fail here (not subscriptable).
    """

    def __init__(self, tokenizer: Any, scripts: list[list[str]]) -> None:
        self.tokenizer = tokenizer
        self.scripts = scripts
        self.episodes: list[tuple[list[int], list[str]]] = []  # (initial prompt, turns left)
        self.seen: list[SamplingParams] = []

    def generate(
        self, prompts: list[list[int]], sampling: Sequence[SamplingParams]
    ) -> list[Sample]:
        assert len(sampling) == len(prompts)
        if not self.episodes:
            self.episodes = [(list(p), list(s)) for p, s in zip(prompts, self.scripts, strict=True)]
        out = []
        for prompt, params in zip(prompts, sampling, strict=True):
            self.seen.append(params)
            _, turns = next(e for e in self.episodes if prompt[: len(e[0])] == e[0])
            text = turns.pop(0)
            ids = self.tokenizer.encode(text, add_special_tokens=False)[: params.max_tokens]
            finish = "stop" if any(stop in text for stop in params.stop) else "eos"
            if finish == "eos":
                ids.append(self.tokenizer.convert_tokens_to_ids("<|im_end|>"))
            out.append(Sample(ids, [-0.5] * len(ids), finish))
        return out

    def update_weights(self, model_or_state_dict: Any) -> None:
        """Scripted: no weights."""
