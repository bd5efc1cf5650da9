"""Sweep use cases: create (validated like a training job), read, stop, delete, and register one
k as a model. The sweep itself runs in a worker (workers/sweeps.py)."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from schemas.sweeps import (
    MAX_SWEEP_KS,
    SweepCreate,
    SweepKResult,
    SweepModelCreate,
    SweepRecommendation,
    SweepTrainingJob,
    SweepView,
)
from service.backends.base import TrainedModel
from service.backends.registry import BackendRegistry
from service.datasets.repository import DatasetRepository
from service.db.changes import announce_work, work_committed
from service.db.tables import DatasetTable, ModelTable, SweepTable
from service.engine import ENGINE_VERSION, ModelState, write_model_tar
from service.engine.metrics import full_pass_name
from service.errors import Conflict, InvalidInput, NotFound
from service.jobs.service import JobService, default_features
from service.models.service import ModelService
from service.settings import Settings
from service.statuses import JobStatus
from service.storage import LocalArtifactStore
from service.sweeps.repository import FINAL_STATUSES, SweepRepository


class SweepService:
    def __init__(
        self, session: Session, store: LocalArtifactStore, backends: BackendRegistry, settings: Settings
    ) -> None:
        self.session = session
        self.sweeps = SweepRepository(session)
        self.datasets = DatasetRepository(session)
        self.store = store
        self.settings = settings
        self.backends = backends
        # The feature and hyperparameter rules are a training job's, exactly.
        self.jobs = JobService(session, store, backends, settings)

    def create(self, request: SweepCreate) -> SweepTable:
        if self.sweeps.find(request.name) is not None:
            raise Conflict(f"sweep {request.name!r} already exists", details={"name": request.name})
        backend = self.backends.usable(request.backend)
        ks = request.k_values()
        if not ks:
            raise InvalidInput("k: min must be <= max", details={"k": request.k.model_dump()})  # type: ignore[union-attr]
        if len(ks) > MAX_SWEEP_KS:
            raise InvalidInput(f"a sweep holds at most {MAX_SWEEP_KS} ks, got {len(ks)}", details={"ks": len(ks)})
        # Each dataset is held until the commit (PostgreSQL: FOR KEY SHARE), so a concurrent delete
        # waits for this sweep (and then sees it) or removes the dataset first (found gone here), as
        # for a training job; on SQLite a file gone mid-check is a 409 naming the dataset.
        train = self._held(self.datasets.get(request.train_dataset_id), request.name)
        test = self._held(self.datasets.get(request.test_dataset_id), request.name) if request.test_dataset_id else None
        features = request.feature_columns or default_features(train)
        try:
            self.jobs.check_features(train, features, "training")
            if test is not None:
                self.jobs.check_features(test, features, "test")
        except FileNotFoundError as exc:
            raise self._deleted(
                test.id if test is not None and train.id != test.id else train.id, request.name
            ) from exc
        raw = request.hyperparameters.model_dump(exclude_none=True)
        raw.pop("k", None)
        # Validated at the largest k: the streaming stage's size, and every ceiling, are its.
        hyperparameters = self.jobs.hyperparameters_for({**raw, "k": ks[-1]}, train, test, features)
        evaluated = (test or train).row_count
        row = SweepTable(
            name=request.name,
            backend=request.backend,
            status=JobStatus.PENDING,
            status_message="waiting for a worker",
            train_dataset_id=train.id,
            test_dataset_id=test.id if test else None,
            feature_columns=features,
            k_values=ks,
            hyperparameters=hyperparameters.to_dict(),
            sample_size=request.sample_size,
            rows_processed=0,
            # in process: the streamed training rows too; remote: the worker only evaluates
            rows_total=train.row_count * hyperparameters.epochs + evaluated if backend.trains_in_process else evaluated,
        )
        try:
            self.sweeps.add(row)
            announce_work(self.session)
            self.session.commit()
        except IntegrityError as exc:
            self.session.rollback()
            if self.sweeps.find(request.name) is not None:
                raise Conflict(f"sweep {request.name!r} already exists", details={"name": request.name}) from exc
            raise Conflict(
                f"a dataset of sweep {request.name!r} was deleted while it was being created; retry",
                details={"name": request.name},
            ) from exc
        work_committed()
        return row

    def _held(self, dataset: DatasetTable, name: str) -> DatasetTable:
        if self.session.get(DatasetTable, dataset.id, with_for_update={"read": True, "key_share": True}) is None:
            raise self._deleted(dataset.id, name)
        return dataset

    @staticmethod
    def _deleted(dataset_id: str, name: str) -> Conflict:
        return Conflict(
            f"dataset {dataset_id!r} was deleted while sweep {name!r} was being created",
            details={"dataset_id": dataset_id, "reason": "dataset_deleted"},
        )

    def get(self, name: str) -> SweepTable:
        return self.sweeps.get(name)

    def page(self, offset: int, limit: int, status: str | None) -> tuple[list[SweepTable], int]:
        return self.sweeps.page(offset, limit, status)

    def stop(self, name: str) -> SweepTable:
        """A Pending sweep stops at once; a running one becomes Stopping and stops within a second."""
        sweep = self.sweeps.get(name)
        if sweep.status in FINAL_STATUSES:
            raise Conflict(f"sweep {name!r} is already {sweep.status}", details={"status": sweep.status})
        if not self.sweeps.stop_if_unclaimed(name):
            self.sweeps.request_stop(name)
        announce_work(self.session)
        self.session.commit()
        self.session.refresh(sweep)
        work_committed()
        return sweep

    def delete(self, name: str) -> None:
        """Delete a sweep that ended; 409 while it may still run. Models registered from it stay."""
        sweep = self.sweeps.get(name)
        if sweep.status not in FINAL_STATUSES:
            raise Conflict(
                f"sweep {name!r} is {sweep.status}; only a Completed, Failed or Stopped sweep can be deleted "
                f"(stop it first: POST /sweeps/{name}/stop)",
                details={"name": name, "status": sweep.status},
            )
        if not self.sweeps.delete_ended(name):
            self.session.rollback()
            raise NotFound(f"sweep {name!r} not found", details={"name": name})
        self.session.commit()

    def register_model(self, name: str, request: SweepModelCreate) -> ModelTable:
        """One k of a Completed sweep as a model (the recommended k by default), deployable like any
        other, with the training dataset's recipe. A k registered before gives 409 naming its model."""
        sweep = self.sweeps.get(name)
        if sweep.status != JobStatus.COMPLETED or not sweep.outcome or not sweep.trained_state:
            raise Conflict(
                f"sweep {name!r} is {sweep.status}; models come from a Completed sweep",
                details={"name": name, "status": sweep.status},
            )
        outcome, state_of_ks = sweep.outcome, sweep.trained_state
        k = request.k if request.k is not None else int(outcome["recommendation"]["k"])
        results = {int(result["k"]): result for result in outcome["results"]}
        if k not in results:
            raise InvalidInput(
                f"sweep {name!r} has no k={k}; it trained k = {', '.join(map(str, sorted(results)))}",
                details={"k": k, "k_values": sorted(results)},
            )
        registered = dict(outcome.get("models") or {})
        if str(k) in registered:
            raise Conflict(
                f"k={k} of sweep {name!r} is already model {registered[str(k)]!r}",
                details={"k": k, "model_id": registered[str(k)]},
            )
        result = results[k]
        dataset = self.datasets.get(sweep.train_dataset_id)
        centers = np.asarray(state_of_ks["centroids"][str(k)], dtype=np.float32)
        if "artifacts" in state_of_ks:  # trained on SageMaker: its own model.tar.gz, byte for byte
            artifact = base64.b64decode(state_of_ks["artifacts"][str(k)])
            engine_version, seed = None, None
        else:
            state = ModelState(
                centers=np.asarray(state_of_ks["local_centers"], dtype=np.float64),
                weights=np.asarray(state_of_ks["local_weights"], dtype=np.float64),
            )
            artifact = write_model_tar(centers, state)
            engine_version, seed = ENGINE_VERSION, sweep.hyperparameters.get("seed")
        training = outcome["evaluated_on"] == "training"
        metrics: dict[str, Any] = {} if result["train_msd"] is None else {"train:msd": result["train_msd"]}
        if training:
            metrics[full_pass_name("msd")] = result["msd"]
            metrics[full_pass_name("ssd")] = result["ssd"]
        else:
            metrics.update({"test:msd": result["msd"], "test:ssd": result["ssd"]})
        hyperparameters = {**sweep.hyperparameters, "k": k}
        trained = TrainedModel(
            centroids=centers,
            artifact=artifact,
            metrics=metrics,
            cluster_sizes=list(result["cluster_sizes"]) if training else None,
            engine_version=engine_version,
            seed=seed,
        )
        models = ModelService(self.session, self.store)
        row = models.register_from_sweep(
            request.name or f"{name}-k{k}", dataset, list(sweep.feature_columns), trained, hyperparameters
        )
        sweep.outcome = {**outcome, "models": {**registered, str(k): row.id}}
        self.session.commit()
        return row


