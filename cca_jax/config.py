"""`CCAConfig`: the attention settings, validated once, with the paper's defaults written once.

CCA (docs/cca.md) has two sizes: the group size g (consecutive tokens pooled into one core
token) and the local window w (the most recent tokens always kept raw). The paper's defaults
are g = 16 and w = 1024; they are the defaults of `CCAConfig` and nowhere else.

One `CCAConfig` travels from the command line to the kernels:

    CLI --group-size / --window-size  ->  CCAConfig
    ->  LlamaConfig.cca  ->  CCAAttention(cca=...)  ->  cca_attention(q, k, v, group_size=...,
        window_size=..., implementation=...)  ->  cca_kernels (Pallas) or the jnp paths
    ->  CacheSpec.cca  (generation: the compressed cache's sizes)

`LlamaConfig`, `CacheSpec` and `CCAAttention` still accept `group_size=`, `window_size=` and
(`LlamaConfig`) `attention_implementation=` as keywords and put them into their `CCAConfig`.

Hybrid models: `LlamaConfig.full_attention_layers` (and `CacheSpec.full_attention_layers`)
lists the decoder layers that use full attention while the others use `attention`. The
rule, in one place (`layer_attention`): a listed layer is "full"; an unlisted one takes
`attention`. So with attention="full" every layer is full and the list changes nothing; with
attention="cca" and every layer listed the model is the full-attention model. The list is
validated by `check_layer_indices` and parsed from the command line by
`parse_layer_indices` ("3,11"; "none" for no layer).
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Iterable, Mapping

ATTENTION_KINDS = ("cca", "full")
CCA_IMPLEMENTATIONS = ("auto", "reference", "xla", "pallas")


def check_positive_int(name: str, value) -> None:
    """TypeError unless `value` is an int (not a bool), ValueError unless it is >= 1; both
    name the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def check_attention_kind(attention: str) -> None:
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")


def check_implementation(implementation: str, allowed: tuple[str, ...] = CCA_IMPLEMENTATIONS,
                         name: str = "implementation") -> None:
    if implementation not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, "
                         f"got {implementation!r}")


def check_layer_indices(value: Iterable, num_layers: int | None = None,
                        name: str = "full_attention_layers") -> tuple[int, ...]:
    """Layer indices as a sorted tuple of ints (the hashable form configs store).

    `value` is any iterable of ints (a list read from JSON, a tuple, numpy ints). TypeError
    if it is not an iterable of ints (a string, a bool, a float); ValueError for a negative
    index, an index >= `num_layers` (when given) or an index listed twice; each error names
    `name`."""
    if isinstance(value, (str, bytes)) or isinstance(value, Mapping):
        raise TypeError(f"{name} must be a list of layer indices (ints), got {value!r}")
    try:
        items = list(value)
    except TypeError:
        raise TypeError(f"{name} must be a list of layer indices (ints), got {value!r}") from None
    for item in items:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral):
            raise TypeError(f"{name} must be a list of layer indices (ints), got {item!r} in "
                            f"{value!r}")
    indices = [int(item) for item in items]
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    if repeated:
        raise ValueError(f"{name} lists layer {repeated[0]} more than once: {indices}")
    for index in indices:
        if index < 0 or (num_layers is not None and index >= num_layers):
            where = (f"the model has {num_layers} layers, 0 .. {num_layers - 1}"
                     if num_layers is not None else "indices count from 0")
            raise ValueError(f"{name}: layer {index} is out of range ({where})")
    return tuple(sorted(indices))


def layer_attention(config, index: int) -> str:
    """"cca" or "full": the attention of decoder layer `index` under `config` (a
    `LlamaConfig` or a `CacheSpec`: anything with `attention` and `full_attention_layers`).
    Every per-layer decision (the model's layers, the cache's layers, the reports) asks
    this function."""
    if config.attention == "full" or index in config.full_attention_layers:
        return "full"
    return config.attention


def parse_layer_indices(text: str, flag: str | None = "--full-attention-layers"
                        ) -> tuple[int, ...]:
    """Layer indices from the command line: "3,11" (commas, spaces allowed), or "none" /
    "" for no layer. ValueError (its message starting with `flag`, when given) for anything
    else: a word, a negative number, an index listed twice. The range is checked where the
    model's layer count is known (the config)."""
    prefix = f"{flag}: " if flag else ""
    stripped = text.strip()
    if stripped.lower() in ("", "none"):
        return ()
    parts = [part.strip() for part in stripped.split(",")]
    if not all(part.isdigit() for part in parts):
        raise ValueError(f"{prefix}expected layer indices (ints >= 0) separated by commas, "
                         f"e.g. 3,11, or 'none'; got {text!r}")
    indices = [int(part) for part in parts]
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    if repeated:
        raise ValueError(f"{prefix}layer {repeated[0]} is listed more than once in {text!r}")
    return tuple(sorted(indices))


def describe_layers(indices: Iterable[int]) -> str:
    """"3,11" (the flag's spelling) or "none"."""
    return ",".join(str(i) for i in indices) or "none"


@dataclasses.dataclass(frozen=True)
class CCAConfig:
    """CCA's group size g, local window w and the op implementation (hashable).

    group_size: g, consecutive tokens pooled into one core token (>= 1).
    window_size: w, the minimum number of recent tokens kept raw (>= 1; need not divide by g).
    implementation: "auto" ("pallas" on a GPU, "xla" elsewhere), "reference", "xla" or
      "pallas"; see `cca_jax.attention.cca_attention`.
    """

    group_size: int = 16
    window_size: int = 1024
    implementation: str = "auto"

    def __post_init__(self):
        check_positive_int("group_size", self.group_size)
        check_positive_int("window_size", self.window_size)
        check_implementation(self.implementation)

    def replace(self, **changes) -> "CCAConfig":
        return dataclasses.replace(self, **changes)

    def updated(self, **changes) -> "CCAConfig":
        """`replace` with the changes that are not None (keyword arguments left unset)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return self.replace(**changes) if changes else self


DEFAULT_CCA = CCAConfig()


def accepts_cca_keywords(names: dict[str, str]):
    """Class decorator for a frozen dataclass with a `cca: CCAConfig` field: its constructor
    (and so `dataclasses.replace`) also takes the keywords of `names` (keyword -> CCAConfig
    field), which replace those fields of `cca`, and each keyword reads back as a property.
    A bad value raises the CCAConfig error, named by the keyword the caller used."""
    def decorate(cls):
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            given = {key: kwargs.pop(key) for key in list(kwargs) if key in names}
            if given:
                cca = kwargs.get("cca", DEFAULT_CCA)
                if isinstance(cca, Mapping):      # from JSON
                    cca = CCAConfig(**cca)
                if not isinstance(cca, CCAConfig):
                    raise TypeError(f"cca must be a CCAConfig, got {type(cca).__name__}")
                for key, value in given.items():
                    try:
                        cca = cca.replace(**{names[key]: value})
                    except (TypeError, ValueError) as err:
                        message = str(err)
                        if message.startswith(names[key] + " "):
                            message = key + message[len(names[key]):]
                        raise type(err)(message) from None
                kwargs["cca"] = cca
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        for key, field in names.items():
            setattr(cls, key, property(lambda self, field=field: getattr(self.cca, field),
                                       doc=f"`cca.{field}`"))
        return cls
    return decorate
