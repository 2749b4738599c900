"""Placements, planned before anything is paid: the master's size, the images each placement
is cut from, the requests that make them, what they cost, and what to refuse.

Each prompt gets one master. With `adapt="crop"` every placement is cut from it; with
`"extend"` a placement of another aspect is cut from an edit that extends the master's
canvas to that aspect; with `"generate"` from a generation at that aspect. Placements that
come out at the same size the model makes share one such image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from prefect_gpt_image._billing import worst_case_over_routes
from prefect_gpt_image._edits import checked_edit
from prefect_gpt_image._image_sizes import parse_size
from prefect_gpt_image._renditions import check_fits, extension_canvas, same_aspect
from prefect_gpt_image._routes import serving_routes
from prefect_gpt_image.errors import InvalidRequestError
from prefect_gpt_image.model_table import REFERENCE_PIXELS, ModelSpec, SizeRule
from prefect_gpt_image.models import GeneratedImage, ImageRequest
from prefect_gpt_image.placement_table import Adapt, Placement

if TYPE_CHECKING:
    from prefect_gpt_image._routes import Route

Size = tuple[int, int]

EXTEND_INSTRUCTION = (
    "Extend this image into the transparent area so that it fills the whole {size} canvas "
    "as one continuous scene; keep the existing picture exactly as it is."
)
"""What an extension's edit asks for, after the prompt the master was made with."""


@dataclass(frozen=True)
class Source:
    """An image renditions are cut from: the master, or one made for other aspects."""

    size: Size
    placements: tuple[Placement, ...]
    kind: Adapt | None = None
    """None for the master; else how the image is made: "extend" or "generate"."""


class Campaign:
    """A run's placements and how they are adapted: the plan of each prompt's images."""

    def __init__(
        self,
        placements: Sequence[Placement],
        adapt: Adapt,
        routes: Sequence[Route],
        master_size: Size | None = None,
    ) -> None:
        """`master_size`: the size every master is made at, where the caller chose one;
        else it is chosen from the placements and the model (`choose_master_size`)."""
        self.placements = tuple(placements)
        self.adapt = adapt
        self.routes = list(routes)
        self.master_size = master_size

    def master(self, request: ImageRequest) -> ImageRequest:
        """`request` at its master's size."""
        width, height = self.master_size or choose_master_size(
            self._spec(request), self.placements, self.adapt
        )
        return request.model_copy(update={"width": width, "height": height})

    def sources(self, master: ImageRequest) -> list[Source]:
        """The images `master`'s placements are cut from: the master first."""
        return plan_sources(
            self._spec(master), self.placements, self.adapt, (master.width, master.height)
        )

    def master_placements(self, master: ImageRequest) -> tuple[Placement, ...]:
        return self.sources(master)[0].placements

    def derived(
        self, master: ImageRequest, image: GeneratedImage | None = None
    ) -> list[tuple[ImageRequest, tuple[Placement, ...]]]:
        """The requests for the master's other sources, with the placements each serves.
        An extension needs the master's `image`; without it, a stand-in of its size is
        extended, for pricing."""
        derived = []
        for source in self.sources(master)[1:]:
            request = source_request(master, source, image.data if image else None)
            derived.append((request, source.placements))
        return derived

    def worst_case_usd(self, master: ImageRequest, *, batch_api: bool = False) -> float:
        """The most a master and its other sources can cost (the sources synchronously)."""
        cost = worst_case_over_routes(master, self.routes, batch=batch_api)
        for request, _ in self.derived(master):
            cost += worst_case_over_routes(request, self.routes)
        return round(cost, 6)

    def check(self, requests: Sequence[ImageRequest]) -> list[ImageRequest]:
        """Refuse, before anything is paid, what cannot be delivered: a byte limit no image
        could meet, an `n` above one, an extension without a route that edits, a source no
        route can make. Returns the requests at their masters' sizes."""
        for placement in self.placements:
            check_fits(placement)
        masters = []
        for request in requests:
            if request.n != 1:
                raise InvalidRequestError(
                    f"Placements take one image per prompt (prompt {request.label!r} asks "
                    f"for n={request.n}): set n to 1."
                )
            master = self.master(request)
            for source_request, _ in self.derived(master):
                if source_request.is_edit and not any(
                    route.can_edit for route in serving_routes(source_request, self.routes)
                ):
                    raise InvalidRequestError(
                        'adapt="extend" extends each master with an image edit, and no route '
                        "of this run edits images: add an OpenAI-protocol route whose model "
                        'edits, or use adapt="crop" or "generate".'
                    )
                for route in serving_routes(source_request, self.routes):
                    route.check_request(source_request)
            masters.append(master)
        return masters

    def safe_zones(self) -> dict[str, str]:
        """The placements with a safe zone, and what it keeps free."""
        return {p.name: p.safe_zone.describe() for p in self.placements if p.safe_zone}

    def _spec(self, request: ImageRequest) -> ModelSpec:
        """The model of the first route that serves `request`: the one that makes it."""
        return serving_routes(request, self.routes)[0].model_spec()


