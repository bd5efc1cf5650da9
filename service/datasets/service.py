"""Dataset use cases: create (CSV, JSON, or registered from S3), derive, read, export, delete.

A dataset registered from S3 (:mod:`service.datasets.s3`) has no Parquet file of Centroid's: its
rows are read from its objects by the same streaming reader training uses. Reading (metadata,
summary, rows, CSV download), training and deleting work on it; a derive (which needs Centroid's
own Parquet files for DuckDB) is refused with 409, and so are predictions for a ``dataset_id`` and
model assignments (``DatasetTable.storage_key`` refuses them: they read only stored files)."""

from __future__ import annotations

import csv
import io
import itertools
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import asdict
from pathlib import Path, PurePath
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq
from sqlalchemy.orm import Session

from schemas.datasets import DatasetCreate, DeriveRequest, JoinStep, S3DatasetCreate
from service.datasets.columnar import ParquetInput, check_key_parquet, derive_parquet
from service.datasets.ingest import (
    CsvSpool,
    SpoolFacts,
    check_key_column,
    check_spool,
    ingest_csv,
    read_header,
    summarise_parquet,
)
from service.datasets.parsing import NUMBER_PATTERN, frame_from_rows, type_columns
from service.datasets.progress import Progress
from service.datasets.repository import DatasetRepository
from service.datasets.s3 import record_batches, register, s3_filesystem
from service.datasets.task_repository import PENDING, UPLOADS_PREFIX, DatasetTaskRepository, upload_key
from service.datasets.transforms import (
    Recipe,
    RecipeLimits,
    RecipeSize,
    Table,
    check_recipe,
    derived_recipe,
    is_numeric,
    recipe_size,
    recipe_summary,
)
from service.db.changes import announce_work, bump_serving, work_committed
from service.db.tables import DatasetTable, DatasetTaskTable
from service.errors import Conflict, InsufficientStorage, InvalidInput, storage_error
from service.ids import new_id
from service.settings import Settings
from service.storage import TEMP_PREFIX, LocalArtifactStore, StagedFile

DATASET_PREFIX = "datasets"
WORK_PREFIX = "work"  # scratch space of the columnar engine (spill files), emptied at start-up
KEY_CHECK_MEMORY = "64MB"  # DuckDB's limit for an upload's key check; it spills to disk beyond it
CSV_CHUNK_ROWS = 10_000

# Who still uses a dataset: each check returns human-readable references to its users.
UsageCheck = Callable[[Session, str], list[str]]
# A background task's completion, written in the transaction that commits its dataset: False when
# the task's lease is no longer held (the task then belongs to another worker).
Completion = Callable[[], bool]


class TaskLeaseLost(Exception):
    """A background task's lease ran out before its dataset was committed (nothing was)."""


def build_dataset_service(
    session: Session, settings: Settings, store: LocalArtifactStore, usage_checks: Sequence[UsageCheck] = ()
) -> DatasetService:
    """The service as the API and the workers configure it (limits from the settings)."""
    return DatasetService(
        session,
        store,
        max_columns=settings.max_columns,
        row_group_rows=settings.parquet_row_group_rows,
        columnar_memory_mb=settings.derive_memory_mb,
        usage_checks=usage_checks,
        s3=lambda: s3_filesystem(settings),
        recipe_limits=RecipeLimits(
            max_depth=settings.max_recipe_depth,
            max_datasets=settings.max_recipe_datasets,
            max_steps=settings.max_recipe_steps,
            max_bytes=settings.max_recipe_bytes,
        ),
    )


def staged_key(dataset_id: str) -> str:
    return f"{DATASET_PREFIX}/{dataset_id}.parquet"


def dtype_name(series: pd.Series) -> str:
    if pd.api.types.is_integer_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
        return "int64"
    if is_numeric(series):
        return "float64"
    return "string"


def json_cells(frame: pd.DataFrame) -> list[list[Any]]:
    """Rows as JSON-ready lists (NaN/NA become null)."""
    as_object = frame.astype(object)
    return as_object.where(frame.notna(), None).to_numpy().tolist()


