# The sanitizer on a CUDA machine, for Ray clusters (head and GPU workers use the same image).
FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/sanitizer
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Dependencies first, so code changes do not reinstall torch.
COPY pyproject.toml README.md ./
COPY sanitizer/__init__.py sanitizer/__init__.py
RUN pip install --no-deps --quiet . && pip install --quiet . && pip uninstall --yes sanitizer

COPY sanitizer sanitizer
COPY schemas schemas
COPY jobs jobs
RUN pip install --no-deps --quiet .

RUN useradd --create-home sanitizer
USER sanitizer
ENTRYPOINT ["sanitizer"]
CMD ["--help"]
