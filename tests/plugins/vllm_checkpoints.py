"""Tiny checkpoints of the vLLM families for the vLLM tests, and the image-token counts they must get.

Built offline with the demo builders (real transformers classes, random weights), then made loadable by vLLM 0.32:

- a video processor config (vLLM's OneVision, InternVL and Qwen processors insist on one; the builders leave it out so
  that the main venv needs no torchvision), written with the venv's own video processor class (Qwen: with the image
  processor's patch, merge and temporal patch sizes, so that a video's grid is the tower's);
- a chat template (``chat_template.jinja``, string content: vLLM puts the image placeholder before the text), so that
  ``vllm serve`` answers ``/v1/chat/completions`` as for a released checkpoint;
- for the LLaVA families and Cohere2 Vision a second copy whose vision keys are ``vision_tower.vision_model.*``
  (transformers 5.19 writes ``vision_tower.*``; vLLM 0.32 reads the released checkpoints' names);
- Cohere2 Vision's LLM with tied input/output embeddings, as Command-A-Vision's (vLLM's Cohere2 builds no ``lm_head``); transformers loads the first copy. InternVL
  and the Qwen families need no renaming (vLLM maps transformers' names itself): one directory serves both.

The expected counts come from the library's geometry and count functions (the formula), never from the plugin.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: What vLLM puts in a chat prompt for a Qwen image (its ``get_placeholder_str``); only the pad is expanded.
QWEN_IMAGE_TOKEN = "<|vision_start|><|image_pad|><|vision_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {{ message['content'] }}\n"
    "{% else %}ASSISTANT: {{ message['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

#: Gemma 3's: vLLM's string chat-content format puts "\n" after the placeholder, and vLLM 0.32's Gemma 3 processor
#: does not find an image span followed by "\n" (it re-splits the merged "\n\n\n" the other way round): a space
#: goes between them.
GEMMA3_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "{{ message['content'] }}",
    "{{ message['content'] | replace('<start_of_image>\\n', '<start_of_image> \\n') }}",
)

#: Cohere2 Vision's: vLLM has no placeholder string for it, so (as Command-A-Vision's own template does) the template
#: writes ``<|IMG_PATCH|>`` for each image part of a list content (vLLM then renders the "openai" content format);
#: a string content is written as is, so the rendered text is the string-content template's.
COHERE2_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "{{ message['content'] }}",
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|IMG_PATCH|>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}",
)
CHAT_TEMPLATES = {"gemma3": GEMMA3_CHAT_TEMPLATE, "cohere2_vision": COHERE2_CHAT_TEMPLATE}


@dataclass(frozen=True)
class VllmFamily:
    name: str
    builder: str  # "module:function"
    image_token: str  # the prompt placeholder vLLM expands
    architecture: str  # GlobalCom² architecture name (--hf-overrides)
    stock: str  # vLLM's own architecture name
    sizes: tuple[tuple[int, int], ...]  # (height, width): several grids, padding and (InternVL) a lone tile
    max_image_tokens: int  # a budget T under which the first size stays whole and the others are compressed
    video_processor: str | None  # transformers class of the video processor vLLM wants

    def build(self, root: Path) -> tuple[Path, Path]:
        """``(hf_dir, vllm_dir)`` under ``root`` (the same dir for InternVL: its key names need no change)."""
        import importlib

        module, function = self.builder.split(":")
        hf_dir = getattr(importlib.import_module(module), function)(root / f"{self.name}_hf")
        if self.video_processor is not None:
            _add_video_processor(hf_dir, self.video_processor)
        if self.name == "gemma3":
            _add_newline_tokens(hf_dir)
        if self.name == "cohere2_vision":
            _tie_word_embeddings(hf_dir)
        (hf_dir / "chat_template.jinja").write_text(CHAT_TEMPLATES.get(self.name, CHAT_TEMPLATE))
        if self.name in SAME_KEYS or self.is_native:
            return hf_dir, hf_dir
        vllm_dir = root / f"{self.name}_vllm"
        vllm_dir.mkdir()
        for f in hf_dir.iterdir():
            (vllm_dir / f.name).write_bytes(f.read_bytes())
        _rename_vision_keys(vllm_dir)
        return hf_dir, vllm_dir

    def prompt(self, text: str) -> str:
        return f"USER: {self.image_token}\n{text}\nASSISTANT:"

    @property
    def single_tile(self) -> bool:
        """Every image is one tile (Gemma 3 without pan-and-scan): the same count whatever the image size."""
        return self.name == "gemma3"

    @property
    def is_native(self) -> bool:
        """A native-resolution family (Qwen): one ``<|image_pad|>`` run per image, ``int(R * H * W)`` long."""
        return self.name.startswith("qwen")


FAMILIES: dict[str, VllmFamily] = {
    f.name: f
    for f in (
        VllmFamily("llava_next", "globalcom2.demo.tiny_model:build_tiny_llava_next", "<image>",
                   "GlobalCom2LlavaNextForConditionalGeneration", "LlavaNextForConditionalGeneration",
                   ((60, 60), (100, 60), (50, 110), (150, 64), (130, 130)), 150, None),
        VllmFamily("llava_onevision", "globalcom2.demo.tiny_families:build_tiny_llava_onevision", "<image>",
                   "GlobalCom2LlavaOnevisionForConditionalGeneration", "LlavaOnevisionForConditionalGeneration",
                   ((40, 50), (84, 140), (150, 170), (140, 250), (300, 120)), 150,
                   "LlavaOnevisionVideoProcessor"),
        VllmFamily("internvl", "globalcom2.demo.tiny_families:build_tiny_internvl", "<IMG_CONTEXT>",
                   "GlobalCom2InternVLForConditionalGeneration", "InternVLForConditionalGeneration",
                   ((112, 112), (200, 300), (300, 200), (100, 180), (400, 130)), 120,
                   "InternVLVideoProcessor"),
        # Qwen (8 px per merged token, 16 to 1024 tokens): 8x7 stays whole under T = 80, the others have 2 to 6
        # regions of at most 16 x 16 (an odd number of rows, a side under 16 and one over it).
        *(VllmFamily(name, f"globalcom2.demo.tiny_qwen:build_tiny_{name}", QWEN_IMAGE_TOKEN,
                     f"GlobalCom2{stock}", stock, ((60, 60), (100, 60), (50, 110), (150, 200), (300, 120)), 80,
                     video)
          for name, stock, video in (
              ("qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2VLVideoProcessor"),
              ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2VLVideoProcessor"),
              ("qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLVideoProcessor"))),
        VllmFamily("gemma3", "globalcom2.demo.tiny_tiling:build_tiny_gemma3", "<start_of_image> ",
                   "GlobalCom2Gemma3ForConditionalGeneration", "Gemma3ForConditionalGeneration",
                   ((30, 100), (100, 60), (120, 200), (40, 50), (200, 150)), 10, None),
        VllmFamily("idefics3", "globalcom2.demo.tiny_idefics3:build_tiny_idefics3", "<image>",
                   "GlobalCom2Idefics3ForConditionalGeneration", "Idefics3ForConditionalGeneration",
                   ((30, 100), (100, 60), (120, 200), (40, 50), (200, 150)), 80, None),
        # Llama 4 and Cohere2 Vision (64 px tiles, 16 tokens each, up to 6 tiles + the global tile / thumbnail; the
        # span is 2 + t markers and the runs): a lone tile first (19 tokens, whole under T = 40), then 3, 7, 7 and 5
        # tiles (1x2 / 2x1, 2x3, 3x2, 2x2 grids; 53 to 121 tokens, compressed under T). The offline runs of the stock
        # model take sizes[1:4], multi-tile only: stock vLLM 0.32 (CPU) fails on Llama 4's lone tile
        # (LONE_TILE_FAILS_STOCK); the lone tile runs through the GlobalCom² classes in the serving tests.
        *(VllmFamily(name, f"globalcom2.demo.tiny_tiling:build_tiny_{name}", token, f"GlobalCom2{stock}", stock,
                     ((40, 50), (100, 60), (120, 200), (200, 150), (128, 128)), 40, None)
          for name, stock, token in (
              ("llama4", "Llama4ForConditionalGeneration", "<|image|>"),
              ("cohere2_vision", "Cohere2VisionForConditionalGeneration", "<|IMG_PATCH|>"))),
    )
}  # fmt: skip
#: Registered architectures without a tiny checkpoint here, and why (docs/engines.md says so too).
UNTESTED_ARCHITECTURES = {
    "GlobalCom2SmolVLMForConditionalGeneration": "vLLM's SmolVLM processor needs num2words and SmolVLM's video "
    "processor, which the vLLM test environment does not install; the class is Idefics3's mixin on vLLM's SmolVLM",
}
#: Families on which stock vLLM 0.32's CPU build fails for an image of one tile (Llama 4: its patch embedding hands
#: oneDNN a non-contiguous view); the GlobalCom² class encodes it (a contiguous copy).
LONE_TILE_FAILS_STOCK = ("llama4",)
#: Families whose vision keys vLLM reads as transformers writes them (no renamed copy).
SAME_KEYS = ("internvl", "idefics3", "llama4")
#: Families whose image span is ``2 + tiles`` markers around one run per tile (Llama 4: ``<|image_start|>``, the tile
#: separators, ``<|image|>``, ``<|image_end|>``; Cohere2 Vision: ``<|START_OF_IMG|>``, a line break per tile,
#: ``<|END_OF_IMG|>``).
TILE_MARKER_FAMILIES = ("llama4", "cohere2_vision")


def _add_newline_tokens(path: Path) -> None:
    """Give the tiny Gemma 3 tokenizer Gemma's newline tokens ``"\n"`` ... ``"\n\n\n\n"`` (vLLM's Gemma 3 processor
    looks them up in the vocabulary; the tiny byte-level tokenizer has none) and the LLM their embedding rows."""
    import torch
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.add_tokens(["\n", "\n\n", "\n\n\n", "\n\n\n\n"])
    model = Gemma3ForConditionalGeneration.from_pretrained(path)
    torch.manual_seed(0)
    model.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
    model.save_pretrained(path)
    processor.save_pretrained(path)


def _tie_word_embeddings(path: Path) -> None:
    """Tie the tiny Cohere2 Vision's output projection to its token embedding, as Command-A-Vision's LLM is tied:
    vLLM's Cohere2 builds no ``lm_head`` (it reads the embedding) and refuses a checkpoint that has one. The tied
    table is scaled by 0.1: at the random init's scale the tiny tied model repeats its last prompt token whatever the
    image, and the tests need greedy tokens that depend on the kept tokens."""
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path)
    model.config.tie_word_embeddings = model.config.text_config.tie_word_embeddings = True
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(0.1)
    model.lm_head.weight = model.get_input_embeddings().weight
    model.save_pretrained(path)


def _add_video_processor(path: Path, class_name: str) -> None:
    import transformers

    ip = json.loads((path / "processor_config.json").read_text())["image_processor"]
    cls = getattr(transformers, class_name)
    geometry = {k: ip[k] for k in ("patch_size", "merge_size", "temporal_patch_size") if k in ip}
    cls(size=ip["size"], image_mean=ip["image_mean"], image_std=ip["image_std"], **geometry).save_pretrained(
        path
    )


def _rename_vision_keys(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    def renamed(key: str) -> str:
        head = "model." if key.startswith("model.vision_tower.") else ""  # Cohere2 Vision's keys
        prefix, new = f"{head}vision_tower.", f"{head}vision_tower.vision_model."
        return new + key[len(prefix) :] if key.startswith(prefix) and not key.startswith(new) else key

    for f in path.glob("*.safetensors"):
        state = {renamed(k): v for k, v in load_file(f).items()}
        save_file(state, f, metadata={"format": "pt"})


def image_tokens(family: VllmFamily, model_dir: Path, height: int, width: int, options: dict | None) -> int:
    """Prompt tokens one image becomes: uncompressed (``options`` None) or under GlobalCom² ``options``.

    LLaVA families: the ``<image>`` run (thumbnail + crop tokens + one newline per row). InternVL: ``<img>`` + the
    ``<IMG_CONTEXT>`` run + ``</img>``. Qwen: the ``<|image_pad|>`` run, ``int(R * H * W)`` (at least 1) of the
    ``H x W`` merged grid HF's ``smart_resize`` gives (the ``<|vision_start|>``/``<|vision_end|>`` markers are text). Idefics3: its whole span, the markers
    (:func:`layout_tokens`) and the runs.
    """
    from globalcom2 import GlobalComConfig

    config = json.loads((model_dir / "config.json").read_text())
    budget = GlobalComConfig.from_kwargs(**options) if options is not None else None
    if family.is_native:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        from globalcom2.adapters.qwen import qwen_num_image_tokens

        ip = json.loads((model_dir / "processor_config.json").read_text())["image_processor"]
        factor = ip["patch_size"] * ip["merge_size"]
        rh, rw = smart_resize(height, width, factor=factor, min_pixels=ip["size"]["shortest_edge"],
                              max_pixels=ip["size"]["longest_edge"])  # fmt: skip
        merged = (rh // factor) * (rw // factor)
        return merged if budget is None else qwen_num_image_tokens(budget, merged)
    if family.name == "gemma3":
        from globalcom2.adapters.internvl import internvl_num_image_tokens

        layout, per_image = _gemma3_layout(model_dir)
        run = per_image if budget is None else internvl_num_image_tokens(budget, 1, per_image, layout)
        return layout + run
    if family.name == "idefics3":
        from globalcom2.adapters.internvl import internvl_num_image_tokens, num_tiles

        layout, (rows, cols), per_tile = _idefics3_layout(model_dir, height, width)
        tiles = num_tiles(rows, cols)
        run = (
            tiles * per_tile if budget is None else internvl_num_image_tokens(budget, tiles, per_tile, layout)
        )
        return layout + run
    if family.name in TILE_MARKER_FAMILIES:
        from globalcom2.adapters.internvl import internvl_num_image_tokens

        tiles, per_tile = _tile_marker_geometry(model_dir, height, width)
        layout = 2 + tiles
        run = (
            tiles * per_tile if budget is None else internvl_num_image_tokens(budget, tiles, per_tile, layout)
        )
        return layout + run
    if family.name == "internvl":
        from globalcom2.adapters.internvl import (
            IMAGE_MARKERS,
            internvl_num_image_tokens,
            num_tiles,
            tile_grid,
        )

        ip = json.loads((model_dir / "processor_config.json").read_text())
        tile = ip["image_processor"]["size"]
        rows, cols = tile_grid(
            height, width, (tile["height"], tile["width"]), ip["image_processor"]["min_patches"],
            ip["image_processor"]["max_patches"],
        )  # fmt: skip
        tiles, per_tile = num_tiles(rows, cols), int(ip["image_seq_length"])
        run = tiles * per_tile if budget is None else internvl_num_image_tokens(budget, tiles, per_tile)
        return IMAGE_MARKERS + run
    geo = anyres_geometry(config, height, width)
    return geo.num_tokens(None) if budget is None else geo.num_budget_tokens(budget)


def layout_tokens(family: VllmFamily, model_dir: Path, height: int, width: int) -> int:
    """Prompt tokens of one image's span besides its image-token runs (InternVL: ``<img>``, ``</img>``; Idefics3:
    its markers and newlines)."""
    if family.name == "internvl":
        from globalcom2.adapters.internvl import IMAGE_MARKERS

        return IMAGE_MARKERS
    if family.name == "idefics3":
        return _idefics3_layout(model_dir, height, width)[0]
    if family.name == "gemma3":
        return _gemma3_layout(model_dir)[0]
    if family.name in TILE_MARKER_FAMILIES:
        return 2 + _tile_marker_geometry(model_dir, height, width)[0]
    return 0


def _tile_marker_geometry(model_dir: Path, height: int, width: int) -> tuple[int, int]:
    """(tiles, tokens per tile) of one Llama 4 / Cohere2 Vision image: the tiles transformers' image processor makes
    for an image of that size (global tile / thumbnail included), the tokens per tile from its processor."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    image = Image.new("RGB", (width, height))
    tiles = int(processor.image_processor(images=[image], return_tensors="pt")["pixel_values"].shape[0])
    if hasattr(processor, "downsample_ratio"):  # Llama 4: patches per tile over the pixel shuffle's merge
        side = int(processor.image_processor.size["height"]) // int(processor.patch_size)
        return tiles, side * side // int(processor.downsample_ratio)
    return tiles, int(processor.patch_size) ** 2  # Cohere2 Vision: tokens per tile side


