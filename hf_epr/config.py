"""EPRConfig: the settings of entropy penalized reparameterization."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .format.decoders import DECODER_KINDS
from .format.errors import EPRError


class EPRConfigError(EPRError, ValueError):
    """An EPRConfig setting is out of range."""


@dataclass
class EPRConfig:
    """How a model is reparameterized, trained and coded.

    Args:
        rate_lambda: weight of the rate term; the training loss is ``task_loss + rate_lambda * bits / N``
            with N the number of compressed parameters (bits per parameter), see ``EPRTrainer``.
        raw_threshold: tensors with fewer elements than this stay raw (stored as ``raw_dtype``).
        raw_dtype: storage dtype of raw floating tensors and buffers ("float32" or "float16").
        init_step_ratio: initial quantization step as a fraction of each tensor's standard deviation; small
            enough that the wrapped model reproduces the base model before training.
        dct_grouping: density/step groups of k x k conv kernels: "band" (u+v diagonals), "frequency" or "tensor".
        min_group_latents: adjacent DCT bands are merged until each group holds at least this many latents
            (a group costs a table in the file).
        rate_relaxation: how the rate term sees the latents while training: "noise" (u + U(-1/2, 1/2), the
            uniform-noise relaxation; default) or "ste" (exact bits of round(u), straight-through gradient).
            Evaluation always uses the exact bits.
        precision: bits of the integer coding tables (8..16).
        max_table_symbols: widest table; values outside it are escaped and stored as int32.
        density_filters: hidden widths of the monotone density network.
        density_init_steps: Adam steps that fit the density to the initial latents in ``from_base`` (0: start
            from a density scaled to each group's spread; ``from_pretrained`` always refits).
        dense_decoder: decoder kind of dense weights and 1 x 1 kernels (a name in ``DECODER_KINDS``).
        conv_decoder: decoder kind of k x k conv kernels, k > 1.
    """

    rate_lambda: float = 0.0
    raw_threshold: int = 64
    raw_dtype: str = "float32"
    init_step_ratio: float = 1.0 / 4096
    dct_grouping: str = "band"
    min_group_latents: int = 2048
    rate_relaxation: str = "noise"
    precision: int = 16
    max_table_symbols: int = 4096
    density_filters: tuple[int, ...] = (3, 3, 3)
    density_init_steps: int = 0
    dense_decoder: str = "affine"
    conv_decoder: str = "dct"

    def __post_init__(self) -> None:
        self.density_filters = tuple(self.density_filters)
        checks = [
            (self.rate_lambda >= 0, "rate_lambda must be >= 0"),
            (self.raw_threshold >= 0, "raw_threshold must be >= 0"),
            (self.raw_dtype in ("float32", "float16"), "raw_dtype must be 'float32' or 'float16'"),
            (0 < self.init_step_ratio <= 1, "init_step_ratio must be in (0, 1]"),
            (self.dct_grouping in ("band", "frequency", "tensor"), "dct_grouping must be band, frequency or tensor"),
            (self.min_group_latents >= 1, "min_group_latents must be >= 1"),
            (self.rate_relaxation in ("ste", "noise"), "rate_relaxation must be 'ste' or 'noise'"),
            (8 <= self.precision <= 16, "precision must be in [8, 16]"),
            (2 < self.max_table_symbols <= (1 << (self.precision - 1)), "max_table_symbols must be in (2, 2**(precision-1)]"),
            (self.density_init_steps >= 0, "density_init_steps must be >= 0"),
            (self.dense_decoder in DECODER_KINDS and self.conv_decoder in DECODER_KINDS,
             f"dense_decoder and conv_decoder must be decoder kinds: {sorted(DECODER_KINDS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise EPRConfigError(message)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["density_filters"] = list(self.density_filters)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EPRConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