ADAPT_STRATEGIES: tuple[Adapt, ...] = ("crop", "extend", "generate")


def price_strategies(
    requests: Sequence[ImageRequest],
    placements: Sequence[Placement],
    route: Route,
    master_size: Size | None = None,
) -> dict[Adapt, float | str]:
    """What delivering `requests` at `placements` through `route` costs at worst with each
    `adapt` strategy, or why the strategy cannot run there."""
    prices: dict[Adapt, float | str] = {}
    for adapt in ADAPT_STRATEGIES:
        campaign = Campaign(placements, adapt, [route], master_size)
        try:
            masters = campaign.check(requests)
        except InvalidRequestError as exc:
            prices[adapt] = str(exc)
            continue
        prices[adapt] = round(sum(campaign.worst_case_usd(master) for master in masters), 6)
    return prices


def choose_master_size(spec: ModelSpec, placements: Sequence[Placement], adapt: Adapt) -> Size:
    """The size a master is made at to serve `placements` best.

    - crop: the aspect whose worst crop over the placements keeps the most (the geometric
      mean of the widest and the tallest aspects the model makes), and the fewest pixels
      that cut every placement without enlarging it, within the model's sizes that are not
      experimental and no fewer than a 1024x1024 image's;
    - extend and generate: the first placement's aspect (the campaign's lead), at the same
      floor; the others are extended from it, or generated at their own.
    """
    if adapt != "crop":
        lead = placements[0]
        return nearest_size(spec, lead.aspect, max(REFERENCE_PIXELS, lead.width * lead.height))
    low, high = _aspect_range(spec)
    aspects = [min(max(p.aspect, low), high) for p in placements]
    target = math.sqrt(min(aspects) * max(aspects))
    if spec.sizes is not None:
        return max(
            _listed_sizes(spec),
            key=lambda size: (_kept_at_worst(size, aspects), size[0] * size[1]),
        )
    needed = max(
        p.width**2 / target if p.aspect >= target else p.height**2 * target for p in placements
    )
    return nearest_size(spec, target, round(needed))


def plan_sources(
    spec: ModelSpec, placements: Sequence[Placement], adapt: Adapt, master: Size
) -> list[Source]:
    """The master and the other images `placements` are cut from, each with its placements."""
    if adapt == "crop":
        return [Source(master, tuple(placements))]
    area = master[0] * master[1]
    by_size: dict[Size, list[Placement]] = {master: []}
    for placement in placements:
        if same_aspect(*master, placement.width, placement.height):
            by_size[master].append(placement)
            continue
        if adapt == "extend":  # a canvas that holds the master whole, at the master's scale
            ratio = placement.aspect / (master[0] / master[1])
            size = nearest_size(spec, placement.aspect, round(area * max(ratio, 1 / ratio)))
        else:
            size = nearest_size(
                spec, placement.aspect, max(area, placement.width * placement.height)
            )
        size = next((known for known in by_size if same_aspect(*known, *size)), size)
        by_size.setdefault(size, []).append(placement)
    return [
        Source(size, tuple(served), None if size == master else adapt)
        for size, served in by_size.items()
        if served or size == master
    ]


