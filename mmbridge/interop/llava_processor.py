"""The processor files and generation config of an exported LLaVA: what our `Processor` does, in
transformers' own classes (no remote code)."""

from __future__ import annotations

from mmbridge.interop.chat_template import multimodal_template
from mmbridge.models.language import IMAGE_TOKEN


def image_processor(size: int, mean, std):
    """Resize to size×size (bicubic, no crop, no padding), scale to [0, 1], normalise: `data.images.preprocess`.

    Saved as `LlavaImageProcessor`; transformers' PIL backend reproduces ours exactly, its torchvision backend
    (chosen when torchvision is installed) resizes differently: pass `backend="pil"` to match bit for bit."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    square = {"height": int(size), "width": int(size)}
    return LlavaImageProcessorPil(
        do_resize=True,
        size=square,
        resample=3,
        do_center_crop=False,
        crop_size=square,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(mean),
        image_std=list(std),
        do_convert_rgb=True,
        do_pad=False,
    )


def next_image_processor(size: int, mean, std, pinpoints):
    """LLaVA-NeXT's image processor set to our AnyRes: the global view resized to size×size (no crop), tiles from
    the image resized to fit its grid, centred on black (data/tiling.py)."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    square = {"height": int(size), "width": int(size)}
    return LlavaNextImageProcessorPil(
        do_resize=True,
        size=square,
        resample=3,
        do_center_crop=False,
        crop_size=square,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(mean),
        image_std=list(std),
        do_convert_rgb=True,
        image_grid_pinpoints=[list(p) for p in pinpoints],
    )


def llava_processor(processor, plan, system_prompt: str | None):
    """A LlavaProcessor (LlavaNextProcessor under AnyRes) equivalent to our `processor` (tokenizer with one
    multimodal chat template)."""
    import copy

    from transformers import LlavaNextProcessor, LlavaProcessor

    tok = copy.deepcopy(processor.tokenizer)
    template = tok.chat_template
    if not isinstance(template, str) or not template:
        raise ValueError(
            f"{type(tok).__name__}: the run's tokenizer has no single chat template to export "
            f"(got {type(template).__name__})"
        )
    template = multimodal_template(template, system_prompt)
    tok.chat_template = template
    if getattr(plan, "pinpoints", None):
        return LlavaNextProcessor(
            image_processor=next_image_processor(
                plan.image_size, processor.image_mean, processor.image_std, plan.pinpoints
            ),
            tokenizer=tok,
            patch_size=plan.patch_size,
            vision_feature_select_strategy=plan.strategy,
            chat_template=template,
            image_token=IMAGE_TOKEN,
            num_additional_image_tokens=plan.num_additional_image_tokens,
        )
    return LlavaProcessor(
        image_processor=image_processor(plan.image_size, processor.image_mean, processor.image_std),
        tokenizer=tok,
        patch_size=plan.patch_size,
        vision_feature_select_strategy=plan.strategy,
        chat_template=template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=plan.num_additional_image_tokens,
    )


def generation_config(processor, suppressed: list[int]):
    """Greedy decoding that stops where ours does (EOS and the template's end-of-turn token); token ids the
    LM never had (the image token's zero row) are suppressed."""
    from transformers import GenerationConfig

    tok = processor.tokenizer
    return GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=list(processor.stop_token_ids),
        pad_token_id=processor.pad_id,
        do_sample=False,
        suppress_tokens=list(suppressed) or None,
    )
