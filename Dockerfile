# mammoflag's own image: the ML backend, Celery workers and the CLI (Label Studio runs from its own image).
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 MAMMOFLAG_HOME=/var/lib/mammoflag \
    MAMMOFLAG_DATA_ROOT=/data MAMMOFLAG_MODELS_DIR=/models
WORKDIR /app
COPY pyproject.toml README.md ./
COPY mammoflag mammoflag
COPY label_config label_config
COPY importers importers
COPY training training
COPY ml_backend ml_backend
COPY flagger flagger
# TORCH_INDEX_URL may name an index of CPU-only wheels of the pinned torch/torchvision (a much smaller image).
ARG TORCH_INDEX_URL=
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install --index-url "$TORCH_INDEX_URL" torch==2.14.1 torchvision==0.29.1; fi \
 && pip install .
RUN useradd --system --uid 10001 mammoflag && mkdir -p /var/lib/mammoflag && chown mammoflag /var/lib/mammoflag
USER mammoflag
EXPOSE 9090
CMD ["mammoflag", "serve-backend", "--host", "0.0.0.0", "--port", "9090"]