def _gemma3_layout(model_dir: Path) -> tuple[int, int]:
    """(layout tokens, tokens per image) of one Gemma 3 image without pan-and-scan: the processor's image sequence
    (``"\n\n<start_of_image>"`` + the run + ``"<end_of_image>\n\n"``) tokenised, the run left out."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    tok, n = processor.tokenizer, int(processor.image_seq_length)
    ids = tok(processor.full_image_sequence, add_special_tokens=False)["input_ids"]
    return len(ids) - n, n


def _idefics3_layout(model_dir: Path, height: int, width: int) -> tuple[int, tuple[int, int], int]:
    """(layout tokens, crop grid, tokens per crop) of one Idefics3 image: the grid by transformers' image processor,
    the layout by the library's formula (:func:`~globalcom2.adapters.idefics3.idefics3_layout_tokens`) with the
    tokenizer's count of ``"\n\n"``."""
    from transformers import AutoProcessor

    from globalcom2.adapters.idefics3 import idefics3_layout_tokens

    processor = AutoProcessor.from_pretrained(model_dir)
    _, rows, cols = processor.image_processor.get_number_of_image_patches(height, width, {})
    rows, cols = max(int(rows), 1), max(int(cols), 1)
    pair = len(processor.tokenizer("\n\n", add_special_tokens=False)["input_ids"])
    return idefics3_layout_tokens(rows, cols, pair), (rows, cols), int(processor.image_seq_len)


