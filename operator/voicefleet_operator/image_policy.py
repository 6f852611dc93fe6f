"""Which images a tenant may run as its workers (spec.worker.image).

The platform's runtime image is always allowed. Beyond it, the platform lists repositories (any
tag or digest of them) and digests (`sha256:<hex>`: any repository pinned to that digest) in the
chart's values runtime.allowedImages. The chart's ValidatingAdmissionPolicy refuses anything
else at admission; this module is the operator's second line (ConfigValid=False naming the
field), for VoiceAgents admitted before the allow-list changed or on clusters without the
policy. Both implement the same rule; `image_allowed` is the reference for it.
"""

from __future__ import annotations

from voicefleet_operator.api import VoiceAgentSpec
from voicefleet_operator.settings import PlatformSettings


def image_allowed(image: str, settings: PlatformSettings) -> bool:
    if image == settings.runtime_image:
        return True
    for repository in settings.allowed_image_repositories:
        if image == repository or image.startswith((repository + ":", repository + "@")):
            return True
    return any(image.endswith("@" + digest) for digest in settings.allowed_image_digests)


def allowed_description(settings: PlatformSettings) -> str:
    parts = [settings.runtime_image]
    parts += [f"{repository}:<any tag>" for repository in settings.allowed_image_repositories]
    parts += [f"<any repository>@{digest}" for digest in settings.allowed_image_digests]
    return ", ".join(parts)


def image_problems(spec: VoiceAgentSpec, settings: PlatformSettings) -> list[str]:
    """`spec.worker.image: ...` when the VoiceAgent asks for an image the platform does not
    allow; [] otherwise (no image: the platform's runtime image)."""
    image = spec.worker.image
    if image is None or image_allowed(image, settings):
        return []
    return [
        f"spec.worker.image: {image!r} is not an image the platform allows for workers "
        f"(allowed: {allowed_description(settings)}); remove the field to run the platform's "
        "runtime image, or ask the platform team to allow it"
    ]
