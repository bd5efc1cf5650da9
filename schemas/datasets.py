"""Request and response models of the datasets API."""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    field_validator,
    model_validator,
)

from service.statuses import DatasetTaskStatus

Dtype = Literal["int64", "float64", "string"]
CellValue = StrictInt | StrictFloat | StrictStr | None
#: Characters ``str.strip()`` removes that are not control characters (Python's whitespace).
_BLANK = r"\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
#: The rule for the names of datasets and imported models, as one regular expression (ECMA-262 and
#: Python alike): no control character (U+0000-U+001F, U+007F), and not only whitespace. The OpenAPI
#: schema publishes it as ``pattern``; the validator below checks it, with a friendlier message.
NAME_PATTERN = rf"^[^\x00-\x1f\x7f]*[^\x00-\x1f\x7f{_BLANK}][^\x00-\x1f\x7f]*$"
_NAME = re.compile(NAME_PATTERN)


def _no_control_chars(value: str) -> str:
    if _NAME.fullmatch(value) is None:
        raise ValueError("must be non-blank and contain no control characters")
    return value


no_control_chars = _no_control_chars  # the multipart forms (CSV upload, model import) check names the same way
Name = Annotated[
    str,
    Field(
        min_length=1,
        max_length=200,
        description="Human-readable name; need not be unique. Not blank, no control characters.",
        examples=["crimes"],
        json_schema_extra={"pattern": NAME_PATTERN},
    ),
    AfterValidator(_no_control_chars),
]
#: A name's JSON Schema, for the forms and query parameters whose schema is written by hand.
NAME_SCHEMA: dict[str, Any] = {
    key: value for key, value in TypeAdapter(Name).json_schema().items() if key not in ("description", "examples")
}
#: Column names follow the same rule (``service.datasets.parsing.check_column_names``, 400 when broken).
ColumnName = Annotated[
    str, Field(min_length=1, max_length=256, examples=["Murder"], json_schema_extra={"pattern": NAME_PATTERN})
]


class ColumnInfo(BaseModel):
    name: str = Field(description="Column name.", examples=["Murder"])
    dtype: Dtype = Field(
        description="`int64` and `float64` are numeric; `string` holds text (key columns are always text).",
        examples=["float64"],
    )


