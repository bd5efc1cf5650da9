# Centroid's image: the API (`centroid serve`) and the worker (`centroid worker`) share it.
# Build: docker build -t centroid .   Run as a team: docker compose up -d (README "Deploy").

# --- build stage: install Centroid and its runtime dependencies (no test tools) into a venv ---
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY service ./service
COPY schemas ./schemas
COPY workers ./workers
# `.` not `.[test]`: the image carries runtime dependencies only.
RUN /opt/venv/bin/pip install .

# --- runtime stage: the venv only, run by an unprivileged user ---
FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CENTROID_DATA_DIR=/var/lib/centroid
# The data directory exists, owned by the app user, so a fresh named volume mounted on it
# inherits that ownership (docker copies the image's directory into an empty volume).
RUN groupadd --system --gid 10001 centroid \
    && useradd --system --uid 10001 --gid centroid --home-dir /home/centroid --create-home centroid \
    && mkdir -p /var/lib/centroid/artifacts \
    && chown -R centroid:centroid /var/lib/centroid
COPY --from=build /opt/venv /opt/venv
USER centroid
WORKDIR /home/centroid
EXPOSE 8000
# slim has no curl: probe liveness with the standard library.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
# Without CENTROID_API_KEYS `centroid serve` refuses to listen on 0.0.0.0 (open API), by design.
CMD ["centroid", "serve", "--host", "0.0.0.0", "--port", "8000"]
