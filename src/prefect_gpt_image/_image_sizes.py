"""The sizes the model makes, in one place: the block's default and the forms' choices.

A successor model with other sizes changes this list (and the block's `supported_sizes`);
prompt files and `ImageRequest`s can ask for any size the block allows.
"""

from __future__ import annotations

from typing import Literal, get_args

ImageSize = Literal["1024x1024", "1536x1024", "1024x1536"]
"""Square, landscape and portrait: the sizes every GPT Image model makes (gpt-image-2 and later
take more; see `model_table.SizeRule`)."""

IMAGE_SIZES: tuple[str, ...] = get_args(ImageSize)


def parse_size(size: str) -> tuple[int, int]:
    """`"1536x1024"` as `(1536, 1024)`."""
    width, _, height = size.partition("x")
    return int(width), int(height)