def anyres_geometry(config: dict, height: int, width: int) -> Any:
    """The LLaVA-NeXT / OneVision geometry of one image from a config.json (OneVision down-samples large grids)."""
    from globalcom2.adapters.anyres import anyres_geometry as geometry
    from globalcom2.adapters.llava_onevision import anyres_max_shape, parse_anyres_max

    tile, patch = config["vision_config"]["image_size"], config["vision_config"]["patch_size"]
    token_grid: Callable[..., tuple[int, int]] | None = None
    if "vision_aspect_ratio" in config:
        max_tiles = parse_anyres_max(config["vision_aspect_ratio"])

        def token_grid(box: tuple[int, int, int, int], g: int) -> tuple[int, int]:
            return anyres_max_shape(box[1] - box[0], box[3] - box[2], g, max_tiles)

    return geometry((height, width), config["image_grid_pinpoints"], tile, tile // patch, token_grid)


def lazy_checkpoints(tmp_path_factory: Any, prefix: str) -> Callable[[str], tuple[Path, Path]]:
    """Family name -> (HF dir, vLLM dir) of its tiny checkpoint, each built on first use under ``prefix_<name>``
    (the body of the test modules' ``checkpoints`` fixtures)."""
    built: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in built:
            built[name] = FAMILIES[name].build(tmp_path_factory.mktemp(f"{prefix}_{name}"))
        return built[name]

    return get