class DatasetCreate(BaseModel):
    """A table sent as JSON. Cells may be numbers, strings (`"1,210.5"` parses as a number) or null."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "crimes-sample",
                    "key_column": "State",
                    "columns": ["State", "Murder", "Assault", "UrbanPop", "Rape"],
                    "rows": [["Alabama", 13.2, 236, 58, 21.2], ["Alaska", "10", "263", 48, "44.5"]],
                }
            ]
        }
    )

    name: Name
    key_column: str | None = Field(
        default=None, description="Column whose values label each row (unique, non-empty).", examples=["State"]
    )
    columns: list[ColumnName] = Field(
        min_length=1, description="Column names, in order; distinct.", json_schema_extra={"uniqueItems": True}
    )
    rows: list[list[CellValue]] = Field(min_length=1, description="Rows; each as long as `columns`.")


# Most objects one S3 dataset may have (data objects and the ones skipped, e.g. `_SUCCESS`).
MAX_S3_OBJECTS = 1000
S3_DELIMITERS = (",", ";", "\t", "|")
S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/[^\x00-\x1f\x7f]*)?$"


class S3DatasetCreate(BaseModel):
    """Register data that already lives in S3 as a dataset: nothing is copied into Centroid."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"name": "clicks-2026-11", "uri": "s3://analytics-bucket/clicks/2026-11/", "format": "parquet"},
                {
                    "name": "features-headerless",
                    "uri": "s3://ml-bucket/kmeans/train/",
                    "format": "csv",
                    "header": False,
                    "columns": ["Murder", "Assault", "UrbanPop", "Rape"],
                },
            ],
            # The rules of `_csv_fields` below, for clients and generators to read.
            "allOf": [
                {
                    "if": {"required": ["format"], "properties": {"format": {"const": "parquet"}}},
                    "then": {
                        "properties": {
                            "header": {"type": "null"},
                            "delimiter": {"const": ","},
                            "columns": {"type": "null"},
                        }
                    },
                },
                {
                    "if": {"required": ["columns"], "properties": {"columns": {"type": "array"}}},
                    "then": {"required": ["header"], "properties": {"header": {"const": False}}},
                },
            ],
        },
    )

    name: Name
    uri: str = Field(
        min_length=8,
        max_length=1100,
        pattern=S3_URI_PATTERN,
        description="`s3://bucket/prefix/`: every object under the prefix (a folder; a trailing `/` is implied) is "
        "part of the dataset, in key order. Objects of zero bytes and those whose name starts with `_` or `.` "
        f"(`_SUCCESS`, `.crc` files) are skipped. At most {MAX_S3_OBJECTS} objects.",
        examples=["s3://analytics-bucket/clicks/2026-11/"],
    )
    format: Literal["csv", "parquet", "auto"] = Field(
        default="auto",
        description="`auto`: from the objects' extensions (`.csv`, `.tsv`, `.txt` are CSV; `.parquet`, `.parq`, "
        "`.pq` are Parquet). Every object must be of the one format; compressed objects are refused.",
    )
    key_column: str | None = Field(
        default=None,
        max_length=256,
        description="Column whose values label the rows (read as text; not checked for uniqueness, which would "
        "mean reading every key).",
        examples=["State"],
    )
    header: bool | None = Field(
        default=None,
        description="CSV only: whether each object starts with a header row. Default: a header unless every "
        "field of the first line is a number.",
    )
    delimiter: Literal[",", ";", "\t", "|"] = Field(default=",", description="CSV only: the field delimiter.")
    columns: list[ColumnName] | None = Field(
        default=None,
        min_length=1,
        description="CSV without a header only (`header: false`): the column names, in order, distinct "
        "(default `f0`, `f1`, ...).",
        examples=[["Murder", "Assault", "UrbanPop", "Rape"]],
        json_schema_extra={"uniqueItems": True},
    )

    @model_validator(mode="after")
    def _csv_fields(self) -> S3DatasetCreate:
        if self.format == "parquet" and (self.header is not None or self.delimiter != "," or self.columns):
            raise ValueError("header, delimiter and columns apply to CSV objects only")
        if self.columns is not None and self.header is not False:
            raise ValueError("columns name the fields of CSV objects without a header: send header: false")
        if self.columns is not None and len(set(self.columns)) != len(self.columns):
            raise ValueError("columns must not repeat")
        return self


class DatasetLocation(BaseModel):
    """Where the rows of a dataset registered from S3 are (Centroid holds no copy of them)."""

    uri: str = Field(description="The S3 prefix the objects were listed under.", examples=["s3://bucket/clicks/"])
    format: Literal["csv", "parquet"] = Field(description="The objects' format.")
    header: bool | None = Field(description="CSV: whether the objects start with a header row (null for Parquet).")
    delimiter: str | None = Field(description="CSV: the field delimiter (null for Parquet).", examples=[","])
    objects: int = Field(description="Data objects, read in key order.", examples=[12])
    skipped_objects: int = Field(
        description="Objects under the prefix that are not data (empty, or named `_...` / `.…`).", examples=[1]
    )
    sagemaker_direct: bool = Field(
        description="The objects are headerless numeric CSV without nulls and nothing else is under the prefix: a "
        "SageMaker job whose features are all the columns, in order, reads them where they are (its `train` "
        "channel is this URI); any other job converts the features once, to Centroid's prefix."
    )

    @model_validator(mode="before")
    @classmethod
    def _from_stored(cls, value: Any) -> Any:
        """The stored location (``datasets.location``) lists every object; the view counts them."""
        if isinstance(value, dict) and isinstance(value.get("objects"), list):
            csv = value.get("csv") or {}
            return {
                "uri": value.get("uri"),
                "format": value.get("format"),
                "header": csv.get("header"),
                "delimiter": csv.get("delimiter"),
                "objects": len(value["objects"]),
                "skipped_objects": len(value.get("skipped") or []),
                "sagemaker_direct": bool(value.get("sagemaker_direct")),
            }
        return value


class RecipeSummary(BaseModel):
    """A recipe's shape, without its steps (what listings show)."""

    source: Literal["upload", "json", "derived", "s3"] = Field(
        description="How the dataset came to be (`s3`: registered from S3 with `POST /datasets/s3`)."
    )
    parent_id: str | None = Field(description="The dataset it was derived from (null for uploads).")
    inputs: list[str] = Field(description="Datasets its steps read directly: the parent, then each join's other side.")
    depth: int = Field(description="Longest chain of derives from an upload (an upload is 0).", examples=[2])
    datasets: int = Field(description="Distinct datasets in its recipe, itself included.", examples=[4])
    steps: int = Field(description="Steps over all of them.", examples=[3])
    bytes: int = Field(description="Size of the recipe as JSON.", examples=[812])


