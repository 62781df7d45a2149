// Command order-service is the Order Service of the online shop «Гоzон». It
// takes orders over HTTP, stores them in PostgreSQL, and talks to the Payment
// Service only through Kafka, using the transactional outbox pattern.
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	_ "embed"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	_ "net/http/pprof" // served only on PPROF_ADDR
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kgo"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "-healthcheck" {
		os.Exit(healthcheck(os.Getenv))
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() {
		<-ctx.Done()
		stop() // from now on a second Ctrl-C kills at once
	}()
	if err := run(ctx, os.Getenv, os.Stdout); err != nil {
		fmt.Fprintf(os.Stderr, "order-service: %v\n", err)
		os.Exit(1)
	}
}

// The API and event contracts, served at /openapi.yaml and /asyncapi.yaml.
var (
	//go:embed openapi.yaml
	openapiYAML []byte
	//go:embed asyncapi.yaml
	asyncapiYAML []byte
)

// Topic names of the Kafka contract and the consumer group (before
// KAFKA_TOPIC_PREFIX).
const (
	topicPayOrder       = "pay-order"
	topicPaymentResults = "payment-results"
	topicPaymentDLQ     = "payment-results.dlq"
	consumerGroup       = "order-service"
)

type config struct {
	HTTPAddr          string
	DatabaseURL       string
	KafkaBrokers      []string
	EmbeddedKafkaAddr string
	EmbeddedKafkaDir  string
	DemoPayments      bool
	TopicPrefix       string
	TopicPartitions   int32
	StartupTimeout    time.Duration
	ShutdownTimeout   time.Duration
	RelayBatchSize    int
	RelayPollInterval time.Duration
	ProduceTimeout    time.Duration
	OutboxRetention   time.Duration
	PurgeInterval     time.Duration
	SessionTimeout    time.Duration
	InstanceID        string
	CreateBatchMax    int
	CreateWriters     int
	PprofAddr         string
	LogLevel          slog.Level
}

func (c config) topic(name string) string { return c.TopicPrefix + name }

// loadConfig reads the environment; every variable has a default that makes
// `go run .` work on a developer machine.
func loadConfig(getenv func(string) string) (config, error) {
	var errs []error
	str := func(key, def string) string {
		if v := strings.TrimSpace(getenv(key)); v != "" {
			return v
		}
		return def
	}
	dur := func(key string, def time.Duration) time.Duration {
		v := str(key, "")
		if v == "" {
			return def
		}
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			errs = append(errs, fmt.Errorf("%s=%q: want a positive duration such as 1s or 500ms", key, v))
		}
		return d
	}
	num := func(key string, def, lo, hi int) int {
		v := str(key, "")
		if v == "" {
			return def
		}
		n, err := strconv.Atoi(v)
		if err != nil || n < lo || n > hi {
			errs = append(errs, fmt.Errorf("%s=%q: want an integer from %d to %d", key, v, lo, hi))
		}
		return n
	}

	c := config{
		HTTPAddr:          str("HTTP_ADDR", ":8081"),
		DatabaseURL:       str("DATABASE_URL", ""),
		EmbeddedKafkaAddr: str("EMBEDDED_KAFKA_ADDR", "127.0.0.1:9092"),
		EmbeddedKafkaDir:  str("EMBEDDED_KAFKA_DIR", ""),
		TopicPrefix:       str("KAFKA_TOPIC_PREFIX", ""),
		TopicPartitions:   int32(num("KAFKA_TOPIC_PARTITIONS", 3, 1, 1000)),
		StartupTimeout:    dur("STARTUP_TIMEOUT", 30*time.Second),
		ShutdownTimeout:   dur("SHUTDOWN_TIMEOUT", 10*time.Second),
		RelayBatchSize:    num("RELAY_BATCH_SIZE", 500, 1, 10000),
		RelayPollInterval: dur("RELAY_POLL_INTERVAL", time.Second),
		ProduceTimeout:    dur("RELAY_PRODUCE_TIMEOUT", 10*time.Second),
		OutboxRetention:   dur("OUTBOX_RETENTION", 24*time.Hour),
		PurgeInterval:     dur("OUTBOX_PURGE_INTERVAL", 30*time.Second),
		SessionTimeout:    dur("KAFKA_SESSION_TIMEOUT", 45*time.Second),
		InstanceID:        str("KAFKA_GROUP_INSTANCE_ID", ""),
		CreateBatchMax:    num("CREATE_BATCH_MAX", 64, 1, 1000),
		CreateWriters:     num("CREATE_WRITERS", 2, 1, 64),
		PprofAddr:         str("PPROF_ADDR", ""),
	}
	for _, b := range strings.Split(str("KAFKA_BROKERS", ""), ",") {
		if b = strings.TrimSpace(b); b != "" {
			c.KafkaBrokers = append(c.KafkaBrokers, b)
		}
	}
	if c.EmbeddedKafkaDir == "" {
		cache, err := os.UserCacheDir()
		if err != nil {
			cache = os.TempDir()
		}
		c.EmbeddedKafkaDir = filepath.Join(cache, "order-service", "kafka")
	}
	switch v := strings.ToLower(str("DEMO_PAYMENTS", "")); v {
	case "":
		c.DemoPayments = len(c.KafkaBrokers) == 0
	case "true", "1", "yes":
		c.DemoPayments = true
	case "false", "0", "no":
	default:
		errs = append(errs, fmt.Errorf("DEMO_PAYMENTS=%q: want true or false", v))
	}
	if err := c.LogLevel.UnmarshalText([]byte(str("LOG_LEVEL", "info"))); err != nil {
		errs = append(errs, fmt.Errorf("LOG_LEVEL: %w", err))
	}
	if err := errors.Join(errs...); err != nil {
		return c, fmt.Errorf("configuration: %w", err)
	}
	return c, nil
}

