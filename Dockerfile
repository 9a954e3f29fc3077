# backstream server image: configure it with BACKSTREAM_* environment variables.
#   docker build -t backstream . && docker run -p 8080:8080 backstream
FROM python:3.11-slim
WORKDIR /src
COPY setup.cfg pyproject.toml README.md ./
COPY backstream ./backstream
COPY scripts/install ./scripts/install
# The same install step as CI (.ci/run -> scripts/test -> scripts/install).
RUN scripts/install /opt/backstream && useradd --system --uid 10001 --no-create-home backstream
COPY policies /etc/backstream/policies
ENV PATH=/opt/backstream/bin:$PATH \
    BACKSTREAM_ADDR=0.0.0.0:8080 \
    PYTHONUNBUFFERED=1
USER backstream
EXPOSE 8080
ENTRYPOINT ["backstream"]
CMD ["serve"]
