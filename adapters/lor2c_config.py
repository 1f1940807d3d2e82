"""LoR2C's configuration: the four variants, the path score, and the schedule of merges and injections.

Variants (`LOR2C_TYPES`, see adapters/lor2c_paths.py for what each path computes):
- `lor2c`: one path per layer;
- `share-lor2c`: one A shared by every path, a B of its own per path;
- `merge-lor2c`: the adjacent pair of paths with the smallest summed score becomes one path, `changes` times;
- `inject-lor2c`: the path with the largest score is replaced by plain LoRA on q_proj and v_proj of its layer.

The score (`adapters/lor2c_scores.py`) ranks paths from the singular values of s·B·A.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from rotaq.pipeline.errors import RotaqError
from rotaq.pipeline.families import DecoderFamily

if TYPE_CHECKING:
    from rotaq.adapters.finetune import FinetuneOptions

LOR2C = "lor2c"
SHARE_LOR2C = "share-lor2c"
MERGE_LOR2C = "merge-lor2c"
INJECT_LOR2C = "inject-lor2c"
LOR2C_TYPES = (LOR2C, SHARE_LOR2C, MERGE_LOR2C, INJECT_LOR2C)
SCORE_METHODS = ("top-share", "mean")


DEFAULT_CHANGES = {MERGE_LOR2C: 4, INJECT_LOR2C: 2}


def inject_targets(family: DecoderFamily) -> tuple[str, str]:
    """Where inject-lor2c puts LoRA: q_proj and v_proj, as in the LoR2C paper (and PEFT's default targets)."""
    return (family.query, family.value)


@dataclass(frozen=True)
class Lor2cConfig:
    kind: str = LOR2C
    rank: int = 8
    alpha: float = 16.0
    score: str = "mean"  # see the module docstring: the mean ranks paths by how much update they carry
    top_k: int = 1  # singular values counted by the top-share score
    changes: int | None = None  # merges (merge-lor2c) or injections (inject-lor2c); None: the type's default
    interval: int | None = None  # optimizer steps between changes; None: spread evenly over training

    def __post_init__(self) -> None:
        if self.kind not in LOR2C_TYPES:
            raise RotaqError(f"unknown LoR2C type '{self.kind}'; choose one of {', '.join(LOR2C_TYPES)}")
        if self.rank < 1:
            raise RotaqError(f"--rank must be at least 1, got {self.rank}")
        if self.score not in SCORE_METHODS:
            raise RotaqError(f"unknown path score '{self.score}'; choose one of {', '.join(SCORE_METHODS)}")
        if not 1 <= self.top_k <= self.rank:
            raise RotaqError(f"top_k must be in [1, rank = {self.rank}], got {self.top_k}")
        if self.changes is not None and self.kind not in DEFAULT_CHANGES and self.changes != 0:
            raise RotaqError(f"--lor2c-changes applies to {MERGE_LOR2C} and {INJECT_LOR2C} only")
        if self.changes is not None and self.changes < 0:
            raise RotaqError(f"--lor2c-changes must not be negative, got {self.changes}")
        if self.interval is not None and self.interval < 1:
            raise RotaqError(f"--lor2c-interval must be at least 1, got {self.interval}")

    @classmethod
    def from_options(cls, options: FinetuneOptions, family: DecoderFamily) -> Lor2cConfig:
        """LoR2C paths take rank, alpha and the schedule; the (Res)LoRA-only options are refused, not ignored."""
        refused = {"--targets": options.targets is not None, "--pre-num": options.pre_num is not None,
                   "--dropout": options.dropout > 0, "--qat": options.qat is not None}
        if given := [name for name, is_set in refused.items() if is_set]:
            raise RotaqError(f"{', '.join(given)} do(es) not apply to {options.adapter}: LoR2C paths span whole "
                             "layers (no targets or shortcuts), and QAT of LoR2C is not implemented")
        return cls(kind=options.adapter, rank=options.rank, alpha=options.alpha, score=options.lor2c_score,
                   top_k=options.lor2c_top_k, changes=options.lor2c_changes, interval=options.lor2c_interval)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def has_shortcuts(self) -> bool:
        """LoR2C paths have no ResLoRA shortcuts (whose merge needs input-norm statistics)."""
        return False

    @property
    def change_count(self) -> int:
        return self.changes if self.changes is not None else DEFAULT_CHANGES.get(self.kind, 0)

    def change_steps(self, total_steps: int, layers: int) -> list[int]:
        """The optimizer steps after which a merge or injection happens.

        By default they are spread evenly, so the last new parameters train for as many steps as the
        first paths trained before the first change.
        """
        count = self.change_count
        if count == 0:
            return []
        limit = layers - 1 if self.kind == MERGE_LOR2C else layers
        if count > limit:
            raise RotaqError(f"{self.kind} cannot make {count} changes on a model with {layers} layers "
                             f"(at most {limit})")
        interval = self.interval or total_steps // (count + 1)
        steps = [interval * (index + 1) for index in range(count)]
        if interval < 1 or steps[-1] >= total_steps:
            raise RotaqError(f"{count} {self.kind} changes every {interval or 0} steps do not fit in {total_steps} "
                             "steps with steps left to train the new parameters: raise --steps or lower "
                             "--lor2c-changes / --lor2c-interval")
        return steps

    def to_section(self) -> dict[str, Any]:
        values = asdict(self)
        return {"type": values.pop("kind"), **values, "scaling": self.scaling}

    @classmethod
    def from_section(cls, section: dict[str, Any]) -> Lor2cConfig:
        return cls(kind=section["type"], rank=int(section["rank"]), alpha=float(section["alpha"]),
                   score=section.get("score", "top-share"), top_k=int(section.get("top_k", 1)),
                   changes=section.get("changes"), interval=section.get("interval"))


def lor2c_parameter_count(hidden: int, layers: int, config: Lor2cConfig) -> int:
    """Trainable parameters at install time: (A + B) per layer, or one shared A plus a B per layer."""
    shared = config.kind == SHARE_LOR2C
    return (1 if shared else layers) * config.rank * hidden + layers * hidden * config.rank
