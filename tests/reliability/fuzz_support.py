"""Schemathesis support shared by the CI fuzz test and the long local CLI run.

* :func:`seed` fills a Centroid with real resources (the workshop datasets, a trained model, an
  InService endpoint ``ep``, an imported SageMaker model, and victims for the DELETE operations),
  through the public API only, so it works on a TestClient and on a live ``centroid serve``.
* :func:`register_hooks` aims schemathesis at those resources: about half of the generated cases
  get their path parameters, id-valued body fields (``train_dataset_id``, ``model_id``,
  ``dataset_id``, join steps) and, for predictions/invocations, well-shaped feature rows replaced
  by seeded values, so the fuzzer reaches the code behind the 404s. The rest stay as generated.
  A ``before_call`` hook redirects DELETE/PUT calls aimed at the resources the others need (``ep``,
  the raw datasets, the imported model) to the victims: schemathesis also reuses ids it saw in
  responses, and would otherwise delete ``ep`` in its first phase.
* :func:`register_serializers` teaches schemathesis to send ``text/csv`` and
  ``application/jsonlines`` request bodies (``POST /endpoints/{name}/invocations``).

Run ``python -m tests.reliability.fuzz_support seed URL seeds.json`` to seed a running server; the
CLI hooks module :mod:`tests.reliability.st_hooks` reads that file (see docs/reliability.md).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_DATA = ROOT / "service" / "sample_data"
SAGEMAKER_ARTIFACT = ROOT / "tests" / "data" / "kmeans-k10-d2-model.tar.gz"
SEEDS_ENV = "CENTROID_FUZZ_SEEDS"
FEATURES = ["Murder", "Assault", "UrbanPop", "Rape", "DensityPerMile"]
CHECK_NAMES = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)


@dataclass
class Seeds:
    """What :func:`seed` created; the hooks pick from these."""

    datasets: list[str]
    workshop_dataset: str
    columns: list[str]
    models: list[str]
    trained_model: str
    jobs: list[str]
    endpoint: str
    features: list[str]
    victim_dataset: str
    victim_model: str
    victim_endpoint: str

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> Seeds:
        return cls(**json.loads(path.read_text()))


# --- seeding ---------------------------------------------------------------------------------------


def _ok(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, f"{response.request.method} {response.request.url}: {response.text}"
    return response.json() if response.content else {}  # type: ignore[no-any-return]


def _upload(client: Any, name: str, path: Path, key_column: str) -> dict[str, Any]:
    files = {"file": (path.name, path.read_bytes(), "text/csv")}
    return _ok(client.post("/datasets", files=files, data={"name": name, "key_column": key_column}), 201)


def _import(client: Any, name: str) -> dict[str, Any]:
    files = {"file": ("model.tar.gz", SAGEMAKER_ARTIFACT.read_bytes(), "application/gzip")}
    return _ok(client.post("/models/import", files=files, data={"name": name, "feature_names": "x,y"}), 201)


def _await(client: Any, path: str, field: str, wanted: str, run_worker: Callable[[], None] | None) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while True:
        if run_worker is not None:
            run_worker()
        body = _ok(client.get(path), 200)
        if body[field] == wanted:
            return body
        assert body[field] not in ("Failed", "Stopped") and time.monotonic() < deadline, body
        time.sleep(0.05 if run_worker is not None else 0.5)


def seed(client: Any, run_worker: Callable[[], None] | None = None) -> Seeds:
    """Create the resources the fuzzer aims at. ``run_worker`` drives an in-process worker
    (tests); without it a real worker (``centroid serve``'s embedded one) is waited for."""
    crimes = _upload(client, "crimes", SAMPLE_DATA / "crimes.csv", "State")
    densities = _upload(client, "densities", SAMPLE_DATA / "densities.csv", "State")
    scaled = _ok(
        client.post(
            f"/datasets/{densities['id']}/derive",
            json={"name": "densities-scaled", "steps": [{"op": "scale", "columns": ["DensityPerMile"]}]},
        ),
        201,
    )
    workshop = _ok(
        client.post(
            f"/datasets/{crimes['id']}/derive",
            json={
                "name": "workshop",
                "steps": [{"op": "join", "dataset_id": scaled["id"]}, {"op": "select", "columns": FEATURES}],
            },
        ),
        201,
    )
    victim_dataset = _ok(
        client.post("/datasets", json={"name": "victim", "columns": ["k", "v"], "rows": [["a", 1], ["b", 2.5]]}), 201
    )
    job = {"name": "job", "train_dataset_id": workshop["id"], "hyperparameters": {"k": 3, "seed": 1}}
    _ok(client.post("/training-jobs", json=job), 202)
    model_id = _await(client, "/training-jobs/job", "status", "Completed", run_worker)["model_id"]
    for name in ("ep", "doomed"):
        _ok(client.post("/endpoints", json={"name": name, "model_id": model_id}), 202)
        _await(client, f"/endpoints/{name}", "status", "InService", run_worker)
    # Queued after the worker ran: with an in-process worker it stays Pending, so `stop` has work.
    _ok(client.post("/training-jobs", json={**job, "name": "queued"}), 202)
    imported = _import(client, "imported")
    victim_model = _import(client, "victim-model")
    columns = sorted({c["name"] for ds in (crimes, densities, workshop) for c in ds["columns"]})
    return Seeds(
        datasets=[crimes["id"], densities["id"], scaled["id"], workshop["id"], victim_dataset["id"]],
        workshop_dataset=workshop["id"],
        columns=columns,
        models=[model_id, imported["id"], victim_model["id"]],
        trained_model=model_id,
        jobs=["job", "queued"],
        endpoint="ep",
        features=FEATURES,
        victim_dataset=victim_dataset["id"],
        victim_model=victim_model["id"],
        victim_endpoint="doomed",
    )


# --- hooks ----------------------------------------------------------------------------------------


def path_parameter_choices(seeds: Seeds, method: str, path: str) -> dict[str, list[str]]:
    """Seeded values per path parameter. DELETEs get victims (and one in-use resource, for 409s),
    so deleting never takes away what the other operations are aimed at."""
    delete = method.upper() == "DELETE"
    if path.startswith("/datasets/{dataset_id}"):
        return {"dataset_id": [seeds.victim_dataset, seeds.workshop_dataset] if delete else seeds.datasets}
    if path.startswith("/models/{model_id}"):
        return {"model_id": [seeds.victim_model, seeds.trained_model] if delete else seeds.models}
    if path.startswith("/training-jobs/{name}"):
        return {"name": seeds.jobs}
    if path.startswith("/endpoints/{name}"):
        return {"name": [seeds.victim_endpoint] if delete else [seeds.endpoint, seeds.victim_endpoint]}
    return {}


def _finite() -> st.SearchStrategy[float]:
    return st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


def _json_float() -> st.SearchStrategy[float]:
    """Any float JSON can carry (schemathesis's JSON serializer refuses NaN and infinities)."""
    return st.floats(allow_nan=False, allow_infinity=False)


def _number() -> st.SearchStrategy[Any]:
    """Mostly ordinary numbers; sometimes extremes, or NaN/infinity/overflow spelled as strings."""
    return st.one_of(
        _finite(),
        _finite(),
        _finite(),
        st.integers(-1000, 1000),
        st.sampled_from([1e308, -1.7976931348623157e308, 5e-324, "1,210.5", "nan", "-inf", "Infinity", "1e309"]),
    )


def _matrix(width: int) -> st.SearchStrategy[list[list[Any]]]:
    """Mostly valid feature rows (so the prediction path runs), sometimes odd values or widths."""
    clean = st.lists(st.lists(_finite(), min_size=width, max_size=width), min_size=1, max_size=8)
    odd = st.lists(
        st.one_of(st.lists(_number(), min_size=width, max_size=width), st.lists(_number(), max_size=width + 2)),
        min_size=1,
        max_size=8,
    )
    return st.one_of(clean, clean, odd)


def _render_rows(rows: list[list[Any]], media_type: str) -> Any:
    if media_type == "text/csv":
        return "".join(",".join(str(v) for v in row) + "\n" for row in rows)
    if "jsonlines" in media_type:
        return "".join(json.dumps({"features": row}) + "\n" for row in rows)
    return {"instances": [{"features": row} for row in rows]}


def _derive_step(seeds: Seeds) -> st.SearchStrategy[dict[str, Any]]:
    columns = st.lists(st.sampled_from(seeds.columns), min_size=1, max_size=3, unique=True)
    return st.one_of(
        st.fixed_dictionaries(
            {"op": st.just("join"), "dataset_id": st.sampled_from(seeds.datasets)},
            optional={"how": st.sampled_from(["inner", "left"]), "on": st.sampled_from(seeds.columns)},
        ),
        st.fixed_dictionaries(
            {"op": st.just("scale"), "columns": columns},
            optional={
                "method": st.sampled_from(["minmax", "standard"]),
                "feature_range": st.lists(_json_float(), min_size=2, max_size=2),
            },
        ),
        st.fixed_dictionaries({"op": st.sampled_from(["select", "drop", "dropna"]), "columns": columns}),
        st.fixed_dictionaries(
            {
                "op": st.just("rename"),
                "mapping": st.dictionaries(
                    st.sampled_from(seeds.columns), st.text(min_size=1, max_size=8), min_size=1, max_size=2
                ),
            }
        ),
        st.fixed_dictionaries(
            {"op": st.just("fillna")},
            optional={
                "columns": columns,
                "strategy": st.sampled_from(["mean", "constant"]),
                "value": st.one_of(_json_float(), st.integers(), st.text(max_size=4)),
            },
        ),
    )


def _seeded_body(
    seeds: Seeds, method: str, path: str, media_type: str | None, body: Any
) -> st.SearchStrategy[Any] | None:
    """A strategy for a well-aimed body of this operation, or None to keep the generated one."""
    if path == "/endpoints/{name}/invocations":
        return _matrix(len(seeds.features)).map(lambda rows: _render_rows(rows, media_type or "application/json"))
    if not isinstance(body, dict):
        return None
    if path == "/endpoints/{name}/predictions":
        clean = st.fixed_dictionaries({name: _finite() for name in seeds.features})
        odd = st.fixed_dictionaries(
            {name: _number() for name in seeds.features}, optional={"State": st.text(max_size=10)}
        )
        rows_or_dataset = st.one_of(
            st.fixed_dictionaries({"rows": st.lists(clean, min_size=1, max_size=8)}),
            st.fixed_dictionaries({"rows": st.lists(odd, min_size=1, max_size=8)}),
            st.fixed_dictionaries({"dataset_id": st.sampled_from(seeds.datasets)}),
        )
        options = {
            "raw": st.booleans(),
            "include_distances": st.booleans(),
            "sort": st.sampled_from(["cluster,distance", "-distance", "key", "cluster,-key"]),
        }
        return rows_or_dataset.flatmap(
            lambda base: st.fixed_dictionaries({}, optional=options).map(lambda o: {**base, **o})
        )
    if path == "/training-jobs" and method == "POST":
        return st.fixed_dictionaries(
            {"train_dataset_id": st.sampled_from(seeds.datasets)},
            optional={
                "test_dataset_id": st.sampled_from(seeds.datasets),
                "feature_columns": st.lists(st.sampled_from(seeds.columns), min_size=1, max_size=5, unique=True),
            },
        ).map(lambda ids: {**body, **ids})
    if path in ("/endpoints", "/endpoints/{name}") and method in ("POST", "PUT"):
        return st.sampled_from(seeds.models).map(lambda model_id: {**body, "model_id": model_id})
    if path == "/datasets/{dataset_id}/derive":
        return st.lists(_derive_step(seeds), min_size=1, max_size=4).map(lambda steps: {**body, "steps": steps})
    return None


def protected_redirect(seeds: Seeds, method: str, path: str) -> tuple[str, set[str], str] | None:
    """(path parameter, seeded values a call must not destroy, victim to hit instead) or None.

    Schemathesis also feeds ids it saw in earlier responses (its "extra data sources", and the
    links of the stateful phase) into DELETE/PUT, so without this the first phase to list
    ``/endpoints`` deletes ``ep`` and every later invocation is a 409."""
    method = method.upper()
    if path == "/endpoints/{name}" and method in ("DELETE", "PUT"):
        return "name", {seeds.endpoint}, seeds.victim_endpoint
    if path == "/datasets/{dataset_id}" and method == "DELETE":
        return "dataset_id", set(seeds.datasets) - {seeds.victim_dataset, seeds.workshop_dataset}, seeds.victim_dataset
    if path == "/models/{model_id}" and method == "DELETE":
        return "model_id", set(seeds.models) - {seeds.victim_model, seeds.trained_model}, seeds.victim_model
    return None


def register_hooks(seeds: Seeds) -> None:
    """Register the aiming hooks globally (``before_call`` only exists as a global hook)."""
    import schemathesis

    def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
        operation = context.operation
        choices = path_parameter_choices(seeds, operation.method, operation.path)
        if not choices or not isinstance(path_parameters, dict):
            return st.just(path_parameters)
        seeded = st.fixed_dictionaries({name: st.sampled_from(values) for name, values in choices.items()})
        return st.one_of(st.just(path_parameters), seeded.map(lambda fixed: {**path_parameters, **fixed}))

    def flatmap_query(context: Any, query: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
        if context.operation.path != "/models/{model_id}/assignments" or not isinstance(query, dict):
            return st.just(query)
        seeded = st.fixed_dictionaries(
            {}, optional={"dataset_id": st.sampled_from(seeds.datasets), "cluster": st.integers(0, 4)}
        )
        # The plain call (no query) on the trained model is the one that must succeed: offer it explicitly.
        return st.one_of(st.just(query), st.just({}), seeded)

    def flatmap_case(context: Any, case: Any) -> st.SearchStrategy[Any]:
        operation = context.operation
        aimed = _seeded_body(seeds, operation.method.upper(), operation.path, case.media_type, case.body)
        if aimed is None:
            return st.just(case)

        def with_body(body: Any) -> Any:
            case.body = body
            return case

        return st.one_of(st.just(case), aimed.map(with_body))

    def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
        operation = context.operation
        redirect = protected_redirect(seeds, operation.method, operation.path)
        if redirect is not None:
            name, protected, victim = redirect
            if (case.path_parameters or {}).get(name) in protected:
                case.path_parameters = {**case.path_parameters, name: victim}

    for hook in (flatmap_path_parameters, flatmap_query, flatmap_case, before_call):
        schemathesis.hook(hook)


_SERIALIZERS_REGISTERED = False


def register_serializers() -> None:
    """``text/csv`` and ``application/jsonlines`` bodies are text: send them as UTF-8 bytes."""
    global _SERIALIZERS_REGISTERED
    if _SERIALIZERS_REGISTERED:
        return
    import schemathesis

    @schemathesis.serializer("text/csv", "application/jsonlines")
    def text_body(ctx: Any, value: Any) -> bytes:
        if isinstance(value, bytes):
            return value
        if isinstance(value, str):
            return value.encode("utf-8", errors="surrogatepass")
        # Negative mode sends non-strings; text is all that can go on the wire.
        return json.dumps(value, default=str).encode("utf-8")

    _SERIALIZERS_REGISTERED = True


def main(argv: list[str]) -> int:
    """``python -m tests.reliability.fuzz_support seed URL OUT.json``"""
    if len(argv) != 3 or argv[0] != "seed":
        print(main.__doc__, file=sys.stderr)
        return 2
    import httpx

    with httpx.Client(base_url=argv[1], timeout=60) as client:
        seeds = seed(client)
    seeds.save(Path(argv[2]))
    print(f"seeded {argv[1]}; wrote {argv[2]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
