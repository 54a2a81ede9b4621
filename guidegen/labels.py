"""Label sets: class ids, names, TotalSegmentator source classes and display colours.

A label set is data (``guidegen/labelsets/<name>.yaml`` or any YAML file with the same shape);
every stage reads the number of classes and the special roles (tumour, body) from it through
:func:`load_label_set`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from guidegen.errors import GuideGenError

DEFAULT_LABEL_SET = "guidegen22"


@dataclass(frozen=True)
class LabelClass:
    id: int
    name: str
    color: tuple[int, int, int]
    totalseg_v2: tuple[str, ...] = ()
    totalseg_v1: tuple[str, ...] = ()
    role: str | None = None  # "tumor", "body" or None for an ordinary class
    # Separate structures this class has in every body (1 for the liver, 2 for the kidneys); None
    # where the number is not fixed (bowel loops, ribs, vertebrae). Post-processing keeps that many.
    parts: int | None = None


@dataclass(frozen=True)
class LabelSet:
    name: str
    classes: tuple[LabelClass, ...]
    description: str = ""
    _by_name: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name.update({c.name: c for c in self.classes})

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    def id_of(self, name: str) -> int:
        try:
            return self._by_name[name].id
        except KeyError:
            raise GuideGenError(f"label set {self.name!r} has no class {name!r}") from None

    def name_of(self, class_id: int) -> str:
        return self.classes[class_id].name

    def _role_id(self, role: str) -> int | None:
        return next((c.id for c in self.classes if c.role == role), None)

    @property
    def tumor_id(self) -> int | None:
        return self._role_id("tumor")

    @property
    def body_id(self) -> int | None:
        return self._role_id("body")

    @property
    def organ_ids(self) -> list[int]:
        """Ids of the organ groups: everything but background, tumour and body."""
        return [c.id for c in self.classes if c.id != 0 and c.role is None]

    @property
    def organ_names(self) -> list[str]:
        return [self.classes[i].name for i in self.organ_ids]

    def colors(self) -> np.ndarray:
        """``(K, 3)`` uint8 RGB colour table indexed by class id."""
        return np.array([c.color for c in self.classes], dtype=np.uint8)

    def class_for_source(self, source_name: str, version: int = 2) -> int | None:
        """Id of the class a TotalSegmentator class name maps to (globs allowed), or None."""
        for c in self.classes:
            patterns = c.totalseg_v2 if version == 2 else c.totalseg_v1
            if any(fnmatch.fnmatchcase(source_name, p) for p in patterns):
                return c.id
        return None


def _parse_label_set(raw: object, origin: str) -> LabelSet:
    if not isinstance(raw, dict) or "classes" not in raw or "name" not in raw:
        raise GuideGenError(f"{origin}: a label set needs the keys 'name' and 'classes'")
    classes = []
    for i, entry in enumerate(raw["classes"]):
        try:
            cls = LabelClass(
                id=int(entry["id"]),
                name=str(entry["name"]),
                color=tuple(int(v) for v in entry.get("color", (128, 128, 128))),
                totalseg_v2=tuple(entry.get("totalseg_v2", ()) or ()),
                totalseg_v1=tuple(entry.get("totalseg_v1", ()) or ()),
                role=entry.get("role"),
                parts=None if entry.get("parts") is None else int(entry["parts"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise GuideGenError(f"{origin}: class entry {i} is malformed ({exc})") from None
        if cls.parts is not None and cls.parts < 1:
            raise GuideGenError(f"{origin}: class {cls.name!r} has parts {cls.parts}; it must be a positive count (or left out)")
        if cls.id != i:
            raise GuideGenError(f"{origin}: class ids must be 0..K-1 in order; entry {i} has id {cls.id}")
        classes.append(cls)
    if len(classes) > 255:
        raise GuideGenError(f"{origin}: at most 255 classes fit a uint8 label map")
    return LabelSet(name=str(raw["name"]), classes=tuple(classes), description=str(raw.get("description", "")).strip())


@lru_cache(maxsize=None)
def load_label_set(name_or_path: str = DEFAULT_LABEL_SET) -> LabelSet:
    """Load a shipped label set by name (``"guidegen22"``) or a user's YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise GuideGenError(f"{path}: label-set file not found")
        text, origin = path.read_text(), str(path)
    else:
        res = resources.files("guidegen") / "labelsets" / f"{name_or_path}.yaml"
        if not res.is_file():
            shipped = sorted(p.name.removesuffix(".yaml") for p in (resources.files("guidegen") / "labelsets").iterdir())
            raise GuideGenError(f"unknown label set {name_or_path!r}; shipped: {', '.join(shipped)} (or give a .yaml path)")
        text, origin = res.read_text(), f"labelsets/{name_or_path}.yaml"
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise GuideGenError(f"{origin}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return _parse_label_set(raw, origin)