class DatasetService:
    def __init__(
        self,
        session: Session,
        store: LocalArtifactStore,
        *,
        max_columns: int,
        row_group_rows: int,
        usage_checks: Sequence[UsageCheck] = (),
        recipe_limits: RecipeLimits | None = None,
        columnar_memory_mb: int = 256,
        s3: Callable[[], pa_fs.FileSystem] | None = None,
    ) -> None:
        """``s3`` opens the filesystem datasets in S3 are read through (None: they are refused)."""
        self.columnar_memory_mb = columnar_memory_mb
        self._s3 = s3
        self.session = session
        self.recipe_limits = recipe_limits or RecipeLimits()
        self.usage_checks = list(usage_checks)
        self.repository = DatasetRepository(session)
        self.tasks = DatasetTaskRepository(session)
        self.store = store
        self.max_columns = max_columns
        self.row_group_rows = row_group_rows

    # --- creation -----------------------------------------------------------------------------

    def new_spool(self) -> CsvSpool:
        """A temp file in the artifact directory for an upload (swept at start-up if a crash leaves it)."""
        directory = self.store.path(DATASET_PREFIX)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            return CsvSpool(directory / f"{TEMP_PREFIX}upload-{uuid.uuid4().hex}.csv")
        except OSError as exc:
            raise storage_error(exc, DATASET_PREFIX) from exc

    def check_free_space(self, upload_bytes: int) -> None:
        """507 before reading an upload the disk cannot hold: the CSV, then its Parquet file."""
        try:
            free = shutil.disk_usage(self.store.root).free
        except OSError:
            return
        needed = 2 * upload_bytes
        if free < needed:
            raise InsufficientStorage(
                f"no space left in the artifact store for an upload of {upload_bytes} bytes: {free} bytes are free, "
                f"about {needed} are needed (the file and its Parquet copy)",
                details={"free_bytes": free, "needed_bytes": needed},
            )

    def create_from_csv(
        self,
        name: str,
        spool: Path,
        facts: SpoolFacts,
        *,
        key_column: str | None,
        filename: str | None,
        delimiter: str = ",",
        dataset_id: str | None = None,
        progress: Progress | None = None,
        complete: Completion | None = None,
    ) -> DatasetTable:
        """Parse the spooled CSV at ``spool`` column-wise into a new dataset (see ``ingest``).

        A background task passes the dataset id it was given, its ``progress`` and ``complete``
        (see :meth:`_commit_new`)."""
        recipe: Recipe = {"source": "upload", "filename": _safe_filename(filename), "columns": []}
        dataset_id = dataset_id or new_id("ds")
        progress = progress or Progress()
        progress.plan(2)
        with self.store.staged(staged_key(dataset_id)) as staged:
            result = ingest_csv(
                spool,
                facts,
                staged.path,
                delimiter=delimiter,
                key_column=key_column,
                max_columns=self.max_columns,
                row_group_rows=self.row_group_rows,
                progress=progress,
            )
            progress.stage("checking the result")
            if key_column is not None and not result.key_ascending:
                with self._work_directory() as work:
                    check_key_parquet(staged.path, key_column, memory_limit=KEY_CHECK_MEMORY, temp_directory=work)
            recipe["columns"] = result.header
            self._commit_new(
                staged,
                dataset_id,
                name,
                key_column,
                result.columns,
                result.row_count,
                recipe,
                result.summary,
                complete=complete,
            )
        return self.repository.get(dataset_id)

    def create_from_rows(self, request: DatasetCreate) -> DatasetTable:
        if len(request.columns) > self.max_columns:
            raise InvalidInput(f"at most {self.max_columns} columns are allowed")
        parsed = type_columns(frame_from_rows(request.columns, request.rows), request.key_column)
        recipe: Recipe = {"source": "json", "columns": list(request.columns)}
        return self._store_new(request.name, Table(parsed.frame, parsed.key_column), recipe)

    def create_from_s3(self, request: S3DatasetCreate) -> DatasetTable:
        """Register the objects under an S3 prefix as a dataset: their schema, row count and summary
        are read from them (see :mod:`service.datasets.s3`); nothing is copied."""
        registered = register(self.s3_filesystem(), request, max_columns=self.max_columns)
        recipe: Recipe = registered.recipe
        row = DatasetTable(
            id=new_id("ds"),
            name=request.name,
            key_column=request.key_column,
            columns=registered.columns,
            row_count=registered.row_count,
            size_bytes=registered.size_bytes,
            storage_key="",
            location=registered.location,
            recipe=recipe,
            recipe_summary=recipe_summary(recipe, recipe_size(recipe)),
            summary=registered.summary,
        )
        self.repository.add(row)
        self.session.commit()
        return row

    def s3_filesystem(self) -> pa_fs.FileSystem:
        """The filesystem datasets in S3 are read through (400 when S3 is not configured)."""
        if self._s3 is None:
            raise InvalidInput("datasets in S3 are not available here", details={"reason": "s3_not_configured"})
        return self._s3()

    def derive(
        self,
        parent_id: str,
        request: DeriveRequest,
        *,
        dataset_id: str | None = None,
        progress: Progress | None = None,
        complete: Completion | None = None,
    ) -> DatasetTable:
        """Apply the steps; the recipe names the parent and each join's dataset by id (a DAG).

        The recipe's ceilings are checked from the inputs' stored recipes before any data is read,
        and once more (its bytes) with the fitted steps. A background task passes the dataset id it
        was given, its ``progress`` and ``complete`` (see :meth:`_commit_new`).
        """
        inputs = self._derive_inputs(parent_id, request)
        recipes = {input_id: row.recipe for input_id, row in inputs.items()}
        parquet_inputs = {input_id: self._parquet_input(row) for input_id, row in inputs.items()}
        dataset_id = dataset_id or new_id("ds")
        with self.store.staged(staged_key(dataset_id)) as staged, self._work_directory() as work:
            result = derive_parquet(
                parquet_inputs[parent_id],
                request.steps,
                parquet_inputs,
                staged.path,
                row_group_rows=self.row_group_rows,
                memory_limit=f"{self.columnar_memory_mb}MB",
                temp_directory=work,
                progress=progress,
            )
            recipe = derived_recipe(parent_id, result.steps, recipes)
            size = check_recipe(recipe, self.recipe_limits)
            summary = summarise_parquet(staged.path, result.columns)
            return self._commit_new(
                staged,
                dataset_id,
                request.name,
                result.key_column,
                result.columns,
                result.row_count,
                recipe,
                summary,
                size,
                complete=complete,
            )

    def _derive_inputs(self, parent_id: str, request: DeriveRequest) -> dict[str, DatasetTable]:
        """The parent and every joined dataset (404 for a missing one); the recipe's ceilings checked
        from their stored recipes, before any data is read."""
        parent = self.repository.get(parent_id)
        inputs = {parent.id: parent}
        for step in request.steps:
            if isinstance(step, JoinStep) and step.dataset_id not in inputs:
                inputs[step.dataset_id] = self.repository.get(step.dataset_id)
        in_s3 = [row for row in inputs.values() if row.in_s3]
        if in_s3:
            row = in_s3[0]
            uri = (row.location or {}).get("uri")
            raise Conflict(
                f"dataset {row.id!r} stays in S3 ({uri}): derives run on the Parquet files Centroid stores, and it "
                "has none. Train on it as it is, or upload the data (POST /datasets) to derive from it",
                details={"dataset_id": row.id, "uri": uri, "reason": "dataset_in_s3"},
            )
        recipes = {input_id: row.recipe for input_id, row in inputs.items()}
        planned = [
            {"op": step.op, "dataset_id": step.dataset_id} if isinstance(step, JoinStep) else {"op": step.op}
            for step in request.steps
        ]
        check_recipe(derived_recipe(parent.id, planned, recipes), self.recipe_limits)
        return inputs

    # --- background tasks ---------------------------------------------------------------------

    def submit_derive(self, parent_id: str, request: DeriveRequest) -> DatasetTaskTable:
        """A derive to run in the background; what can be refused without reading data is refused now."""
        inputs = self._derive_inputs(parent_id, request)
        progress = Progress(len(request.steps) + 2)
        task = DatasetTaskTable(
            id=new_id("dt"),
            kind="derive",
            name=request.name,
            status=PENDING,
            parent_id=parent_id,
            input_ids=list(inputs),
            request=request.model_dump(mode="json"),
            progress=progress.snapshot(),
            dataset_id=new_id("ds"),
            attempts=0,
        )
        return self._submit(task)

    def submit_upload(
        self,
        name: str,
        spool: Path,
        facts: SpoolFacts,
        *,
        key_column: str | None,
        filename: str | None,
        delimiter: str = ",",
    ) -> DatasetTaskTable:
        """An upload to parse in the background. The file's bytes, header and key column are
        checked now (400 at once); the spooled file moves to ``uploads/<task id>.csv`` until the
        task ends."""
        check_spool(facts)
        check_key_column(read_header(spool, delimiter, self.max_columns), key_column)
        task_id = new_id("dt")
        key = upload_key(task_id)
        target = self.store.path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(spool, target)
        except OSError as exc:
            raise storage_error(exc, key) from exc
        task = DatasetTaskTable(
            id=task_id,
            kind="upload",
            name=name,
            status=PENDING,
            parent_id=None,
            input_ids=[],
            request={
                "upload_key": key,
                "facts": asdict(facts),
                "key_column": key_column,
                "filename": filename,
                "delimiter": delimiter,
            },
            progress=Progress(2).snapshot(),
            dataset_id=new_id("ds"),
            attempts=0,
        )
        try:
            return self._submit(task)
        except BaseException:
            target.unlink(missing_ok=True)
            raise

    def _submit(self, task: DatasetTaskTable) -> DatasetTaskTable:
        self.tasks.add(task)
        announce_work(self.session)
        self.session.commit()
        work_committed()
        return task

    def run_task(self, task: DatasetTaskTable, progress: Progress, complete: Completion) -> DatasetTable:
        """Do what ``task`` asks (in a worker); its completion is committed with the new dataset."""
        if task.kind == "derive":
            assert task.parent_id is not None
            request = DeriveRequest.model_validate(task.request)
            return self.derive(
                task.parent_id, request, dataset_id=task.dataset_id, progress=progress, complete=complete
            )
        spec = task.request
        return self.create_from_csv(
            task.name,
            self.store.path(spec["upload_key"]),
            SpoolFacts(**spec["facts"]),
            key_column=spec["key_column"],
            filename=spec["filename"],
            delimiter=spec["delimiter"],
            dataset_id=task.dataset_id,
            progress=progress,
            complete=complete,
        )

    def _parquet_input(self, row: DatasetTable) -> ParquetInput:
        return ParquetInput(self.store.path(row.storage_key), row.key_column, list(row.columns))

    @contextmanager
    def _work_directory(self) -> Iterator[Path]:
        """A scratch directory for the columnar engine's spill files, removed afterwards (and at
        start-up, if a crash left one: see :func:`sweep_orphan_files`)."""
        root = self.store.path(WORK_PREFIX)
        try:
            root.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(dir=root))
        except OSError as exc:
            raise storage_error(exc, WORK_PREFIX) from exc
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _store_new(self, name: str, table: Table, recipe: Recipe, size: RecipeSize | None = None) -> DatasetTable:
        """Write the Parquet file and the row together: both land, or neither does."""
        dataset_id = new_id("ds")
        key = staged_key(dataset_id)
        frame = table.frame.reset_index(drop=True)
        columns = [{"name": c, "dtype": dtype_name(frame[c])} for c in frame.columns]
        with self.store.staged(key) as staged:
            frame.to_parquet(staged.path, index=False, row_group_size=self.row_group_rows)
            return self._commit_new(
                staged,
                dataset_id,
                name,
                table.key_column,
                columns,
                len(frame),
                recipe,
                summarise_parquet(staged.path, columns),
                size,
            )

    def _commit_new(
        self,
        staged: StagedFile,
        dataset_id: str,
        name: str,
        key_column: str | None,
        columns: list[dict[str, str]],
        row_count: int,
        recipe: Recipe,
        summary: list[dict[str, Any]],
        size: RecipeSize | None = None,
        *,
        complete: Completion | None = None,
    ) -> DatasetTable:
        """The row for a written file; the file is published and the row committed together.

        ``complete`` (a background task's) writes the task's completion in the same transaction and
        says whether the task's lease was still held; when it was not, nothing is published or
        committed (:class:`TaskLeaseLost`): another worker runs the task."""
        row = DatasetTable(
            id=dataset_id,
            name=name,
            key_column=key_column,
            columns=columns,
            row_count=row_count,
            size_bytes=staged.path.stat().st_size,
            storage_key=staged_key(dataset_id),
            recipe=recipe,
            recipe_summary=recipe_summary(recipe, size or recipe_size(recipe)),
            summary=summary,
        )
        self.repository.add(row)
        if complete is not None and not complete():
            self.session.rollback()
            raise TaskLeaseLost(f"the lease on the task making dataset {dataset_id!r} was lost")
        staged.publish()
        self.session.commit()
        return row

    # --- reading ------------------------------------------------------------------------------

    def get(self, dataset_id: str) -> DatasetTable:
        return self.repository.get(dataset_id)

    def page(self, offset: int, limit: int, name: str | None) -> tuple[list[DatasetTable], int]:
        return self.repository.page(offset, limit, name)

    def summary(self, row: DatasetTable) -> list[dict[str, Any]]:
        """Stored with the dataset; for datasets written before summaries were stored, computed one
        row group at a time."""
        if row.summary is not None:
            return list(row.summary)
        return summarise_parquet(self.store.path(row.storage_key), list(row.columns))

    def rows(self, row: DatasetTable, offset: int, limit: int) -> list[list[Any]]:
        """Rows [offset, offset+limit), reading only the Parquet row groups that hold them (a dataset
        in S3: only the objects that hold them, streamed up to the last row asked for)."""
        if row.in_s3:
            return self._s3_rows(row, offset, limit)
        parquet = pq.ParquetFile(self.store.path(row.storage_key))
        pieces: list[pd.DataFrame] = []
        start = 0
        for group in range(parquet.num_row_groups):
            size = parquet.metadata.row_group(group).num_rows
            if start + size > offset and start < offset + limit:
                piece = parquet.read_row_group(group).to_pandas()
                pieces.append(piece.iloc[max(offset - start, 0) : offset + limit - start])
            start += size
        if not pieces:
            return []
        return json_cells(pd.concat(pieces, ignore_index=True))

    def _s3_rows(self, row: DatasetTable, offset: int, limit: int) -> list[list[Any]]:
        if offset >= row.row_count:
            return []
        pieces: list[pa.RecordBatch] = []
        wanted = limit
        batches = record_batches(row, self.s3_filesystem(), min(limit, CSV_CHUNK_ROWS), first_row=offset)
        with closing(batches):
            for batch in batches:
                pieces.append(batch.slice(0, wanted))
                wanted -= min(wanted, batch.num_rows)
                if not wanted:
                    break
        if not pieces:
            return []
        return json_cells(pa.Table.from_batches(pieces).to_pandas())

    def csv_chunks(self, row: DatasetTable, *, spreadsheet_safe: bool = False) -> Iterator[bytes]:
        """The dataset as CSV, streamed row group by row group.

        Cells are written exactly as stored. With ``spreadsheet_safe``, text cells (and header names)
        that a spreadsheet would evaluate as a formula get a leading ``'`` (see :func:`neutralise_formulas`).
        A dataset in S3 is read from its objects; its first piece is read before this returns, so
        S3's refusal (or a missing object) is an ordinary error response rather than a cut stream.
        """
        if row.in_s3:
            batches = record_batches(row, self.s3_filesystem(), CSV_CHUNK_ROWS)
            chunks = self._csv_pieces(batches, spreadsheet_safe)
            first = next(chunks, None)
            if first is None:
                header = pd.DataFrame(columns=[column["name"] for column in row.columns])
                return iter([self._csv_piece(header, spreadsheet_safe, header=True)])
            return itertools.chain([first], chunks)
        parquet = pq.ParquetFile(self.store.path(row.storage_key))
        return self._csv_pieces(parquet.iter_batches(batch_size=CSV_CHUNK_ROWS), spreadsheet_safe)

    def _csv_pieces(self, batches: Iterator[pa.RecordBatch], spreadsheet_safe: bool) -> Iterator[bytes]:
        header = True
        for batch in batches:
            yield self._csv_piece(batch.to_pandas(), spreadsheet_safe, header=header)
            header = False

    @staticmethod
    def _csv_piece(frame: pd.DataFrame, spreadsheet_safe: bool, *, header: bool) -> bytes:
        if spreadsheet_safe:
            frame = neutralise_formulas(frame)
        # The csv module quotes a cell holding "\n" but not one holding a lone "\r", which every
        # reader then takes for a line break: such a batch quotes all its text cells instead.
        quoting = csv.QUOTE_NONNUMERIC if _holds_carriage_return(frame) else csv.QUOTE_MINIMAL
        buffer = io.StringIO()
        frame.to_csv(buffer, index=False, header=header, lineterminator="\n", quoting=quoting)
        return buffer.getvalue().encode("utf-8")

    # --- deletion -----------------------------------------------------------------------------

    def delete(self, dataset_id: str) -> None:
        """Delete a dataset nothing uses; 409 naming its users otherwise.

        Safe against a concurrent job or model creation naming it: on PostgreSQL the row is locked
        first (the other request commits before the check, which then sees it, or finds the dataset
        gone); on SQLite the foreign key refuses the delete and the users are read again to say why.
        """
        from sqlalchemy.exc import IntegrityError

        from service.errors import NotFound

        row = self.repository.get(dataset_id)
        key = None if row.in_s3 else row.storage_key  # a dataset in S3: its objects are the user's, left alone

        def refuse_if_used() -> None:
            users = [ref for check in self.usage_checks for ref in check(self.session, dataset_id)]
            if users:
                raise Conflict(
                    f"dataset {dataset_id!r} is still used by {', '.join(users[:5])}", details={"used_by": users}
                )

        if self.session.get(DatasetTable, dataset_id, with_for_update=True) is None:
            raise NotFound(f"dataset {dataset_id!r} not found", details={"dataset_id": dataset_id})
        refuse_if_used()
        try:
            self.repository.delete(row)
            bump_serving(self.session)  # every process drops its cached reads of this dataset
            self.session.commit()
        except IntegrityError as exc:  # a job or model started using it after the check
            self.session.rollback()
            refuse_if_used()
            raise Conflict(
                f"dataset {dataset_id!r} was taken into use by a concurrent request; retry",
                details={"dataset_id": dataset_id},
            ) from exc
        if key is not None:
            self.store.delete(key)


