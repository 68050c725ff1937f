# syntax=docker/dockerfile:1
# One image for every role of analysisq: operator, worker, trigger (the CronJob), migrate.
#
#   docker build -t analysisq:0.1.0 .
#   docker run --rm analysisq:0.1.0 --help
#
# The builder stage turns the source into a wheel and installs it with its dependencies into
# a virtualenv without pip; the final stage is the base image plus that virtualenv, run as a
# numeric non-root user so that `runAsNonRoot` can be verified by the kubelet. Nothing is
# written outside /tmp at run time (the chart mounts an emptyDir there and sets
# readOnlyRootFilesystem). BASE_IMAGE can name any Debian-like image with Python >= 3.11,
# pip and venv (CI builds one with debootstrap; see docs/install.md).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder
# The run-time user (uid 65532), made here so that the final stage only copies its entry.
RUN groupadd --system --gid 65532 analysisq \
 && useradd --system --uid 65532 --gid 65532 --home-dir /tmp --no-create-home \
        --shell /usr/sbin/nologin analysisq
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# operator/analysisq/sql is a symlink to ../../sql: both trees are needed for the wheel.
COPY pyproject.toml README.md constraints.txt ./
COPY sql/ sql/
COPY operator/ operator/
# constraints.txt: the dependency versions the test suite last passed with.
RUN python3 -m pip wheel --no-deps --wheel-dir /wheels . \
 && python3 -m venv --without-pip /opt/analysisq \
 && python3 -m pip --python /opt/analysisq/bin/python install --no-compile \
        -c constraints.txt /wheels/*.whl \
 && /opt/analysisq/bin/python -m compileall -q -j 0 /opt/analysisq/lib \
 && /opt/analysisq/bin/analysisq --help >/dev/null

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="analysisq" \
      org.opencontainers.image.description="Kubernetes operator and PostgreSQL work queue for daily LLM prompt analyses" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/analysisq/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp
COPY --from=builder /opt/analysisq /opt/analysisq
# The user needs a passwd entry: getpass.getuser() (kopf names the operator with it) fails
# for a uid the image does not know, and the operator crash-looped on a real kubelet.
COPY --from=builder /etc/passwd /etc/group /etc/
USER 65532:65532
WORKDIR /tmp
ENTRYPOINT ["analysisq"]
CMD ["--help"]
