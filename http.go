package main

// http.go is the HTTP API: every route in one place, the handlers, input
// validation, problem details, the page cursor, the ids it hands out, and
// the -healthcheck probe.

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	_ "embed"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net"
	"net/http"
	_ "net/http/pprof" // served only on PPROF_ADDR (servePprof)
	"net/url"
	"os"
	"path"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"

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
	streams *streamLimits, m *metrics, floor *claimFloor) *http.Server {
	// Shutdown waits for requests in flight, but an event stream of a
	// PENDING order could outlast it: streams end when shutdown begins.
	stopStreams := make(chan struct{})
	mux := http.NewServeMux()
	addRoutes(mux, log, db, kafka, notes, orders, streams, m, floor, stopStreams)
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

// problemWriter replaces the mux's text/plain error body with a problem.
type problemWriter struct {
	http.ResponseWriter
	r       *http.Request
	problem bool
}

func (w *problemWriter) WriteHeader(code int) {
	if code < 400 {
		w.ResponseWriter.WriteHeader(code)
		return
	}
	w.problem = true
	detail := fmt.Sprintf("no route for %s %s", w.r.Method, w.r.URL.Path)
	if code == http.StatusMethodNotAllowed {
		detail = fmt.Sprintf("%s is not allowed on %s; allowed: %s", w.r.Method, w.r.URL.Path, w.Header().Get("Allow"))
	}
	w.Header().Del("Content-Length")
	writeProblem(w.ResponseWriter, code, detail)
}

func (w *problemWriter) Write(b []byte) (int, error) {
	if w.problem {
		return len(b), nil // the mux's text body, replaced
	}
	return w.ResponseWriter.Write(b)
}

// router is what addRoutes needs of a mux; the tests pass one that records
// the patterns, to hold openapi.yaml to them.
type router interface {
	Handle(pattern string, handler http.Handler)
}

// addRoutes is the whole API surface in one place.
func addRoutes(mux router, log *slog.Logger, db *pgxpool.Pool, kafka *kgo.Client, notes *notifier, orders *orderWriter,
	streams *streamLimits, m *metrics, floor *claimFloor, stopStreams <-chan struct{}) {
	mux.Handle("POST /orders", handleCreateOrder(log, orders, m))
	mux.Handle("GET /orders", handleListOrders(log, db))
	mux.Handle("GET /orders/{id}", handleGetOrder(log, db))
	mux.Handle("GET /orders/{id}/events", handleOrderEvents(log, db, notes, streams, stopStreams))
	mux.Handle("GET /healthz", handleHealthz())
	mux.Handle("GET /readyz", handleReadyz(log, db, kafka))
	mux.Handle("GET /metrics", handleMetrics(m, func(ctx context.Context) (databaseGauges, error) {
		return getDatabaseGauges(ctx, db, floor.get())
	}))
	mux.Handle("GET /openapi.yaml", handleFile("application/yaml", openapiYAML))
	mux.Handle("GET /asyncapi.yaml", handleFile("application/yaml", asyncapiYAML))
}

const (
	maxBodyBytes     = 1 << 20
	bodyReadTimeout  = 5 * time.Second
	maxDescription   = 1000
	maxUserID        = 128
	maxIdempotency   = 255
	defaultPageSize  = 50
	maxPageSize      = 500
	requestDBTimeout = 2500 * time.Millisecond // with settleTimeout, within 5s
)

type createOrderRequest struct {
	Amount      json.RawMessage `json:"amount"` // read by orderAmount
	Description *string         `json:"description"`
}

// orderFields are createOrderRequest's fields, exactly as they are spelled.
var orderFields = []string{"amount", "description"}

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

// requireUser reads X-User-Id. Authentication happens upstream (a gateway);
// this service trusts the header but still bounds what it stores.
func requireUser(w http.ResponseWriter, r *http.Request) (string, bool) {
	vals := r.Header.Values("X-User-Id")
	if len(vals) == 0 || vals[0] == "" {
		// The scheme names the header the gateway in front of this
		// service sets; RFC 9110 asks a 401 to name its challenge.
		w.Header().Set("WWW-Authenticate", `X-User-Id realm="order-service"`)
		writeProblem(w, http.StatusUnauthorized, "the X-User-Id header is required")
		return "", false
	}
	if len(vals) > 1 || !printable(vals[0], maxUserID) {
		writeProblem(w, http.StatusBadRequest, fmt.Sprintf("X-User-Id must be one header of 1 to %d printable characters", maxUserID))
		return "", false
	}
	return vals[0], true
}

// requireUserAndOrderID reads X-User-Id and the {id} of /orders/{id}.
func requireUserAndOrderID(w http.ResponseWriter, r *http.Request) (userID, id string, ok bool) {
	if userID, ok = requireUser(w, r); !ok {
		return "", "", false
	}
	id = strings.ToLower(r.PathValue("id"))
	if !isUUID(id) {
		writeProblem(w, http.StatusBadRequest, "order id must be a UUID")
		return "", "", false
	}
	return userID, id, true
}

func printable(s string, maxChars int) bool {
	if s == "" || !utf8.ValidString(s) || utf8.RuneCountInString(s) > maxChars {
		return false
	}
	for _, c := range s {
		if !unicode.IsPrint(c) {
			return false
		}
	}
	return true
}

// orderInput is a validated POST /orders body.
type orderInput struct {
	Amount      int64
	Description string
}

// decodeOrderInput reads and validates a POST /orders body; a non-nil problem
// says what is wrong with it (400, or 413 past maxBodyBytes).
func decodeOrderInput(body io.Reader) (orderInput, *problem) {
	b, err := io.ReadAll(body)
	var mbe *http.MaxBytesError
	var ne net.Error
	switch {
	case errors.As(err, &mbe):
		return orderInput{}, &problem{Status: http.StatusRequestEntityTooLarge, Detail: fmt.Sprintf("request body is larger than %d bytes", mbe.Limit)}
	case errors.Is(err, os.ErrDeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return orderInput{}, &problem{Status: http.StatusRequestTimeout, Detail: fmt.Sprintf("the request body did not arrive within %s", bodyReadTimeout)}
	case err != nil:
		// Not err's text: it names the socket's addresses.
		return orderInput{}, badRequest("the request body could not be read whole")
	}
	if !utf8.Valid(b) {
		// encoding/json would quietly turn bad bytes into U+FFFD, and the
		// stored description would differ from what the client sent.
		return orderInput{}, badRequest("request body is not valid UTF-8")
	}
	if err := findLoneSurrogate(b); err != nil {
		// encoding/json would store U+FFFD in its place, as for bad UTF-8.
		return orderInput{}, badRequest("request body holds a " + err.Error() + ": not a Unicode character")
	}
	req, err := decodeJSON[createOrderRequest](bytes.NewReader(b))
	if err != nil {
		return orderInput{}, decodeProblem(err)
	}
	if err := checkKeys(b, orderFields); err != nil {
		return orderInput{}, badRequest(err.Error())
	}
	amount, p := orderAmount(req.Amount)
	if p != nil {
		return orderInput{}, p
	}
	var desc string
	if req.Description != nil {
		desc = *req.Description
	}
	if n := utf8.RuneCountInString(desc); n > maxDescription {
		return orderInput{}, badRequest(fmt.Sprintf("description is %d characters long; at most %d are allowed", n, maxDescription))
	}
	if strings.ContainsRune(desc, 0) {
		// PostgreSQL text cannot hold NUL.
		return orderInput{}, badRequest("description must not contain NUL characters")
	}
	return orderInput{Amount: amount, Description: desc}, nil
}

// orderAmount reads amount as JSON Schema reads an integer: any JSON number
// whose value is whole, so 1500, 1500.0 and 1.5e3 are all 1500 (a generated
// client may send any of them); fractions, strings and values beyond int64
// are the client's mistake.
func orderAmount(raw json.RawMessage) (int64, *problem) {
	wrong := func(got string) (int64, *problem) {
		return 0, badRequest(fmt.Sprintf("amount must be an integer from 1 to %d (minor units), got %s", int64(1<<63-1), got))
	}
	s := string(raw)
	switch {
	case s == "" || s == "null":
		return 0, badRequest("amount is required")
	case s[0] == '"':
		return wrong("string")
	case s[0] == '{':
		return wrong("object")
	case s[0] == '[':
		return wrong("array")
	case s == "true" || s == "false":
		return wrong("bool")
	}
	n, ok := wholeNumber(s)
	switch {
	case !ok:
		return wrong("number " + s)
	case n <= 0:
		return 0, badRequest("amount must be a positive integer (minor units)")
	}
	return n, nil
}

// wholeNumber is the value of JSON number s when it is a whole number within
// int64. Exact: it works on the decimal digits, never on a float, and never
// builds a number longer than int64's 19 digits (1e999999999 is refused, not
// computed).
func wholeNumber(s string) (int64, bool) {
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		return n, true
	}
	mant, exp, _ := strings.Cut(strings.ToLower(s), "e")
	e := 0
	if exp != "" {
		var err error
		if e, err = strconv.Atoi(exp); err != nil {
			return 0, false
		}
	}
	sign := ""
	if strings.HasPrefix(mant, "-") {
		sign, mant = "-", mant[1:]
	}
	whole, frac, _ := strings.Cut(mant, ".")
	digits := strings.TrimLeft(whole+frac, "0")
	e -= len(frac)
	trimmed := strings.TrimRight(digits, "0")
	e += len(digits) - len(trimmed)
	switch {
	case trimmed == "":
		return 0, true
	case e < 0 || len(trimmed)+e > 19:
		return 0, false
	}
	n, err := strconv.ParseInt(sign+trimmed+strings.Repeat("0", e), 10, 64)
	return n, err == nil
}

// decodeJSON reads exactly one JSON value with no unknown fields.
func decodeJSON[T any](body io.Reader) (T, error) {
	var v T
	dec := json.NewDecoder(body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&v); err != nil {
		return v, err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return v, errors.New("request body must hold a single JSON object")
	}
	return v, nil
}

func badRequest(detail string) *problem {
	return &problem{Status: http.StatusBadRequest, Detail: detail}
}

// acceptedBodyType: JSON, or no type at all, or the form type curl's -d sends
// unless told otherwise, so that the plainest curl line works; the body is
// read as JSON whatever the type says.
func acceptedBodyType(contentType string) bool {
	if contentType == "" {
		return true
	}
	mt, params, err := mime.ParseMediaType(contentType)
	if err != nil {
		return false
	}
	if cs, ok := params["charset"]; ok && !strings.EqualFold(cs, "utf-8") {
		return false
	}
	return mt == "application/json" || mt == "application/x-www-form-urlencoded"
}

// decodeProblem explains a decoding error in the client's terms.
func decodeProblem(err error) *problem {
	var (
		se *json.SyntaxError
		te *json.UnmarshalTypeError
	)
	switch {
	case errors.Is(err, io.EOF):
		return badRequest("request body is empty; want a JSON object such as {\"amount\": 1000}")
	case errors.As(err, &se), errors.Is(err, io.ErrUnexpectedEOF):
		return badRequest("request body is not valid JSON: " + err.Error())
	case errors.As(err, &te) && te.Field != "":
		return badRequest(fmt.Sprintf("%s must be a %s, got %s", te.Field, te.Type, te.Value))
	case errors.As(err, &te):
		return badRequest("request body must be a JSON object, got " + te.Value)
	default:
		// Unknown fields and trailing data; the decoder's text names the field.
		return badRequest(strings.TrimPrefix(err.Error(), "json: "))
	}
}

// writeDBError answers 503 with Retry-After when the failure is transient
// (the database unreachable, read-only, too slow, or a conflict with another
// transaction: the client may retry) and 500 for anything else, which is a
// bug: requests are validated before they reach the database.
func writeDBError(w http.ResponseWriter, r *http.Request, log *slog.Logger, err error) {
	if errors.Is(r.Context().Err(), context.Canceled) {
		return // the client went away
	}
	if dbTransient(err) {
		log.WarnContext(r.Context(), "database unavailable", repeatsKey, repeatsOf("database unavailable", err), "route", r.Pattern, "err", err)
		w.Header().Set("Retry-After", "1")
		detail := "the database is unavailable; retry later"
		if errors.Is(err, errCommitOutcomeUnknown) {
			detail = "the database did not confirm whether the order was stored; retry with the same Idempotency-Key, " +
				"or list your orders before retrying without one"
		}
		writeProblem(w, http.StatusServiceUnavailable, detail)
		return
	}
	log.ErrorContext(r.Context(), "request failed", "route", r.Pattern, "err", err)
	writeProblem(w, http.StatusInternalServerError, "internal error")
}

// writeOverloaded answers a POST /orders refused unwritten: more orders are
// arriving than the writers can commit.
func writeOverloaded(w http.ResponseWriter, r *http.Request, log *slog.Logger) {
	log.WarnContext(r.Context(), "order refused: more orders are arriving than can be written", repeatsKey, "order refused")
	w.Header().Set("Retry-After", "1")
	writeProblem(w, http.StatusServiceUnavailable, "more orders are arriving than can be written; nothing was stored, retry later")
}

// problem is an RFC 9457 problem details object.
type problem struct {
	Type   string `json:"type"`
	Title  string `json:"title"`
	Status int    `json:"status"`
	Detail string `json:"detail"`
}

func writeProblem(w http.ResponseWriter, status int, detail string) {
	w.Header().Set("Content-Type", "application/problem+json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(problem{Type: "about:blank", Title: http.StatusText(status), Status: status, Detail: detail}) //nolint:errcheck // the client is gone
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v) //nolint:errcheck // the client is gone
}

func recoverPanics(log *slog.Logger, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if v := recover(); v != nil {
				if v == http.ErrAbortHandler {
					panic(v)
				}
				log.ErrorContext(r.Context(), "panic serving request", "route", r.Pattern, "panic", v)
				writeProblem(w, http.StatusInternalServerError, "internal error")
			}
		}()
		next.ServeHTTP(w, r)
	})
}