// run is the whole program; main only adds the OS. Tests call it with their
// own environment and cancel ctx to shut it down.
func run(ctx context.Context, getenv func(string) string, stdout io.Writer) error {
	cfg, err := loadConfig(getenv)
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(stdout, &slog.HandlerOptions{Level: cfg.LogLevel}))

	// stopBy is when shutdown must be over: zero until it begins. The
	// deferred closes wait for nothing past it (closeBefore).
	var stopBy time.Time
	db, err := connectDB(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer closeBefore(&stopBy, db.Close)
	if err := applySchema(ctx, db); err != nil {
		return err
	}

	brokers := cfg.KafkaBrokers
	if len(brokers) == 0 {
		kf, err := startEmbeddedKafka(cfg.EmbeddedKafkaAddr, cfg.EmbeddedKafkaDir)
		if err != nil {
			return fmt.Errorf("%w (is another order-service running? set EMBEDDED_KAFKA_ADDR or KAFKA_BROKERS)", err)
		}
		defer closeBefore(&stopBy, kf.Close)
		brokers = kf.ListenAddrs()
		log.Info("embedded kafka started", "addr", brokers[0], "data_dir", cfg.EmbeddedKafkaDir)
	}

	producer, err := kgo.NewClient(
		kgo.SeedBrokers(brokers...),
		kgo.ClientID("order-service"),
		// acks=all and idempotent writes are kgo's defaults. This lets the
		// relay's deadline fail even in-flight records, so a stalled
		// broker cannot hold outbox row locks forever; the price is a
		// possible duplicate, which at-least-once delivery allows anyway.
		kgo.AllowIdempotentProduceCancellation(),
		// While brokers are unreachable kgo fails a record only after a
		// metadata refresh, and refreshes at most every MetadataMinAge (5s)
		// with backoff up to 2.5s between tries: a 1s RELAY_PRODUCE_TIMEOUT
		// took 4-7s, and a returned cluster was noticed as late. Refreshing
		// at most four times a second and retrying within 250ms costs a few
		// requests a second, only while something is failing.
		kgo.MetadataMinAge(250*time.Millisecond),
		kgo.RetryBackoffFn(func(tries int) time.Duration {
			return jitter(min(250*time.Millisecond, 25*time.Millisecond<<min(tries, 4)))
		}),
	)
	if err != nil {
		return fmt.Errorf("kafka producer: %w", err)
	}
	defer closeBefore(&stopBy, producer.Close)
	// A member that crashed holds its partitions until this timeout; a
	// restarted replica waits that long for them, unless it has a static
	// identity (KIP-345): then it takes its partitions back at once.
	groupOpts := []kgo.Opt{kgo.SessionTimeout(cfg.SessionTimeout)}
	if cfg.InstanceID != "" {
		groupOpts = append(groupOpts, kgo.InstanceID(cfg.InstanceID))
	}
	group, err := newConsumerClient(brokers, cfg.topic(consumerGroup), cfg.topic(topicPaymentResults), log, groupOpts...)
	if err != nil {
		return fmt.Errorf("kafka consumer: %w", err)
	}

	if cfg.PprofAddr != "" {
		// Profiling on its own listener, never on the public mux.
		pprofSrv := &http.Server{Addr: cfg.PprofAddr, Handler: http.DefaultServeMux, ReadHeaderTimeout: 5 * time.Second}
		defer pprofSrv.Close()
		go func() {
			log.Info("pprof listening", "addr", cfg.PprofAddr)
			if err := pprofSrv.ListenAndServe(); !errors.Is(err, http.ErrServerClosed) {
				log.Warn("pprof stopped", "err", err)
			}
		}()
	}
	ln, err := net.Listen("tcp", cfg.HTTPAddr)
	if err != nil {
		group.Close()
		return fmt.Errorf("listen: %w", err)
	}

	m := newMetrics()
	// Workers outlive ctx: they are stopped in order during shutdown.
	workCtx, stopWork := context.WithCancel(context.WithoutCancel(ctx))
	defer stopWork()
	// abortCtx ends when shutdown's budget is nearly spent: work still in
	// flight then is abandoned, which is safe to redo (see shutdown below).
	abortCtx, abort := context.WithCancel(context.WithoutCancel(ctx))
	defer abort()
	var wg sync.WaitGroup
	wg.Go(func() {
		ensureTopics(workCtx, producer, log, cfg.TopicPartitions,
			cfg.topic(topicPayOrder), cfg.topic(topicPaymentResults), cfg.topic(topicPaymentDLQ))
	})
	orders := newOrderWriter(db, cfg.topic(topicPayOrder), cfg.CreateBatchMax, m)
	// Few writers make big batches: while one waits for its commit, the
	// requests arriving meanwhile gather for the next one.
	wg.Go(func() { orders.run(workCtx, cfg.CreateWriters) })
	notes := newNotifier(db, log, outboxChannel, statusChannel)
	wg.Go(func() { notes.run(workCtx) })
	wake, _ := notes.subscribe(outboxChannel, "")
	r := &relay{db: db, kafka: producer, log: log, metrics: m, wake: wake, batchSize: cfg.RelayBatchSize,
		pollInterval: cfg.RelayPollInterval, produceTimeout: cfg.ProduceTimeout,
		retention: cfg.OutboxRetention, purgeInterval: cfg.PurgeInterval}
	wg.Go(func() { r.run(workCtx, abortCtx) })
	c := &consumer{db: db, group: group, producer: producer, dlqTopic: cfg.topic(topicPaymentDLQ), log: log, metrics: m}
	wg.Go(func() { c.run(workCtx, abortCtx) })
	if cfg.DemoPayments {
		log.Info("demo payments on: orders up to the limit are PAID, larger ones FAILED", "limit", demoPaymentLimit)
		wg.Go(func() {
			if err := demoPayments(workCtx, brokers, cfg.topic(topicPayOrder), cfg.topic(topicPaymentResults),
				cfg.topic(consumerGroup)+"-demo-payments", log); err != nil {
				log.Error("demo payments stopped", "err", err)
			}
		})
	}

	// Shutdown waits for requests in flight, but an event stream of a
	// PENDING order could outlast it: streams end when shutdown begins.
	stopStreams := make(chan struct{})
	srv := &http.Server{
		Handler:           newServer(log, db, producer, notes, orders, m, stopStreams),
		ReadHeaderTimeout: 5 * time.Second, // slow-loris clients
		ReadTimeout:       15 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       60 * time.Second,
		MaxHeaderBytes:    64 << 10, // answers 431 past this
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	srv.RegisterOnShutdown(func() { close(stopStreams) })
	log.Info("http server listening", "addr", ln.Addr().String())
	srvErr := make(chan error, 1)
	go func() { srvErr <- srv.Serve(ln) }()

	select {
	case <-ctx.Done():
		err = nil
	case err = <-srvErr:
		err = fmt.Errorf("http server: %w", err)
	}

	// Shutdown order: stop taking requests and finish those in flight;
	// let the relay finish its batch and the consumer commit what it
	// applied; leave the group; flush the producer. All of it within
	// SHUTDOWN_TIMEOUT, whatever the broker or the group do: the last fifth
	// of the budget (at most 2s) is kept for leaving the group, and work
	// still in flight when it begins is abandoned. That is safe to redo:
	// unpublished rows stay in the outbox, uncommitted results are
	// redelivered and change nothing.
	log.Info("shutting down")
	stopBy = time.Now().Add(cfg.ShutdownTimeout)
	sctx, cancel := context.WithDeadline(context.Background(), stopBy)
	defer cancel()
	keep := min(cfg.ShutdownTimeout/5, 2*time.Second)
	defer time.AfterFunc(cfg.ShutdownTimeout-keep, abort).Stop()
	if serr := srv.Shutdown(sctx); serr != nil {
		log.Warn("http shutdown", "err", serr)
	}
	stopWork()
	done := make(chan struct{})
	go func() {
		defer close(done)
		wg.Wait() // the relay's last batch is marked, the consumer's last poll committed
		if lerr := group.LeaveGroupContext(sctx); lerr != nil {
			log.Warn("leave consumer group", "err", lerr)
		}
		group.CloseAllowingRebalance()
		if ferr := producer.Flush(sctx); ferr != nil {
			log.Warn("flush producer", "err", ferr)
		}
	}()
	select {
	case <-done:
		log.Info("stopped")
	case <-sctx.Done():
		log.Error("shutdown budget spent, stopping anyway: unpublished events stay in the outbox, "+
			"uncommitted payment results will be redelivered", "budget", cfg.ShutdownTimeout)
	}
	return err
}

// closeBefore runs f, a deferred close, but waits for it no later than
// *deadline once that is set: shutdown ends within its budget even when a
// close hangs (a pool waiting for a connection an abandoned worker holds).
func closeBefore(deadline *time.Time, f func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	if deadline.IsZero() {
		<-done
		return
	}
	select {
	case <-done:
	case <-time.After(time.Until(*deadline)):
	}
}

// connectDB retries for STARTUP_TIMEOUT, so the service may start before its
// database (as in docker compose), then gives up with the address it tried.
func connectDB(ctx context.Context, cfg config, log *slog.Logger) (*pgxpool.Pool, error) {
	pcfg, err := pgxpool.ParseConfig(cfg.DatabaseURL)
	if err != nil {
		return nil, fmt.Errorf("DATABASE_URL: %w", err)
	}
	if pcfg.ConnConfig.ConnectTimeout == 0 || pcfg.ConnConfig.ConnectTimeout > 3*time.Second {
		// Requests must fail fast while the database is down, not hang.
		pcfg.ConnConfig.ConnectTimeout = 3 * time.Second
	}
	pcfg.ConnConfig.OnPgError = closeReadOnly
	if !strings.Contains(cfg.DatabaseURL, "pool_max_conns") {
		// pgxpool's default is max(4, CPUs): too few for the order
		// writers, the relay, the consumer and reads at once.
		pcfg.MaxConns = 16
	}
	where := fmt.Sprintf("%s:%d/%s", pcfg.ConnConfig.Host, pcfg.ConnConfig.Port, pcfg.ConnConfig.Database)
	db, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return nil, fmt.Errorf("database %s: %w", where, err)
	}
	deadline := time.Now().Add(cfg.StartupTimeout)
	for failures := 1; ; failures++ {
		pctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		err = db.Ping(pctx)
		cancel()
		if err == nil {
			log.Info("database connected", "addr", where)
			return db, nil
		}
		cause := oneLine(err)
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && (strings.HasPrefix(pgErr.Code, "28") || pgErr.Code == "3D000") {
			// A wrong role, password or database name will not fix
			// itself: say so now rather than after the timeout.
			db.Close()
			return nil, fmt.Errorf("database %s refused the connection: %s", where, cause)
		}
		if ctx.Err() != nil || time.Now().After(deadline) {
			db.Close()
			return nil, fmt.Errorf("database %s unreachable after %s: %s", where, cfg.StartupTimeout, cause)
		}
		d := backoff(failures)
		log.Warn("database not reachable yet, retrying", "addr", where, "err", err, "retry_in", d)
		sleep(ctx, d)
	}
}

