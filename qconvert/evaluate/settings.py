"""What a pipeline is called with when it is measured: the seed's settings per family.

FLUX.1 1024², 28 steps, guidance 3.5, max_sequence_length 512; Qwen-Image 1024², 50 steps,
true CFG 4.0 with the negative prompt " "; LTX-2 768×512, 121 frames, 40 steps, guidance 4.0.
The embedded tiny pipelines are measured with what their builders say they are called with
(``CALL`` in each tiny module), which is the smallest each accepts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from qconvert.evaluate.errors import EvalError


@dataclass(frozen=True)
class Family:
    """How one family's pipeline is driven."""

    name: str
    title: str
    video: bool
    multiple_of: int  # height and width must be multiples of this
    batch_arg: str  # the pipeline's "images per prompt" argument
    defaults: dict[str, Any]


FAMILIES: dict[str, Family] = {
    "flux": Family(
        "flux",
        "FLUX.1",
        False,
        16,
        "num_images_per_prompt",
        {
            "height": 1024,
            "width": 1024,
            "num_inference_steps": 28,
            "guidance_scale": 3.5,
            "max_sequence_length": 512,
        },
    ),
    "qwenimage": Family(
        "qwenimage",
        "Qwen-Image",
        False,
        16,
        "num_images_per_prompt",
        {
            "height": 1024,
            "width": 1024,
            "num_inference_steps": 50,
            "true_cfg_scale": 4.0,
            "negative_prompt": " ",
        },
    ),
    "ltx2": Family(
        "ltx2",
        "LTX-2",
        True,
        32,
        "num_videos_per_prompt",
        {
            "height": 512,
            "width": 768,
            "num_frames": 121,
            "frame_rate": 24.0,
            "num_inference_steps": 40,
            "guidance_scale": 4.0,
        },
    ),
}


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise EvalError(
            f"no evaluation settings for the {name!r} family; qconvert eval and bench know "
            f"{', '.join(FAMILIES)}"
        ) from None


@dataclass(frozen=True)
class Settings:
    """Pipeline call arguments (besides prompt, seed and batch) for one family."""

    family: str
    call: dict[str, Any] = field(default_factory=dict)
    tiny: bool = False

    @property
    def steps(self) -> int:
        return int(self.call["num_inference_steps"])

    @property
    def height(self) -> int:
        return int(self.call["height"])

    @property
    def width(self) -> int:
        return int(self.call["width"])

    @property
    def frames(self) -> int | None:
        frames = self.call.get("num_frames")
        return None if frames is None else int(frames)

    @property
    def video(self) -> bool:
        return family(self.family).video

    def kwargs(self, batch: int = 1) -> dict[str, Any]:
        """Keyword arguments for the pipeline call (a fresh dict)."""
        out = json.loads(json.dumps(self.call))
        if batch != 1:
            out[family(self.family).batch_arg] = batch
        return out

    def key(self) -> dict[str, Any]:
        """What identifies these settings in the generation cache."""
        return {"family": self.family, "call": self.call}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """e.g. "1024×1024, 28 steps, guidance 3.5"."""
        c = self.call
        parts = [f"{self.width}×{self.height}"]
        if self.frames is not None:
            parts[0] += f"×{self.frames} frames"
        parts.append(f"{self.steps} step{'s' if self.steps != 1 else ''}")
        if "guidance_scale" in c:
            parts.append(f"guidance {c['guidance_scale']:g}")
        if "true_cfg_scale" in c:
            negative = c.get("negative_prompt")
            parts.append(f"true CFG {c['true_cfg_scale']:g} (negative prompt {negative!r})")
        if "max_sequence_length" in c:
            parts.append(f"max_sequence_length {c['max_sequence_length']}")
        return ", ".join(parts)

    def override(
        self,
        steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        frames: int | None = None,
    ) -> Settings:
        """These settings with the user's --steps / --height / --width / --frames, checked."""
        fam = family(self.family)
        call = dict(self.call)
        for flag, value, key in (
            ("--steps", steps, "num_inference_steps"),
            ("--height", height, "height"),
            ("--width", width, "width"),
        ):
            if value is None:
                continue
            if value < 1:
                raise EvalError(f"{flag} {value}: must be at least 1")
            if key != "num_inference_steps" and value % fam.multiple_of:
                raise EvalError(
                    f"{flag} {value}: {fam.title} needs a multiple of {fam.multiple_of}"
                )
            call[key] = value
        if frames is not None:
            if not fam.video:
                raise EvalError(f"--frames: {fam.title} makes images, not videos")
            if frames < 1 or (frames - 1) % 8:
                raise EvalError(f"--frames {frames}: {fam.title} takes 8·k + 1 frames (9, 121, …)")
            call["num_frames"] = frames
        return replace(self, call=call)


def defaults(name: str, tiny: bool = False) -> Settings:
    """The family's seed settings, or (``tiny``) the embedded tiny pipeline's."""
    fam = family(name)
    if tiny:
        from qconvert.tiny import call_kwargs

        call = call_kwargs(name)
    else:
        call = dict(fam.defaults)
    return Settings(name, call, tiny)