// The cursor is "<created_at in µs since 1970>.<order id>" of the last order
// of a page: opaque to clients, who pass back next_cursor, but with a format
// openapi.yaml can state exactly, so that every value it allows is accepted.
func encodeCursor(k pageKey) string {
	return strconv.FormatInt(k.CreatedAt.UnixMicro(), 10) + "." + k.ID
}

// maxCursorDigits bounds the timestamp to year 5138: no order is newer, and
// PostgreSQL holds it.
const maxCursorDigits = 17

func decodeCursor(s string) (pageKey, error) {
	ts, id, ok := strings.Cut(s, ".")
	if !ok || ts == "" || len(ts) > maxCursorDigits || strings.Trim(ts, "0123456789") != "" || !isUUID(id) {
		return pageKey{}, errors.New("malformed cursor")
	}
	us, err := strconv.ParseInt(ts, 10, 64)
	if err != nil {
		return pageKey{}, errors.New("malformed cursor")
	}
	return pageKey{CreatedAt: time.UnixMicro(us).UTC(), ID: id}, nil
}

// newUUID returns a version 7 UUID: time-ordered, so new orders and events
// land at the right edge of their indexes instead of at random pages.
func newUUID() string {
	var u [16]byte
	binary.BigEndian.PutUint64(u[:8], uint64(time.Now().UnixMilli())<<16)
	rand.Read(u[6:])
	u[6] = u[6]&0x0f | 0x70 // version 7
	u[8] = u[8]&0x3f | 0x80 // RFC 9562 variant
	var s [36]byte
	hex.Encode(s[0:8], u[0:4])
	s[8] = '-'
	hex.Encode(s[9:13], u[4:6])
	s[13] = '-'
	hex.Encode(s[14:18], u[6:8])
	s[18] = '-'
	hex.Encode(s[19:23], u[8:10])
	s[23] = '-'
	hex.Encode(s[24:], u[10:])
	return string(s[:])
}

// isUUID accepts the canonical lowercase 8-4-4-4-12 form only.
func isUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i, c := range []byte(s) {
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
				return false
			}
		}
	}
	return true
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
