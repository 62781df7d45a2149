package main

// http.go is the HTTP API: every route in one place, the handlers, input
// validation, problem details, the page cursor, the ids it hands out, and
// the -healthcheck probe.

import (
	"context"
	"crypto/sha256"
	_ "embed"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	_ "net/http/pprof" // served only on PPROF_ADDR (servePprof)
	"net/url"
	"os"
	"path"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kgo"
)

// The API and event contracts, served at /openapi.yaml and /asyncapi.yaml.
var (
	//go:embed openapi.yaml
	openapiYAML []byte
	//go:embed asyncapi.yaml
	asyncapiYAML []byte
)

// newServer builds the HTTP server: every route, then the middleware, behind
// the limits a public listener needs.
func newServer(log *slog.Logger, db *pgxpool.Pool, kafka *kgo.Client, notes *notifier, orders *orderWriter,
	streams *streamLimits, m *metrics, g gauges) *http.Server {
	// Shutdown waits for requests in flight, but an event stream of a
	// PENDING order could outlast it: streams end when shutdown begins.
	stopStreams := make(chan struct{})
	mux := http.NewServeMux()
	addRoutes(mux, log, db, kafka, notes, orders, streams, m, g, stopStreams)
	srv := &http.Server{
		// traceRequests first: the request it hands on is the one the mux
		// stamps with its route pattern, which instrument reads.
		Handler:           traceRequests(m.instrument(recoverPanics(log, guardRequests(mux)))),
		ReadHeaderTimeout: 5 * time.Second, // slow-loris clients
		ReadTimeout:       15 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       60 * time.Second,
		MaxHeaderBytes:    64 << 10, // answers 431 past this
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	srv.RegisterOnShutdown(func() { close(stopStreams) })
	return srv
}

// servePprof serves profiling on its own listener, never on the public mux;
// the returned func closes it.
func servePprof(addr string, log *slog.Logger) (closeFn func()) {
	srv := &http.Server{Addr: addr, Handler: http.DefaultServeMux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		log.Info("pprof listening", "addr", addr)
		if err := srv.ListenAndServe(); !errors.Is(err, http.ErrServerClosed) {
			log.Warn("pprof stopped", "err", err)
		}
	}()
	return func() { srv.Close() }
}

// guardRequests holds every request to the contract before the mux sees it.
// A path that is not in its canonical form ("//orders", "/orders/../healthz")
// is 404: the mux would answer it with a redirect to the cleaned path, in
// HTML, which a client following it would obey with its method and body. A
// chunked request body closes the connection after its answer: Go's server
// drops a Content-Length sent along with it before any handler sees it, and
// RFC 9112 section 6.3 asks a server to close a connection whose framing was
// that ambiguous. The mux's own 404 (no route) and 405 (wrong method, with
// its Allow header) are answered as problem+json, like every other error.
func guardRequests(mux *http.ServeMux) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if len(r.TransferEncoding) > 0 {
			w.Header().Set("Connection", "close")
		}
		if p := r.URL.Path; p != "*" && !canonicalPath(p) {
			writeProblem(w, http.StatusNotFound, fmt.Sprintf("no route for %s %s: paths are served only in their canonical form",
				r.Method, clip(p, 256)))
			return
		}
		if _, pattern := mux.Handler(r); pattern == "" {
			w = &problemWriter{ResponseWriter: w, r: r}
		}
		mux.ServeHTTP(w, r)
	})
}

// canonicalPath: absolute, with no empty, "." or ".." segment.
func canonicalPath(p string) bool {
	if !strings.HasPrefix(p, "/") {
		return false
	}
	clean := path.Clean(p)
	if strings.HasSuffix(p, "/") && clean != "/" {
		clean += "/"
	}
	return clean == p
}

// router is what addRoutes needs of a mux; the tests pass one that records
// the patterns, to hold openapi.yaml to them.
type router interface {
	Handle(pattern string, handler http.Handler)
}

