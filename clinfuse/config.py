"""Typed configuration loaded from YAML study files.

The bundled studies ship inside the package (``clinfuse/configs/``, whose source is the
repository's top-level ``configs/``): :data:`DEFAULT_CONFIG` is the demo study and
:data:`STUDY_TEMPLATE` the commented study file that ``clinfuse init`` copies for a new site.

``load_config(path)`` reads a YAML file into a :class:`Config`. Unknown keys, wrong types and
bad values raise :class:`clinfuse.errors.InputError` naming the file and the dotted key path,
e.g. ``configs/demo.yaml: key 'train.batch_size': Input should be a valid integer``.

Everything that shapes preprocessing is *declared* here (labels, tabular ranges and categories,
image size, tokeniser buckets) and never fitted on a site's data, so nothing learned from private
records leaks into the model through its input pipeline.
"""

from __future__ import annotations

import hashlib
import json
import math
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from clinfuse.errors import InputError

MODALITIES = ("image", "text", "tabular")
# Through the installed package, never the checkout: a wheel has no top-level configs/.
CONFIGS_DIR = Path(str(resources.files("clinfuse") / "configs"))
DEFAULT_CONFIG = CONFIGS_DIR / "demo.yaml"
STUDY_TEMPLATE = CONFIGS_DIR / "study.yaml"


class _Strict(BaseModel):
    # NaN and infinity (YAML's .nan / .inf) are refused everywhere: no setting means either.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def canonical_value(value: object) -> str:
    """The one spelling of a label or category: numbers by value, everything else as stripped text.

    ``0``, ``"0"``, ``"0.0"`` and ``" 0 "`` are all ``"0"``; ``0.5`` and ``"0.50"`` are ``"0.5"``;
    ``"positive"`` stays ``"positive"``. So quote-free numeric labels in YAML (``labels: [0, 1]``)
    match manifest cells written ``0``, ``1.0`` or read from a numeric Parquet column, and a
    category ``1.0`` at one site is the category ``1`` at another. Booleans are refused (YAML reads
    a bare ``yes``/``no``/``on``/``off`` as one): quote them.
    """
    if isinstance(value, bool):
        raise ValueError(  # noqa: TRY004 - pydantic reports ValueError as a validation error
            f"{value!r} is a YAML boolean (yes/no/true/false/on/off unquoted); quote it, "
            "e.g. 'yes'")
    if isinstance(value, (int, float)):
        number, text = value, str(value)
    else:
        text = str(value).strip()
        try:
            number = float(text)
        except ValueError:
            return text
    if not math.isfinite(number):
        return text
    if float(number).is_integer():
        return str(int(number))
    return repr(float(number))


def _canonical_list(values):
    if not isinstance(values, (list, tuple)):
        return values  # pydantic reports the wrong type
    return [canonical_value(v) if isinstance(v, (str, int, float)) else v for v in values]


CanonicalList = Annotated[list[str], BeforeValidator(_canonical_list)]


class NumericColumn(_Strict):
    """A numeric tabular field: values outside [min, max] are rejected.

    Encoded as ``(value - center) / spread`` when a clinical reference ``center`` and ``spread``
    are declared (e.g. temperature 37.5 +- 1), else scaled to [0, 1] by the range. Both are
    declared, never fitted on a site's rows. A reference scale matters under DP: inputs squeezed
    into a sliver of [0, 1] give gradients that the DP noise drowns.
    """
    name: str
    type: Literal["numeric"] = "numeric"
    min: float
    max: float
    center: float | None = None
    spread: float | None = Field(None, gt=0.0)
    # Codes that mean "not measured" (e.g. [0, -1]): such a cell is a missing value, not a number.
    missing: list[float] = Field(default_factory=list)

    @model_validator(mode="after")
    def _range(self):
        if not self.max > self.min:
            raise ValueError(f"column '{self.name}': max ({self.max}) must exceed min ({self.min})")
        if (self.center is None) != (self.spread is None):
            raise ValueError(f"column '{self.name}': declare center and spread together")
        return self


class CategoricalColumn(_Strict):
    """A categorical tabular field, one-hot over its declared categories (numbers by value: see
    :func:`canonical_value`). ``missing`` lists codes that mean "not recorded" (e.g. ``[U, 9]``)."""
    name: str
    type: Literal["categorical"]
    categories: CanonicalList = Field(min_length=1)
    missing: CanonicalList = Field(default_factory=list)

    @model_validator(mode="after")
    def _distinct(self):
        if len(set(self.categories)) != len(self.categories):
            raise ValueError(f"column '{self.name}': categories must be distinct (numbers compare by value: "
                             f"{self.categories})")
        both = sorted(set(self.categories) & set(self.missing))
        if both:
            raise ValueError(f"column '{self.name}': {both} cannot be both a category and a missing code")
        return self


