# syntax=docker/dockerfile:1
# Build: a static binary (no cgo), so the final image needs no libc.
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/order-service .

# Run: distroless static, as the image's non-root user. It has no shell and no
# curl, so the binary is its own health probe.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/order-service /order-service
USER nonroot:nonroot
# The service listens on loopback unless told otherwise; in a container it
# must take the published port's traffic.
ENV HTTP_ADDR=:8081
EXPOSE 8081
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 CMD ["/order-service", "-healthcheck"]
ENTRYPOINT ["/order-service"]