class DatasetListItem(BaseModel):
    """A stored dataset's metadata, as listed (without the recipe: see `recipe_summary`)."""

    id: str = Field(description="Server-assigned id.", examples=["ds-6f1c0e9b2a4d4f3e8b1a"])
    name: str = Field(description="Name given at creation.", examples=["crimes"])
    key_column: str | None = Field(description="Column labelling each row, if any.", examples=["State"])
    columns: list[ColumnInfo] = Field(description="Columns in order, with their types.")
    row_count: int = Field(description="Number of rows.", examples=[50])
    size_bytes: int = Field(
        description="Size of the stored Parquet file (a dataset in S3: of its data objects).", examples=[4096]
    )
    recipe_summary: RecipeSummary | None = Field(description="The recipe's source, inputs and size.")
    location: DatasetLocation | None = Field(
        default=None,
        description="Where the rows are, for a dataset registered from S3 (`POST /datasets/s3`); null for the "
        "datasets Centroid stores itself (uploads and derives).",
    )
    created_at: datetime = Field(description="Creation time (UTC).")


class Dataset(DatasetListItem):
    """A stored dataset's metadata, with its recipe."""

    recipe: dict[str, Any] = Field(
        description=(
            "How the dataset came to be: `source` is `upload`, `json`, `s3` (registered from S3: with its `uri`, "
            "`format` and `columns`) or `derived`. A derived dataset's "
            "recipe carries `parent_id`, the applied `steps` with their fitted parameters (scaling min/max "
            "or mean/std, fill values; a `join` names the other side's `dataset_id`), and `inputs`: the "
            "recipe of every dataset it reads from, directly or through others, keyed by dataset id and "
            "stored once each (by reference: its size grows with the datasets it includes, never doubles). "
            "The same transform can be replayed on new raw rows, even after those datasets are deleted."
        ),
        examples=[{"source": "upload", "filename": "crimes.csv", "columns": ["State", "Murder"]}],
    )


class ColumnSummary(BaseModel):
    name: str = Field(description="Column name.", examples=["Murder"])
    dtype: Dtype = Field(description="Column type.", examples=["float64"])
    count: int = Field(description="Non-null values.", examples=[50])
    null_count: int = Field(description="Null (missing) values.", examples=[0])
    min: float | str | None = Field(description="Smallest value (text columns: lexicographic).", examples=[0.8])
    max: float | str | None = Field(description="Largest value.", examples=[17.4])
    mean: float | None = Field(description="Mean of a numeric column.", examples=[7.788])
    std: float | None = Field(description="Sample standard deviation (ddof=1) of a numeric column.", examples=[4.356])


class DatasetDetail(Dataset):
    """Metadata plus a per-column summary."""

    summary: list[ColumnSummary] = Field(description="One entry per column.")


class DatasetRows(BaseModel):
    dataset_id: str = Field(description="The dataset.", examples=["ds-6f1c0e9b2a4d4f3e8b1a"])
    columns: list[str] = Field(description="Column names, in order.", examples=[["State", "Murder"]])
    rows: list[list[CellValue]] = Field(description="Rows in stored order.", examples=[[["Alabama", 13.2]]])
    offset: int = Field(description="Index of the first row returned.", examples=[0])
    limit: int = Field(description="Most rows asked for.", examples=[100])
    total: int = Field(description="Rows in the dataset.", examples=[50])


