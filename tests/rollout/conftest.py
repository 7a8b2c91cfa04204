"""Fixtures for the rollout tests: three chat templates on the SmolLM2 tokenizer, engines.

* ``smollm2``: the model's own ChatML template (default system prompt "You are a helpful AI
  assistant named SmolLM...").
* ``llama3``: a Llama-3-style template (``<|start_header_id|>role<|end_header_id|>\\n\\n ...
  <|eot_id|>``, BOS text in the template, content trimmed), its special tokens added to a copy
  of the tokenizer; ``<|eot_id|>`` is the end-of-turn/EOS token.
* ``qwen``: a Qwen2.5-style template (default system prompt "You are Qwen, created by Alibaba
  Cloud...", ``tool`` messages grouped into one ``<tool_response>`` user turn).

Engines built for a template cover its vocabulary (added tokens included): tiny random models
for speed, the real SmolLM2 (embeddings resized for added tokens) where behaviour matters.
"""

from __future__ import annotations

import copy

import pytest

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

TEMPLATES = ("smollm2", "llama3", "qwen")


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
    elif name != "smollm2":
        raise ValueError(name)
    return tok


@pytest.fixture(scope="session")
def template_tokenizers(tokenizer):
    return {name: make_template_tokenizer(tokenizer, name) for name in TEMPLATES}


@pytest.fixture(scope="session")
def smollm2_bf16(default_model_path):
    """The real SmolLM2 weights (float32 master copy, like a trainer's)."""
    from alp_agents.models import load_model

    return load_model(default_model_path)


def real_engine_for(model, tok):
    """HFEngine (bf16) on SmolLM2, with embeddings grown to cover ``tok``'s added tokens."""
    from alp_agents.engines import HFEngine

    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model = copy.deepcopy(model)
        model.resize_token_embeddings(len(tok), mean_resizing=True)
    return HFEngine(model, tok)
