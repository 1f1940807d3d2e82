"""What an adapter is: its type, the projections it targets, rank, alpha, dropout, shortcut span.

The four types differ only in which low-rank products act on a layer's input (`summed_layers`) and
which earlier layers' inputs reach it through a shortcut (`shortcut_sources`); every forward, QAT and
merge formula in this package is written in those two terms.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from rotaq.pipeline.errors import RotaqError
from rotaq.pipeline.families import DecoderFamily

if TYPE_CHECKING:
    from rotaq.adapters.finetune import FinetuneOptions

LORA = "lora"
INPUT_SHORTCUT = "reslora-is"
BLOCK_SHORTCUT = "reslora-bs"
MIDDLE_SHORTCUT = "reslora-ms"
ADAPTER_TYPES = (LORA, INPUT_SHORTCUT, BLOCK_SHORTCUT, MIDDLE_SHORTCUT)
# Types whose layer n reads inputs of earlier layers: they merge only approximately.
SHORTCUT_TYPES = (INPUT_SHORTCUT, MIDDLE_SHORTCUT)
DEFAULT_PRE_NUM = {LORA: 0, INPUT_SHORTCUT: 1, BLOCK_SHORTCUT: 2, MIDDLE_SHORTCUT: 2}


@dataclass(frozen=True)
class AdapterConfig:
    """One adapter setup; `targets` are layer-relative paths such as 'self_attn.q_proj'."""

    kind: str
    targets: tuple[str, ...]
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    pre_num: int = 0
    qat: str | None = None  # a rotaq.quantizers.schemes name, e.g. 'w4a4'
    qat_act_clip_ratio: float | None = None  # the deployment's activation clipping, for per-token schemes

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_TYPES:
            raise RotaqError(f"unknown adapter '{self.kind}'; choose one of {', '.join(ADAPTER_TYPES)}")
        if self.rank < 1:
            raise RotaqError(f"--rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise RotaqError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.kind in (LORA, INPUT_SHORTCUT) and self.pre_num != DEFAULT_PRE_NUM[self.kind]:
            raise RotaqError(f"--pre-num applies to {BLOCK_SHORTCUT} and {MIDDLE_SHORTCUT} only "
                             f"({self.kind} uses {DEFAULT_PRE_NUM[self.kind]})")
        if self.kind in (BLOCK_SHORTCUT, MIDDLE_SHORTCUT) and self.pre_num < 1:
            raise RotaqError(f"--pre-num must be at least 1 for {self.kind}, got {self.pre_num}")
        if self.qat is not None and self.dropout > 0:
            raise RotaqError("--dropout cannot be combined with --qat: QAT trains the merged weight W + s·B·A, "
                             "on which an input dropout of the adapter path has no meaning")
        if not self.targets:
            raise RotaqError("no adapter targets given")
        if self.qat_act_clip_ratio is not None and not 0.0 < self.qat_act_clip_ratio <= 1.0:
            raise RotaqError(f"--qat-act-clip-ratio must be in (0, 1], got {self.qat_act_clip_ratio}")

    @property
    def scaling(self) -> float:
        """s = alpha / rank, the factor on every low-rank product."""
        return self.alpha / self.rank

    @property
    def has_shortcuts(self) -> bool:
        return self.kind in SHORTCUT_TYPES

    def summed_layers(self, layer: int) -> list[int]:
        """Layers whose B·A act on layer `layer`'s own input: n, and for bs also n-1 … n-m."""
        span = self.pre_num if self.kind == BLOCK_SHORTCUT else 0
        return [layer - k for k in range(span + 1) if layer - k >= 0]

    def shortcut_sources(self, layer: int) -> list[tuple[int, int]]:
        """(k, j) pairs: layer n adds s·B_n·A_j·x_{n-k}; is: (1, n); ms: (k, n-k) for k = 1 … m."""
        if self.kind == INPUT_SHORTCUT:
            return [(1, layer)] if layer >= 1 else []
        if self.kind == MIDDLE_SHORTCUT:
            return [(k, layer - k) for k in range(1, self.pre_num + 1) if layer - k >= 0]
        return []

    def to_section(self) -> dict[str, Any]:
        """The manifest's description of the adapters (the 'adapters' section adds statistics to it)."""
        values = asdict(self)
        return {"type": values.pop("kind"), **values, "targets": list(self.targets), "scaling": self.scaling}

    @classmethod
    def from_options(cls, options: FinetuneOptions, family: DecoderFamily) -> AdapterConfig:
        pre_num = options.pre_num if options.pre_num is not None else default_pre_num(options.adapter)
        return cls(kind=options.adapter, targets=resolve_targets(options.targets, family), rank=options.rank,
                   alpha=options.alpha, dropout=options.dropout, pre_num=pre_num, qat=options.qat,
                   qat_act_clip_ratio=options.qat_act_clip_ratio)

    @classmethod
    def from_section(cls, section: dict[str, Any]) -> AdapterConfig:
        return cls(kind=section["type"], targets=tuple(section["targets"]), rank=int(section["rank"]),
                   alpha=float(section["alpha"]), dropout=float(section.get("dropout", 0.0)),
                   pre_num=int(section["pre_num"]), qat=section.get("qat"),
                   qat_act_clip_ratio=section.get("qat_act_clip_ratio"))


def default_pre_num(kind: str) -> int:
    if kind not in ADAPTER_TYPES:
        raise RotaqError(f"unknown adapter '{kind}'; choose one of {', '.join(ADAPTER_TYPES)}")
    return DEFAULT_PRE_NUM[kind]


def resolve_targets(names: str | list[str] | tuple[str, ...] | None, family: DecoderFamily) -> tuple[str, ...]:
    """Layer-relative projection paths for names like 'q_proj' or 'self_attn.q_proj' (default: all seven).

    Returned in the family's execution order, so the same set always gives the same adapter layout.
    """
    if names is None:
        return family.decoder_linears
    requested = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    by_short_name = {path.rsplit(".", 1)[-1]: path for path in family.decoder_linears}
    resolved = set()
    for name in requested:
        path = name if name in family.decoder_linears else by_short_name.get(name)
        if path is None:
            raise RotaqError(f"unknown adapter target '{name}'; choose from {', '.join(by_short_name)}")
        resolved.add(path)
    if not resolved:
        raise RotaqError("--targets is empty")
    return tuple(path for path in family.decoder_linears if path in resolved)
