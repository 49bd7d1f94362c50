"""Engine plugins: GlobalCom² (paper Sec. 4, Eq. 1-6) inside lmms-eval and vLLM, loaded through entry points.

Both hosts are optional extras (``pip install "globalcom2[lmms-eval]"`` / ``"globalcom2[vllm]"``). This module is
what the entry points name, so it imports neither host: each function imports its plugin module only when the host
calls it (and the host is then installed by definition).

- ``lmms_eval.models`` -> :func:`lmms_eval_manifests`: model names ``globalcom2_llava_hf`` (and its alias
  ``globalcom2_llava_hf_chat``), built on lmms-eval's ``llava_hf``; see :mod:`globalcom2.plugins.lmms_eval`.
- ``vllm.general_plugins`` -> :func:`register_vllm`: the architectures of :data:`VLLM_ARCHITECTURES` (budget mode),
  switched on per model with ``--hf-overrides``; see :mod:`globalcom2.plugins.vllm` (LLaVA-NeXT, LLaVA-OneVision,
  InternVL), :mod:`globalcom2.plugins.vllm_qwen` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) and
  :mod:`globalcom2.plugins.vllm_markers` (Idefics3, SmolVLM, Gemma 3, Llama 4, Cohere2 Vision).
"""

from __future__ import annotations

from typing import Any, NamedTuple

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


class VllmArchitecture(NamedTuple):
    """One GlobalCom² architecture for vLLM: the stock architecture it replaces and where its class lives."""

    stock: str
    class_name: str
    module: str = "globalcom2.plugins.vllm"


_QWEN_MODULE = "globalcom2.plugins.vllm_qwen"
_MARKERS_MODULE = "globalcom2.plugins.vllm_markers"
#: vLLM architecture name -> :class:`VllmArchitecture` (stock name, class name, module).
VLLM_ARCHITECTURES: dict[str, VllmArchitecture] = {
    "GlobalCom2LlavaNextForConditionalGeneration": VllmArchitecture(
        "LlavaNextForConditionalGeneration", "GlobalComLlavaNextForConditionalGeneration"
    ),
    "GlobalCom2LlavaOnevisionForConditionalGeneration": VllmArchitecture(
        "LlavaOnevisionForConditionalGeneration", "GlobalComLlavaOnevisionForConditionalGeneration"
    ),
    "GlobalCom2InternVLForConditionalGeneration": VllmArchitecture(
        "InternVLForConditionalGeneration", "GlobalComInternVLForConditionalGeneration"
    ),
    "GlobalCom2Qwen2VLForConditionalGeneration": VllmArchitecture(
        "Qwen2VLForConditionalGeneration", "GlobalComQwen2VLForConditionalGeneration", _QWEN_MODULE
    ),
    "GlobalCom2Qwen2_5_VLForConditionalGeneration": VllmArchitecture(
        "Qwen2_5_VLForConditionalGeneration", "GlobalComQwen2_5_VLForConditionalGeneration", _QWEN_MODULE
    ),
    "GlobalCom2Qwen3VLForConditionalGeneration": VllmArchitecture(
        "Qwen3VLForConditionalGeneration", "GlobalComQwen3VLForConditionalGeneration", _QWEN_MODULE
    ),
    "GlobalCom2Idefics3ForConditionalGeneration": VllmArchitecture(
        "Idefics3ForConditionalGeneration", "GlobalComIdefics3ForConditionalGeneration", _MARKERS_MODULE
    ),
    "GlobalCom2SmolVLMForConditionalGeneration": VllmArchitecture(
        "SmolVLMForConditionalGeneration", "GlobalComSmolVLMForConditionalGeneration", _MARKERS_MODULE
    ),
    "GlobalCom2Gemma3ForConditionalGeneration": VllmArchitecture(
        "Gemma3ForConditionalGeneration", "GlobalComGemma3ForConditionalGeneration", _MARKERS_MODULE
    ),
    "GlobalCom2Llama4ForConditionalGeneration": VllmArchitecture(
        "Llama4ForConditionalGeneration", "GlobalComLlama4ForConditionalGeneration", _MARKERS_MODULE
    ),
    "GlobalCom2Cohere2VisionForConditionalGeneration": VllmArchitecture(
        "Cohere2VisionForConditionalGeneration",
        "GlobalComCohere2VisionForConditionalGeneration",
        _MARKERS_MODULE,
    ),
}
#: The LLaVA-NeXT architecture name (``--hf-overrides '{"architectures": [...]}'``); see :data:`VLLM_ARCHITECTURES`.
VLLM_ARCHITECTURE = "GlobalCom2LlavaNextForConditionalGeneration"
#: HF-config attribute holding the vLLM options (a dict of ``GlobalComConfig`` fields), set by ``--hf-overrides``.
VLLM_CONFIG_KEY = "globalcom2"
#: Environment variable with JSON options; when set, vLLM's stock architectures of every family above are replaced.
VLLM_ENV_VAR = "GLOBALCOM2_VLLM"


def register_vllm() -> None:
    """Register the GlobalCom² models with vLLM (entry-point group ``vllm.general_plugins``).

    Runs in every vLLM process; idempotent. The model module is named by string, so vLLM imports it (and its
    CUDA-touching dependencies) only when a model actually uses it. With ``GLOBALCOM2_VLLM`` set, the stock names
    (``VllmArchitecture.stock``, e.g. ``LlavaNextForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``)
    resolve to the GlobalCom² classes too.
    """
    import os

    from vllm import ModelRegistry

    replace_stock = bool(os.environ.get(VLLM_ENV_VAR))
    for name, arch in VLLM_ARCHITECTURES.items():
        path = f"{arch.module}:{arch.class_name}"
        ModelRegistry.register_model(name, path)
        if replace_stock:
            ModelRegistry.register_model(arch.stock, path)


__all__ = [
    "LMMS_EVAL_MODELS",
    "VLLM_ARCHITECTURE",
    "VLLM_ARCHITECTURES",
    "VLLM_CONFIG_KEY",
    "VLLM_ENV_VAR",
    "VllmArchitecture",
    "lmms_eval_manifests",
    "register_vllm",
]