// oneLine flattens an error for a one-line exit message: pgx lists every
// address it tried on lines of their own.
func oneLine(err error) string {
	var b strings.Builder
	for _, line := range strings.Split(err.Error(), "\n") {
		if line = strings.TrimSpace(line); line == "" {
			continue
		}
		if b.Len() > 0 {
			if strings.HasSuffix(b.String(), ":") {
				b.WriteString(" ")
			} else {
				b.WriteString("; ")
			}
		}
		b.WriteString(line)
	}
	return b.String()
}

// newServer builds the HTTP handler: every route, then the middleware.
func newServer(log *slog.Logger, db *pgxpool.Pool, kafka *kgo.Client, notes *notifier, orders *orderWriter,
	m *metrics, stopStreams <-chan struct{}) http.Handler {
	mux := http.NewServeMux()
	addRoutes(mux, log, db, kafka, notes, orders, m, stopStreams)
	return m.instrument(recoverPanics(log, routeProblems(mux)))
}

// routeProblems answers the mux's own 404 (no route) and 405 (wrong method,
// with its Allow header) as problem+json, like every other error.
func routeProblems(mux *http.ServeMux) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, pattern := mux.Handler(r); pattern == "" {
			w = &problemWriter{ResponseWriter: w, r: r}
		}
		mux.ServeHTTP(w, r)
	})
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
	m *metrics, stopStreams <-chan struct{}) {
	mux.Handle("POST /orders", handleCreateOrder(log, orders, m))
	mux.Handle("GET /orders", handleListOrders(log, db))
	mux.Handle("GET /orders/{id}", handleGetOrder(log, db))
	mux.Handle("GET /orders/{id}/events", handleOrderEvents(log, db, notes, stopStreams))
	mux.Handle("GET /healthz", handleHealthz())
	mux.Handle("GET /readyz", handleReadyz(db, kafka))
	mux.Handle("GET /metrics", handleMetrics(m, func(ctx context.Context) (outboxStats, error) {
		return getOutboxStats(ctx, db)
	}))
	mux.Handle("GET /openapi.yaml", handleFile("application/yaml", openapiYAML))
	mux.Handle("GET /asyncapi.yaml", handleFile("application/yaml", asyncapiYAML))
}