class JoinStep(BaseModel):
    """Join another dataset, 1:1, on a join column of each side (by default: the two key columns).

    Duplicate join values on either side are an error. The result keeps this dataset's rows in
    order (`inner`: those that find a match), then the other side's columns; the other side's join
    column is not repeated. A non-key column name both sides have is an error unless `suffixes`
    are given."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"op": "join", "dataset_id": "ds-0a1b2c3d4e5f60718293"},
                {
                    "op": "join",
                    "dataset_id": "ds-0a1b2c3d4e5f60718293",
                    "how": "left",
                    "left_on": "State",
                    "right_on": "state_name",
                    "suffixes": ["_crimes", "_facts"],
                },
            ]
        }
    )

    op: Literal["join"]
    dataset_id: str = Field(description="The dataset to join in.", examples=["ds-0a1b2c3d4e5f60718293"])
    how: Literal["inner", "left"] = Field(
        default="inner",
        description="`inner` keeps the rows whose join value is on both sides; `left` keeps every row of this "
        "dataset (the other side's columns are null where it has no match; its integer columns become floats).",
    )
    on: str | None = Field(
        default=None,
        description="One name for both sides' join column (like `left_on` and `right_on` both set to it), e.g. to "
        "join on a column that is not a key. Not together with `left_on` or `right_on` (400).",
        examples=["State"],
    )
    left_on: str | None = Field(
        default=None,
        description="This dataset's join column, when the two sides name theirs differently (given without "
        "`right_on`, the other side joins on its key column). Default: this dataset's key column (400 when it has "
        "none). The result keeps it under this name.",
        examples=["State"],
    )
    right_on: str | None = Field(
        default=None,
        description="The other dataset's join column; the result does not repeat it. Default: the other "
        "dataset's key column, whatever its name; when that dataset has no key column, its column named like this "
        "side's join column (400 when it has none either: pass `right_on`).",
        examples=["state_name"],
    )
    suffixes: tuple[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=64)]] | None = Field(
        default=None,
        description="`[left_suffix, right_suffix]`, as in `pandas.merge`: a column name both datasets have "
        "(besides the join columns) is kept on both sides, renamed with this dataset's suffix on its side and "
        "the other's on the other side (this dataset's join column always keeps its name). Default: none, and "
        "such a name is a 400 naming the columns. Suffixes that leave two columns with one name (e.g. two "
        'empty ones) are a 400 naming them. The suffixed names are what later steps use (`"Murder_crimes"`).',
        examples=[["_crimes", "_facts"]],
    )

    @field_validator("suffixes")
    @classmethod
    def _printable_suffixes(cls, value: tuple[str, str] | None) -> tuple[str, str] | None:
        for suffix in value or ():
            if any(ord(ch) < 32 or ord(ch) == 127 or 0xD800 <= ord(ch) <= 0xDFFF for ch in suffix):
                raise ValueError("suffixes must be text without control characters or lone surrogates")
        return value


class ScaleStep(BaseModel):
    """Rescale numeric columns; the fitted parameters are stored in the recipe."""

    op: Literal["scale"]
    columns: list[ColumnName] = Field(min_length=1, description="Columns to scale.", examples=[["DensityPerMile"]])
    method: Literal["minmax", "standard"] = Field(
        default="minmax",
        description="`minmax`: linear map of [min, max] onto `feature_range` (like `np.interp`); `standard`: z-score.",
    )
    feature_range: tuple[float, float] = Field(
        default=(-1.0, 1.0), description="Target range for `minmax`.", examples=[[-1.0, 1.0]]
    )

    @field_validator("feature_range")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not (low < high) or any(abs(v) == float("inf") for v in value):
            raise ValueError("feature_range must be two finite numbers with low < high")
        return value


class SelectStep(BaseModel):
    """Keep only these columns, in this order (the key column is always kept, first)."""

    op: Literal["select"]
    columns: list[ColumnName] = Field(min_length=1, examples=[["Murder", "Assault", "UrbanPop", "Rape"]])


class DropStep(BaseModel):
    """Remove columns."""

    op: Literal["drop"]
    columns: list[ColumnName] = Field(min_length=1, examples=[["UrbanPop"]])


class RenameStep(BaseModel):
    """Rename columns (old name → new name)."""

    op: Literal["rename"]
    mapping: dict[str, ColumnName] = Field(min_length=1, examples=[{"DensityPerMile": "Density"}])


class DropNaStep(BaseModel):
    """Drop rows with a null in any of `columns` (default: any column)."""

    op: Literal["dropna"]
    columns: list[ColumnName] | None = Field(default=None, examples=[["Murder"]])


_NO_NUL: dict[str, Any] = {"pattern": "^[^\\x00]*$"}


class FillNaStep(BaseModel):
    """Fill nulls with the column mean or a constant; the values used are stored in the recipe."""

    op: Literal["fillna"]
    columns: list[ColumnName] | None = Field(default=None, description="Default: every column with nulls.")
    strategy: Literal["mean", "constant"] = Field(default="mean")
    value: StrictFloat | StrictInt | Annotated[StrictStr, Field(json_schema_extra=_NO_NUL)] | None = Field(
        default=None,
        description="The constant for `strategy: constant` (a finite number, or text without NUL characters).",
        examples=[0],
    )

    @field_validator("value")
    @classmethod
    def _finite(cls, value: float | int | str | None) -> float | int | str | None:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be a finite number (NaN and infinities would poison every distance)")
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value


DeriveStep = Annotated[
    JoinStep | ScaleStep | SelectStep | DropStep | RenameStep | DropNaStep | FillNaStep,
    Field(discriminator="op"),
]


class DeriveRequest(BaseModel):
    """Make a new dataset by applying steps, in order, to an existing one."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "densities-scaled",
                    "steps": [{"op": "scale", "columns": ["DensityPerMile"], "method": "minmax"}],
                },
                {
                    "name": "workshop-features",
                    "steps": [
                        {"op": "join", "dataset_id": "ds-0a1b2c3d4e5f60718293", "how": "inner"},
                        {"op": "select", "columns": ["Murder", "Assault", "UrbanPop", "Rape", "DensityPerMile"]},
                    ],
                },
            ]
        }
    )

    name: Name
    steps: list[DeriveStep] = Field(min_length=1, max_length=100, description="Steps applied in order.")


