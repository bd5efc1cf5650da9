"""A sweep on SageMaker: one built-in KMeans training job per k, run in parallel, then every k
evaluated here in one pass, so the sweep's result has the same shape as a local one.

Why training jobs and not a hyperparameter tuning job: a tuning job picks the trials itself
(Bayesian, random, or a grid whose size it decides) and reports only the objective of each; a
sweep wants every k of its range, each model kept, and the same metrics for all of them. Jobs
named ``<sweep>-k<k>`` (see :func:`~service.backends.sagemaker.naming.sweep_training_job_name`)
give exactly that, with the same options, data channels and artifacts as a single training job.

**Cost**: SageMaker bills every training job for its instances' time (``BillableTimeInSeconds``),
one job per k. The sweep reports each job's billable seconds and their sum.

The state machine, driven by the worker in short resumable steps like a training job:

1. the first call uploads the data once (under ``<prefix>/sweeps/<sweep>/``; every job reads the
   same objects) and submits the first jobs;
2. each later call polls the jobs in flight (DescribeTrainingJob, through
   :class:`~service.backends.sagemaker.training.TrainingJobs`), submits more as they finish (at
   most ``sweep_parallel_training_jobs`` at once), and reports how many are done;
3. when every job has completed, their ``model.tar.gz`` are downloaded and every k is evaluated
   on the test data (else the training data) in one pass with the engine's
   :func:`~service.engine.sweep.evaluate_centers`: msd, ssd, cluster sizes, silhouette,
   Davies–Bouldin, Calinski–Harabasz and the recommended k, as a local sweep gives them.

A job that fails fails the sweep (the others are asked to stop, so nothing more is billed); a
stop request stops every job in flight and submits no more. Everything the next call needs is in
the returned ``remote``: a worker may die between any two calls.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from service.backends.base import (
    BackendNotConfigured,
    SweepSpec,
    SweepUpdate,
    TrainingHooks,
    TrainingSpec,
)
from service.backends.sagemaker.client import AwsContext, Permanent
from service.backends.sagemaker.naming import sweep_training_job_name
from service.backends.sagemaker.s3 import UploadInterrupted, download_artifact
from service.backends.sagemaker.training import DATA_KEYS, TrainingJobs
from service.engine import EngineInputError, ModelFormatError, TrainingStopped, evaluate_centers, read_model_tar
from service.statuses import JobStatus

log = logging.getLogger("centroid.sagemaker")

WAITING = "Waiting"  # a k whose training job is not submitted yet
DONE = (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.STOPPED)


def data_prefix(sweep: str) -> str:
    """Where a sweep's data goes in S3 (under the configured prefix): apart from every training job's."""
    return f"sweeps/{sweep}"


class SweepJobs:
    """Runs a sweep as one SageMaker training job per k."""

    def __init__(self, aws: AwsContext, training: TrainingJobs) -> None:
        self.aws = aws
        self.training = training

    def advance(self, spec: SweepSpec, hooks: TrainingHooks) -> SweepUpdate:
        remote = {**spec.remote}
        trials: dict[str, dict[str, Any]] = {str(k): dict(t) for k, t in (remote.get("trials") or {}).items()}
        for k in spec.ks:
            trials.setdefault(str(k), {"name": sweep_training_job_name(spec.name, k), "status": WAITING})
        remote["trials"] = trials
        try:
            self.aws.ensure_configured()
        except BackendNotConfigured as exc:
            if any(t["status"] != WAITING for t in trials.values()):
                raise  # jobs run on SageMaker: keep the sweep, poll again once the settings are back
            return SweepUpdate.failed(f"the sagemaker backend is not configured: {exc}")
        try:
            return self._advance(spec, hooks, remote, trials)
        except Permanent as exc:
            self._stop_in_flight(trials)
            return SweepUpdate.failed(str(exc), remote=remote)

    def stop(self, spec: SweepSpec) -> None:
        """StopTrainingJob for every job in flight (SageMaker's answer is seen on later polls)."""
        self._stop_in_flight({str(k): dict(t) for k, t in (spec.remote.get("trials") or {}).items()})

    # --- the steps ----------------------------------------------------------------------------

    def _advance(
        self, spec: SweepSpec, hooks: TrainingHooks, remote: dict[str, Any], trials: dict[str, dict[str, Any]]
    ) -> SweepUpdate:
        polls = int(remote.get("polls", 0)) + 1
        remote["polls"] = polls
        if spec.stop_requested:
            for trial in trials.values():
                if trial["status"] == WAITING:
                    trial["status"] = JobStatus.STOPPED
                    trial["message"] = "not submitted: the sweep was stopped"
        if "data" not in remote and not spec.stop_requested:
            try:
                remote["data"] = self.training.upload_data(
                    data_prefix(spec.name),
                    spec.train,
                    spec.test,
                    int(self.aws.settings.training_instance_count),
                    hooks.should_stop,
                )
            except UploadInterrupted as exc:
                return SweepUpdate.stopped(f"stopped while uploading the data, before any training job ({exc})")
        self._poll_in_flight(spec, trials)
        failed = [(int(k), t) for k, t in trials.items() if t["status"] == JobStatus.FAILED]
        if failed:
            self._stop_in_flight(trials)
            k, trial = min(failed, key=lambda item: item[0])
            reason = (
                f"k={k}: SageMaker training job {trial['name']} failed: {trial.get('failure_reason') or 'no reason'}"
                "; the sweep's other training jobs were asked to stop"
            )
            return SweepUpdate.failed(reason, remote=remote)
        if not spec.stop_requested:
            self._submit_more(spec, hooks, remote, trials)
        if all(t["status"] in DONE for t in trials.values()):
            if spec.stop_requested:
                return SweepUpdate.stopped(f"stopped on request; {self._counts(trials)}", remote=remote)
            return self._evaluate(spec, hooks, remote, trials)
        return SweepUpdate(
            JobStatus.STOPPING if spec.stop_requested else JobStatus.IN_PROGRESS,
            message=("stop requested; waiting for SageMaker to stop the training jobs: " if spec.stop_requested else "")
            + self._counts(trials),
            remote=remote,
            poll_after_seconds=self.aws.poll_delay(polls),
        )

    def _trial_spec(self, spec: SweepSpec, k: int, trial: dict[str, Any], data: dict[str, Any]) -> TrainingSpec:
        return TrainingSpec(
            job_name=trial["name"],
            train=spec.train,
            test=spec.test,
            hyperparameters=dataclasses.replace(spec.hyperparameters, k=k),
            resource_config={},
            remote={**{key: data[key] for key in DATA_KEYS if key in data}, **(trial.get("remote") or {})},
            stop_requested=spec.stop_requested,
        )

    def _submit_more(
        self, spec: SweepSpec, hooks: TrainingHooks, remote: dict[str, Any], trials: dict[str, dict[str, Any]]
    ) -> None:
        """Submit waiting ks, smallest first, while fewer than the allowed number run."""
        room = int(self.aws.settings.sweep_parallel_training_jobs) - sum(
            t["status"] not in DONE and t["status"] != WAITING for t in trials.values()
        )
        for key in sorted(trials, key=int):
            if room <= 0 or hooks.should_stop():
                return
            trial = trials[key]
            if trial["status"] != WAITING:
                continue
            update = self.training.advance(self._trial_spec(spec, int(key), trial, remote["data"]), hooks)
            self._record(trial, update)
            room -= 1

    def _poll_in_flight(self, spec: SweepSpec, trials: dict[str, dict[str, Any]]) -> None:
        for key, trial in trials.items():
            if trial["status"] in DONE or trial["status"] == WAITING:
                continue
            trial_spec = self._trial_spec(spec, int(key), trial, {})
            self._record(trial, self.training.advance(trial_spec, full_pass=False))

    @staticmethod
    def _record(trial: dict[str, Any], update: Any) -> None:
        """A training job's update, kept on its trial (status, billing, SageMaker's train:msd)."""
        trial["status"] = str(update.status)
        trial["remote"] = {**(trial.get("remote") or {}), **update.remote}
        for name in ("billable_seconds", "training_seconds", "failure_reason"):
            if getattr(update, name) is not None:
                trial[name] = getattr(update, name)
        if update.message:
            trial["message"] = update.message
        if update.result is not None:
            trial["train_msd"] = update.result.metrics.get("train:msd")
            trial["artifact_s3_uri"] = update.remote.get("model_artifact_s3_uri")

    def _stop_in_flight(self, trials: dict[str, dict[str, Any]]) -> None:
        for trial in trials.values():
            if trial["status"] not in DONE and trial["status"] != WAITING:
                self.training.send_stop(trial["name"])

    @staticmethod
    def _counts(trials: dict[str, dict[str, Any]]) -> str:
        statuses = [t["status"] for t in trials.values()]
        done = statuses.count(JobStatus.COMPLETED)
        waiting = statuses.count(WAITING)
        running = len(statuses) - done - waiting - statuses.count(JobStatus.STOPPED) - statuses.count(JobStatus.FAILED)
        stopped = statuses.count(JobStatus.STOPPED)
        parts = [f"{done} of {len(statuses)} SageMaker training jobs (one per k) completed", f"{running} running"]
        if waiting:
            parts.append(f"{waiting} waiting")
        if stopped:
            parts.append(f"{stopped} stopped")
        return ", ".join(parts)

    def _evaluate(
        self, spec: SweepSpec, hooks: TrainingHooks, remote: dict[str, Any], trials: dict[str, dict[str, Any]]
    ) -> SweepUpdate:
        """Every k's artifact read, then all of them evaluated in one pass over the data."""
        centers: dict[int, np.ndarray] = {}
        artifacts: dict[int, bytes] = {}
        for key, trial in trials.items():
            k, uri = int(key), str(trial.get("artifact_s3_uri") or "")
            try:
                artifacts[k] = download_artifact(self.aws, uri)
                centers[k] = read_model_tar(artifacts[k])
            except ModelFormatError as exc:
                return SweepUpdate.failed(f"k={k}: the model artifact at {uri} is not usable: {exc}", remote=remote)
        scored = spec.test or spec.train
        try:
            result = evaluate_centers(
                scored.batch_source(),
                centers,
                train_msd={int(key): trial.get("train_msd") for key, trial in trials.items()},
                evaluated_on="test" if spec.test is not None else "training",
                sample_size=spec.sample_size,
                seed=spec.hyperparameters.seed,
                batch_size=spec.hyperparameters.mini_batch_size,
                progress=hooks.progress,
                should_stop=hooks.should_stop,
            )
        except TrainingStopped:
            if spec.stop_requested:
                return SweepUpdate.stopped("stopped on request while evaluating the trained ks", remote=remote)
            # the lease was lost or the worker is shutting down: the next claim evaluates again
            return SweepUpdate(JobStatus.IN_PROGRESS, message="evaluation interrupted; it runs again", remote=remote)
        except (EngineInputError, OSError, ValueError) as exc:  # pyarrow's errors are OSError or ValueError
            return SweepUpdate.failed(f"the trained ks could not be evaluated: {exc}", remote=remote)
        billed = sum(float(t.get("billable_seconds") or 0.0) for t in trials.values())
        update = SweepUpdate.completed(result, remote=remote, artifacts=artifacts)
        update.message = (
            f"sweep completed: {len(trials)} SageMaker training jobs (one per k), {billed:.0f} billable seconds in all"
        )
        return update
