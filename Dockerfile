# Builds the Kairos binaries; docker-compose.yml runs them.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Extra cargo features, e.g. OpenTelemetry export:
# docker build --build-arg KAIROS_FEATURES=kairos-scheduler/otlp,kairos-worker/otlp .
ARG KAIROS_FEATURES=""
RUN cargo build --release --bins ${KAIROS_FEATURES:+--features "$KAIROS_FEATURES"}

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/kairos-scheduler /src/target/release/kairos-worker /src/target/release/kairosctl /usr/local/bin/
USER nobody