def _column_type(value) -> str | None:
    # 'type' may be left out for numeric columns, as NumericColumn's default says.
    if isinstance(value, dict):
        return value.get("type", "numeric")
    return getattr(value, "type", None)


TabularColumn = Annotated[Annotated[NumericColumn, Tag("numeric")] | Annotated[CategoricalColumn, Tag("categorical")],
                          Discriminator(_column_type)]
ImageSide = Annotated[int, Field(ge=1, le=4096)]


class ImageConfig(_Strict):
    size: tuple[ImageSide, ImageSide] = (64, 64)
    normalize: Literal["zscore", "minmax"] = "zscore"
    frame: Literal["middle", "first", "last"] | int = "middle"
    apply_voi_lut: bool = True


class TextConfig(_Strict):
    max_tokens: int = Field(128, ge=8, le=4096)
    ngram_max: int = Field(2, ge=1, le=4)
    hash_buckets: int = Field(4096, ge=64, le=1 << 22)
    lowercase: bool = True


class SplitConfig(_Strict):
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _fractions(self):
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be below 1")
        return self


class DataConfig(_Strict):
    labels: CanonicalList = Field(min_length=2)
    tabular: list[TabularColumn] = Field(default_factory=list)
    image: ImageConfig = ImageConfig()
    text: TextConfig = TextConfig()
    split: SplitConfig = SplitConfig()
    require_deidentified: bool = False
    cache_dir: str | None = None  # default: <manifest dir>/.clinfuse-cache
    # Folders besides the manifest's own that manifest paths may point into (relative ones are taken
    # from each manifest's folder); see clinfuse.data.paths. A site adds its own with --data-root.
    roots: list[str] = Field(default_factory=list)

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, labels):
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels must be unique (numbers compare by value: {labels})")
        return labels

    @model_validator(mode="after")
    def _unique(self):
        names = [c.name for c in self.tabular]
        if len(set(names)) != len(names):
            raise ValueError("tabular column names must be unique")
        reserved = {"patient_id", "label", "image", "note", "note_path", "split"}
        clash = reserved.intersection(names)
        if clash:
            raise ValueError(f"tabular column names clash with manifest columns: {sorted(clash)}")
        return self


class ImageEncoderConfig(_Strict):
    name: Literal["small_cnn", "densenet121", "resnet10", "resnet18"] = "small_cnn"
    pretrained: str | None = None  # local path to a state_dict; nothing is ever downloaded
    channels: list[int] = Field(default_factory=lambda: [16, 32, 64])


class TextEncoderConfig(_Strict):
    name: Literal["hashed_bag", "transformer", "pretrained"] = "hashed_bag"
    layers: int = Field(1, ge=1, le=12)
    heads: int = Field(2, ge=1, le=16)
    path: str | None = None  # local directory of a frozen pretrained encoder
    # hashed_bag only. false: a fixed random embedding table (seeded, identical at every site, not
    # trained: DP-SGD then needs per-sample gradients only for the Linear layers above it).
    trainable_embedding: bool = False
    embedding_dim: int = Field(256, ge=8, le=4096)  # width of the fixed table
    embedding_seed: int = Field(0, ge=0)


class TabularEncoderConfig(_Strict):
    hidden: int = Field(32, ge=4)


class FusionConfig(_Strict):
    name: Literal["concat", "gated", "attention", "lowrank"] = "attention"
    rank: int = Field(4, ge=1, le=64)
    # Add each present modality's auxiliary logits to the fused logits (a product of experts):
    # the fused model then starts from the combination of what each modality says alone.
    residual_aux: bool = False


class ModelConfig(_Strict):
    dim: int = Field(64, ge=8, le=2048)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    image_encoder: ImageEncoderConfig = ImageEncoderConfig()
    text_encoder: TextEncoderConfig = TextEncoderConfig()
    tabular_encoder: TabularEncoderConfig = TabularEncoderConfig()
    fusion: FusionConfig = FusionConfig()


class ModalityRates(_Strict):
    image: float = Field(0.0, ge=0.0, lt=1.0)
    text: float = Field(0.0, ge=0.0, lt=1.0)
    tabular: float = Field(0.0, ge=0.0, lt=1.0)


