# Two images from one file:
#   server   - the dashboard, without torch (fastapi, sqlalchemy, jinja2)
#   pipeline - `saescope build` / `train`, with the pinned torch (CUDA build on GPU hosts)
FROM python:3.11-slim AS server
WORKDIR /app
COPY pyproject.toml README.md ./
COPY db db
COPY server server
COPY frontend frontend
COPY cli cli
# The pipeline's code without its dependencies (torch): the package's layout needs the folder.
COPY pipeline pipeline
RUN pip install --no-cache-dir .
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/api/v1/health')"
ENTRYPOINT ["python", "-m", "saescope.server"]
CMD ["/data/features.db", "--host", "0.0.0.0", "--port", "8000"]

FROM python:3.11-slim AS pipeline
WORKDIR /app
RUN pip install --no-cache-dir torch==2.13.0
COPY . .
RUN pip install --no-cache-dir '.[pipeline]'
ENTRYPOINT ["saescope"]
CMD ["demo", "--data", "/data/demo", "--no-serve"]