// addRoutes is the whole API surface in one place.
func addRoutes(mux router, log *slog.Logger, db *pgxpool.Pool, kafka *kgo.Client, notes *notifier, orders *orderWriter,
	streams *streamLimits, m *metrics, g gauges, stopStreams <-chan struct{}) {
	mux.Handle("POST /orders", handleCreateOrder(log, orders, m))
	mux.Handle("GET /orders", handleListOrders(log, db))
	mux.Handle("GET /orders/{id}", handleGetOrder(log, db))
	mux.Handle("GET /orders/{id}/events", handleOrderEvents(log, db, notes, streams, stopStreams))
	mux.Handle("GET /healthz", handleHealthz())
	mux.Handle("GET /readyz", handleReadyz(log, db, kafka))
	mux.Handle("GET /metrics", handleMetrics(m, g))
	mux.Handle("GET /openapi.yaml", handleFile("application/yaml", openapiYAML))
	mux.Handle("GET /asyncapi.yaml", handleFile("application/yaml", asyncapiYAML))
}

func handleCreateOrder(log *slog.Logger, orders *orderWriter, m *metrics) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		userID, ok := requireUser(w, r)
		if !ok {
			return
		}
		var idemKey *string
		if vals := r.Header.Values("Idempotency-Key"); len(vals) > 0 {
			k := vals[0]
			if len(vals) > 1 || !printable(k, maxIdempotency) {
				writeProblem(w, http.StatusBadRequest, fmt.Sprintf("Idempotency-Key must be one header of 1 to %d printable characters", maxIdempotency))
				return
			}
			idemKey = &k
		}
		if orders.full() {
			writeOverloaded(w, r, log)
			return
		}
		if !acceptedBodyType(r.Header.Get("Content-Type")) {
			w.Header().Set("Accept", "application/json")
			writeProblem(w, http.StatusUnsupportedMediaType, "the request body must be application/json")
			return
		}
		// A body shorter than its Content-Length would hold the request
		// until the server's ReadTimeout; it gets its own, shorter one.
		_ = http.NewResponseController(w).SetReadDeadline(time.Now().Add(bodyReadTimeout))
		req, p := decodeOrderInput(http.MaxBytesReader(w, r.Body, maxBodyBytes))
		if p != nil {
			if p.Status == http.StatusRequestTimeout {
				w.Header().Set("Connection", "close") // the rest of the body may still come
			}
			writeProblem(w, p.Status, p.Detail)
			return
		}
		desc := req.Description

		h := sha256.New()
		binary.Write(h, binary.BigEndian, req.Amount) //nolint:errcheck // hashes never fail
		h.Write([]byte(desc))
		in := newOrder{ID: newUUID(), UserID: userID, Amount: req.Amount, Description: desc,
			IdempotencyKey: idemKey, RequestHash: h.Sum(nil)}
		if ri, ok := requestInfoFrom(r.Context()); ok {
			// The pay-order record's parent is this request's span.
			in.Traceparent, in.Tracestate = ri.span.String(), ri.tracestate
		}

		ctx, cancel := context.WithTimeout(r.Context(), requestDBTimeout)
		defer cancel()
		res, err := orders.create(ctx, in)
		order, created := res.Order, res.Created
		switch {
		case errors.Is(err, errIdempotencyConflict):
			writeProblem(w, http.StatusConflict, "this Idempotency-Key was already used with a different request body")
			return
		case errors.Is(err, errOverloaded):
			writeOverloaded(w, r, log)
			return
		case err != nil:
			writeDBError(w, r, log, err)
			return
		}
		if !created {
			writeJSON(w, http.StatusOK, order)
			return
		}
		m.ordersCreated.Add(1)
		log.InfoContext(ctx, "order created", "order_id", order.ID, "user_id", order.UserID, "amount", order.Amount)
		w.Header().Set("Location", "/orders/"+order.ID)
		writeJSON(w, http.StatusCreated, order)
	})
}

type orderPage struct {
	Orders     []Order `json:"orders"`
	NextCursor string  `json:"next_cursor,omitempty"`
}