class DatasetTaskProgress(BaseModel):
    """How far a task is; written by the worker about once a second while it runs."""

    stage: str = Field(
        description="What the task is doing: `queued`, `parsing` (an upload), `step 2 of 3: scale` (a derive), "
        "`writing`, `checking the result`, `done`.",
        examples=["writing"],
    )
    stage_index: int = Field(description="1-based number of the current stage (0 while queued).", examples=[4])
    stages: int = Field(description="Stages the task goes through (a derive: its steps + 2; an upload: 2).")
    done: int = Field(description="Units of the current stage finished (see `unit`).", examples=[4_000_000])
    total: int | None = Field(description="Units the current stage has in all, when known.", examples=[10_000_000])
    unit: Literal["rows", "bytes"] = Field(description="What `done` and `total` count.", examples=["rows"])
    rows_written: int = Field(description="Rows of the new dataset written so far.", examples=[4_000_000])
    percent: float = Field(
        description="An estimate over all stages (each stage an equal share; a stage that is one long database "
        "statement follows that statement's own progress). Never decreases; 100 only once Completed.",
        examples=[72.5],
    )


class DatasetTaskError(BaseModel):
    code: str = Field(
        description="The error code a synchronous request would have answered.", examples=["invalid_input"]
    )
    message: str = Field(examples=["step 1 (scale): column 'State' is not numeric"])
    details: Any = Field(default=None, description="Structured context, as in the synchronous error body.")


class DatasetTask(BaseModel):
    """An upload or derive run in the background (asked for with `Prefer: respond-async`).

    Run by a worker under a lease, like a training job: if the worker dies, another one runs the task
    again from the start (the new dataset is committed once, with the task's completion)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "dt-5c0f4e1a2b3c4d5e6f70",
                    "kind": "derive",
                    "name": "workshop-features",
                    "status": "InProgress",
                    "parent_id": "ds-0a1b2c3d4e5f60718293",
                    "progress": {
                        "stage": "writing",
                        "stage_index": 3,
                        "stages": 4,
                        "done": 4000000,
                        "total": 10000000,
                        "unit": "rows",
                        "rows_written": 4000000,
                        "percent": 60.0,
                    },
                    "dataset_id": None,
                    "error": None,
                    "attempts": 1,
                    "created_at": "2026-12-03T10:00:00Z",
                    "started_at": "2026-12-03T10:00:01Z",
                    "ended_at": None,
                }
            ]
        }
    )

    id: str = Field(description="The task's id (`dt-...`); `GET /dataset-tasks/{id}` follows it.")
    kind: Literal["upload", "derive"] = Field(description="A CSV upload's parsing, or a derive.")
    name: str = Field(description="The name the new dataset will have.")
    status: DatasetTaskStatus = Field(
        description="`Pending` (waiting for a worker), `InProgress`, `Completed` (`dataset_id` is set) or "
        "`Failed` (`error` says why, as the synchronous request would have)."
    )
    parent_id: str | None = Field(description="A derive's input dataset (null for an upload).")
    progress: DatasetTaskProgress
    dataset_id: str | None = Field(description="The new dataset, once Completed.")
    error: DatasetTaskError | None = Field(description="Why the task failed, once Failed.")
    attempts: int = Field(description="How many times a worker started this task (>1 after a crash).")
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
