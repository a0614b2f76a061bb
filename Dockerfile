# The sanitizer for Ray clusters: head and GPU workers run the same image.
# torch's Linux wheels carry their own CUDA libraries; the NVIDIA container runtime adds the driver.
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0

WORKDIR /opt/sanitizer

# Dependencies first (pinned in pyproject.toml), so a code change does not reinstall torch; the
# cluster extra adds Ray's job server, so that a head started from this image takes `ray job submit`.
COPY pyproject.toml README.md ./
RUN mkdir sanitizer && touch sanitizer/__init__.py \
    && pip install --quiet './[cluster]' \
    && pip uninstall --yes --quiet sanitizer

COPY sanitizer sanitizer
COPY schemas schemas
COPY jobs jobs
RUN pip install --quiet --no-deps . \
    && useradd --uid 1000 --create-home sanitizer

USER 1000
ENTRYPOINT ["sanitizer"]
CMD ["--help"]
