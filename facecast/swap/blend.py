"""Masks, colour transfer and blending for pasting a warped face into a frame.

All functions work on a face's box (a crop), never the whole frame: blending cost scales
with the face, not the resolution.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import cv2
import numpy as np

from facecast.media.planes import Box

BlendMode = Literal["feather", "poisson"]


def polygon_mask(shape: tuple[int, int], polygons: list[np.ndarray]) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    for poly in polygons:
        cv2.fillPoly(mask, [np.round(poly * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    return mask


def feathered(mask: np.ndarray, feather_px: float) -> np.ndarray:
    """float32 alpha that is 1 deep inside ``mask`` and falls smoothly to 0 at its edge over
    ``feather_px`` pixels (a smoothstep on the distance to the edge: no visible seam line)."""
    if feather_px < 1:
        return (mask > 127).astype(np.float32)
    return ramp(inside_distance(mask), feather_px)


def inside_distance(mask: np.ndarray) -> np.ndarray:
    """Each pixel's distance to the edge of ``mask`` (0 outside): computed once, it gives
    feathers of any width through ``ramp``."""
    return cv2.distanceTransform((mask > 127).astype(np.uint8), cv2.DIST_L2, 3)


def ramp(distance: np.ndarray, width: float) -> np.ndarray:
    """0 at the edge to 1 at ``width`` pixels inside, as a smoothstep (no visible seam)."""
    t = np.clip(distance / max(width, 1e-6), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def soft_holes(mask: np.ndarray, blur_px: float) -> np.ndarray:
    """float32 0..1 for regions kept from the target (eyes, mouth opening), softened inward:
    full strength well inside the opening, nothing of the target past its rim, so the
    target's own lids and lip line do not come back as a ring around the source's."""
    k = max(3, int(blur_px) * 2 + 1)
    shrink = max(1, int(blur_px))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * shrink + 1, 2 * shrink + 1))
    return cv2.GaussianBlur(cv2.erode(mask, kernel), (k, k), 0).astype(np.float32) / 255.0


def shading_shift(
    target: np.ndarray, source: np.ndarray, weight: np.ndarray, sigma: float
) -> np.ndarray:
    """(H, W, 3) float32: the target's low-frequency colour field minus the source's, each a
    Gaussian blur at ``sigma`` over the pixels ``weight`` (0..1) marks as skin (the lighting
    on the skin, not on the hair or background around it). Worked out at a reduced scale: the
    result is smooth by construction, so nothing is lost; only the difference is scaled up.
    OpenCV's own arithmetic throughout: numpy's broadcasting cost more than the blur."""
    h, w = weight.shape
    factor = max(1, int(sigma / 3))
    small = (max(1, w // factor), max(1, h // factor))
    s = sigma * small[0] / w
    weight3 = cv2.merge([weight, weight, weight])
    norm = cv2.GaussianBlur(cv2.resize(weight, small, interpolation=cv2.INTER_AREA), (0, 0), s)
    norm = cv2.merge([np.maximum(norm, 1e-4)] * 3)
    fields = [
        cv2.divide(
            cv2.GaussianBlur(
                cv2.resize(cv2.multiply(image, weight3), small, interpolation=cv2.INTER_AREA),
                (0, 0),
                s,
            ),
            norm,
        )
        for image in (target, source)
    ]
    return cv2.resize(cv2.subtract(fields[0], fields[1]), (w, h), interpolation=cv2.INTER_LINEAR)


def soft_mask(mask: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian blur of a 0..1 mask, worked out at a quarter of the size when it is wide
    (a soft mask has no detail to lose)."""
    h, w = mask.shape
    factor = 4 if sigma >= 4 else 1
    if factor == 1:
        return cv2.GaussianBlur(mask, (0, 0), max(sigma, 0.5))
    small = cv2.resize(
        mask, (max(1, w // factor), max(1, h // factor)), interpolation=cv2.INTER_AREA
    )
    return cv2.resize(
        cv2.GaussianBlur(small, (0, 0), sigma / factor), (w, h), interpolation=cv2.INTER_LINEAR
    )


# 8-bit LAB lightness past which a recoloured pixel is compressed instead of clipped
HIGHLIGHT_KNEE = 215.0


def soft_highlights(lightness: np.ndarray, knee: float = HIGHLIGHT_KNEE) -> np.ndarray:
    """8-bit LAB L compressed above ``knee`` so that it approaches 255 without reaching it:
    a skin gain that lifts a dark face onto a light one would otherwise clip the sclera and
    teeth to flat white, a bright ring around every kept eye."""
    room = np.float32(255.0 - knee)
    over = np.maximum(lightness - np.float32(knee), np.float32(0.0))
    # over = 0 leaves a pixel as it was; the slope is 1 at the knee, so no visible kink
    return lightness - over + room * over / (over + room)


def transfer_colour(
    source: np.ndarray,
    target: np.ndarray,
    skin: np.ndarray,
    shading_sigma: float = 0.0,
    settle_stats: Callable[[np.ndarray], np.ndarray] | None = None,
    features: np.ndarray | None = None,
) -> np.ndarray:
    """Recolour ``source`` (BGR uint8) to ``target``'s skin: LAB mean and spread matched on
    the skin mask, then, if ``shading_sigma`` > 0, a smooth local field at that scale: the
    target's low-frequency lighting carried over on L, so directional light falls on the new
    face as it did on the old one, and its local colour casts on the skin's a and b.

    ``features`` (0..1): where the source keeps its own contrast and hue, shifted only by the
    skin's mean lightness (the eyes: the skin's spread gain would blacken an iris, and its
    colour cast tint the white).

    ``settle_stats`` (video) maps this frame's statistics, ``[mean_s, sd_s, mean_t, sd_t]``
    (12 values), to the ones to use: a per-face temporal filter, so the colour does not
    flicker as the skin sample shifts from frame to frame.

    8-bit LAB (OpenCV's table-driven conversion) is several times faster than float LAB, and
    the matching is scale-free, so nothing is lost that the eye could see."""
    skin_u8 = (skin > 0.5).astype(np.uint8)
    if cv2.countNonZero(skin_u8) < 16:
        return source
    src = cv2.cvtColor(source, cv2.COLOR_BGR2LAB)
    tgt = cv2.cvtColor(target, cv2.COLOR_BGR2LAB)
    stats = np.concatenate([*cv2.meanStdDev(src, mask=skin_u8), *cv2.meanStdDev(tgt, mask=skin_u8)])
    if settle_stats is not None:
        stats = settle_stats(stats.ravel())
    mu_s, sd_s, mu_t, sd_t = np.asarray(stats, np.float64).reshape(4, 3)
    gain = np.clip(sd_t / np.maximum(sd_s, 1e-3), 0.75, 1.33)
    offset = mu_t - mu_s * gain
    # the per-channel gain and offset as one table lookup, 8 bits to float: several times
    # cheaper than converting to float and transforming
    levels = np.arange(256, dtype=np.float64)[:, None]
    out = cv2.LUT(src, (levels * gain + offset).astype(np.float32).reshape(1, 256, 3))
    if features is not None:
        _keep_features(out, src, features, float(mu_t[0] - mu_s[0]))
    if shading_sigma > 0:
        weight = skin.astype(np.float32)
        # where the colour shift lands: lighting (L) everywhere, colour casts (a, b) only on
        # the skin it was measured on, so a beard, the sclera or teeth keep their own hue
        on_skin = soft_mask(weight, max(1.0, shading_sigma / 8))
        shift_l, shift_a, shift_b = cv2.split(
            shading_shift(tgt.astype(np.float32), out, weight, shading_sigma)
        )
        out = cv2.add(
            out,
            cv2.merge([shift_l, cv2.multiply(shift_a, on_skin), cv2.multiply(shift_b, on_skin)]),
        )
    out[:, :, 0] = soft_highlights(out[:, :, 0])
    # rounded and saturated to 8 bits by OpenCV (after the floor at 0: it takes |x|)
    return cv2.cvtColor(cv2.convertScaleAbs(np.maximum(out, 0.0)), cv2.COLOR_LAB2BGR)


def _keep_features(
    out: np.ndarray, source: np.ndarray, features: np.ndarray, lightness_shift: float
) -> None:
    """In place: where ``features`` is set, ``out`` (LAB) becomes ``source`` moved by the skin's
    mean lightness shift alone. Worked on the features' box only: they are small."""
    x, y, w, h = cv2.boundingRect((features > 0).astype(np.uint8))
    if w == 0 or h == 0:
        return
    box = (slice(y, y + h), slice(x, x + w))
    keep = features[box].astype(np.float32)[:, :, None]
    own = source[box].astype(np.float32) + np.array([lightness_shift, 0.0, 0.0], np.float32)
    out[box] += (own - out[box]) * keep


def alpha_blend(face: np.ndarray, background: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    alpha = np.ascontiguousarray(alpha, dtype=np.float32)
    return cv2.blendLinear(face, background, alpha, 1.0 - alpha)


def poisson_blend(face: np.ndarray, background: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Gradient-domain paste (cv2.seamlessClone) of the pixels where alpha is high."""
    mask = (alpha > 0.5).astype(np.uint8) * 255
    ys, xs = np.nonzero(mask)
    if len(xs) < 16:
        return background
    _h, _w = mask.shape
    # seamlessClone needs the mask away from the image border
    mask[:2], mask[-2:], mask[:, :2], mask[:, -2:] = 0, 0, 0, 0
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    centre = (int((x0 + x1 + 1) // 2), int((y0 + y1 + 1) // 2))
    try:
        return cv2.seamlessClone(face, background, mask, centre, cv2.NORMAL_CLONE)
    except cv2.error:  # a mask touching the crop's edge after rounding: fall back, don't fail
        return alpha_blend(face, background, alpha)


def skin_probability(lab: np.ndarray, samples: np.ndarray, max_distance: float = 3.0) -> np.ndarray:
    """0..1 per pixel: how well its LAB colour fits the skin sampled at ``samples`` (M, 3).

    A Mahalanobis distance to the sampled colours: hair, a microphone, a hand or a collar
    inside the face outline scores low, so neither the source's occluders are pasted onto
    the target nor the target's are painted over."""
    mean = samples.mean(0)
    # floor (8-bit LAB units): evenly lit skin is narrow, and the floor keeps noise from
    # counting as an occluder
    cov = np.cov(samples, rowvar=False) + np.eye(3) * 9.0
    # whiten with the Cholesky factor: |L^-1 (x - mean)| is the Mahalanobis distance;
    # OpenCV's per-pixel transforms, a few times cheaper than numpy's matrix product here
    whiten = np.linalg.inv(np.linalg.cholesky(cov))
    z = cv2.transform(
        np.asarray(lab, np.float32),
        np.hstack([whiten, -(whiten @ mean)[:, None]]).astype(np.float32),
    )
    distance = cv2.sqrt(cv2.transform(cv2.multiply(z, z), np.ones((1, 3), np.float32)))
    t = np.clip((distance - max_distance) / max_distance, 0.0, 1.0)
    return 1.0 - t * t * (3 - 2 * t)


def sample_colours(lab: np.ndarray, points: np.ndarray, radius: int) -> np.ndarray:
    """LAB colours of small square patches around ``points`` (skin reference patches).

    Patches whose mean is far from the median patch are dropped: a hand or a microphone
    over one cheek must not become part of the skin model it is to be told apart by."""
    h, w = lab.shape[:2]
    patches = []
    for x, y in np.round(points).astype(int):
        xa, xb = max(x - radius, 0), min(x + radius + 1, w)
        ya, yb = max(y - radius, 0), min(y + radius + 1, h)
        if xb > xa and yb > ya:
            patches.append(lab[ya:yb, xa:xb].reshape(-1, 3))
    if not patches:
        return np.zeros((1, 3), np.float32)
    means = np.array([p.mean(0) for p in patches])
    spread = np.linalg.norm(means - np.median(means, axis=0), axis=1)
    limit = max(3.0 * float(np.median(spread)), 4.0)
    return np.concatenate([p for p, d in zip(patches, spread, strict=True) if d <= limit])


def local_texture(grey: np.ndarray, face_width: float) -> np.ndarray:
    """Fine detail per pixel (its difference from a slightly blurred copy, averaged over a
    small neighbourhood), scaled to the face: hair and beards are textured at this scale,
    skin, a microphone or a collar are smooth."""
    detail = np.abs(grey - cv2.GaussianBlur(grey, (0, 0), max(1.0, face_width / 200)))
    return cv2.GaussianBlur(detail, (0, 0), max(1.0, face_width / 100))


def component_medians(labels: np.ndarray, values: np.ndarray, count: int) -> np.ndarray:
    """The median of ``values`` over each label 1..count-1 of ``labels`` (0 for label 0 and
    where a label has no pixel): one sort of the labelled pixels only, so the cost does not
    grow with the label count, and the unlabelled bulk (label 0) is never sorted."""
    inside = labels.ravel() > 0
    flat_labels, flat_values = labels.ravel()[inside], values.ravel()[inside]
    order = np.lexsort((flat_values, flat_labels))
    sorted_values = flat_values[order]
    counts = np.bincount(flat_labels, minlength=count)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    medians = np.zeros(count, np.float32)
    present = counts > 0
    medians[present] = sorted_values[starts[present] + counts[present] // 2]
    return medians


def paste_crop(
    frame: np.ndarray,
    crop: np.ndarray,
    matrix: np.ndarray,
    alpha: np.ndarray,
    mode: BlendMode = "feather",
    interpolation: int = cv2.INTER_CUBIC,
) -> Box | None:
    """Warp ``crop`` (made from ``frame`` with ``matrix``, ``faces.align.align_crop``) back
    into ``frame`` in place, through ``alpha`` (crop-sized, 0..1): the learned swappers'
    and the face restorers' way back. Only the frame box under alpha's non-zero part is
    read and written, so the rest of the frame stays bit for bit. Returns that box, or None
    when it falls outside the frame or is too small to blend."""
    ys, xs = np.nonzero(alpha > 0)
    if len(xs) == 0:
        return None
    inverse = cv2.invertAffineTransform(matrix)
    # the footprint of alpha's support (pixel corners, one pixel of interpolation slack)
    x_lo, x_hi, y_lo, y_hi = xs.min() - 1, xs.max() + 2, ys.min() - 1, ys.max() + 2
    corners = np.array([[x_lo, y_lo], [x_hi, y_lo], [x_lo, y_hi], [x_hi, y_hi]], np.float64)
    mapped = corners @ inverse[:, :2].T + inverse[:, 2]
    h, w = frame.shape[:2]
    x0, y0 = np.maximum(np.floor(mapped.min(0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(mapped.max(0)).astype(int) + 1, [w, h])
    if x1 - x0 < 8 or y1 - y0 < 8:
        return None
    local = inverse.copy()
    local[:, 2] -= (x0, y0)
    size = (int(x1 - x0), int(y1 - y0))
    # cubic by default: the crop is usually enlarged on the way back, and linear would soften
    # it more
    face = cv2.warpAffine(crop, local, size, flags=interpolation, borderMode=cv2.BORDER_REPLICATE)
    weight = cv2.warpAffine(alpha.astype(np.float32), local, size, flags=cv2.INTER_LINEAR)
    weight = np.clip(weight, 0.0, 1.0)
    background = frame[y0:y1, x0:x1]
    if mode == "poisson":
        out = poisson_blend(face, background, weight)
    else:
        out = alpha_blend(face, background, weight)
    frame[y0:y1, x0:x1] = out
    return int(x0), int(y0), int(x1), int(y1)