func handleListOrders(log *slog.Logger, db *pgxpool.Pool) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		userID, ok := requireUser(w, r)
		if !ok {
			return
		}
		q, err := url.ParseQuery(r.URL.RawQuery)
		if err != nil {
			writeProblem(w, http.StatusBadRequest, "malformed query string: "+err.Error())
			return
		}
		// A parameter given empty is malformed, not absent: it matches no
		// value openapi.yaml allows.
		limit := defaultPageSize
		if q.Has("limit") {
			v := q.Get("limit")
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > maxPageSize {
				writeProblem(w, http.StatusBadRequest, fmt.Sprintf("limit must be an integer from 1 to %d", maxPageSize))
				return
			}
			limit = n
		}
		after := firstPage
		if q.Has("cursor") {
			k, err := decodeCursor(q.Get("cursor"))
			if err != nil {
				writeProblem(w, http.StatusBadRequest, "cursor is not one this service issued")
				return
			}
			after = k
		}
		ctx, cancel := context.WithTimeout(r.Context(), requestDBTimeout)
		defer cancel()
		// One row more than asked tells whether another page follows.
		orders, err := listOrders(ctx, db, userID, after, limit+1)
		if err != nil {
			writeDBError(w, r, log, err)
			return
		}
		page := orderPage{Orders: orders}
		if len(orders) > limit {
			page.Orders = orders[:limit]
			last := page.Orders[limit-1]
			page.NextCursor = encodeCursor(pageKey{CreatedAt: last.CreatedAt, ID: last.ID})
		}
		writeJSON(w, http.StatusOK, page)
	})
}

func handleGetOrder(log *slog.Logger, db *pgxpool.Pool) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		userID, id, ok := requireUserAndOrderID(w, r)
		if !ok {
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), requestDBTimeout)
		defer cancel()
		order, err := getOrder(ctx, db, userID, id)
		switch {
		case errors.Is(err, errNotFound):
			writeProblem(w, http.StatusNotFound, "no order "+id)
		case err != nil:
			writeDBError(w, r, log, err)
		default:
			writeJSON(w, http.StatusOK, order)
		}
	})
}

func handleFile(contentType string, content []byte) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", contentType)
		w.Write(content) //nolint:errcheck // the client is gone
	})
}

func handleHealthz() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
}

// handleReadyz reports whether this instance can do its work: a load balancer
// should stop sending it orders while either dependency is unreachable, or
// while the database takes no writes (a failover in progress). It says which
// dependency is down, never why: the error names hosts, roles and paths that
// are not a caller's business; the log has it.
func handleReadyz(log *slog.Logger, db *pgxpool.Pool, kafka *kgo.Client) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		checks := map[string]string{"database": "ok", "kafka": "ok"}
		code := http.StatusOK
		var wg sync.WaitGroup
		var mu sync.Mutex
		check := func(name string, ping func(context.Context) error) {
			if err := ping(ctx); err != nil {
				log.WarnContext(ctx, "not ready", repeatsKey, repeatsOf("not ready "+name, err), "dependency", name, "err", err)
				mu.Lock()
				checks[name], code = "unavailable", http.StatusServiceUnavailable
				mu.Unlock()
			}
		}
		wg.Go(func() { check("database", func(ctx context.Context) error { return checkWritable(ctx, db) }) })
		wg.Go(func() { check("kafka", kafka.Ping) })
		wg.Wait()
		writeJSON(w, code, checks)
	})
}

// healthcheck is `order-service -healthcheck`: a probe for container images
// that have no curl. It exits 0 when /healthz answers 200.
func healthcheck(getenv func(string) string) int {
	addr := getenv("HTTP_ADDR")
	if addr == "" {
		addr = defaultHTTPAddr
	}
	if strings.HasPrefix(addr, ":") {
		addr = "127.0.0.1" + addr
	}
	cl := http.Client{Timeout: 3 * time.Second}
	resp, err := cl.Get("http://" + addr + "/healthz")
	if err != nil {
		fmt.Fprintln(os.Stderr, "healthcheck:", err)
		return 1
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		fmt.Fprintln(os.Stderr, "healthcheck: status", resp.Status)
		return 1
	}
	return 0
}