class AuxWeightsConfig(_Strict):
    mode: Literal["none", "fixed", "gblend", "uncertainty"] = "fixed"
    weight: float = Field(0.3, ge=0.0)


class ClipGroupsConfig(_Strict):
    """Share of the DP clipping budget per parameter group (renormalised to sum 1)."""
    enabled: bool = False
    image: float = Field(0.4, gt=0.0)
    text: float = Field(0.2, gt=0.0)
    tabular: float = Field(0.1, gt=0.0)
    fusion: float = Field(0.3, gt=0.0)


class BalanceConfig(_Strict):
    modality_dropout: ModalityRates = ModalityRates()
    aux_weights: AuxWeightsConfig = AuxWeightsConfig()
    clip_groups: ClipGroupsConfig = ClipGroupsConfig()


class TrainConfig(_Strict):
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    optimizer: Literal["adam", "sgd"] = "adam"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # mixed precision, used only on CUDA
    seed: int = 0
    num_threads: int | None = None


class PrivacyConfig(_Strict):
    enabled: bool = True
    target_epsilon: float = Field(8.0, gt=0.0)
    delta: float | None = Field(None, gt=0.0, lt=1.0)  # default: below 1/number of patients
    max_grad_norm: float = Field(1.0, gt=0.0)
    accountant: Literal["prv", "rdp"] = "prv"
    grad_sample_mode: Literal["auto", "hooks", "ew", "functorch"] = "auto"
    noise_multiplier: float | None = Field(None, ge=0.0)  # set to override planning (audits)


class FederationConfig(_Strict):
    rounds: int = Field(5, ge=1)
    local_epochs: int = Field(1, ge=1)
    strategy: Literal["fedavg", "fedprox", "fedadam"] = "fedavg"
    proximal_mu: float = Field(0.01, ge=0.0)
    server_lr: float = Field(0.01, gt=0.0)
    modality_aware: bool = True
    min_sites: int = Field(2, ge=1)
    accept_failures: bool = True
    client_dp: bool = False
    client_dp_noise: float = Field(0.5, ge=0.0)
    client_dp_clip: float = Field(1.0, gt=0.0)
    secagg: bool = False


class EvaluationConfig(_Strict):
    threshold: Literal["youden", "sensitivity"] = "youden"
    target_sensitivity: float = Field(0.9, gt=0.0, lt=1.0)
    bootstrap: int = Field(1000, ge=100)
    seed: int = 0
    ece_bins: int = Field(10, ge=2)


class Config(_Strict):
    study: str = "clinfuse-study"
    data: DataConfig
    model: ModelConfig = ModelConfig()
    balance: BalanceConfig = BalanceConfig()
    train: TrainConfig = TrainConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    federation: FederationConfig = FederationConfig()
    evaluation: EvaluationConfig = EvaluationConfig()

    @property
    def n_classes(self) -> int:
        return len(self.data.labels)

    def digest(self) -> str:
        """sha256 of the canonical JSON form: names the exact configuration in ledgers and caches."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)


def _key_path(loc) -> str:
    # pydantic puts the discriminator tag (e.g. 'numeric') into the location; drop it so the
    # path is the one the user typed.
    parts = [str(p) for p in loc if p not in ("numeric", "categorical")]
    return ".".join(parts)


def config_from_dict(data: dict, *, source: str | Path = "<config>") -> Config:
    """Build a :class:`Config` from a mapping; errors name ``source`` and the key path."""
    if not isinstance(data, dict):
        raise InputError("the configuration must be a YAML mapping of keys to values", file=source)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = _key_path(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = f"unknown key (check its spelling against {STUDY_TEMPLATE}, where every key is explained)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        more = len(exc.errors()) - 1
        if more:
            msg += f" (and {more} more problem{'s' if more > 1 else ''})"
        raise InputError(msg, file=source, key=key or None) from None


def load_config(path: str | Path | None = None) -> Config:
    """Read a YAML file into a :class:`Config`. ``None`` loads the bundled demo study, :data:`DEFAULT_CONFIG`."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise InputError("configuration file not found", file=path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc)
        raise InputError(f"not valid YAML{where}: {' '.join(str(what).split())}", file=path) from None
    except UnicodeDecodeError:
        raise InputError("not a UTF-8 text file", file=path) from None
    return config_from_dict(data, source=path)
