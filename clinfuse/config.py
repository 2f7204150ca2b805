"""Typed configuration loaded from YAML study files.

The bundled studies ship inside the package (``clinfuse/configs/``, whose source is the
repository's top-level ``configs/``): :data:`DEFAULT_CONFIG` is the demo study and
:data:`STUDY_TEMPLATE` the commented study file that ``clinfuse init`` copies for a new site.

``load_config(path)`` reads a YAML file into a :class:`Config`. Unknown keys, wrong types and
bad values raise :class:`clinfuse.errors.InputError` naming the file and the dotted key path,
e.g. ``configs/demo.yaml: key 'train.batch_size': Input should be a valid integer``.

A study declares its inputs as a list of named **modalities** (top-level ``modalities``), each of a
*kind* — ``image`` (2-D DICOM/PNG/JPEG), ``volume`` (3-D: a DICOM series folder, a multi-frame
DICOM file, NIfTI), ``text``, ``tabular`` or ``signal`` (1-D multichannel: WFDB, CSV, NPY) — with
its preprocessing, its encoder and ``max_count`` (how many files of it one patient may have;
they are pooled into one feature). Only declared modalities exist in the model. The older
three-slot form (``data.image``, ``data.text``, ``data.tabular`` and ``model.*_encoder``) is read
as modalities named ``image``, ``text`` and ``tabular`` and dumped back in that form. ``cfg.modalities``
is always the resolved tuple, in declared order.

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
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from clinfuse.errors import InputError

KINDS = ("image", "volume", "text", "tabular", "signal")
#: Names a modality cannot take: batch keys, group and head names, manifest columns.
RESERVED_NAMES = frozenset({"fusion", "main", "mask", "label", "instances", "none", "patient_id", "split",
                            "site", "all"})
#: Manifest columns every manifest may have whatever the modalities.
MANIFEST_COLUMNS = ("patient_id", "label", "split", "site")
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
    # The three-slot form (see the module docstring); with ``modalities`` declared these stay unset.
    tabular: list[TabularColumn] = Field(default_factory=list)
    image: ImageConfig | None = None
    text: TextConfig | None = None
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


class VolumeEncoderConfig(_Strict):
    """3-D encoders: ``small_cnn3d`` (strided 3x3x3 convolutions, the CPU default) or the MONAI nets
    with ``spatial_dims=3``, built DP-valid (GroupNorm, no in-place operations)."""
    name: Literal["small_cnn3d", "densenet121", "resnet10", "resnet18"] = "small_cnn3d"
    pretrained: str | None = None
    channels: list[int] = Field(default_factory=lambda: [8, 16, 32])


class SignalEncoderConfig(_Strict):
    """1-D CNN over ``[channels, length]``: strided convolutions with GroupNorm, global pooling."""
    name: Literal["cnn1d"] = "cnn1d"
    channels: list[int] = Field(default_factory=lambda: [16, 32, 64])
    kernel_size: int = Field(7, ge=3, le=63)
    pretrained: str | None = None


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
    hidden: int | None = Field(None, ge=4)  # default: the model width


# -- modalities ---------------------------------------------------------------------------------

_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"


class _ModalityCommon(_Strict):
    """What every modality declares besides its kind's preprocessing."""
    name: str = Field(pattern=_NAME_PATTERN)
    # How many inputs of this modality one patient may have (rows of the patient, or several
    # paths in one cell separated by ';'): they are pooled by masked attention into one feature.
    max_count: int = Field(1, ge=1, le=64)

    @model_validator(mode="after")
    def _reserved(self):
        if self.name in RESERVED_NAMES:
            raise ValueError(f"modality name '{self.name}' is reserved; pick another")
        return self

    def preprocessing(self) -> dict:
        """The settings that shape this modality's decoded input (cache keys, checkpoints)."""
        skip = {"name", "encoder", "column", "max_count"}
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in skip}


class ImageModality(ImageConfig, _ModalityCommon):
    """A 2-D image (DICOM, PNG, JPEG). Manifest column: ``column`` (default: the name), a path."""
    kind: Literal["image"]
    column: str | None = None
    encoder: ImageEncoderConfig = ImageEncoderConfig()


class VolumeModality(_ModalityCommon):
    """A 3-D volume: a DICOM series folder, a multi-frame (or single) DICOM file, or NIfTI.

    Decoded to the file's intensity units (CT: Hounsfield units), clipped to ``intensity_range``
    when given, resized to ``size`` = (depth, height, width) and normalised on its own.
    """
    kind: Literal["volume"]
    column: str | None = None
    size: tuple[int, int, int] = (32, 64, 64)
    normalize: Literal["zscore", "minmax"] = "zscore"
    intensity_range: tuple[float, float] | None = None  # e.g. [-1000, 400] HU before normalising
    encoder: VolumeEncoderConfig = VolumeEncoderConfig()

    @model_validator(mode="after")
    def _sizes(self):
        if min(self.size) < 1:
            raise ValueError(f"size must be positive, got {list(self.size)}")
        if self.intensity_range is not None and not self.intensity_range[1] > self.intensity_range[0]:
            raise ValueError("intensity_range must be [low, high] with high > low")
        return self


