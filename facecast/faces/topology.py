"""The face mesh's fixed topology: triangles and the index lists of its features.

Read from MediaPipe's ``face_mesh_connections.py`` data file (shipped in the same wheel as
the mesh model) by parsing it, never importing it. Triangles are the 3-cliques of the
tesselation's edge graph; contours are its edge cycles chained into ordered polygons.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from itertools import combinations

import numpy as np

from facecast.models.registry import model_path


def _edge_sets() -> dict[str, set[tuple[int, int]]]:
    tree = ast.parse(model_path("face_mesh_topology").read_text())
    sets: dict[str, set[tuple[int, int]]] = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)):
            continue
        name = node.targets[0].id  # type: ignore[attr-defined]
        args = node.value.args
        if len(args) == 1 and isinstance(args[0], ast.List):  # frozenset([...]) literals only
            sets[name] = {tuple(e) for e in ast.literal_eval(args[0])}
    return sets


def triangles_from_edges(edges: set[tuple[int, int]]) -> np.ndarray:
    neighbours: dict[int, set[int]] = {}
    for a, b in edges:
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    found = set()
    for a, near in neighbours.items():
        for b, c in combinations(sorted(near), 2):
            if c in neighbours.get(b, ()):
                found.add(tuple(sorted((a, b, c))))
    return np.array(sorted(found), dtype=np.int32)


def chain_cycles(edges: set[tuple[int, int]]) -> list[list[int]]:
    """Ordered vertex loops of an edge set made of disjoint cycles (e.g. outer and inner lip)."""
    neighbours: dict[int, list[int]] = {}
    for a, b in edges:
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    seen: set[int] = set()
    cycles = []
    for start in sorted(neighbours):
        if start in seen:
            continue
        loop, prev, cur = [start], None, start
        seen.add(start)
        while True:
            nxt = next((n for n in neighbours[cur] if n != prev and n not in loop[1:]), None)
            if nxt is None or nxt == start:
                break
            loop.append(nxt)
            seen.add(nxt)
            prev, cur = cur, nxt
        cycles.append(loop)
    return cycles


@dataclass(frozen=True)
class MeshTopology:
    triangles: np.ndarray  # (T, 3) vertex indices
    face_oval: np.ndarray  # ordered outline polygon
    outer_lips: np.ndarray
    inner_lips: np.ndarray  # the mouth opening: the target's stays visible
    right_eye: np.ndarray  # subject's right eye opening polygon
    left_eye: np.ndarray
    right_brow: np.ndarray  # unordered index sets
    left_brow: np.ndarray
    nose: np.ndarray  # unordered index set

    @property
    def lips_points(self) -> np.ndarray:
        return np.union1d(self.outer_lips, self.inner_lips)


@cache
def mesh_topology() -> MeshTopology:
    sets = _edge_sets()
    # The lip edges hold two loops of 20 points; the inner one (the mouth opening) is the
    # loop through vertex 13, the middle of the upper lip's inner edge.
    lip_loops = chain_cycles(sets["FACEMESH_LIPS"])
    inner = next(loop for loop in lip_loops if 13 in loop)
    outer = next(loop for loop in lip_loops if 13 not in loop)

    def single(name: str) -> np.ndarray:
        return np.array(chain_cycles(sets[name])[0], dtype=np.int32)

    def flat(*names: str) -> np.ndarray:
        return np.unique(np.array([i for n in names for e in sets[n] for i in e], dtype=np.int32))

    return MeshTopology(
        triangles=triangles_from_edges(sets["FACEMESH_TESSELATION"]),
        face_oval=single("FACEMESH_FACE_OVAL"),
        outer_lips=np.array(outer, dtype=np.int32),
        inner_lips=np.array(inner, dtype=np.int32),
        right_eye=single("FACEMESH_RIGHT_EYE"),
        left_eye=single("FACEMESH_LEFT_EYE"),
        right_brow=flat("FACEMESH_RIGHT_EYEBROW"),
        left_brow=flat("FACEMESH_LEFT_EYEBROW"),
        nose=flat("FACEMESH_NOSE"),
    )
