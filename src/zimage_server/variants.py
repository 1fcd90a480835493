"""What differs between the Z-Image variants, in one table. Pure data, no torch.

Every "which variant is this" question (default steps, how it edits, whether it takes a mask,
which dtype it runs in, where its weights come from) reads this table instead of comparing names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

EditMethod = Literal["img2img", "omni"]


@dataclass(frozen=True)
class Variant:
    name: str
    repo_id: str | None  # on Hugging Face and ModelScope alike; None: no public checkpoint yet
    pipeline_class: str  # the diffusers class that loads the folder
    default_steps: int  # as the model card recommends
    default_guidance: float
    # "img2img": edits run ZImageImg2Img/Inpaint pipelines built over the loaded modules (one input
    # image, optional mask); "omni": the pipeline itself takes the images as references.
    edit_method: EditMethod
    takes_mask: bool
    # diffusers' ZImageOmniPipeline casts input images with .bfloat16(), so Omni only runs in bf16.
    bf16_only: bool = False

    @property
    def model_name(self) -> str:
        """The name clients send as `model`, and the folder under MODELS_DIR."""
        return f"z-image-{self.name}"


VARIANTS: dict[str, Variant] = {
    variant.name: variant
    for variant in (
        Variant("turbo", "Tongyi-MAI/Z-Image-Turbo", "ZImagePipeline", 8, 0.0, "img2img", takes_mask=True),
        Variant("base", "Tongyi-MAI/Z-Image", "ZImagePipeline", 50, 4.0, "img2img", takes_mask=True),
        # Announced, never published: served only from a user-supplied checkpoint (Z_IMAGE_MODEL_ID).
        Variant("edit", None, "ZImageOmniPipeline", 28, 4.0, "omni", takes_mask=False, bf16_only=True),
    )
}
VARIANT_NAMES = tuple(VARIANTS)