class SignalModality(_ModalityCommon):
    """A 1-D multichannel series: a WFDB record (``.hea``), or a CSV/NPY array ``[samples, channels]``.

    ``channels`` and ``sampling_rate`` (Hz) are declared: CSV/NPY files are taken to be at that
    rate; WFDB records carry their own and are resampled to it. ``channel_names`` picks WFDB
    channels by name (in that order). The series is cropped or zero-padded to ``length`` samples
    and normalised per channel (``zscore``) or left in its units (``none``).
    """
    kind: Literal["signal"]
    column: str | None = None
    channels: int = Field(ge=1, le=256)
    sampling_rate: float = Field(gt=0.0)
    length: int = Field(ge=8, le=1_000_000)
    channel_names: list[str] | None = None
    normalize: Literal["zscore", "none"] = "zscore"
    encoder: SignalEncoderConfig = SignalEncoderConfig()

    @model_validator(mode="after")
    def _names(self):
        if self.channel_names is not None and len(self.channel_names) != self.channels:
            raise ValueError(f"channel_names lists {len(self.channel_names)} names for {self.channels} channels")
        return self


class TextModality(TextConfig, _ModalityCommon):
    """A clinical note: inline in column ``column`` (default: the name) or a UTF-8 file named in
    ``<column>_path``."""
    kind: Literal["text"]
    column: str | None = None
    encoder: TextEncoderConfig = TextEncoderConfig()


class TabularModality(_ModalityCommon):
    """Declared EHR fields, one manifest column each (named after the field)."""
    kind: Literal["tabular"]
    columns: list[TabularColumn] = Field(min_length=1)
    encoder: TabularEncoderConfig = TabularEncoderConfig()

    @model_validator(mode="after")
    def _unique_columns(self):
        names = [c.name for c in self.columns]
        if len(set(names)) != len(names):
            raise ValueError("tabular column names must be unique")
        return self


Modality = Annotated[ImageModality | VolumeModality | TextModality | TabularModality | SignalModality,
                     Field(discriminator="kind")]


def modality_columns(spec) -> tuple[str, ...]:
    """The manifest columns a modality reads (tabular: one per field; text: inline and ``_path``)."""
    if spec.kind == "tabular":
        return tuple(c.name for c in spec.columns)
    column = spec.column or spec.name
    return (column, f"{column}_path") if spec.kind == "text" else (column,)


class FusionConfig(_Strict):
    # default: "attention" for two or more modalities, "concat" for one
    name: Literal["concat", "gated", "attention", "lowrank"] | None = None
    rank: int = Field(4, ge=1, le=64)
    # Add each present modality's auxiliary logits to the fused logits (a product of experts):
    # the fused model then starts from the combination of what each modality says alone.
    residual_aux: bool = False


class ModelConfig(_Strict):
    # "linear": a linear head over fixed, data-independent features (clinfuse.models.linear);
    # "fusion": encoders + fusion operator; "auto": linear when the study declares
    # federation.min_site_patients below 5000, else fusion (clinfuse.privacy.recipe.resolve_head)
    head: Literal["auto", "linear", "fusion"] = "auto"
    # default: follows the inputs — 64 when any modality is an image, volume, signal or note;
    # for tabular-only studies the number of fields rounded up to a power of two, within [8, 64]
    dim: int | None = Field(None, ge=8, le=2048)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    # the three-slot form (see the module docstring)
    image_encoder: ImageEncoderConfig | None = None
    text_encoder: TextEncoderConfig | None = None
    tabular_encoder: TabularEncoderConfig | None = None
    fusion: FusionConfig = FusionConfig()


class AuxWeightsConfig(_Strict):
    mode: Literal["none", "fixed", "gblend", "uncertainty"] = "fixed"
    weight: float = Field(0.3, ge=0.0)


#: Default share of the DP clipping budget per modality kind (and for the fusion group).
DEFAULT_CLIP_SHARES = {"image": 0.4, "volume": 0.4, "signal": 0.2, "text": 0.2, "tabular": 0.1, "fusion": 0.3}


