# The actor connector: `pyflyte serve connector` with plugin_backend registered (task types "actor", "actor_sync", "actor_map").
#   docker build -t flyte-actor-connector:0.1.0 .
#   docker run -p 8000:8000 -p 9090:9090 flyte-actor-connector:0.1.0
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLYTE_ACTOR_BACKEND=kubernetes \
    FLYTE_ACTOR_STATE_DIR=/var/run/flyte-actor

WORKDIR /opt/flyte-actor
# Every dependency pinned: an unpinned flytekit install can backtrack for a quarter of an hour.
COPY constraints.txt setup.py README.md ./
COPY flytekitplugins_actor ./flytekitplugins_actor
COPY plugin_backend ./plugin_backend
RUN pip install -c constraints.txt setuptools wheel \
 && pip install --no-build-isolation -c constraints.txt '.[connector]' \
 && python -m compileall -q /usr/local/lib/python3.11/site-packages \
 && useradd --uid 1000 --create-home flyte \
 && mkdir -p /var/run/flyte-actor && chown flyte /var/run/flyte-actor

USER 1000
EXPOSE 8000 9090
# 8000: the gRPC connector service propeller calls; 9090: Prometheus metrics (flyte_actor_*, flyte_connector_*).
CMD ["pyflyte", "serve", "connector", "--port", "8000", "--prometheus_port", "9090"]
