"""lmms-eval model plugin: lmms-eval's HF LLaVA model with GlobalCom² applied (paper Sec. 4, Eq. 1-6).

Registered through the ``lmms_eval.models`` entry point (see :func:`globalcom2.plugins.lmms_eval_manifests`) as
``globalcom2_llava_hf``: the chat class :class:`GlobalComLlavaHfChat` by default (as for lmms-eval's own
``llava_hf``), the simple class :class:`GlobalComLlavaHf` with ``--force_simple``. Every ``llava_hf`` model argument
still works; our options ride along in ``--model_args``::

    accelerate launch --num_processes 8 -m lmms_eval --model globalcom2_llava_hf \\
        --model_args pretrained=llava-hf/llava-v1.6-vicuna-7b-hf,ratio=0.25,allocation=softmax-sum \\
        --tasks pope --batch_size 1

``max_image_tokens=T`` instead of ``ratio=R`` caps every image at T visual tokens (newlines included) at the
largest retention that fits (:class:`globalcom2.GlobalComConfig`); passing both is an error.

Data parallelism is lmms-eval's own (one model per process, each process applies GlobalCom² to its copy). The
options are validated before the checkpoint is loaded, so a typo fails in seconds.

``loglikelihood`` is our own, not lmms-eval's: the host class measures the context length on the prompt *without*
its images, so with LLaVA-NeXT's hundreds of expanded ``<image>`` placeholders it scores the placeholders and the
prompt tail as if they were continuation, and it compares greedy tokens one position off. That would make compressed
and uncompressed numbers incomparable (their placeholder counts differ), so we score the continuation tokens only.
The return convention stays lmms-eval's: ``(mean negative log-likelihood of the continuation, is_greedy)`` — tasks
take the argmin.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
import torch.nn.functional as F

from ..apply import apply
from ..config import GlobalComConfig
from ..extras import MissingDependencyError, install_command, optional_imports

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.models.chat.llava_hf import LlavaHf as _HostChat
    from lmms_eval.models.simple.llava_hf import VICUNA_CHAT_TEMPLATE
    from lmms_eval.models.simple.llava_hf import LlavaHf as _HostSimple
    from loguru import logger as eval_logger
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError(
        f"globalcom2.plugins.lmms_eval needs lmms-eval (>=0.7.3,<0.8): {install_command('lmms_eval')}",
        name="lmms_eval",
    ) from exc

#: ``--model_args`` keys that belong to GlobalCom² (everything else goes to lmms-eval's ``llava_hf``).
OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(GlobalComConfig))
IMAGE_TOKEN = "<image>"


def split_model_args(kwargs: dict[str, Any]) -> tuple[GlobalComConfig, dict[str, Any]]:
    """Split lmms-eval keyword arguments into a validated :class:`GlobalComConfig` and the host's arguments.

    Raises:
        ValueError / TypeError: an invalid GlobalCom² option (raised before any checkpoint is loaded).
    """
    ours = {k: kwargs[k] for k in OPTION_NAMES if k in kwargs}
    rest = {k: v for k, v in kwargs.items() if k not in ours}
    return GlobalComConfig.from_kwargs(**ours), rest


def _num_processes() -> int:
    with optional_imports("the lmms-eval plugin"):
        from accelerate import PartialState

    return int(PartialState().num_processes)


class _GlobalComMixin:
    """Applies GlobalCom² to the host's model and processor after the host has loaded them."""

    globalcom: Any  # the GlobalComHandle
    # Provided by lmms-eval's LlavaHf:
    model: Any
    tokenizer: Any
    chat_template: str | None
    task_dict: dict
    _image_processor: Any
    _device: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        config, host_kwargs = split_model_args(kwargs)
        if not host_kwargs.get("device_map") and _num_processes() == 1:
            # The host's default device_map="" means "no map" but transformers 5 refuses it; one process: same
            # meaning, spelled as the device. (Several processes: the host sets cuda:<rank> itself.)
            host_kwargs["device_map"] = str(host_kwargs.get("device") or "cuda")
        super().__init__(*args, **host_kwargs)  # type: ignore[call-arg]
        # `self.model` is the unwrapped module under accelerate; patches land on it and its processor.
        self.globalcom = apply(self.model, self._image_processor, config)
        #: Running totals over this process's requests: images, visual tokens sent to the LLM, and without GlobalCom².
        self.globalcom_stats = {"images": 0, "visual_tokens": 0, "visual_tokens_full": 0}
        self._globalcom_seen: list | None = None
        self.globalcom.add_hook(self.model.register_forward_hook(self._globalcom_count))
        eval_logger.info(f"GlobalCom² applied to {type(self.model).__name__}: {config}")

    def _globalcom_count(self, module: Any, args: Any, output: Any) -> None:
        plans = self.globalcom.plans  # a new list after every packing; decode steps reuse it
        if plans and plans is not self._globalcom_seen:
            self._globalcom_seen = plans
            self.globalcom_stats["images"] += len(plans)
            self.globalcom_stats["visual_tokens"] += sum(p.num_tokens for p in plans)
            self.globalcom_stats["visual_tokens_full"] += sum(p.num_tokens_full for p in plans)

    def _globalcom_log(self) -> None:
        s = self.globalcom_stats
        if s["images"]:
            cfg = self.globalcom.config
            budget = (
                f"R={cfg.ratio}"
                if cfg.max_image_tokens is None
                else f"max_image_tokens={cfg.max_image_tokens}"
            )
            eval_logger.info(
                f"GlobalCom² ({budget}): {s['images']} images, visual tokens "
                f"{s['visual_tokens_full']} -> {s['visual_tokens']} ({s['visual_tokens'] / s['visual_tokens_full']:.1%})"
            )

    def generate_until(self, requests: list[Instance]) -> list:
        results = super().generate_until(requests)  # type: ignore[misc]
        self._globalcom_log()
        return results

    # -- log-likelihood (continuation tokens only; see the module docstring) ----------------------------------
    def _loglikelihood_texts(self, context: str, continuation: str, num_images: int) -> tuple[str, str]:
        """The prompt and prompt + continuation, built exactly as lmms-eval's ``llava_hf`` builds them."""
        if num_images:
            context = f"{' '.join([IMAGE_TOKEN] * num_images)}\n{context}"
        messages = [{"role": "user", "content": context}, {"role": "assistant", "content": continuation}]
        if self.chat_template is not None:
            self.tokenizer.chat_template = self.chat_template
        elif self.tokenizer.chat_template is None:
            self.tokenizer.chat_template = VICUNA_CHAT_TEMPLATE
        prompt = self.tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        return prompt, full

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Mean NLL of each request's continuation given its context and images, and whether it is greedy.

        Args:
            requests: ``Instance`` objects whose ``args`` are ``(context, continuation or doc_to_target,
                doc_to_visual, doc_id, task, split)`` (lmms-eval's loglikelihood request layout).

        Returns:
            One ``(mean_nll, is_greedy)`` per request, in order.
        """
        results: list[tuple[float, bool]] = []
        for context, doc_to_target, doc_to_visual, doc_id, task, split in [req.args for req in requests]:
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            visuals = list(doc_to_visual(doc) or [])
            prompt, full = self._loglikelihood_texts(context, continuation, len(visuals))
            images = visuals or None
            inputs = self._image_processor(text=[full], images=images, return_tensors="pt")
            # The context with its images expanded exactly as in `full` (same processor, same images).
            context_ids = self._image_processor(text=[prompt], images=images, return_tensors="pt")[
                "input_ids"
            ]
            input_ids = inputs["input_ids"]
            num_cont = int(input_ids.shape[1] - context_ids.shape[1])
            if num_cont <= 0:  # an empty continuation has log-probability 0 and is trivially greedy
                results.append((0.0, True))
                continue
            inputs = inputs.to(self._device, self.model.dtype)
            with torch.inference_mode():
                logits = self.model(**inputs).logits
            # Align from the end: in reference mode the model shrinks the image run inside the forward.
            pred = logits[0, -num_cont - 1 : -1].float()
            target = input_ids[0, -num_cont:].to(pred.device)
            nll = F.cross_entropy(pred, target)
            results.append((float(nll), bool((pred.argmax(-1) == target).all())))
        self._globalcom_log()
        return results


class GlobalComLlavaHf(_GlobalComMixin, _HostSimple):
    """lmms-eval's simple ``llava_hf`` with GlobalCom² (``--model globalcom2_llava_hf --force_simple``).

    Accepts every ``llava_hf`` argument plus the GlobalCom² options (``ratio`` or ``max_image_tokens``, ``mode``,
    ``allocation``, ``scoring``, ``alpha``, ``tau``, ``score``, ``importance``; see
    :class:`globalcom2.GlobalComConfig`).
    The handle is ``self.globalcom`` (``.plans`` of the last forward, ``.remove()``).
    """

    is_simple = True


class GlobalComLlavaHfChat(_GlobalComMixin, _HostChat):
    """lmms-eval's chat ``llava_hf`` with GlobalCom² (the default class of ``--model globalcom2_llava_hf``)."""

    is_simple = False


__all__ = ["OPTION_NAMES", "GlobalComLlavaHf", "GlobalComLlavaHfChat", "split_model_args"]