def source_request(
    master: ImageRequest, source: Source, master_bytes: bytes | None
) -> ImageRequest:
    """The request that makes `source` from `master`: a generation at its size, or an edit
    of the master on a canvas of its size, the new area masked. Both carry the layout hints
    of its placements' safe zones."""
    width, height = source.size
    prompt = _with_layout_hints(master.prompt, source.placements)
    if source.kind != "extend":
        return master.model_copy(update={"prompt": prompt, "width": width, "height": height})
    data = master_bytes if master_bytes is not None else _stand_in(master.width, master.height)
    canvas, mask = extension_canvas(data, width, height)
    instruction = EXTEND_INSTRUCTION.format(size=f"{width}x{height}")
    edit = master.model_copy(
        update={
            "prompt": f"{prompt}\n\n{instruction}",
            "width": width,
            "height": height,
            "images": (canvas,),
            "mask": mask,
            "input_fidelity": None,
        }
    )
    return checked_edit(edit)


def _with_layout_hints(prompt: str, placements: Sequence[Placement]) -> str:
    """`prompt`, with what its placements' safe zones ask of the layout."""
    zones = sorted({p.safe_zone.describe() for p in placements if p.safe_zone is not None})
    if not zones:
        return prompt
    return f"{prompt}\n\nKeep the {' and the '.join(zones)} of the image free of text and logos."


@lru_cache(maxsize=8)
def _stand_in(width: int, height: int) -> bytes:
    """A blank master of this size, to price an extension before the master exists."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (128, 128, 128)).save(buffer, "PNG")
    return buffer.getvalue()


def nearest_size(spec: ModelSpec, aspect: float, area: int) -> Size:
    """The size the model makes nearest `aspect`, with about `area` pixels where it takes
    free sizes (within its limits, short of its experimental sizes)."""
    if spec.sizes is not None:
        return min(
            _listed_sizes(spec),
            key=lambda size: (abs(math.log(size[0] / size[1] / aspect)), -size[0] * size[1]),
        )
    rule = spec.size_rule or SizeRule()
    low, high = _aspect_range(spec)
    aspect = min(max(aspect, low), high)
    largest = min(rule.max_pixels, rule.experimental_above_pixels or rule.max_pixels)
    area = min(max(area, rule.min_pixels), largest)
    step = rule.multiple_of
    width, height = math.sqrt(area * aspect), math.sqrt(area / aspect)
    base_w, base_h = round(width / step), round(height / step)
    candidates = [
        ((base_w + dw) * step, (base_h + dh) * step)
        for dw in range(-3, 4)
        for dh in range(-3, 4)
        if base_w + dw > 0 and base_h + dh > 0
    ]
    valid = [
        size for size in candidates if rule.problem(*size) is None and size[0] * size[1] <= largest
    ]
    if not valid:
        raise InvalidRequestError(f"The model makes no size near {aspect:.2f}:1.")
    return min(
        valid,
        key=lambda size: (
            round(abs(math.log(size[0] / size[1] / aspect)), 3),
            abs(size[0] * size[1] - area),
        ),
    )


def _aspect_range(spec: ModelSpec) -> tuple[float, float]:
    """The narrowest and widest aspects the model makes."""
    if spec.sizes is not None:
        aspects = [w / h for w, h in _listed_sizes(spec)]
        return min(aspects), max(aspects)
    ratio = (spec.size_rule or SizeRule()).max_aspect_ratio
    return 1 / ratio, ratio


def _listed_sizes(spec: ModelSpec) -> list[Size]:
    return [parse_size(size) for size in spec.sizes or ()]


def _kept_at_worst(size: Size, aspects: Sequence[float]) -> float:
    """The least share of a `size` image any of `aspects` keeps when cut from it."""
    own = size[0] / size[1]
    return min(min(own / aspect, aspect / own) for aspect in aspects)