def sweep_view(row: SweepTable) -> SweepView:
    outcome = row.outcome or {}
    models = outcome.get("models") or {}
    results = outcome.get("results")
    recommendation = outcome.get("recommendation")
    trials = (row.remote or {}).get("trials")
    jobs = None
    if trials is not None:  # trained remotely, one training job per k
        jobs = [
            SweepTrainingJob(
                k=k,
                training_job_name=str(trial["name"]),
                status=str(trial["status"]),
                billable_seconds=trial.get("billable_seconds"),
                failure_reason=trial.get("failure_reason"),
            )
            for k, trial in sorted((int(key), value) for key, value in trials.items())
        ]
    return SweepView(
        name=row.name,
        backend=row.backend,
        status=JobStatus(row.status),
        status_message=row.status_message,
        failure_reason=row.failure_reason,
        train_dataset_id=row.train_dataset_id,
        test_dataset_id=row.test_dataset_id,
        feature_columns=list(row.feature_columns),
        k_values=list(row.k_values),
        hyperparameters=dict(row.hyperparameters),
        sample_size=row.sample_size,
        rows_processed=row.rows_processed,
        rows_total=row.rows_total,
        evaluated_on=outcome.get("evaluated_on"),
        sample_rows=outcome.get("sample_rows"),
        results=None
        if results is None
        else [
            SweepKResult(
                **result,
                model_id=models.get(str(result["k"])),
            )
            for result in results
        ],
        recommendation=None if recommendation is None else SweepRecommendation(**recommendation),
        training_jobs=jobs,
        billable_seconds=None if jobs is None else sum(job.billable_seconds or 0.0 for job in jobs),
        created_at=row.created_at,
        started_at=row.started_at,
        ended_at=row.ended_at,
    )
