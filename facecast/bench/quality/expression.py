"""Expression and pose fidelity: does the swapped face still do what the target face did?

Both faces are measured on facecast's own 468-point mesh (``Face.mesh``), so a swap is judged
by the same eyes that drive it. Indices are MediaPipe's canonical face-mesh numbering (the
one ``faces/topology.py`` reads from ``face_mesh_connections.py``):

- inner lips, centre: 13 (upper), 14 (lower) — the loop ``topology.inner_lips`` runs through;
- eyelids, centre: 159 / 145 (subject's right eye), 386 / 374 (subject's left eye), the top
  and bottom of ``FACEMESH_RIGHT_EYE`` / ``FACEMESH_LEFT_EYE``;
- eye corners: 33 (outer) and 133 (inner) of the right eye, 362 (inner) and 263 (outer) of
  the left — the pairs MediaPipe's own iris graph
  (``iris_landmark_left_and_right_from_face_landmarks_cpu.pbtxt``) crops the eyes from, and
  33 / 263 are ``faces/landmarks.py``'s roll reference;
- head frame: symmetric pairs 33/263, 133/362, 234/454 (face-oval sides, by the ears) and
  127/356 give the left-right axis; the forehead (10, 151, 109, 338), those eye corners and
  the oval sides give the face plane. All are upper-face points, rigid with the skull: the
  jaw and lips move with the expression and would leak into the pose. The pose is that
  frame's rotation, read from the mesh's own 3-D points: cv2.solvePnP would need MediaPipe's
  canonical face model, which the 0.10.21 wheel does not ship.

Distances are 3-D (the mesh's z is in pixel scale), so a turned head does not shrink them.
Openings are in % of the face's own inter-ocular distance (between the eye centres, each the
midpoint of its two corners); for a swap, target and output share the frame's geometry, so
an error is then in % of the target's inter-ocular distance.

Gaze needs the iris, which the mesh model does not give: MediaPipe's iris model
(``faces/iris.py``). Chosen over a darkest-pixels estimate
because a swap changes exactly what that estimate reads — skin tone, shadows under the brow,
eyelashes and make-up on the lids — so it would report gaze errors the swap did not make.
"""

from __future__ import annotations

import numpy as np

from facecast.faces.expression import (  # the mesh-only measures, shared with the engine
    LEFT_CORNERS,
    RIGHT_CORNERS,
    head_pose,
    inter_ocular,
    openings,
)
from facecast.faces.face import Face
from facecast.faces.iris import gaze_in_eyes, iris_centres


def gaze_offsets(mesh: np.ndarray, irises: np.ndarray) -> dict[str, float]:
    """Each iris centre's offset from its eye's corner midpoint, in eye widths, along the
    eye (x, towards the image's right) and across it (y, downwards)."""
    gaze = gaze_in_eyes(mesh, irises)
    return {
        f"gaze_{side}_{axis}": float(gaze[k, j])
        for k, side in enumerate(("right", "left"))
        for j, axis in enumerate(("x", "y"))
    }


def _eye_width_over_iod(mesh: np.ndarray) -> float:
    widths = [np.linalg.norm(mesh[a, :2] - mesh[b, :2]) for a, b in (RIGHT_CORNERS, LEFT_CORNERS)]
    return float(np.mean(widths)) / inter_ocular(mesh)


# ---------------------------------------------------------------------------- the measures


def expression_of(face: Face, image: np.ndarray | None = None) -> dict[str, float]:
    """The raw measures of one face: openings (% of inter-ocular distance), pose (degrees),
    and, when the face's image is given, gaze (eye widths)."""
    if face.mesh is None:
        raise ValueError("the face has no mesh: analyse it with FaceAnalyser first")
    mesh = face.mesh
    measures = {"inter_ocular_px": inter_ocular(mesh), **openings(mesh), **head_pose(mesh)}
    if image is not None:
        measures.update(gaze_offsets(mesh, iris_centres(image, mesh)))
    return measures


def expression_errors(
    target_face: Face,
    output_face: Face,
    target_image: np.ndarray | None = None,
    output_image: np.ndarray | None = None,
) -> dict[str, float]:
    """How far the output face's expression and pose are from the target's.

    Openings and gaze: absolute differences in % of inter-ocular distance (gaze only when
    both images are given: the iris is read from pixels). Pose: absolute differences in
    degrees. ``mouth_open_target`` / ``mouth_open_output`` are the openings themselves, so a
    caller can tell an open mouth that closed from one that merely moved.
    """
    target = expression_of(target_face, target_image)
    output = expression_of(output_face, output_image)
    eyes = [abs(target[k] - output[k]) for k in ("eye_open_right", "eye_open_left")]
    errors = {
        "mouth_open": abs(target["mouth_open"] - output["mouth_open"]),
        "mouth_open_target": target["mouth_open"],
        "mouth_open_output": output["mouth_open"],
        "eye_open_right": eyes[0],
        "eye_open_left": eyes[1],
        "eye_open": float(np.mean(eyes)),
        **{k: abs(_wrap(target[k] - output[k])) for k in ("yaw", "pitch", "roll")},
    }
    if "gaze_right_x" in target and "gaze_right_x" in output:
        # offsets are in eye widths: the target's eye width in inter-ocular distances
        # turns a difference into % of the target's inter-ocular distance
        scale = 100.0 * _eye_width_over_iod(np.asarray(target_face.mesh))
        per_eye = []
        for side in ("right", "left"):
            dx = target[f"gaze_{side}_x"] - output[f"gaze_{side}_x"]
            dy = target[f"gaze_{side}_y"] - output[f"gaze_{side}_y"]
            per_eye.append(scale * float(np.hypot(dx, dy)))
            errors[f"gaze_{side}"] = per_eye[-1]
        errors["gaze"] = float(np.mean(per_eye))
    return errors


def _wrap(degrees: float) -> float:
    return (degrees + 180.0) % 360.0 - 180.0
