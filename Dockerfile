# syntax=docker/dockerfile:1.7
#
# Promotion Gate image: the `promotion-gate` command (webhook server, operator, CLI).
#
#   docker build \
#     --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
#     --build-arg SOURCE=https://github.com/promotion-gate/promotion-gate \
#     --build-arg CI_RUN_ID="$GITHUB_RUN_ID" \
#     -t ghcr.io/promotion-gate/promotion-gate:0.1.0 .
#
# Deploy it by digest (image.digest in the chart), like everything the webhook admits.

# The base image is pinned by digest so a rebuild of the same commit uses the same base. The digest
# below must be refreshed (for base-image security fixes) with:
#   docker buildx imagetools inspect python:3.11-slim-bookworm --format '{{json .Manifest.Digest}}'
# and is overridable: --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest>
# Without any registry (tools/cluster, `make e2e-cluster`): a Debian bookworm base made by mmdebstrap
# (python3, python3-venv, python-is-python3, passwd) is passed here; both bases have Python 3.11.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

# ---- builder: build the project wheel and every dependency's wheel -------------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# README* : pyproject.toml names README.md as the long description; the glob keeps the build working
# if it is absent.
COPY pyproject.toml README* ./
COPY webhook ./webhook
# pip runs from a throw-away venv, so the base needs only python and venv (true of python:3.11-slim and
# of the Debian base alike). The optional build secret "pip-ca" is a CA bundle for a TLS-intercepting
# proxy in front of PyPI (buildah/docker build --secret id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt):
# mounted for this RUN only, so it is in no layer, and this stage is not part of the final image.
RUN --mount=type=secret,id=pip-ca \
    python -m venv /tmp/pip \
 && if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && /tmp/pip/bin/python -m pip wheel --wheel-dir /wheels .

# ---- runtime: install the wheels (offline) into a virtualenv; no compiler, no build files -------
FROM ${PYTHON_IMAGE} AS runtime
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/promotion-gate/bin:$PATH \
    HOME=/tmp
# The wheels are bind-mounted from the builder, so they never become a layer of this image. pip
# compiles the .pyc files at install time: at run time the root filesystem is read-only.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/promotion-gate \
 && /opt/promotion-gate/bin/pip install --no-index --find-links=/wheels promotion-gate \
 && /opt/promotion-gate/bin/pip uninstall --yes pip \
 && groupadd --system --gid 65532 promotion-gate \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /tmp \
      --shell /usr/sbin/nologin promotion-gate \
 && promotion-gate --version

# Labels last: they change on every build and must not invalidate the install layer above.
ARG REVISION=unknown
ARG SOURCE=https://github.com/promotion-gate/promotion-gate
ARG CREATED=unknown
ARG CI_RUN_ID=unknown
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="promotion-gate" \
      org.opencontainers.image.description="Admission webhook that admits only image digests promoted to the target environment" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.created="${CREATED}" \
      io.promotion-gate.ci.run-id="${CI_RUN_ID}"

# The same uid/gid as the chart's securityContext (runAsUser/runAsGroup 65532).
USER 65532:65532
WORKDIR /tmp
EXPOSE 8443
ENTRYPOINT ["promotion-gate"]
CMD ["--help"]
