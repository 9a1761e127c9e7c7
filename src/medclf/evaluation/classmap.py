"""Class maps: score a model on data whose labels group the model's classes.

``'tumour=glioma,meningioma,pituitary;normal=notumor'`` names groups of the model's classes. Every model
class must sit in exactly one group. A group's probability is the sum of its classes' probabilities (the
classes are mutually exclusive outcomes of one softmax), so the grouped task is scored like any other: its
metrics, plots and report come from the usual code with the group names as classes.

A dataset label must be a group name, or a model class name, which then counts as its group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medclf.errors import ConfigError

__all__ = ["ClassMap", "parse_class_map"]

SYNTAX = "'GROUP=class,class;GROUP=class' (e.g. 'tumour=glioma,meningioma,pituitary;normal=notumor')"


@dataclass(frozen=True)
class ClassMap:
    """Ordered groups of model classes: ``groups[name]`` lists the model classes in group ``name``."""

    groups: dict[str, tuple[str, ...]]
    model_classes: tuple[str, ...]

    @property
    def names(self) -> list[str]:
        return list(self.groups)

    def group_of(self, model_class: str) -> str:
        return next(g for g, members in self.groups.items() if model_class in members)

    def matrix(self) -> np.ndarray:
        """(model classes, groups) 0/1 matrix: ``probs @ matrix`` gives the grouped probabilities."""
        m = np.zeros((len(self.model_classes), len(self.groups)))
        for j, members in enumerate(self.groups.values()):
            for c in members:
                m[self.model_classes.index(c), j] = 1.0
        return m

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """Grouped probabilities (N, groups) from model-class probabilities (N, model classes); NaN rows stay NaN."""
        return np.asarray(probs, dtype=np.float64) @ self.matrix()

    def label_lookup(self, label_names: Sequence[str], where: str = "the data") -> np.ndarray:
        """The group index of each of a dataset's label names (group names, or model classes mapped through).

        Refuses (one line) names that are neither, and a name that is a group and also a model class of
        another group (ambiguous)."""
        lut, unknown = [], []
        for name in label_names:
            if name in self.groups:
                if name in self.model_classes and self.group_of(name) != name:
                    raise ConfigError(
                        f"label {name!r} of {where} is both a group of the class map and a model class in group "
                        f"{self.group_of(name)!r}: rename the group"
                    )
                lut.append(self.names.index(name))
            elif name in self.model_classes:
                lut.append(self.names.index(self.group_of(name)))
            else:
                unknown.append(name)
                lut.append(-1)
        if unknown:
            raise ConfigError(
                f"labels {unknown} of {where} are neither groups of the class map ({', '.join(self.names)}) "
                f"nor model classes ({', '.join(self.model_classes)})"
            )
        return np.array(lut, dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {g: list(members) for g, members in self.groups.items()}

    def describe(self) -> str:
        return "; ".join(f"{g} = {', '.join(m)}" for g, m in self.groups.items())


def parse_class_map(spec: str | Mapping[str, Sequence[str]], model_classes: Sequence[str]) -> ClassMap:
    """Parse ``'A=x,y;B=z'`` (or a mapping group -> classes) against the model's classes.

    Every model class must be in exactly one group and every named class must be a model class; there must
    be at least two groups, none empty. Anything else is a one-line :class:`ConfigError`."""
    classes = tuple(str(c) for c in model_classes)
    pairs: list[tuple[str, list[str]]] = []
    if isinstance(spec, str):
        for part in (p.strip() for p in spec.split(";")):
            if not part:
                continue
            name, sep, members = part.partition("=")
            if not sep or not name.strip():
                raise ConfigError(f"class map {spec!r}: {part!r} is not GROUP=classes; write {SYNTAX}")
            pairs.append((name.strip(), [m.strip() for m in members.split(",") if m.strip()]))
    else:
        pairs = [(str(g), [str(c) for c in members]) for g, members in spec.items()]
    names = [g for g, _ in pairs]
    repeated = sorted({g for g in names if names.count(g) > 1})
    if repeated:
        raise ConfigError(f"class map: group(s) {repeated} named more than once")
    empty = [g for g, members in pairs if not members]
    if empty:
        raise ConfigError(f"class map: group(s) {empty} hold no class; write {SYNTAX}")
    if len(pairs) < 2:
        raise ConfigError(f"class map: needs at least two groups, got {names}; write {SYNTAX}")
    listed = [c for _, members in pairs for c in members]
    unknown = sorted({c for c in listed if c not in classes})
    twice = sorted({c for c in listed if listed.count(c) > 1})
    missing = [c for c in classes if c not in listed]
    problems = []
    if unknown:
        problems.append(f"{unknown} are not model classes")
    if twice:
        problems.append(f"{twice} are in more than one group")
    if missing:
        problems.append(f"{missing} are in no group")
    if problems:
        raise ConfigError(
            f"class map: {'; '.join(problems)} (every model class of {list(classes)} must be in exactly one group)"
        )
    return ClassMap(groups={g: tuple(members) for g, members in pairs}, model_classes=classes)
