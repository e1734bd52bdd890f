# One image for the API and the workers. TORCH=cpu (default) or TORCH=cuda picks the torch build.
FROM python:3.11-slim

ARG TORCH=cpu
ARG TORCH_VERSION=2.13.0
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HOME=/cache/huggingface

WORKDIR /app
RUN if [ "$TORCH" = "cuda" ]; then pip install "torch==${TORCH_VERSION}"; \
    else pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu; fi
COPY pyproject.toml README.md ./
COPY api ./api
COPY blipq ./blipq
COPY contract ./contract
COPY worker ./worker
COPY demo_model/blip-vqa-easy ./demo_model/blip-vqa-easy
COPY demo_model/blip-caption-easy ./demo_model/blip-caption-easy
COPY demo_model/examples ./demo_model/examples
# Editable, so that the shipped demo model is found beside the code.
RUN pip install -e .

RUN useradd --create-home --uid 1000 blipq && mkdir -p /cache/huggingface && chown blipq /cache/huggingface
USER blipq
EXPOSE 8000
CMD ["blipq", "api", "--bind", "0.0.0.0:8000"]
