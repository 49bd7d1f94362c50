"""Engine plugins: GlobalCom² (paper Sec. 4, Eq. 1-6) inside lmms-eval and vLLM, loaded through entry points.

Both hosts are optional extras (``pip install "globalcom2[lmms-eval]"`` / ``"globalcom2[vllm]"``). This module is
what the entry points name, so it imports neither host: each function imports its plugin module only when the host
calls it (and the host is then installed by definition).

- ``lmms_eval.models`` -> :func:`lmms_eval_manifests`: model names ``globalcom2_llava_hf`` (and its alias
  ``globalcom2_llava_hf_chat``), built on lmms-eval's ``llava_hf``; see :mod:`globalcom2.plugins.lmms_eval`.
- ``vllm.general_plugins`` -> :func:`register_vllm`: the architecture ``GlobalCom2LlavaNextForConditionalGeneration``
  (budget mode), switched on per model with ``--hf-overrides``; see :mod:`globalcom2.plugins.vllm`.
"""

from __future__ import annotations

from typing import Any

#: lmms-eval model id -> (simple class, chat class) in :mod:`globalcom2.plugins.lmms_eval`.
LMMS_EVAL_MODELS: dict[str, tuple[str, str]] = {
    "globalcom2_llava_hf": ("GlobalComLlavaHf", "GlobalComLlavaHfChat"),
}


def lmms_eval_manifests() -> list[Any]:
    """Model manifests for lmms-eval's registry (entry-point group ``lmms_eval.models``).

    Only class *paths* are handed over: lmms-eval imports the classes when a model is requested, so its registry
    (which calls this while ``lmms_eval.models`` is still initialising) never imports transformers models.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    module = "globalcom2.plugins.lmms_eval"
    return [
        ModelManifest(
            model_id=name,
            simple_class_path=f"{module}.{simple}",
            chat_class_path=f"{module}.{chat}",
            aliases=(f"{name}_chat",),
        )
        for name, (simple, chat) in LMMS_EVAL_MODELS.items()
    ]


#: vLLM architecture name to put in ``--hf-overrides '{"architectures": [...]}'``.
VLLM_ARCHITECTURE = "GlobalCom2LlavaNextForConditionalGeneration"
#: HF-config attribute holding the vLLM options (a dict of ``GlobalComConfig`` fields), set by ``--hf-overrides``.
VLLM_CONFIG_KEY = "globalcom2"
#: Environment variable with JSON options; when set, vLLM's stock LLaVA-NeXT architecture is replaced too.
VLLM_ENV_VAR = "GLOBALCOM2_VLLM"
_VLLM_STOCK_ARCHITECTURE = "LlavaNextForConditionalGeneration"
_VLLM_CLASS_PATH = "globalcom2.plugins.vllm:GlobalComLlavaNextForConditionalGeneration"


def register_vllm() -> None:
    """Register the GlobalCom² LLaVA-NeXT variant with vLLM (entry-point group ``vllm.general_plugins``).

    Runs in every vLLM process; idempotent. The model module is named by string, so vLLM imports it (and its
    CUDA-touching dependencies) only when a model actually uses it.
    """
    import os

    from vllm import ModelRegistry

    ModelRegistry.register_model(VLLM_ARCHITECTURE, _VLLM_CLASS_PATH)
    if os.environ.get(VLLM_ENV_VAR):
        ModelRegistry.register_model(_VLLM_STOCK_ARCHITECTURE, _VLLM_CLASS_PATH)


__all__ = [
    "LMMS_EVAL_MODELS",
    "VLLM_ARCHITECTURE",
    "VLLM_CONFIG_KEY",
    "VLLM_ENV_VAR",
    "lmms_eval_manifests",
    "register_vllm",
]