class ClipGroupsConfig(BaseModel):
    """Share of the DP clipping budget per parameter group (renormalised to sum 1).

    Besides ``enabled`` and ``fusion``, one key per modality name, e.g. ``{enabled: true, ct: 0.4,
    note: 0.2, fusion: 0.3}``; a modality not named gets its kind's default
    (:data:`DEFAULT_CLIP_SHARES`).
    """
    model_config = ConfigDict(extra="allow", frozen=True)
    enabled: bool = False
    fusion: float = Field(0.3, gt=0.0)

    @model_validator(mode="after")
    def _shares(self):
        for key, value in (self.model_extra or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"share of '{key}' must be a positive number, got {value!r}")
        return self

    def shares(self, modalities) -> dict[str, float]:
        """``{group: share}`` for these modality specs plus ``fusion``."""
        extra = self.model_extra or {}
        out = {m.name: float(extra.get(m.name, DEFAULT_CLIP_SHARES[m.kind])) for m in modalities}
        out["fusion"] = float(self.fusion)
        return out


class BalanceConfig(_Strict):
    # {modality name: rate in [0, 1)}; a modality not named is never dropped
    modality_dropout: dict[str, Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(default_factory=dict)
    aux_weights: AuxWeightsConfig = AuxWeightsConfig()
    clip_groups: ClipGroupsConfig = ClipGroupsConfig()


class TrainConfig(_Strict):
    epochs: int = Field(3, ge=1)
    # None = the plan decides (clinfuse.privacy.recipe): under DP from the site's patient count,
    # epsilon and horizon; without DP the head's defaults. A value set here always wins.
    batch_size: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    optimizer: Literal["adam", "sgd"] | None = None
    momentum: float | None = Field(None, ge=0.0, lt=1.0)  # SGD only
    ema_decay: float | None = Field(None, ge=0.0, lt=1.0)  # averaged iterates; 0 = the last iterate
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # mixed precision, used only on CUDA
    seed: int = 0
    num_threads: int | None = None


class PrivacyConfig(_Strict):
    enabled: bool = True
    target_epsilon: float = Field(8.0, gt=0.0, allow_inf_nan=False)
    delta: float | None = Field(None, gt=0.0, lt=1.0)  # default: below 1/number of patients
    max_grad_norm: float | None = Field(None, gt=0.0)  # None = the plan's (1.0)
    accountant: Literal["prv", "rdp"] = "prv"
    grad_sample_mode: Literal["auto", "hooks", "ew", "functorch"] = "auto"
    noise_multiplier: float | None = Field(None, ge=0.0)  # set to override planning (audits)

    @field_validator("noise_multiplier")
    @classmethod
    def _no_dp_without_noise(cls, value, info):
        # Noise 0 is training without DP under a DP label (epsilon infinite): only the explicit
        # switch turns DP off.
        if value == 0 and info.data.get("enabled", True):
            raise ValueError("0 gives no differential privacy (epsilon is infinite); non-DP training is only "
                             "ever the explicit --no-dp or privacy.enabled: false")
        return value


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
    # The smallest site's training patients, as the consortium declares it (a study-level fact,
    # the same at every site): model.head auto picks the linear head below 5000.
    min_site_patients: int | None = Field(None, ge=2)


class EvaluationConfig(_Strict):
    threshold: Literal["youden", "sensitivity"] = "youden"
    target_sensitivity: float = Field(0.9, gt=0.0, lt=1.0)
    bootstrap: int = Field(1000, ge=100)
    seed: int = 0
    ece_bins: int = Field(10, ge=2)


NEW_FORM_EXAMPLE = """modalities:
  - {name: chest, kind: image, size: [64, 64], encoder: {name: small_cnn}}
  - {name: ct, kind: volume, size: [32, 64, 64], encoder: {name: small_cnn3d}}
  - {name: note, kind: text, max_tokens: 128, encoder: {name: hashed_bag}}
  - name: ehr
    kind: tabular
    columns: [{name: age, type: numeric, min: 0, max: 110}]
  - {name: ecg, kind: signal, channels: 12, sampling_rate: 100, length: 1000}"""

_LEGACY_DATA = ("image", "text", "tabular")
_LEGACY_MODEL = ("image_encoder", "text_encoder", "tabular_encoder")


class Config(_Strict):
    study: str = "clinfuse-study"
    data: DataConfig
    # The study's inputs in declared order; after loading always the resolved tuple (a three-slot
    # config is translated, see the module docstring).
    modalities: tuple[Modality, ...] | None = None
    model: ModelConfig = ModelConfig()
    balance: BalanceConfig = BalanceConfig()
    train: TrainConfig = TrainConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    federation: FederationConfig = FederationConfig()
    evaluation: EvaluationConfig = EvaluationConfig()

    _legacy: bool = PrivateAttr(False)

    @model_validator(mode="after")
    def _resolve_modalities(self):
        legacy_keys = [f"data.{k}" for k in _LEGACY_DATA if getattr(self.data, k)] + \
                      [f"model.{k}" for k in _LEGACY_MODEL if getattr(self.model, k) is not None]
        if self.modalities is not None:
            if legacy_keys:
                raise ValueError(f"declare inputs either as 'modalities' or in the three-slot form, not both "
                                 f"(found {', '.join(legacy_keys)}); the modalities form is:\n{NEW_FORM_EXAMPLE}")
            specs = tuple(self.modalities)
        else:
            specs = self._translate_legacy()
            self._legacy = True
        if not specs:
            raise ValueError(f"the study declares no modality; declare them, e.g.\n{NEW_FORM_EXAMPLE}")
        names = [m.name for m in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"modality names must be unique, got {names}")
        owner: dict[str, str] = {}
        for spec in specs:
            for column in modality_columns(spec):
                if column in MANIFEST_COLUMNS or column in owner:
                    other = owner.get(column, "the manifest's own columns")
                    raise ValueError(f"modality '{spec.name}' reads manifest column '{column}', "
                                     f"already used by {other}")
                owner[column] = f"modality '{spec.name}'"
        # Frozen models: the resolved values are set once, here, before anyone reads them.
        object.__setattr__(self, "modalities", specs)
        rates = dict(self.balance.modality_dropout)
        unknown = sorted(set(rates) - set(names))
        if unknown and not self._legacy:
            raise ValueError(f"balance.modality_dropout names unknown modalities {unknown} (declared: {names})")
        unknown_shares = sorted(set(self.balance.clip_groups.model_extra or {}) - set(names))
        if unknown_shares and not self._legacy:
            raise ValueError(f"balance.clip_groups names unknown modalities {unknown_shares} (declared: {names})")
        if unknown:  # the three-slot form allowed a rate for a slot the study does not use
            balance = self.balance.model_copy(update={"modality_dropout": {k: v for k, v in rates.items()
                                                                           if k in names}})
            object.__setattr__(self, "balance", balance)
        model_updates = {}
        if self.model.dim is None:
            model_updates["dim"] = default_model_dim(specs)
        if self.model.fusion.name is None:
            fusion = self.model.fusion.model_copy(update={"name": "attention" if len(specs) > 1 else "concat"})
            model_updates["fusion"] = fusion
        if model_updates:
            object.__setattr__(self, "model", self.model.model_copy(update=model_updates))
        return self

    def _translate_legacy(self) -> tuple:
        """The three-slot form as modalities named ``image``, ``text`` and ``tabular`` (the last only
        when tabular fields are declared): what the fixed-slot model always had."""
        data, model = self.data, self.model
        image = (data.image or ImageConfig()).model_dump()
        text = (data.text or TextConfig()).model_dump()
        specs = [ImageModality(name="image", kind="image", encoder=model.image_encoder or ImageEncoderConfig(),
                               **image),
                 TextModality(name="text", kind="text", column="note",
                              encoder=model.text_encoder or TextEncoderConfig(), **text)]
        if data.tabular:
            specs.append(TabularModality(name="tabular", kind="tabular", columns=list(data.tabular),
                                         encoder=model.tabular_encoder or TabularEncoderConfig()))
        return tuple(specs)

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        # A three-slot config dumps as it was written (so it reloads the same, with the same digest);
        # a modalities config dumps without the empty three-slot keys.
        out = handler(self)
        if self._legacy:
            out.pop("modalities", None)
        else:
            for key in _LEGACY_DATA:
                out["data"].pop(key, None)
            for key in _LEGACY_MODEL:
                out["model"].pop(key, None)
        return out

    @property
    def n_classes(self) -> int:
        return len(self.data.labels)

    @property
    def modality_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modalities)

    def modality(self, name: str):
        """The spec of the modality called ``name``."""
        for spec in self.modalities:
            if spec.name == name:
                return spec
        raise KeyError(f"no modality named {name!r} (declared: {list(self.modality_names)})")

    def digest(self) -> str:
        """sha256 of the canonical JSON form: names the exact configuration in ledgers and caches."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)


def default_model_dim(modalities) -> int:
    """Model width for these modalities when ``model.dim`` is not set: 64 with any image, volume,
    signal or note; a tabular-only study gets its field count rounded up to a power of two, in
    [8, 64] (a 25-field study gets 32: under DP every extra parameter adds noise)."""
    if any(m.kind != "tabular" for m in modalities):
        return 64
    fields = sum(len(m.columns) for m in modalities)
    return int(min(64, max(8, 2 ** math.ceil(math.log2(max(fields, 1))))))


def _key_path(loc) -> str:
    # pydantic puts the discriminator tag (e.g. 'numeric') into the location; drop it so the
    # path is the one the user typed.
    tags = ("numeric", "categorical", *KINDS)
    parts = [str(p) for i, p in enumerate(loc) if not (p in tags and i and isinstance(loc[i - 1], int))]
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
        msg = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
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
