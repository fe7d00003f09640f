# Stand-in for otel/opentelemetry-collector-contrib where no registry is reachable: our ocb build
# (deploy/otelcol/builder-config.yaml, the components deploy/otelcol/config.yaml uses) laid out as
# the contrib image is: FROM scratch (no shell, no /tmp), the binary at /otelcol-contrib, user 10001.
FROM scratch
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY otelcol-contrib /otelcol-contrib
COPY config.yaml /etc/otelcol-contrib/config.yaml
USER 10001
EXPOSE 4317 4318 55678 55679
ENTRYPOINT ["/otelcol-contrib"]
CMD ["--config", "/etc/otelcol-contrib/config.yaml"]