const (
	maxBodyBytes     = 1 << 20
	maxDescription   = 1000
	maxUserID        = 128
	maxIdempotency   = 255
	defaultPageSize  = 50
	maxPageSize      = 500
	requestDBTimeout = 3 * time.Second
)

type createOrderRequest struct {
	Amount      *int64  `json:"amount"`
	Description *string `json:"description"`
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
		req, p := decodeOrderInput(http.MaxBytesReader(w, r.Body, maxBodyBytes))
		if p != nil {
			writeProblem(w, p.Status, p.Detail)
			return
		}
		desc := req.Description

		h := sha256.New()
		binary.Write(h, binary.BigEndian, req.Amount) //nolint:errcheck // hashes never fail
		h.Write([]byte(desc))
		in := newOrder{ID: newUUID(), UserID: userID, Amount: req.Amount, Description: desc,
			IdempotencyKey: idemKey, RequestHash: h.Sum(nil)}

		ctx, cancel := context.WithTimeout(r.Context(), requestDBTimeout)
		defer cancel()
		res, err := orders.create(ctx, in)
		order, created := res.Order, res.Created
		switch {
		case errors.Is(err, errIdempotencyConflict):
			writeProblem(w, http.StatusConflict, "this Idempotency-Key was already used with a different request body")
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
		limit := defaultPageSize
		if v := q.Get("limit"); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > maxPageSize {
				writeProblem(w, http.StatusBadRequest, fmt.Sprintf("limit must be an integer from 1 to %d", maxPageSize))
				return
			}
			limit = n
		}
		after := firstPage
		if v := q.Get("cursor"); v != "" {
			k, err := decodeCursor(v)
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

// handleOrderEvents streams an order's status as Server-Sent Events: the
// current state at once, then each change, ending after PAID or FAILED. The
// change may be applied by any replica: it arrives through the NOTIFY that
// applyPaymentResults sends.
func handleOrderEvents(log *slog.Logger, db *pgxpool.Pool, notes *notifier, stop <-chan struct{}) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		userID, id, ok := requireUserAndOrderID(w, r)
		if !ok {
			return
		}
		// Subscribe before the first read, so that a change committed in
		// between still wakes us.
		changed, unsubscribe := notes.subscribe(statusChannel, id)
		defer unsubscribe()
		read := func() (Order, error) {
			ctx, cancel := context.WithTimeout(r.Context(), requestDBTimeout)
			defer cancel()
			return getOrder(ctx, db, userID, id)
		}
		order, err := read()
		switch {
		case errors.Is(err, errNotFound):
			writeProblem(w, http.StatusNotFound, "no order "+id)
			return
		case err != nil:
			writeDBError(w, r, log, err)
			return
		}

		rc := http.NewResponseController(w)
		_ = rc.SetWriteDeadline(time.Time{}) // the stream outlives the server's WriteTimeout
		w.Header().Set("Content-Type", "text/event-stream")
		w.Header().Set("Cache-Control", "no-cache")
		w.Header().Set("X-Accel-Buffering", "no") // proxies must not buffer the stream
		w.WriteHeader(http.StatusOK)
		keepAlive := time.NewTicker(15 * time.Second)
		defer keepAlive.Stop()
		sent := ""
		for {
			if order.Status != sent {
				b, _ := json.Marshal(order)
				if _, err := fmt.Fprintf(w, "event: status\ndata: %s\n\n", b); err != nil || rc.Flush() != nil {
					return
				}
				sent = order.Status
			}
			if order.Status != "PENDING" {
				return
			}
			select {
			case <-r.Context().Done():
				return
			case <-stop:
				return
			case <-keepAlive.C:
				// A comment line: keeps proxies from timing the stream
				// out and finds clients that are gone.
				if _, err := fmt.Fprint(w, ": keep-alive\n\n"); err != nil || rc.Flush() != nil {
					return
				}
				continue
			case <-changed:
			}
			if order, err = read(); err != nil {
				if r.Context().Err() == nil {
					log.WarnContext(r.Context(), "order events: read failed", "order_id", id, "err", err)
					fmt.Fprint(w, "event: error\ndata: {\"detail\": \"status unavailable; reconnect to resume\"}\n\n")
				}
				return
			}
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
// while the database takes no writes (a failover in progress).
func handleReadyz(db *pgxpool.Pool, kafka *kgo.Client) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		checks := map[string]string{"database": "ok", "kafka": "ok"}
		code := http.StatusOK
		var wg sync.WaitGroup
		var mu sync.Mutex
		check := func(name string, ping func(context.Context) error) {
			if err := ping(ctx); err != nil {
				mu.Lock()
				checks[name], code = "unavailable: "+err.Error(), http.StatusServiceUnavailable
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
	if err != nil {
		return orderInput{}, decodeProblem(err)
	}
	if !utf8.Valid(b) {
		// encoding/json would quietly turn bad bytes into U+FFFD, and the
		// stored description would differ from what the client sent.
		return orderInput{}, badRequest("request body is not valid UTF-8")
	}
	req, err := decodeJSON[createOrderRequest](bytes.NewReader(b))
	if err != nil {
		return orderInput{}, decodeProblem(err)
	}
	switch {
	case req.Amount == nil:
		return orderInput{}, badRequest("amount is required")
	case *req.Amount <= 0:
		return orderInput{}, badRequest("amount must be a positive integer (minor units)")
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
	return orderInput{Amount: *req.Amount, Description: desc}, nil
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

// decodeProblem explains a decoding error in the client's terms.
func decodeProblem(err error) *problem {
	var (
		mbe *http.MaxBytesError
		se  *json.SyntaxError
		te  *json.UnmarshalTypeError
	)
	switch {
	case errors.As(err, &mbe):
		return &problem{Status: http.StatusRequestEntityTooLarge, Detail: fmt.Sprintf("request body is larger than %d bytes", mbe.Limit)}
	case errors.Is(err, io.EOF):
		return badRequest("request body is empty; want a JSON object such as {\"amount\": 1000}")
	case errors.As(err, &se), errors.Is(err, io.ErrUnexpectedEOF):
		return badRequest("request body is not valid JSON: " + err.Error())
	case errors.As(err, &te) && te.Field == "amount":
		return badRequest(fmt.Sprintf("amount must be an integer from 1 to %d (minor units), got %s", int64(1<<63-1), te.Value))
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
		log.WarnContext(r.Context(), "database unavailable", "route", r.Pattern, "err", err)
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

// The cursor is opaque to clients: base64url of "<created_at µs>.<id>".
func encodeCursor(k pageKey) string {
	return base64.RawURLEncoding.EncodeToString([]byte(strconv.FormatInt(k.CreatedAt.UnixMicro(), 10) + "." + k.ID))
}

// minCursorMicros is year 1: no order is older, and PostgreSQL holds it.
var minCursorMicros = time.Date(1, 1, 1, 0, 0, 0, 0, time.UTC).UnixMicro()

func decodeCursor(s string) (pageKey, error) {
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		return pageKey{}, err
	}
	ts, id, ok := strings.Cut(string(b), ".")
	us, err := strconv.ParseInt(ts, 10, 64)
	if !ok || err != nil || !isUUID(id) {
		return pageKey{}, errors.New("malformed cursor")
	}
	if us < minCursorMicros || us > firstPage.CreatedAt.UnixMicro() {
		// Outside PostgreSQL's timestamp range it would fail as 22008.
		return pageKey{}, errors.New("cursor out of range")
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
		addr = ":8081"
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