# OWASP's CSV-injection guidance: a cell starting with one of these is a formula to a spreadsheet.
_FORMULA_START = r"^[=+\-@\t\r]"


def neutralise_formulas(frame: pd.DataFrame) -> pd.DataFrame:
    """Prefix ``'`` to text cells (and column names) a spreadsheet would run as a formula.

    Numeric columns are untouched, and so are text cells that are a number as a whole (``-3``,
    ``+1.5e3``): a spreadsheet reads those as numbers, and a negative number is data, not an attack.
    Work is columnar (vectorised string matching per text column).
    """
    columns = {name: _neutralise_cell(str(name)) for name in frame.columns}
    out = frame.rename(columns=columns) if any(k != v for k, v in columns.items()) else frame.copy()
    for position in range(frame.shape[1]):
        series = frame.iloc[:, position]
        if is_numeric(series) or pd.api.types.is_bool_dtype(series.dtype):
            continue
        text = series.astype("string")
        risky = text.str.contains(_FORMULA_START, regex=True) & ~text.str.fullmatch(NUMBER_PATTERN)
        risky = risky.fillna(False).astype(bool)
        if risky.any():
            out.iloc[:, position] = text.where(~risky, "'" + text)
    return out


def _holds_carriage_return(frame: pd.DataFrame) -> bool:
    for position in range(frame.shape[1]):
        series = frame.iloc[:, position]
        if not is_numeric(series) and series.astype("string").str.contains("\r", regex=False).any():
            return True
    return False


def _neutralise_cell(text: str) -> str:
    return "'" + text if re.match(_FORMULA_START, text) and not re.fullmatch(NUMBER_PATTERN, text) else text


def sweep_orphan_files(session: Session, store: LocalArtifactStore, grace_seconds: float) -> list[str]:
    """Remove dataset files no row names (left by a process killed between write and commit, an
    upload's spool file among them) and scratch directories older than the grace period."""
    work = store.path(WORK_PREFIX)
    if work.is_dir():
        cutoff = time.time() - grace_seconds
        for entry in work.iterdir():
            if entry.is_dir() and entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
    removed = store.sweep_orphans(DATASET_PREFIX, DatasetRepository(session).storage_keys(), grace_seconds)
    # an upload waiting for its task is kept; one whose task ended (or never committed) goes
    return removed + store.sweep_orphans(
        UPLOADS_PREFIX, DatasetTaskRepository(session).active_upload_keys(), grace_seconds
    )


def _safe_filename(filename: str | None) -> str | None:
    if not filename:
        return None
    printable = "".join(ch for ch in filename if ch.isprintable())  # no NUL/control chars in the recipe
    return PurePath(printable.replace("\\", "/")).name[:200] or None
