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

from .rollout_helpers import TEMPLATES, make_template_tokenizer


@pytest.fixture(scope="session")
def template_tokenizers(tokenizer):
    return {name: make_template_tokenizer(tokenizer, name) for name in TEMPLATES}


@pytest.fixture(scope="session")
def smollm2_bf16(default_model_path):
    """The real SmolLM2 weights (float32 master copy, like a trainer's)."""
    from alp_agents.models import load_model

    return load_model(default_model_path)


# Added Llama-3 tokens start as copies of their ChatML counterparts, so the 135M model still
# follows the conversation (and, with tied embeddings, samples <|eot_id|> as it would <|im_end|>).
COUNTERPARTS = {
    "<|begin_of_text|>": "<|endoftext|>",
    "<|start_header_id|>": "<|im_start|>",
    "<|end_header_id|>": "\n",
    "<|eot_id|>": "<|im_end|>",
}


def real_engine_for(model, tok):
    """HFEngine on SmolLM2, with embeddings grown to cover ``tok``'s added tokens: bf16 where
    the CPU runs it natively, else float32 (bf16 is ~100x slower there; alp_agents.models.precision).
    """
    import torch

    from alp_agents.models.precision import resolve_engine_precision
    from alp_agents.rollout.engines import HFEngine

    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model = copy.deepcopy(model)
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        with torch.no_grad():
            for new, old in COUNTERPARTS.items():
                new_id = tok.convert_tokens_to_ids(new)
                old_id = tok.encode(old, add_special_tokens=False)[0]
                emb[new_id] = emb[old_id]
                head[new_id] = head[old_id]
    dtype, _ = resolve_engine_precision("auto", "cpu", training=False)
    return HFEngine(model, tok, dtype=dtype)
